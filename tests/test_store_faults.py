"""The store under real faults: another process's lock, a deleted or garbage file, a full
disk, a clock that ran fast. Each fault is made for real (a second process, the file system);
what is checked is what a user sees: the store's answers and `deployhealth serve`'s HTTP API.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from support.serve import ServeProcess, readyz

from deployhealth import readiness
from deployhealth.model import FUTURE_TOLERANCE_SECONDS, Finding, Section, Severity
from deployhealth.settings import Settings
from deployhealth.store import ResultStore, StoreUnavailable
from deployhealth.store.sqlite import SQLiteStore

NOBODY = 65534


def section(checked_at: datetime, severity: Severity = Severity.OK, **details: object) -> Section:
    failing = severity is Severity.ERROR
    errors = [Finding("EDB01", "cannot connect", Severity.ERROR)] if failing else []
    return Section(
        severity=severity, errors=errors, healthy=not failing, checked_at=checked_at,
        details=dict(details),
    )


def now() -> datetime:
    return datetime.now(UTC)


class LockHolder:
    """Another process holding `BEGIN EXCLUSIVE` on the file, and writing inside it, until
    `release()`: what a second writer (a backup tool, a sqlite3 shell) does."""

    SCRIPT = textwrap.dedent(
        """
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1], isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        # A write inside the lock: a reader left on an old snapshot would never see past it.
        db.execute(
            "INSERT INTO settings (deployment, key, value) VALUES ('someone-else', 'k', 'v')"
        )
        print("locked", flush=True)
        sys.stdin.readline()
        db.execute("COMMIT")
        print("released", flush=True)
        """
    )

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "locked\n"

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "released\n"
        assert self.proc.wait(timeout=10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "results.db"), "coder", 7)
    yield store
    store.close()


# --- a lock held by another process ---------------------------------------------------


def test_a_put_failing_on_another_process_lock_does_not_jam_the_store(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    before = section(now() - timedelta(seconds=30), which="before")
    sqlite_store.put("database", before)

    holder = LockHolder(tmp_path / "results.db")
    try:
        with pytest.raises(StoreUnavailable) as failed:
            sqlite_store.put("database", section(now() - timedelta(seconds=20), which="locked"))
        assert failed.value.store == f"sqlite:///{tmp_path / 'results.db'}"
        assert "locked" in failed.value.problem
        # The store can still be read, and says why its results are not current.
        during = sqlite_store.snapshot()
        assert during.latest["database"].details["which"] == "before"
        assert "locked" in during.problem
    finally:
        holder.release()

    sqlite_store.put("database", section(now() - timedelta(seconds=10), which="after"))
    sqlite_store.put("websocket", section(now(), which="after"))
    snapshot = sqlite_store.snapshot()
    assert snapshot.problem == ""
    assert snapshot.latest["database"].details["which"] == "after"
    assert snapshot.latest["websocket"].details["which"] == "after"
    # History is not frozen and nothing stored before the lock is lost.
    assert [s.details["which"] for s in sqlite_store.history("database")] == ["after", "before"]
    assert sqlite_store.set_dismissed(["websocket"]) is True
    # What another process reads from the file: every write landed in it.
    other = SQLiteStore(str(tmp_path / "results.db"), "coder", 7)
    try:
        assert other.snapshot().latest["database"].details["which"] == "after"
        assert other.dismissed() == ("websocket",)
    finally:
        other.close()


# --- a clock that ran fast --------------------------------------------------------------


def test_a_result_dated_an_hour_ahead_never_passes_and_real_results_take_over(
    store: ResultStore,
) -> None:
    settings = Settings(gating_sections=("database",))
    ahead = section(now() + timedelta(hours=1), which="ahead")
    store.put("database", ahead)

    verdict = readiness.evaluate(settings, store.latest(), ["database"])
    assert not verdict.ready
    assert verdict.checks[0].reason.startswith("dated in the future: last result 3600 s ahead")

    # The clock was corrected: real results, failing then passing, are what readiness follows.
    store.put("database", section(now() - timedelta(seconds=2), Severity.ERROR, which="real"))
    verdict = readiness.evaluate(settings, store.latest(), ["database"])
    assert verdict.text(verbose=False).splitlines()[0] == "[-]database failed: EDB01"

    store.put("database", section(now(), which="real-ok"))
    assert store.latest()["database"].details["which"] == "real-ok"
    assert readiness.evaluate(settings, store.latest(), ["database"]).ready


def test_a_result_within_the_clock_tolerance_is_judged_normally() -> None:
    settings = Settings(gating_sections=("database",))
    slightly_ahead = section(now() + timedelta(seconds=FUTURE_TOLERANCE_SECONDS / 2))
    assert readiness.evaluate(settings, {"database": slightly_ahead}, ["database"]).ready


def test_hysteresis_does_not_replay_results_dated_in_the_future(store: ResultStore) -> None:
    settings = Settings(gating_sections=("database",), ready_recover_after=2)
    for hours in (2, 1):
        store.put("database", section(now() + timedelta(hours=hours)))
    store.put("database", section(now() - timedelta(seconds=1), Severity.ERROR))

    def history(name: str) -> list[Section]:
        return store.history(name)

    verdict = readiness.evaluate(settings, store.latest(), ["database"], history=history)
    assert verdict.checks[0].reason == "EDB01"


# --- the file deleted while in use ------------------------------------------------------


def test_the_file_deleted_under_the_store_is_recreated_with_what_it_held(
    sqlite_store: SQLiteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "results.db"
    sqlite_store.put("database", section(now() - timedelta(seconds=5), which="held"))
    sqlite_store.set_dismissed(["derp"])
    for name in ("results.db", "results.db-wal", "results.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)

    snapshot = sqlite_store.snapshot()
    assert snapshot.latest["database"].details["which"] == "held"
    assert snapshot.dismissed == ("derp",)
    assert "results.db: the file was deleted" in caplog.text
    sqlite_store.put("websocket", section(now(), which="after"))

    # A later process (the restart) finds both in the file.
    reopened = SQLiteStore(str(path), "coder", 7)
    try:
        latest = reopened.latest()
        assert latest["database"].details["which"] == "held"
        assert latest["websocket"].details["which"] == "after"
        assert reopened.dismissed() == ("derp",)
    finally:
        reopened.close()


# --- a full disk --------------------------------------------------------------------------


DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import os, resource, signal, sys
    from datetime import UTC, datetime, timedelta
    from deployhealth.model import Section, Severity
    from deployhealth.store import StoreUnavailable
    from deployhealth.store.sqlite import SQLiteStore

    path = sys.argv[1]
    store = SQLiteStore(path, "coder", 7)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    def result(seconds, **details):
        return Section(Severity.OK, checked_at=t0 + timedelta(seconds=seconds), details=details)

    store.put("database", result(0, which="before"))
    # No file of this process may grow past its present size: the disk is "full".
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    size = max(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    big = {"which": "big", "blob": "x" * 200_000}
    try:
        store.put("database", result(10, **big))
        print("stored although the disk was full")
    except StoreUnavailable as exc:
        print("failed:", exc)
        print("problem:", store.snapshot().problem)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    store.put("database", result(20, which="after"))
    snapshot = store.snapshot()
    which = snapshot.latest["database"].details["which"]
    print("latest:", which, "problem:", repr(snapshot.problem))
    print("history:", [s.details["which"] for s in store.history("database")])
    """
)


def test_a_full_disk_fails_the_write_names_it_and_the_store_recovers(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"failed: result store sqlite:///{path} is unavailable: ")
    assert lines[1].startswith("problem: results cannot be stored: ")
    assert lines[2:] == ["latest: after problem: ''", "history: ['after', 'before']"]


# --- `deployhealth serve` under store faults ---------------------------------------------


@pytest.mark.parametrize("fault", ["garbage", "directory"])
def test_serve_starts_whatever_the_store_and_recovers_when_it_is_repaired(
    healthy_env, tmp_path, fault
):
    path = tmp_path / "results.db"
    if fault == "garbage":
        path.write_bytes(b"this is not a database\n" * 100)
        problem = "file is not a database"
    else:
        path.mkdir()
        problem = "it is a directory, not a database file"
    env = {**healthy_env, "DEPLOYHEALTH_STORE": f"sqlite:///{path}"}
    server = ServeProcess.on_free_port(env, tmp_path)
    base = server.base
    try:
        server.wait_for("deployhealth serving")
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        down = readyz(base)
        assert down.status_code == 503
        assert f"result store sqlite:///{path} is unavailable: {problem}" in down.text
        server.wait_for("round:")

        if fault == "garbage":
            path.unlink()
        else:
            shutil.rmtree(path)
        # The round after the repair opens the store and stores its results.
        server.next_round_started_after_now()
        up = readyz(base)
        assert up.status_code == 200, up.text
    finally:
        assert server.stop() == 0


def test_serve_names_a_lock_held_elsewhere_without_waiting_for_it(healthy_env, tmp_path):
    path = tmp_path / "results.db"
    env = {**healthy_env, "DEPLOYHEALTH_STORE": f"sqlite:///{path}"}
    server = ServeProcess.on_free_port(env, tmp_path)
    base = server.base
    holder: LockHolder | None = None
    try:
        server.wait_for("round:")
        assert readyz(base).status_code == 200
        holder = LockHolder(path)
        server.wait_for("store: result store")  # a put of this round failed on the lock
        # Answered while the other process still holds the lock: /readyz did not wait on it.
        down = readyz(base)
        assert holder.proc.poll() is None
        assert down.status_code == 503
        assert f"result store sqlite:///{path} is unavailable" in down.text
        assert "locked" in down.text
        holder.release()
        holder = None
        server.next_round_started_after_now()
        assert readyz(base).status_code == 200
    finally:
        if holder is not None:
            holder.kill()
        assert server.stop() == 0


def test_serve_recreates_a_deleted_store_file_and_loses_nothing(healthy_env, tmp_path):
    path = tmp_path / "results.db"
    env = {**healthy_env, "DEPLOYHEALTH_STORE": f"sqlite:///{path}"}
    server = ServeProcess.on_free_port(env, tmp_path)
    base = server.base
    try:
        server.wait_for("round:")
        deleted_at = now()
        for name in ("results.db", "results.db-wal", "results.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        # The next read notices: the file is back, with the results this process held.
        assert readyz(base).status_code == 200
        assert path.is_file()
        server.wait_for(f"result store sqlite:///{path}: the file was deleted")
        server.next_round_started_after_now()
    finally:
        assert server.stop() == 0

    # After the restart (a new process reading the file), every family's latest result is
    # one stored after the deletion: nothing written since is gone.
    store = SQLiteStore(str(path), "cli-test", 7)
    try:
        latest = store.latest()
        assert latest, "nothing in the recreated file"
        assert all(s.checked_at > deleted_at for s in latest.values())
        assert len(store.history("access_url")) >= 2  # written back, then the next rounds
    finally:
        store.close()


# --- `deployhealth serve` on a disk that fills up, on a file it may not open --------------


def stored_stamps(path: Path, name: str) -> list[datetime]:
    """The `checked_at` of every stored result of `name`, read by another process (this one)."""
    store = SQLiteStore(str(path), "cli-test", 7)
    try:
        return [s.checked_at for s in store.history(name, limit=10_000)]
    finally:
        store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs), mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; CI runs as root, so it runs there")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mountpoint)],
        check=True, capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the file system refuses another byte; returns it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        chunk = b"\0" * 65536
        while chunk:
            try:
                out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk = chunk[: len(chunk) // 2]
    assert shutil.disk_usage(disk).free == 0
    return filler


def test_serve_on_a_full_disk_names_it_loses_nothing_and_recovers(
    healthy_env, tmp_path, small_disk
):
    path = small_disk / "results.db"
    env = {**healthy_env, "DEPLOYHEALTH_STORE": f"sqlite:///{path}"}
    server = ServeProcess.on_free_port(env, tmp_path)
    base = server.base
    try:
        server.wait_for("round:")
        assert readyz(base).status_code == 200
        before = stored_stamps(path, "access_url")
        assert before

        filler = fill(small_disk)
        # The first round that cannot write says so on stderr, naming the store.
        warning = server.wait_for("store: result store")
        assert f"sqlite:///{path} is unavailable: " in warning
        assert f"disk is full: no space left on the file system of {small_disk}" in warning
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        down = readyz(base)
        assert down.status_code == 503
        assert f"result store sqlite:///{path} is unavailable: " in down.text
        assert f"no space left on the file system of {small_disk}" in down.text

        filler.unlink()
        server.next_round_started_after_now()
        up = readyz(base)
        assert up.status_code == 200, up.text
    finally:
        assert server.stop() == 0

    after = stored_stamps(path, "access_url")
    # Nothing stored before the disk filled is lost, and the rounds after it were stored.
    assert set(before) <= set(after)
    assert max(after) > max(before)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
@pytest.mark.parametrize("mode", [0o600, 0o644], ids=["unreadable", "read-only"])
def test_serve_names_a_store_file_it_has_no_permission_for_and_recovers(
    healthy_env, tmp_path, mode
):
    """The store file belongs to another user (mode 0600: `serve` may not open it; 0644: it
    may only read it), then is given to the user `serve` runs as.

    `serve` runs as root *without capabilities* (setpriv drops them all, as a container with
    `capabilities: drop: [ALL]` does): the kernel then checks file permissions as for any
    user. An unprivileged uid (nobody) is not used because it could not start the test's
    interpreter where the virtualenv links to a Python under /root (mode 0700).
    """
    if os.geteuid() != 0:
        pytest.skip("giving the store file to another user needs root; CI runs as root")
    path = tmp_path / "results.db"
    earlier = section(now() - timedelta(minutes=10), which="earlier")
    store = SQLiteStore(str(path), "cli-test", 7)
    store.put("access_url", earlier)
    store.close()
    os.chown(path, NOBODY, NOBODY)
    path.chmod(mode)

    env = {**healthy_env, "DEPLOYHEALTH_STORE": f"sqlite:///{path}"}
    without_rights = ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--")
    server = ServeProcess.on_free_port(env, tmp_path, prefix=without_rights)
    base = server.base
    try:
        server.wait_for("deployhealth serving")
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        down = readyz(base)
        assert down.status_code == 503
        assert f"result store sqlite:///{path} is unavailable: " in down.text
        assert f"no permission to read and write {path}" in down.text
        server.wait_for("round:")

        os.chown(path, 0, 0)
        server.next_round_started_after_now()
        up = readyz(base)
        assert up.status_code == 200, up.text
    finally:
        assert server.stop() == 0

    # What was in the file before is still there, under the rounds stored since.
    history = SQLiteStore(str(path), "cli-test", 7)
    try:
        stored = history.history("access_url", limit=1000)
        assert stored[-1].details == {"which": "earlier"}
        assert len(stored) >= 2
    finally:
        history.close()
