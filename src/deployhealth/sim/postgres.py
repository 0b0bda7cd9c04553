"""A real, password-protected PostgreSQL listening on 127.0.0.1.

The server comes from the binaries bundled in the ``pgserver`` wheel, but is driven
directly with initdb/pg_ctl rather than through ``pgserver.get_server``: that helper
only listens on a Unix socket with trust auth, while the checks under test speak
TCP and must see real SCRAM password authentication succeed and fail.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import math
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import pg8000.native

from deployhealth.sim._service import Service
from deployhealth.sim.tcp import LOOPBACK, free_port

__all__ = ["SYSTEM_USER", "LocalPostgres", "PostgresError"]

# Postgres refuses to run as root. This is the account pgserver itself creates for
# the same reason, so the two can share it on one machine.
SYSTEM_USER = "pgserver"

_DEFAULT_SETTINGS: dict[str, str] = {
    # The clusters are throwaway; durability only costs start-up and seeding time.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}

_LOG_NAME = "postgres.log"
_LOG_TAIL_LINES = 40
_PORT_ATTEMPTS = 3
# Extra time subprocess.run allows beyond pg_ctl's own -t, so pg_ctl's clearer
# timeout message wins whenever it can.
_SUBPROCESS_GRACE = 15.0

_install_lock = threading.Lock()
_install_checked = False


class PostgresError(RuntimeError):
    """initdb/pg_ctl failed; the message carries their output and the server log tail."""


def _bin_dir() -> Path:
    """``pgserver._commands.POSTGRES_BIN_PATH``, located without importing pgserver.

    Importing the package builds pgserver's own server machinery at import time
    (platformdirs lookups that warn when XDG_RUNTIME_DIR is unset), none of which
    is used here.
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError(
            "LocalPostgres needs the 'pgserver' package for its PostgreSQL binaries; "
            "install it with: pip install 'deployhealth[local]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _add_mode(path: Path, bits: int) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits != bits:
        path.chmod(mode | bits)


def _allow_traverse(path: Path) -> None:
    """Let other users pass through every ancestor of ``path``.

    Only the search bit is added, never read, so e.g. /root becomes enterable by
    the postgres account without becoming listable.
    """
    for ancestor in path.resolve().parents:
        _add_mode(ancestor, stat.S_IXOTH)


def _make_install_usable() -> None:
    """Make the bundled binaries, libraries and share files usable by SYSTEM_USER.

    Wheels are normally unpacked world-readable, but a root-owned venv under a
    0700 directory (or a restrictive umask at install time) is not, and then
    initdb fails with a confusing "could not find postgres" message.
    """
    global _install_checked
    with _install_lock:
        if _install_checked:
            return
        root = _bin_dir().parent
        _allow_traverse(root)
        for dirpath, _dirnames, filenames in os.walk(root):
            _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
            for name in filenames:
                path = Path(dirpath, name)
                if path.is_symlink():
                    continue
                executable = path.stat().st_mode & stat.S_IXUSR
                _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if executable else 0))
        _install_checked = True


def _ensure_system_user(name: str) -> tuple[int, int]:
    import pwd

    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PostgresError(
            f"running as root, postgres needs an unprivileged account {name!r}, "
            "and there is no useradd to create it"
        )
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/bin/false", name],
        capture_output=True,
        text=True,
        check=False,
    )
    # Look up again rather than trusting the exit code: a parallel test worker may
    # have created the account first, which makes our useradd fail harmlessly.
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PostgresError(
            f"could not create system user {name!r}: {result.stderr.strip()}"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    if path.stat().st_uid == uid:
        return
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.chown(Path(dirpath, name), uid, gid, follow_symlinks=False)


class LocalPostgres(Service):
    """PostgreSQL on 127.0.0.1 with SCRAM password auth, for tests and the demo.

    ``start()`` runs initdb on first use of the data directory, then ``pg_ctl -w
    start``, which returns once the server accepts connections. Without
    ``data_dir`` the cluster lives in a temporary directory removed by
    :meth:`close`. The port is chosen once and kept across :meth:`restart`, so
    anything holding :attr:`url` sees the same endpoint go down and come back.

    When the process runs as root the server runs as :data:`SYSTEM_USER`.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        password: str | None = None,
        user: str = "postgres",
        database: str = "postgres",
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        runtime_parent: Path | None = None,
    ) -> None:
        self.user = user
        self.password = password if password is not None else secrets.token_urlsafe(18)
        self.database = database
        self.host = LOOPBACK
        self.port: int = port if port is not None else free_port()
        # A caller-chosen port, or one that clients have already seen, must never
        # silently change; only a fresh, never-started pick may be retried.
        self._port_fixed = port is not None
        self.settings: dict[str, str] = {**_DEFAULT_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        # Holds the socket and the initdb password file, and the cluster itself when
        # no data_dir is given. Kept short: Unix socket paths are limited to ~107 bytes.
        # `runtime_parent` puts it inside a directory of the caller's (the demo's), so that
        # everything of one run lives, and is removed, under one path.
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="dh-pg-", dir=runtime_parent))
        self.data_dir: Path = (
            self._runtime_dir / "data" if data_dir is None else Path(data_dir).absolute()
        )
        self.socket_dir: Path = self._runtime_dir
        self._lock = threading.RLock()
        self._run_as: tuple[int, int] | None = None
        self._prepared = False
        # Set once this instance has started the cluster. Until then a server found
        # running on data_dir belongs to someone else and must be left alone.
        self._owned = False
        self._bootstrapped = False
        self._closed = False
        atexit.register(self.close)

    # -- endpoints ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.url_with_password(self.password)

    def url_with_password(self, password: str) -> str:
        """The server's URL with another password, for authentication-failure tests."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}?sslmode=disable"
        )

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log yet)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def is_running(self) -> bool:
        """Whether the postmaster recorded in postmaster.pid is alive."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Self:
        """Initialise the cluster if needed and start it; no-op if already running."""
        with self._lock:
            if self._closed:
                raise PostgresError("LocalPostgres is closed")
            if self.is_running:
                if not self._owned:
                    # Someone else's server owns this data_dir; its port and password
                    # are unknown to us, so handing out self.url would be a lie.
                    raise PostgresError(f"a server is already running on {self.data_dir}")
                return self
            self._prepare()
            fresh = not (self.data_dir / "PG_VERSION").exists()
            if fresh:
                self._initdb()
            # Whatever runs on data_dir from here on was started by us, even if pg_ctl
            # gives up waiting, so close() must be allowed to stop it.
            self._owned = True
            for attempt in range(_PORT_ATTEMPTS):
                log_offset = self._log_size()
                try:
                    self._pg_ctl_start()
                    break
                except PostgresError:
                    port_taken = "Address already in use" in self._log_since(log_offset)
                    if self._port_fixed or not port_taken or attempt == _PORT_ATTEMPTS - 1:
                        raise
                    # free_port() lost a race with another process; pick again.
                    self.port = free_port()
            self._port_fixed = True
            if not self._bootstrapped:
                self._bootstrap(fresh)
                self._bootstrapped = True
        return self

    def stop(self) -> None:
        """Fast shutdown: disconnect clients, stop, and wait until the port is closed."""
        with self._lock:
            if not (self._owned and self.is_running):
                return
            self._run(
                self._pg_ctl("-m", "fast", "-w", "-t", self._pg_ctl_timeout(), "stop"),
                "pg_ctl stop",
            )

    def restart(self) -> Self:
        """Stop and start again on the same port."""
        with self._lock:
            self.stop()
            return self.start()

    def close(self) -> None:
        """Stop the server (forcefully if need be) and delete any temporary directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            try:
                self._stop_hard()
            finally:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        # __exit__ does not run when __enter__ raises, so clean up a failed start here.
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    # -- queries ------------------------------------------------------------------

    def connect(
        self,
        password: str | None = None,
        database: str | None = None,
        timeout: float = 10.0,
    ) -> pg8000.native.Connection:
        """Open a pg8000 connection over TCP, authenticating with SCRAM like a real client."""
        return pg8000.native.Connection(
            user=self.user,
            password=self.password if password is None else password,
            host=self.host,
            port=self.port,
            database=self.database if database is None else database,
            timeout=timeout,
        )

    def execute(self, sql: str, **params: Any) -> list[list[Any]]:
        """Run ``sql`` (several ;-separated statements allowed without params) and
        return the rows of the last statement; ``:name`` placeholders take ``params``.
        """
        conn = self.connect()
        try:
            rows = conn.run(sql, **params)
        finally:
            conn.close()
        return [list(row) for row in rows or []]

    # -- internals ----------------------------------------------------------------

    def _prepare(self) -> None:
        if self._prepared:
            return
        if os.geteuid() == 0:
            uid, gid = _ensure_system_user(SYSTEM_USER)
            self._run_as = (uid, gid)
            _make_install_usable()
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _allow_traverse(self.data_dir)
            os.chown(self._runtime_dir, uid, gid)
            _chown_tree(self.data_dir, uid, gid)
        else:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._prepared = True

    def _initdb(self) -> None:
        pwfile = self._runtime_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._run_as is not None:
            os.chown(pwfile, *self._run_as)
        try:
            self._run(
                [
                    str(_bin_dir() / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--encoding=UTF8",
                    # C locale: no dependency on the host's installed locales, and
                    # server messages stay in English for tests that match on them.
                    "--locale=C",
                    # Skipping the final fsync of the new cluster roughly halves initdb time.
                    "--no-sync",
                    "--no-instructions",
                ],
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _pg_ctl_timeout(self) -> str:
        return str(max(1, math.ceil(self.start_timeout)))

    def _pg_ctl(self, *args: str) -> list[str]:
        return [str(_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), *args]

    def _pg_ctl_start(self) -> None:
        server_args = ["-h", self.host, "-p", str(self.port), "-k", str(self.socket_dir)]
        for name, value in self.settings.items():
            server_args += ["-c", f"{name}={value}"]
        self._run(
            self._pg_ctl(
                "-w",
                "-t",
                self._pg_ctl_timeout(),
                "-l",
                str(self.log_path),
                # pg_ctl hands -o to /bin/sh, hence the shell quoting.
                "-o",
                shlex.join(server_args),
                "start",
            ),
            "pg_ctl start",
        )

    def _bootstrap(self, fresh: bool) -> None:
        """Align the role's password and create the database, over the trusted socket.

        initdb already set the password on a fresh cluster; a reused data_dir may have
        been created with another one.
        """
        if fresh and self.database == "postgres":
            return
        conn = pg8000.native.Connection(
            user=self.user,
            unix_sock=str(self.socket_dir / f".s.PGSQL.{self.port}"),
            database="postgres",
            timeout=self.start_timeout,
        )
        try:
            if not fresh:
                # Utility statements cannot take bind parameters, hence literal().
                conn.run(
                    f"ALTER ROLE {pg8000.native.identifier(self.user)} "
                    f"PASSWORD {pg8000.native.literal(self.password)}"
                )
            exists = conn.run("SELECT 1 FROM pg_database WHERE datname = :d", d=self.database)
            if not exists:
                conn.run(f"CREATE DATABASE {pg8000.native.identifier(self.database)}")
        finally:
            conn.close()

    def _stop_hard(self) -> None:
        if not (self._owned and self.is_running):
            return
        # Escalate until something works: clean fast stop, crash-like immediate stop,
        # then SIGKILL, so that no server outlives the test run that started it.
        with contextlib.suppress(PostgresError):
            self.stop()
            return
        with contextlib.suppress(PostgresError):
            self._run(self._pg_ctl("-m", "immediate", "-w", "stop"), "pg_ctl stop -m immediate")
            return
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, signal.SIGKILL)

    def _env(self) -> dict[str, str]:
        # Inherited PGPORT/PGHOST/PGDATA etc. would make the tools disagree with the
        # explicit arguments about which server they are talking to.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _run(self, cmd: list[str], what: str) -> None:
        extra: dict[str, Any] = {}
        if self._run_as is not None:
            uid, gid = self._run_as
            # Drop root's supplementary groups too, not just the uid.
            extra = {"user": uid, "group": gid, "extra_groups": []}
        # Files, not pipes: if anything spawned by pg_ctl inherited a pipe, run() would
        # wait for it to close, i.e. for the server to exit.
        with tempfile.TemporaryFile("w+") as out:
            try:
                result = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._runtime_dir,
                    env=self._env(),
                    timeout=self.start_timeout + _SUBPROCESS_GRACE,
                    check=False,
                    **extra,
                )
            except subprocess.TimeoutExpired:
                raise PostgresError(
                    f"{what} timed out\n--- server log tail ({self.log_path}) ---\n"
                    f"{self.log_tail()}"
                ) from None
            if result.returncode != 0:
                out.seek(0)
                raise PostgresError(
                    f"{what} failed with exit code {result.returncode}\n"
                    f"--- output ---\n{out.read().strip()}\n"
                    f"--- server log tail ({self.log_path}) ---\n{self.log_tail()}"
                )

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
