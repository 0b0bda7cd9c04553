"""A point in monotonic time that every socket timeout of a family run is clipped to."""

from __future__ import annotations

import time
from dataclasses import dataclass


class DeadlineExceeded(TimeoutError):
    """The family's total time ran out before an operation could start."""


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() value

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def timeout(self, cap: float) -> float:
        """The timeout for one operation: its own cap, but never past the deadline.

        Raises DeadlineExceeded when no time is left, so callers never pass a zero or
        negative timeout to a socket (zero means non-blocking, None means forever).
        """
        left = self.remaining()
        if left <= 0.0:
            raise DeadlineExceeded("the family deadline passed")
        return min(cap, left)

    def sooner(self, seconds: float) -> Deadline:
        """A deadline that ends `seconds` from now, or at this one, whichever is first."""
        return Deadline(min(self.at, time.monotonic() + seconds))
