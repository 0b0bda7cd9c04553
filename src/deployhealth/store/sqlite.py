"""The embedded store: one SQLite file, safe to share between the scheduler and the server.

Faults it recovers from by itself (docs/design.md, "Result store"):

- a write that fails (the file locked by another process, the disk full) is rolled back at
  once, so the connection never stays inside a transaction with an old snapshot: the next
  write after the cause is gone succeeds. Until then `Snapshot.problem` names the fault;
- reads use a connection of their own, so `/readyz` never queues behind a write waiting
  for a lock (in WAL mode a reader does not wait for writers, even another process's);
- the file deleted or replaced under a running process is noticed before every operation
  (the path's device and inode against those opened): the file is opened again (recreated
  if gone), the latest results and dismissed sections this process holds are written back,
  and a warning is logged;
- a file it has no right to read and write (or a directory it may not create the journal in)
  is refused on opening with "no permission ...", rather than opened read-only in silence;
- a full disk fails the write, rolled back; the fault says the file system has no space.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from deployhealth.model import (
    SECTION_NAMES,
    Section,
    SectionSummary,
    moves_latest,
    summarize,
)
from deployhealth.store import ReadinessSnapshot, Snapshot, StoreUnavailable

logger = logging.getLogger(__name__)

# How long a write waits for another process's lock before it fails. Our own writes are
# serialized by a lock in this process and take milliseconds; waiting longer only delays the
# round (each family's put would wait in turn) and the moment the fault is reported.
WRITE_BUSY_TIMEOUT_SECONDS = 1.0
# How long a read waits for a lock. In WAL mode readers are not blocked by writers; this
# only bounds the rare cases that do block (a WAL recovery in progress, a file that another
# process turned back to a rollback journal), so that `/readyz` answers promptly.
READ_BUSY_TIMEOUT_SECONDS = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS latest (
    deployment TEXT NOT NULL,
    section TEXT NOT NULL,
    checked_at REAL NOT NULL,
    -- Before the body: reading a column stored after a body of hundreds of KB walks the
    -- body's overflow pages. (A file migrated by _migrate has it last; it still works.)
    summary TEXT,
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

_T = TypeVar("_T")


class SQLiteStore:
    def __init__(self, path: str, deployment: str, retention_days: float) -> None:
        self.description = f"sqlite:///{path}"
        self._path = path
        self._in_memory = path == ":memory:"
        self._deployment = deployment
        self._retention_s = retention_days * 86400.0
        # Lock order: _write_lock before _read_lock (only reopening takes both).
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        # What this process holds of the store, to write back into a recreated file.
        # As stored JSON text, not Section objects: a 5,000-proxy section is a few hundred
        # thousand objects that the garbage collector would walk on every full collection
        # of a process that also answers /readyz (`serve`).
        self._held_latest: dict[str, tuple[float, str]] = {}  # name: (checked_at, body)
        self._held_dismissed: str | None = None
        self._fault = ""  # why the last write failed; "" once one succeeds
        self._broken = False  # the connections must be opened again before use
        self._writer, self._reader, self._identity = self._connect()

    # --- the ResultStore protocol ---------------------------------------------------

    def put(self, name: str, section: Section) -> None:
        body = json.dumps(section.to_stored())

        def work(db: sqlite3.Connection) -> None:
            # Held under the write lock, and before the commit: a result this process made
            # is written back into a recreated file even if this put failed.
            self._hold(name, section.checked_at.timestamp(), body)
            now = time.time()
            db.execute(
                "INSERT INTO history (deployment, section, checked_at, body) VALUES (?, ?, ?, ?)",
                (self._deployment, name, section.checked_at.timestamp(), body),
            )
            self._put_latest(db, name, section, body, now)
            # Retention, one index range per section: (deployment, section, checked_at) finds
            # the expired rows of each directly. Without `section` the delete walked every
            # stored row of the deployment on every put (17 ms at 100k rows). The known
            # sections are all pruned, as before, so one that stopped reporting still expires.
            names = dict.fromkeys((name, *SECTION_NAMES))
            marks = ", ".join("?" * len(names))
            db.execute(
                f"DELETE FROM history WHERE deployment = ? AND section IN ({marks})"
                " AND checked_at < ?",
                (self._deployment, *names, now - self._retention_s),
            )

        self._write(work)

    def readiness_snapshot(self) -> ReadinessSnapshot:
        # One statement, so one implicit read transaction: the same view of the file for the
        # summaries and the dismissed setting. Bodies are read only for rows stored before
        # summaries existed (summary NULL), to summarise them here.
        rows = self._read(
            lambda db: db.execute(
                """SELECT section, summary, CASE WHEN summary IS NULL THEN body END
                   FROM latest WHERE deployment = ?
                   UNION ALL
                   SELECT NULL, value, NULL FROM settings
                   WHERE deployment = ? AND key = 'dismissed'""",
                (self._deployment, self._deployment),
            ).fetchall()
        )
        summaries: dict[str, SectionSummary] = {}
        dismissed: tuple[str, ...] | None = None
        for name, summary, body in rows:
            if name is None:
                dismissed = tuple(json.loads(summary))
            else:
                summaries[name] = _summary_of(name, summary, body)
        return ReadinessSnapshot(summaries, dismissed, self._write_problem())

    def snapshot(self) -> Snapshot:
        def work(db: sqlite3.Connection) -> tuple[list[tuple[str, str]], tuple[str] | None]:
            # Two statements in one read transaction: the same view of the file for both.
            db.execute("BEGIN")
            rows = db.execute(
                "SELECT section, body FROM latest WHERE deployment = ?", (self._deployment,)
            ).fetchall()
            setting = db.execute(
                "SELECT value FROM settings WHERE deployment = ? AND key = 'dismissed'",
                (self._deployment,),
            ).fetchone()
            db.execute("COMMIT")
            return rows, setting

        rows, setting = self._read(work)
        latest = {name: Section.from_stored(json.loads(body)) for name, body in rows}
        for name, body in rows:
            self._hold(name, latest[name].checked_at.timestamp(), body)
        if setting is not None:
            self._held_dismissed = setting[0]
        dismissed = None if setting is None else tuple(json.loads(setting[0]))
        return Snapshot(latest, dismissed, self._write_problem())

    def latest(self) -> dict[str, Section]:
        return self.snapshot().latest

    def history(
        self, name: str, *, limit: int = 50, since: datetime | None = None
    ) -> list[Section]:
        floor = since.timestamp() if since else float("-inf")
        rows = self._read(
            lambda db: db.execute(
                """SELECT body FROM history WHERE deployment = ? AND section = ?
                   AND checked_at >= ? ORDER BY checked_at DESC LIMIT ?""",
                (self._deployment, name, floor, limit),
            ).fetchall()
        )
        return [Section.from_stored(json.loads(body)) for (body,) in rows]

    def dismissed(self) -> tuple[str, ...] | None:
        row = self._read(
            lambda db: db.execute(
                "SELECT value FROM settings WHERE deployment = ? AND key = 'dismissed'",
                (self._deployment,),
            ).fetchone()
        )
        return None if row is None else tuple(json.loads(row[0]))

    def set_dismissed(self, sections: Sequence[str]) -> bool:
        value = json.dumps(list(sections))

        def work(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT value FROM settings WHERE deployment = ? AND key = 'dismissed'",
                (self._deployment,),
            ).fetchone()
            if row is not None and row[0] == value:
                return False
            self._insert_dismissed(db, value)
            return True

        changed = self._write(work)
        self._held_dismissed = value
        return changed

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._close_connections()

    def _write_problem(self) -> str:
        """`Snapshot.problem`: the last write's failure, "" once a write succeeds."""
        fault = self._fault
        return f"results cannot be stored: {fault}" if fault else ""

    def _hold(self, name: str, stamp: float, body: str) -> None:
        held = self._held_latest.get(name)
        if held is None or moves_latest(stamp, held[0], time.time()):
            self._held_latest[name] = (stamp, body)

    # --- statements -----------------------------------------------------------------

    def _put_latest(
        self, db: sqlite3.Connection, name: str, section: Section, body: str, now: float
    ) -> None:
        """Make `section` latest if it moves latest forward, with its summary, in one statement.

        Read and written inside the caller's write transaction (BEGIN IMMEDIATE holds the
        file's write lock), so no other writer can slip in between and lose a result from
        the summary's runs.
        """
        stamp = section.checked_at.timestamp()
        row = db.execute(
            """SELECT checked_at, summary, CASE WHEN summary IS NULL THEN body END
               FROM latest WHERE deployment = ? AND section = ?""",
            (self._deployment, name),
        ).fetchone()
        if row is not None and not moves_latest(stamp, row[0], now):
            return  # a newer result is latest: this late one only joins history
        previous = None if row is None else _summary_of(name, row[1], row[2])
        summary = summarize(name, section, previous, now=now).to_stored()
        db.execute(
            """INSERT INTO latest (deployment, section, checked_at, body, summary)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (deployment, section) DO UPDATE
               SET checked_at = excluded.checked_at, body = excluded.body,
                   summary = excluded.summary""",
            (self._deployment, name, stamp, body, summary),
        )

    def _insert_dismissed(self, db: sqlite3.Connection, value: str) -> None:
        db.execute(
            """INSERT INTO settings (deployment, key, value) VALUES (?, 'dismissed', ?)
               ON CONFLICT (deployment, key) DO UPDATE SET value = excluded.value""",
            (self._deployment, value),
        )

    # --- connections, transactions, recovery ----------------------------------------

    def _connect(self) -> tuple[sqlite3.Connection, sqlite3.Connection, tuple[int, int]]:
        """Open the writer and the reader; StoreUnavailable naming the problem otherwise."""
        opened: list[sqlite3.Connection] = []
        try:
            if self._in_memory:
                # One connection: a second ":memory:" connection would be another database.
                db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                db.executescript(_SCHEMA)
                _migrate(db)
                return db, db, (0, 0)
            path = Path(self._path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise StoreUnavailable(self.description, "it is a directory, not a database file")
            # Asked before SQLite: it opens a file it may only read without a word (every
            # write fails later) and says only "unable to open" for one it may not read.
            denied = self._access_problem()
            if denied:
                raise StoreUnavailable(self.description, denied)
            # isolation_level=None: no implicit transactions; every write is one explicit
            # BEGIN IMMEDIATE ... COMMIT, rolled back on any error (see _write).
            writer = sqlite3.connect(
                self._path, check_same_thread=False, timeout=WRITE_BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
            )
            opened.append(writer)
            writer.execute("PRAGMA journal_mode=WAL")
            writer.executescript(_SCHEMA)
            _migrate(writer)
            reader = sqlite3.connect(
                self._path, check_same_thread=False, timeout=READ_BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
            )
            opened.append(reader)
            stat = os.stat(self._path)
            return writer, reader, (stat.st_dev, stat.st_ino)
        except (sqlite3.Error, OSError) as exc:
            # OSError: the parent directory cannot be made (a file stands there, no rights).
            for db in opened:
                db.close()
            raise StoreUnavailable(self.description, _problem(exc)) from None

    def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._write_lock:
            try:
                self._ensure_current()
            except StoreUnavailable as exc:
                self._fault = exc.problem
                raise
            db = self._writer
            try:
                db.execute("BEGIN IMMEDIATE")
                result = work(db)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._fault = self._with_space(_problem(exc))
                self._roll_back(db)
                raise StoreUnavailable(self.description, self._fault) from None
            self._fault = ""
            return result

    def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._broken or self._file_changed():
            with self._write_lock:
                self._ensure_current()
        with self._read_lock:
            db = self._reader
            try:
                return work(db)
            except sqlite3.Error as exc:
                self._roll_back(db)
                raise StoreUnavailable(self.description, _problem(exc)) from None

    def _roll_back(self, db: sqlite3.Connection) -> None:
        """Leave no transaction open: its old snapshot would hide every later write."""
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            # The connection is in a state we cannot trust: open it again before next use.
            self._broken = True

    def _file_changed(self) -> str:
        """How the file at the path differs from the one open: "" when it is the same."""
        if self._in_memory:
            return ""
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            return "was deleted"
        except OSError:
            return ""  # cannot tell: the next statement reports what is wrong
        if (stat.st_dev, stat.st_ino) != self._identity:
            return "was replaced by another file"
        return ""

    def _ensure_current(self) -> None:
        """Reopen if the connections are unusable or the file is not the one open.

        The caller holds the write lock.
        """
        why = "could not be used" if self._broken else self._file_changed()
        if not why:
            return
        with self._read_lock:
            self._broken = True
            self._close_connections()
            if not os.path.exists(self._path):
                # The deleted file's WAL and shared memory would be replayed into the new file.
                for suffix in ("-wal", "-shm"):
                    try:
                        Path(self._path + suffix).unlink(missing_ok=True)
                    except OSError as exc:
                        raise StoreUnavailable(self.description, _problem(exc)) from None
            self._writer, self._reader, self._identity = self._connect()
            rewritten = self._write_back()
            self._broken = False
        logger.warning(
            "result store %s: the file %s while in use; opened it again and wrote back the "
            "%d latest results this process held",
            self.description, why, rewritten,
        )

    def _write_back(self) -> int:
        db = self._writer
        try:
            db.execute("BEGIN IMMEDIATE")
            now = time.time()
            for name, (_, body) in self._held_latest.items():
                section = Section.from_stored(json.loads(body))
                # The runs start again from here in a recreated file (it has no previous).
                self._put_latest(db, name, section, body, now)
            if self._held_dismissed is not None:
                self._insert_dismissed(db, self._held_dismissed)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._roll_back(db)
            raise StoreUnavailable(self.description, _problem(exc)) from None
        return len(self._held_latest)

    def _with_space(self, problem: str) -> str:
        """`problem`, saying so when the file system is full: SQLite's "database or disk is
        full" leaves the operator to guess which, and "disk I/O error" does not say it."""
        if self._in_memory:
            return problem
        directory = os.path.dirname(os.path.abspath(self._path))
        try:
            full = os.statvfs(directory).f_bavail == 0
        except OSError:
            return problem
        return f"{problem}: no space left on the file system of {directory}" if full else problem

    def _access_problem(self) -> str:
        """Why this process cannot read and write the file, its journal or its directory.

        Only checked on opening: rights taken away later do not touch the descriptors open.
        """
        for path in (self._path, self._path + "-wal", self._path + "-shm"):
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # SQLite creates it, if the directory lets it (checked below)
            except PermissionError:
                return f"no permission to read and write {path} (uid {os.geteuid()})"
            except OSError as exc:
                return f"cannot open {path}: {exc.strerror}"
            os.close(fd)
        directory = os.path.dirname(os.path.abspath(self._path))
        # effective_ids: the rights this process has, not its real user's.
        if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
            return f"no permission to create files in {directory} (uid {os.geteuid()})"
        return ""

    def _close_connections(self) -> None:
        for db in {id(c): c for c in (self._writer, self._reader)}.values():
            with contextlib.suppress(sqlite3.Error):
                db.close()


def _summary_of(name: str, summary: str | None, body: str | None) -> SectionSummary:
    """A stored summary, or one made from the body of a row stored before summaries."""
    if summary is not None:
        return SectionSummary.from_stored(summary)
    assert body is not None  # the statements read the body exactly when summary is NULL
    return summarize(name, Section.from_stored(json.loads(body)))


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file written by an older release up to the schema (idempotent)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(latest)")}
    if "summary" not in columns:
        # NULL in the old rows: they are summarised from their body until replaced.
        try:
            db.execute("ALTER TABLE latest ADD COLUMN summary TEXT")
        except sqlite3.OperationalError as exc:
            # Another process opening the same old file added it first.
            if "duplicate column" not in str(exc):
                raise


def _problem(exc: BaseException) -> str:
    if isinstance(exc, StoreUnavailable):
        return exc.problem
    return str(exc) or type(exc).__name__
