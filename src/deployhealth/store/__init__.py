"""The result store: the latest section per family, its history, and the health settings.

Two backends behind one interface: SQLite (embedded, local runs) and DynamoDB (Lambda).
Both keep the same promises, checked by one contract suite (tests/test_store_contract.py):

- `put` never moves "latest" backwards: an older result arriving late only joins history,
  unless the stored latest is dated more than `FUTURE_TOLERANCE_SECONDS` ahead of the
  writer's clock (a clock that ran fast): then any put replaces it, or it would shadow every
  real result until the clock caught up;
- `snapshot` reads every latest section and the dismissed settings in one request;
- `readiness_snapshot` reads the same in one request but only each latest section's summary
  (`model.SectionSummary`: severity, codes, checked time, the run-length record hysteresis
  needs), never the bodies: that is all `/readyz` needs, and its cost does not grow with a
  section's size. A summary is derived from its section by `model.summarize` and written in
  the same statement (item) as the body, so the two never disagree; a latest stored before
  summaries existed is summarised from its body on read;
- history is bounded by a retention (DynamoDB TTL, pruning in SQLite);
- any backend failure surfaces as `StoreUnavailable`, naming the store and never a secret;
- `Snapshot.problem` names a fault the store knows of in its own writes (the last put failed:
  the file locked, the disk full): readiness fails on it rather than on stale results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from deployhealth.model import Section, SectionSummary
from deployhealth.settings import StoreLocation


class StoreUnavailable(RuntimeError):
    """The store could not be read or written."""

    def __init__(self, store: str, problem: str) -> None:
        super().__init__(f"result store {store} is unavailable: {problem}")
        self.store = store
        self.problem = problem


@dataclass(frozen=True)
class Snapshot:
    """Everything readiness and the report read: latest sections and the dismissed ones."""

    latest: dict[str, Section]
    dismissed: tuple[str, ...] | None  # None: never set through the settings API
    # Why the results cannot be trusted to be current although they could be read: the
    # store's last write failed ("" when it did not, or the backend cannot know).
    problem: str = ""


@dataclass(frozen=True)
class ReadinessSnapshot:
    """What `/readyz` reads: the summary of every latest section, and the dismissed ones."""

    summaries: dict[str, SectionSummary]
    dismissed: tuple[str, ...] | None  # None: never set through the settings API
    problem: str = ""  # as Snapshot.problem


class ResultStore(Protocol):
    description: str

    def snapshot(self) -> Snapshot:
        """The latest section of every family and the dismissed sections, in one request."""

    def readiness_snapshot(self) -> ReadinessSnapshot:
        """The summaries of every latest section and the dismissed sections, in one request."""

    def put(self, name: str, section: Section) -> None:
        """Add `section` to the history of `name`, and make it latest unless a newer one is."""

    def latest(self) -> dict[str, Section]:
        """The latest section of every family that has one, in one request."""

    def history(
        self, name: str, *, limit: int = 50, since: datetime | None = None
    ) -> list[Section]:
        """Past sections of one family, newest first: at most `limit`, none before `since`."""

    def dismissed(self) -> tuple[str, ...] | None:
        """The dismissed sections, or None when they were never set."""

    def set_dismissed(self, sections: Sequence[str]) -> bool:
        """Store the dismissed sections; False when they were already exactly these."""

    def close(self) -> None: ...


class LazyStore:
    """A store opened on first use, and opened again on every use until an open succeeds.

    `deployhealth serve` shares one between the scheduler and the API so that a store that
    cannot be opened at start (a garbage file, no permission, a directory in its place) stops
    neither: `/healthz` answers, `/readyz` says 503 naming the store and why, and the first
    use after the repair (the next round, the next request) opens it.
    """

    def __init__(
        self,
        description: str,
        opener: Callable[[], ResultStore],
        describe: Callable[[BaseException], str] | None = None,
    ) -> None:
        self.description = description
        self._opener = opener
        # How an unforeseen failure to open is told (the API's scrubs configured secrets).
        self._describe = describe or (lambda exc: f"{type(exc).__name__}: {exc}")
        self._store: ResultStore | None = None
        self._lock = threading.Lock()

    def open(self) -> ResultStore:
        """The opened store; raises StoreUnavailable (naming the store) while it cannot open.

        Each backend raises StoreUnavailable for what it foresees; anything else opening it is
        still "the store cannot be opened", never a crash of whoever asked.
        """
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is None:
                try:
                    self._store = self._opener()
                except StoreUnavailable:
                    raise
                except Exception as exc:
                    raise StoreUnavailable(self.description, self._describe(exc)) from None
            return self._store

    def snapshot(self) -> Snapshot:
        return self.open().snapshot()

    def readiness_snapshot(self) -> ReadinessSnapshot:
        return self.open().readiness_snapshot()

    def put(self, name: str, section: Section) -> None:
        self.open().put(name, section)

    def latest(self) -> dict[str, Section]:
        return self.open().latest()

    def history(
        self, name: str, *, limit: int = 50, since: datetime | None = None
    ) -> list[Section]:
        return self.open().history(name, limit=limit, since=since)

    def dismissed(self) -> tuple[str, ...] | None:
        return self.open().dismissed()

    def set_dismissed(self, sections: Sequence[str]) -> bool:
        return self.open().set_dismissed(sections)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def open_store_lazily(
    location: StoreLocation,
    deployment: str,
    retention_days: float,
    describe: Callable[[BaseException], str] | None = None,
) -> LazyStore:
    """`open_store` deferred to first use and retried until it succeeds; never raises here."""
    return LazyStore(
        location.describe(), lambda: open_store(location, deployment, retention_days), describe
    )


def open_store(location: StoreLocation, deployment: str, retention_days: float) -> ResultStore:
    if location.kind == "sqlite":
        from deployhealth.store.sqlite import SQLiteStore

        return SQLiteStore(location.path, deployment, retention_days)
    from deployhealth.store.dynamodb import DynamoDBStore

    return DynamoDBStore(
        location.table,
        deployment,
        retention_days,
        region=location.region,
        endpoint_url=location.endpoint_url,
    )
