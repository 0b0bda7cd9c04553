"""The lifecycle the simulators share: `with service:` starts it and closes it afterwards."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self


class Service(abc.ABC):
    """Runs from `start()` to `close()`; `with` calls both, `close()` whatever happened inside."""

    @abc.abstractmethod
    def start(self) -> Self: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
