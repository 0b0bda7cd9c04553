"""What `deployhealth serve` and `demo` write to their terminal: timestamped log lines.

A terminal left open for hours must say what changed and when, not repeat the same verdict
every interval. So the `round:` line is written only when a round's verdict (each section's
severity and codes) differs from the last one written; between changes, a `heartbeat:`
line every `heartbeat_seconds` (300 by default) says rounds are still running and how many
there were. A round that hangs therefore also shows: the heartbeat stops. Store errors are
written when they appear or change, and once when they clear.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

from deployhealth.model import Section

DEFAULT_HEARTBEAT_SECONDS = 300.0

_write_lock = threading.Lock()


def timestamp() -> str:
    """Local time with its UTC offset, to the second: `2025-06-01T14:03:09+02:00`."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def log(message: str, stream: TextIO | None = None) -> None:
    """One line, timestamped, written whole (threads: the scheduler, fault switches)."""
    out = sys.stderr if stream is None else stream
    # A terminal that was closed (EIO) or a reader that went away (EPIPE) must not stop
    # the process midway: it is about to stop in order, and must still clean up.
    with _write_lock, contextlib.suppress(OSError, ValueError):
        out.write(f"{timestamp()} {message}\n")
        out.flush()


def log_block(text: str, stream: TextIO | None = None) -> None:
    """Several lines as they are (a banner), not timestamped, with the same care as `log`."""
    out = sys.stderr if stream is None else stream
    with _write_lock, contextlib.suppress(OSError, ValueError):
        out.write(text if text.endswith("\n") else text + "\n")
        out.flush()


def round_summary(sections: Mapping[str, Section]) -> str:
    """`access_url=ok database=error(EDB01) ...`: what a round's line says."""
    return " ".join(
        f"{name}={s.severity.value}" + (f"({','.join(dict.fromkeys(s.codes))})" if s.codes else "")
        for name, s in sections.items()
    )


@dataclass
class RoundLog:
    """The scheduler's `on_round`: a line when something changed, else a periodic heartbeat.

    `every_round` (serve's and demo's `--verbose`) writes the `round:` line after every
    round, changed or not.
    """

    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    every_round: bool = False
    write: Callable[[str], None] = log
    clock: Callable[[], float] = time.monotonic
    _summary: str | None = None
    _store_errors: tuple[str, ...] = ()
    _quiet_rounds: int = 0
    _changed_at: str = ""
    _last_line: float = field(default=0.0)

    def __call__(self, sections: Mapping[str, Section], store_errors: list[str]) -> None:
        summary = round_summary(sections)
        now = self.clock()
        if self.every_round or summary != self._summary:
            self.write(f"round: {summary}")
            if summary != self._summary:
                self._changed_at = timestamp()
            self._summary = summary
            self._quiet_rounds = 0
            self._last_line = now
        else:
            self._quiet_rounds += 1
            if now - self._last_line >= self.heartbeat_seconds:
                rounds = "round" if self._quiet_rounds == 1 else "rounds"
                self.write(
                    f"heartbeat: {self._quiet_rounds} {rounds} since the last line, "
                    f"unchanged since {self._changed_at}"
                )
                self._quiet_rounds = 0
                self._last_line = now
        errors = tuple(store_errors)
        if errors != self._store_errors or (self.every_round and errors):
            for error in errors:
                self.write(f"store: {error}")
            if not errors:
                self.write("store: writing results again")
            self._store_errors = errors
            self._last_line = now
