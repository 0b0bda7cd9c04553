"""The local stand-in for EventBridge: runs every family each interval and stores the results.

A round reads the deployment at its start (each family within its first milliseconds)
and reports when its slowest family ends, so a change made while a round is in flight
shows only in the next round. `between_rounds()` is for whoever makes such changes on
purpose (the demo's fault switches): it waits for the round in flight to end, holds the
next one back while the change is made, then starts it at once, so that the first round
to end after the change is also the first to have started after it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

from deployhealth.checks import FAMILIES
from deployhealth.metrics import MetricsSink
from deployhealth.model import Section
from deployhealth.runner import run_and_record
from deployhealth.settings import Settings
from deployhealth.store import ResultStore


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: ResultStore,
        metrics: MetricsSink | None,
        *,
        families: Sequence[str] = FAMILIES,
        on_round: Callable[[dict[str, Section], list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.families = tuple(families)
        self.on_round = on_round
        self.rounds = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends the wait between rounds early
        self._round = threading.Lock()  # held for a whole round, on_round included
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, Section]:
        with self._round:
            # A wake-up asked for before this round started is answered by this round.
            self._wake.clear()
            sections, store_errors = run_and_record(
                self.settings, self.families, self.store, self.metrics
            )
            self.rounds += 1
            if self.on_round is not None:
                self.on_round(sections, store_errors)
        return sections

    @contextlib.contextmanager
    def between_rounds(self) -> Iterator[None]:
        """Wait for the round in flight to end; no round runs inside; the next starts after.

        The round in flight read the deployment before the change and reports what it
        read: it must not pass for the round after the change.
        """
        with self._round:
            yield
            self._wake.set()

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.settings.deadline_for(f) for f in self.families) + 2)

    def _loop(self) -> None:
        interval = self.settings.check_interval_seconds
        while not self._stop.is_set():
            self.run_once()
            if self._stop.is_set():
                break
            # Event.wait, not sleep: stop() and between_rounds() end the wait at once.
            self._wake.wait(interval)
