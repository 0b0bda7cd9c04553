"""The result store: the latest section per family, its history, and the health settings.

Two backends behind one interface: SQLite (embedded, local runs) and DynamoDB (Lambda).
Both keep the same promises, checked by one contract suite (tests/test_store_contract.py):

- `put` never moves "latest" backwards: an older result arriving late only joins history;
- `snapshot` reads every latest section and the dismissed settings in one request, which is
  all `/readyz` needs;
- history is bounded by a retention (DynamoDB TTL, pruning in SQLite);
- any backend failure surfaces as `StoreUnavailable`, naming the store and never a secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from deployhealth.model import Section
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


class ResultStore(Protocol):
    description: str

    def snapshot(self) -> Snapshot:
        """The latest section of every family and the dismissed sections, in one request."""

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
