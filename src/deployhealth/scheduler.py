"""The local stand-in for EventBridge: runs every family each interval and stores the results."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

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
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, Section]:
        sections, store_errors = run_and_record(
            self.settings, self.families, self.store, self.metrics
        )
        self.rounds += 1
        if self.on_round is not None:
            self.on_round(sections, store_errors)
        return sections

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.settings.deadline_for(f) for f in self.families) + 2)

    def _loop(self) -> None:
        interval = self.settings.check_interval_seconds
        while not self._stop.is_set():
            self.run_once()
            # Event.wait, not sleep: stop() ends the wait at once.
            self._stop.wait(interval)
