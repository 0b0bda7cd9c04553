"""`deployhealth demo`: a simulated deployment on loopback, and deployhealth serving against it.

Everything is real: the access URL is an HTTP server, the database a PostgreSQL reached
through a TCP proxy that can add latency. Faults are switched on the simulation's
`/_sim/faults` endpoint.

A switch waits for the check round in flight, if any, and a fresh round starts as soon as
it is made (`link_faults_to_rounds`). Without that, a round that started before the switch
(and so read the deployment without the fault) ended after it, and its `round:` line and
`/readyz` said "ok" as if they were the round after: with a slow round in flight (a
silent STUN server holds the derp family for its tries), that was one switch in two.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from deployhealth.settings import Secret, Settings, StoreLocation

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

Try:
  curl {{api}}/readyz?verbose
  curl {{api}}/api/v2/debug/health
  open {{api}}/health in a browser

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

Ctrl-C stops everything.
"""


def link_faults_to_rounds(
    sim: SimulatedDeployment, scheduler: Scheduler, out: TextIO | None = None
) -> None:
    """Make every fault switch land between two rounds, and start the next round at once.

    A round reads the deployment in its first milliseconds and ends with its slowest
    family; a switch made in between reaches only the next round. Waiting for the round in
    flight makes the first round to end after the switch the first to see it. With `out`,
    a `fault: name=mode` line is written there once the switch is made, before that round
    starts: on the demo's terminal, the `round:` line after it is the one that sees it.
    """

    @contextlib.contextmanager
    def guard(changes: dict[str, str]) -> Iterator[None]:
        with scheduler.between_rounds():
            yield
            if out is not None:
                shown = " ".join(f"{name}={mode}" for name, mode in changes.items())
                print(f"fault: {shown}", file=out, flush=True)

    sim.switch_guard = guard


def run_demo(port: int, interval: float) -> int:
    from deployhealth.cli import serve
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.postgres import LocalPostgres, PostgresError
    from deployhealth.sim.stun import servers_of
    from deployhealth.sim.tcp import DelayProxy

    workdir = Path(tempfile.mkdtemp(prefix="deployhealth-demo-"))
    print("deployhealth demo: starting PostgreSQL ...", file=sys.stderr)
    postgres = LocalPostgres(database="coder")
    try:
        postgres.start()
    except PostgresError as exc:
        print(f"deployhealth demo: cannot start PostgreSQL: {exc}", file=sys.stderr)
        postgres.close()
        return 2
    proxy = DelayProxy(postgres.host, postgres.port, 0.0)
    proxy.start()

    def apply_database_fault(mode: str) -> None:
        if mode == "down":
            postgres.stop()
            return
        postgres.start()
        proxy.delay_seconds = SLOW_DATABASE_DELAY_SECONDS if mode == "slow" else 0.0

    sim = SimulatedDeployment(on_database=apply_database_fault).start()
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
        sim=sim.url, pg_port=postgres.port, proxy_port=proxy.port, interval=interval
    )
    try:
        return serve(
            settings, "127.0.0.1", port, banner=banner,
            on_scheduler=lambda scheduler: link_faults_to_rounds(sim, scheduler, sys.stderr),
        )
    finally:
        sim.close()
        proxy.close()
        postgres.close()
