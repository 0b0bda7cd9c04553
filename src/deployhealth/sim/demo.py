"""`deployhealth demo`: a simulated deployment on loopback, and deployhealth serving against it.

Everything is real: the access URL is an HTTP server, the database a PostgreSQL reached
through a TCP proxy that can add latency. Faults are switched on the simulation's
`/_sim/faults` endpoint.

A switch waits for the check round in flight, if any, and a fresh round starts as soon as
it is made (`link_faults_to_rounds`). Without that, a round that started before the switch
(and so read the deployment without the fault) ended after it, and its `round:` line and
`/readyz` said "ok" as if they were the round after: with a slow round in flight (a
silent STUN server holds the derp family for its tries), that was one switch in two.

The demo prints `export` lines that point `deployhealth check` and `serve` at the
simulation; it checks its port before starting anything, and PostgreSQL and its temporary
directory go away however it ends (`run_demo`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from deployhealth.console import RoundLog, log
from deployhealth.settings import ENV_PREFIX, Secret, Settings, StoreLocation

if TYPE_CHECKING:
    from deployhealth.scheduler import Scheduler
    from deployhealth.sim.deployment import SimulatedDeployment

# Added to each packet in each direction when the database is "slow": a round trip then
# takes over 2 x 20 ms, well above the default 15 ms threshold.
SLOW_DATABASE_DELAY_SECONDS = 0.02

BANNER = """
deployhealth demo: a simulated Coder deployment is running on loopback.

  simulated deployment   {sim}
  PostgreSQL             127.0.0.1:{pg_port} (through a latency proxy on :{proxy_port})
  deployhealth API       {{api}}
  temporary files        {workdir} (removed when the demo stops)

Try:
  curl '{{api}}/readyz?verbose'
  curl '{{api}}/api/v2/debug/health'
  open {{api}}/health in a browser

Point `deployhealth check` (or `serve --port 8081`) at it from another shell: paste these.
They hold the demo's own throwaway token and database password, made up for this run.
{exports}
  {command} check

Break it (checks run every {interval:g} s; a switch waits for the round in flight, prints
"fault: ...", and starts a new round: the "round:" line after it and /readyz show it):
  curl -X POST '{sim}/_sim/faults?healthz=502'        # load balancer cannot reach Coder
  curl -X POST '{sim}/_sim/faults?healthz=wrong-body' # DNS points at something else
  curl -X POST '{sim}/_sim/faults?healthz=hang'       # server accepts, never answers
  curl -X POST '{sim}/_sim/faults?database=down'      # PostgreSQL stopped
  curl -X POST '{sim}/_sim/faults?database=slow'      # ~40 ms per round trip
  curl -X POST '{sim}/_sim/faults?websocket=refuse'   # a proxy refuses WebSocket upgrades
  curl -X POST '{sim}/_sim/faults?websocket=wrong-echo' # something rewrites WebSocket traffic
  curl -X POST '{sim}/_sim/faults?derp=websocket-only' # a proxy drops Upgrade: DERP: EDERP01
  curl -X POST '{sim}/_sim/faults?derp=down'           # the relay answers 503
  curl -X POST '{sim}/_sim/faults?stun=hard-nat'       # mapping varies by destination: ESTUN02
  curl -X POST '{sim}/_sim/faults?stun=silent'         # UDP 3478 blocked: ESTUN01
  curl -X POST '{sim}/_sim/faults?replicas=two-no-ha'  # two replicas, no HA licence: EENT01
  curl -X POST '{sim}/_sim/faults?provisioners=none'   # no provisioner daemon: EPD01
  curl -X POST '{sim}/_sim/faults?proxy=unreachable'   # a workspace proxy is down: EWP04
  curl -X POST '{sim}/_sim/faults?reset'              # everything healthy again

Ctrl-C stops everything. Below: a "round:" line when the verdict changes, a "heartbeat:"
line every {heartbeat:g} s while it does not.
"""

HOST = "127.0.0.1"
# Exit statuses: 2 as for bad settings (a taken port is one); 128 + n for signal n
# arriving before the demo was serving, as a shell reports a process it ended.
EXIT_CANNOT_START = 2


class _Stopped(BaseException):
    """A stop signal arrived while the demo was still starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def exports(settings: Settings) -> list[str]:
    """`export DEPLOYHEALTH_...=...` lines that give `check` and `serve` these settings.

    Quoted for any POSIX shell (bash, zsh, dash): the database URL holds `?` and `&`.
    The demo's settings are its own made-up ones, so printing its token is the point.
    """
    values = {
        "NAME": settings.name,
        "ACCESS_URL": settings.access_url or "",
        "CODER_TOKEN": settings.coder_token.reveal() if settings.coder_token else "",
        "DATABASE_URL": settings.database_url.reveal() if settings.database_url else "",
        "STUN_SERVERS": ",".join(settings.stun_servers),
    }
    return [f"export {ENV_PREFIX}{key}={shlex.quote(value)}" for key, value in values.items()]


def command_name() -> str:
    """How to run this `deployhealth` from another shell: its name if PATH finds this one."""
    here = Path(sys.executable).parent / "deployhealth"
    found = shutil.which("deployhealth")
    if found and here.exists() and Path(found).resolve() == here.resolve():
        return "deployhealth"
    return shlex.quote(str(here)) if here.exists() else "deployhealth"


def reserve_port(host: str, port: int) -> socket.socket | str:
    """A socket bound to `host:port`, or why it cannot be. Checked before anything starts.

    The socket listens (and accepts nothing) until the API server takes it over: the
    demo's other servers pick free ports meanwhile, and a port that is only bound with
    SO_REUSEADDR can still be handed to another SO_REUSEADDR socket (the simulation's
    listeners are such), a listening one cannot. SO_REUSEADDR as the API server sets it,
    so that a port in TIME_WAIT after a previous run does not count as taken.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
        probe.listen(1)
    except OSError as exc:
        probe.close()
        return exc.strerror or str(exc)
    return probe


def _die_with_parent() -> bool:
    """Have the kernel send us SIGHUP when our parent dies; False if it already has.

    A demo whose parent is gone (the shell or `make` killed) has no terminal left to be
    stopped from; SIGHUP makes it stop in order, as closing the terminal does. Linux only
    (prctl); elsewhere a thread watches the parent's pid.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        # prctl is variadic and reads unsigned longs: plain Python ints would go as 32-bit
        # ints, leaving the upper half of arg2's register to chance (then EINVAL).
        args = [ctypes.c_ulong(v) for v in (int(signal.SIGHUP), 0, 0, 0)]
        if libc.prctl(ctypes.c_int(pr_set_pdeathsig), *args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    else:  # pragma: no cover - not Linux

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGHUP)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    # The parent may have died before prctl: then no signal will ever come.
    return os.getppid() == parent


def link_faults_to_rounds(
    sim: SimulatedDeployment, scheduler: Scheduler, write: Callable[[str], None] | None = None
) -> None:
    """Make every fault switch land between two rounds, and start the next round at once.

    A round reads the deployment in its first milliseconds and ends with its slowest
    family; a switch made in between reaches only the next round. Waiting for the round in
    flight makes the first round to end after the switch the first to see it. With `write`,
    a `fault: name=mode` line is written through it once the switch is made, before that
    round starts: on the demo's terminal, the `round:` line after it is the one that sees it.
    """

    @contextlib.contextmanager
    def guard(changes: dict[str, str]) -> Iterator[None]:
        with scheduler.between_rounds():
            yield
            if write is not None:
                shown = " ".join(f"{name}={mode}" for name, mode in changes.items())
                write(f"fault: {shown}")

    sim.switch_guard = guard


def run_demo(port: int, interval: float, *, round_log: RoundLog | None = None) -> int:
    """Run the demo until Ctrl-C, SIGTERM, SIGHUP or the parent's death; clean up after it.

    Whatever ends it, PostgreSQL is stopped and the one temporary directory that holds
    everything of this run (the cluster, its socket, the result store) is removed: the stop
    signals are turned into an orderly return from the first moment, before PostgreSQL
    starts, and `serve` takes them over once it runs.
    """
    from deployhealth.cli import serve, stop_signals

    reserved = reserve_port(HOST, port)
    if isinstance(reserved, str):
        print(
            f"deployhealth demo: cannot listen on {HOST}:{port}: {reserved}. Nothing was "
            f"started. Choose another port: deployhealth demo --port {port + 1} "
            f"(make demo PORT={port + 1})",
            file=sys.stderr,
        )
        return EXIT_CANNOT_START

    def stopped(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    signals = stop_signals()
    for sig in signals:
        signal.signal(sig, stopped)
    workdir: Path | None = None
    cleanup: list[Callable[[], None]] = [reserved.close]
    try:
        if signal.SIGHUP in signals and not _die_with_parent():
            return 128 + signal.SIGHUP
        workdir = Path(tempfile.mkdtemp(prefix="deployhealth-demo-"))
        return _run(reserved, interval, workdir, cleanup, round_log or RoundLog(), serve)
    except _Stopped as exc:
        return 128 + exc.signum
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave PostgreSQL behind.
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        for close in reversed(cleanup):
            with contextlib.suppress(Exception):
                close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    reserved: socket.socket,
    interval: float,
    workdir: Path,
    cleanup: list[Callable[[], None]],
    round_log: RoundLog,
    serve: Callable[..., int],
) -> int:
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.postgres import LocalPostgres, PostgresError
    from deployhealth.sim.stun import servers_of
    from deployhealth.sim.tcp import DelayProxy

    log("deployhealth demo: starting PostgreSQL ...")
    postgres = LocalPostgres(database="coder", runtime_parent=workdir)
    cleanup.append(postgres.close)
    try:
        postgres.start()
    except PostgresError as exc:
        print(f"deployhealth demo: cannot start PostgreSQL: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    proxy = DelayProxy(postgres.host, postgres.port, 0.0)
    proxy.start()
    cleanup.append(proxy.close)

    def apply_database_fault(mode: str) -> None:
        if mode == "down":
            postgres.stop()
            return
        postgres.start()
        proxy.delay_seconds = SLOW_DATABASE_DELAY_SECONDS if mode == "slow" else 0.0

    sim = SimulatedDeployment(on_database=apply_database_fault).start()
    cleanup.append(sim.close)
    # The same URL as the server's own, but through the latency proxy.
    database_url = postgres.url.replace(f":{postgres.port}/", f":{proxy.port}/")
    settings = Settings(
        name="demo",
        access_url=sim.url,
        coder_token=Secret(sim.token),
        stun_servers=tuple(servers_of(sim)),
        database_url=Secret(database_url),
        check_interval_seconds=interval,
        store=StoreLocation("sqlite", path=str(workdir / "results.db")),
    )
    banner = BANNER.format(
        sim=sim.url, pg_port=postgres.port, proxy_port=proxy.port, interval=interval,
        workdir=workdir, exports="\n".join(f"  {line}" for line in exports(settings)),
        command=command_name(), heartbeat=round_log.heartbeat_seconds,
    )
    port = reserved.getsockname()[1]
    return serve(
        settings, HOST, port, banner=banner, round_log=round_log, listening=reserved,
        on_scheduler=lambda scheduler: link_faults_to_rounds(sim, scheduler, log),
    )
