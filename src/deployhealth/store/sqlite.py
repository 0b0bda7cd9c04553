"""The embedded store: one SQLite file, safe to share between the scheduler and the server."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from deployhealth.model import Section
from deployhealth.store import Snapshot, StoreUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS latest (
    deployment TEXT NOT NULL,
    section TEXT NOT NULL,
    checked_at REAL NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (deployment, section)
);
CREATE TABLE IF NOT EXISTS history (
    deployment TEXT NOT NULL,
    section TEXT NOT NULL,
    checked_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_time ON history (deployment, section, checked_at);
CREATE TABLE IF NOT EXISTS settings (
    deployment TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (deployment, key)
);
"""


class SQLiteStore:
    def __init__(self, path: str, deployment: str, retention_days: float) -> None:
        self.description = f"sqlite:///{path}"
        self._deployment = deployment
        self._retention_s = retention_days * 86400.0
        self._lock = threading.Lock()
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # One connection guarded by a lock: the scheduler thread writes while the HTTP
            # server's threads read; WAL lets a second process (deployhealth check) read too.
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            # OSError: the parent directory cannot be made (a file stands there, no rights).
            raise StoreUnavailable(self.description, str(exc)) from None

    def put(self, name: str, section: Section) -> None:
        stamp = section.checked_at.timestamp()
        body = json.dumps(section.to_stored())
        with self._guard():
            self._db.execute(
                "INSERT INTO history (deployment, section, checked_at, body) VALUES (?, ?, ?, ?)",
                (self._deployment, name, stamp, body),
            )
            self._db.execute(
                """INSERT INTO latest (deployment, section, checked_at, body) VALUES (?, ?, ?, ?)
                   ON CONFLICT (deployment, section) DO UPDATE
                   SET checked_at = excluded.checked_at, body = excluded.body
                   WHERE excluded.checked_at > latest.checked_at""",
                (self._deployment, name, stamp, body),
            )
            self._db.execute(
                "DELETE FROM history WHERE deployment = ? AND checked_at < ?",
                (self._deployment, time.time() - self._retention_s),
            )
            self._db.commit()

    def snapshot(self) -> Snapshot:
        # Two statements in one transaction: the same view of the file for both.
        with self._guard():
            rows = self._db.execute(
                "SELECT section, body FROM latest WHERE deployment = ?", (self._deployment,)
            ).fetchall()
            setting = self._db.execute(
                "SELECT value FROM settings WHERE deployment = ? AND key = 'dismissed'",
                (self._deployment,),
            ).fetchone()
        latest = {name: Section.from_stored(json.loads(body)) for name, body in rows}
        return Snapshot(latest, None if setting is None else tuple(json.loads(setting[0])))

    def latest(self) -> dict[str, Section]:
        return self.snapshot().latest

    def history(
        self, name: str, *, limit: int = 50, since: datetime | None = None
    ) -> list[Section]:
        floor = since.timestamp() if since else float("-inf")
        with self._guard():
            rows = self._db.execute(
                """SELECT body FROM history WHERE deployment = ? AND section = ?
                   AND checked_at >= ? ORDER BY checked_at DESC LIMIT ?""",
                (self._deployment, name, floor, limit),
            ).fetchall()
        return [Section.from_stored(json.loads(body)) for (body,) in rows]

    def dismissed(self) -> tuple[str, ...] | None:
        with self._guard():
            row = self._db.execute(
                "SELECT value FROM settings WHERE deployment = ? AND key = 'dismissed'",
                (self._deployment,),
            ).fetchone()
        return None if row is None else tuple(json.loads(row[0]))

    def set_dismissed(self, sections: Sequence[str]) -> bool:
        value = json.dumps(list(sections))
        with self._guard():
            row = self._db.execute(
                "SELECT value FROM settings WHERE deployment = ? AND key = 'dismissed'",
                (self._deployment,),
            ).fetchone()
            if row is not None and row[0] == value:
                return False
            self._db.execute(
                """INSERT INTO settings (deployment, key, value) VALUES (?, 'dismissed', ?)
                   ON CONFLICT (deployment, key) DO UPDATE SET value = excluded.value""",
                (self._deployment, value),
            )
            self._db.commit()
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _guard(self) -> _Guard:
        return _Guard(self._lock, self.description)


class _Guard:
    """Hold the connection lock and turn SQLite errors into StoreUnavailable."""

    def __init__(self, lock: threading.Lock, description: str) -> None:
        self._lock = lock
        self._description = description

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        self._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise StoreUnavailable(self._description, str(exc)) from None
        return False
