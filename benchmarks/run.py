"""`make bench`: deployhealth's speed targets, as ratios against baselines from the same run.

Runs every benchmark in turn, each printing its figures as it goes (benchmarks/figures.py),
then a summary table of every figure: its value, its target, pass or MISS. Exits non-zero
when a figure misses its target, a benchmark fails, or one runs without recording a figure
(its numbers would be checked by nobody). A benchmark module that does not exist is reported
as not available and does not fail the run.

`python benchmarks/run.py NAME...` runs only the benchmarks named (`check`, `readyz_dynamodb`,
or a module's name with or without `bench_`): `make bench ONLY="cold_start derp"`.

Two figures are measured here rather than in a module of their own:

- `check` of all families against the slowest single family (target <= 1.2): the families
  run concurrently, so the whole should cost about its slowest part.
- A warm `/readyz` through the API handler against a bare read of the store, with DynamoDB
  served by moto in a process of its own (target <= 1.5x): readiness adds little to its one
  read. The figure is this process's CPU time: moto's 7 ms of Python per request, in this
  process or in the wall time, would hide the handler's fraction of a millisecond.

Everything runs on 127.0.0.1: a simulated deployment, a real PostgreSQL, moto's DynamoDB.
"""

from __future__ import annotations

import importlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Siblings: `python benchmarks/run.py` puts this folder first on sys.path, so every module
# records into this same `figures` module.
import figures
from figures import MIN_ROUNDS, Figure, interleaved_medians, record

CHECK_ROUNDS = MIN_ROUNDS
CHECK_TARGET = 1.2
# One /readyz is a few milliseconds: many single requests, so that the median is of requests.
READYZ_ROUNDS = 200
READYZ_TARGET = 1.5
MOTO_START_SECONDS = 60.0


def bench_check_concurrency() -> None:
    from deployhealth.checks import FAMILIES
    from deployhealth.runner import run_families
    from deployhealth.settings import Secret, Settings
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.postgres import LocalPostgres
    from deployhealth.sim.stun import servers_of
    from deployhealth.sim.tcp import DelayProxy

    print("check: all families at once vs the slowest single family")
    # A deployment across a network, not on loopback: the access URL (and so the WebSocket,
    # DERP and Coder API behind it) 30 ms per packet away, the database 5 ms, so the families
    # take tens of milliseconds, as they do in a region, and thread start-up noise does not
    # decide the ratio.
    with LocalPostgres() as postgres, SimulatedDeployment() as sim:
        http_port = int(sim.url.rsplit(":", 1)[1])
        with DelayProxy("127.0.0.1", http_port, 0.030) as web, DelayProxy(
            postgres.host, postgres.port, 0.005
        ) as db:
            settings = Settings(
                name="bench",
                access_url=f"http://127.0.0.1:{web.port}",
                coder_token=Secret(sim.token),
                database_url=Secret(postgres.url.replace(f":{postgres.port}/", f":{db.port}/")),
                stun_servers=tuple(servers_of(sim)),
            )
            run_families(settings)  # warm: imports, first connections
            # Which family is the slowest, from rounds of their own; then the whole against
            # that one, interleaved.
            samples: dict[str, list[float]] = {name: [] for name in FAMILIES}
            for _ in range(MIN_ROUNDS):
                for name in FAMILIES:
                    start = time.perf_counter()
                    run_families(settings, [name])
                    samples[name].append(time.perf_counter() - start)
            singles = {name: statistics.median(s) for name, s in samples.items()}
            slowest = max(singles, key=lambda name: singles[name])
            together, alone = interleaved_medians(
                lambda: run_families(settings),
                lambda: run_families(settings, [slowest]),
                CHECK_ROUNDS,
            )
    each = ", ".join(f"{name} {s * 1000:.0f}" for name, s in singles.items())
    record(Figure(
        name="check, all families vs the slowest single family",
        value=together / alone,
        target=CHECK_TARGET,
        detail=(f"all {together * 1000:.0f} ms vs {slowest} {alone * 1000:.0f} ms "
                f"(medians of {CHECK_ROUNDS}); single families, ms: {each}"),
    ))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's DynamoDB in a process of its own (`moto_server`, from moto[server]): its URL."""
    command = Path(sys.executable).with_name("moto_server")
    port = _free_port()
    # Its log (a line per request) goes to a file: a pipe nobody reads would fill and stall it.
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            [str(command), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + MOTO_START_SECONDS
            while not _listening(port):
                try:
                    # The pause between polls, cut short if the server exits (a port taken).
                    server.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    if time.monotonic() < deadline:
                        continue
                log.seek(0)
                raise RuntimeError(f"moto_server did not listen on {port}: {log.read()[-2000:]}")
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)


def bench_readyz_dynamodb() -> None:
    from deployhealth.api.app import ApiContext, create_app
    from deployhealth.api.local import build_event
    from deployhealth.model import Section, Severity
    from deployhealth.settings import Settings, StoreLocation
    from deployhealth.store.dynamodb import DynamoDBStore

    print("readyz, DynamoDB: a warm /readyz through the handler vs a bare read of the store")
    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    with moto_server() as endpoint:
        store = DynamoDBStore("bench", "bench", 7.0, region="us-east-1", endpoint_url=endpoint)
        try:
            store.create_table()
            settings = Settings(
                name="bench",
                store=StoreLocation("dynamodb", table="bench", region="us-east-1",
                                    endpoint_url=endpoint),
            )
            for name in settings.gating_sections:
                store.put(name, Section(Severity.OK, details={"reachable": True}))
            app = create_app(ApiContext(settings, store=store))
            event = build_event("GET", "/readyz", [("host", "bench")], b"", "127.0.0.1")

            def readyz() -> None:
                response = app(event, None)
                assert response["statusCode"] == 200, response

            for _ in range(20):  # warm: connection pool, Powertools route compilation
                readyz()
                store.readiness_snapshot()
            # The bare read is what /readyz reads: one Query of the summaries, no bodies.
            handler, bare = _interleaved_cpu_and_wall(
                readyz, store.readiness_snapshot, READYZ_ROUNDS
            )
        finally:
            store.close()
    record(Figure(
        name="readyz, DynamoDB (moto out of process), handler vs its bare store read, CPU",
        value=handler.cpu / bare.cpu,
        target=READYZ_TARGET,
        detail=(f"CPU in this process: handler {handler.cpu * 1000:.2f} ms vs the bare read "
                f"{bare.cpu * 1000:.2f} ms; wall, moto's time included: "
                f"{handler.wall * 1000:.2f} vs {bare.wall * 1000:.2f} ms "
                f"(medians of {READYZ_ROUNDS} interleaved requests)"),
    ))


@dataclass(frozen=True)
class Cost:
    wall: float  # seconds
    cpu: float  # seconds of this process's CPU


def _interleaved_cpu_and_wall(
    measured: Callable[[], object], baseline: Callable[[], object], rounds: int
) -> tuple[Cost, Cost]:
    """Medians of `measured` and `baseline`, as figures.interleaved_medians, CPU beside wall.

    With the store's server in another process, this process's CPU time is what the handler
    and the store's client cost, without the server's: the wall time of a request to moto
    (milliseconds of Python) would drown the handler's own fraction of a millisecond.
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"a figure needs at least {MIN_ROUNDS} rounds, not {rounds}")
    ours: list[Cost] = []
    theirs: list[Cost] = []
    for _ in range(rounds):
        for fn, into in ((baseline, theirs), (measured, ours)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            into.append(Cost(time.perf_counter() - wall, time.process_time() - cpu))

    def median(costs: list[Cost]) -> Cost:
        return Cost(statistics.median(c.wall for c in costs),
                    statistics.median(c.cpu for c in costs))

    return median(ours), median(theirs)


# In the order they run: what is most sensitive to a busy machine (fresh interpreters, single
# requests) before what leaves servers and threads behind it.
LOCAL: dict[str, Callable[[], None]] = {
    "check": bench_check_concurrency,
    "readyz_dynamodb": bench_readyz_dynamodb,
}
BENCHMARKS: tuple[str, ...] = (
    "check",
    "readyz_dynamodb",
    "bench_cold_start",
    "bench_readyz",
    "bench_serve",
    "bench_derp",
    "bench_proxies",
    "bench_blackbox",
)


@dataclass(frozen=True)
class Outcome:
    """How one benchmark went."""

    name: str
    status: str  # "ran", "not available", "failed", "no figure"
    figures: int = 0
    error: str = ""

    @property
    def fails(self) -> bool:
        return self.status in ("failed", "no figure")


def _bench_function(name: str) -> Callable[[], None] | None:
    """The benchmark's function; None if its module does not exist (yet)."""
    if name in LOCAL:
        return LOCAL[name]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # the module exists, something it imports does not: a failure
        return None
    bench: Callable[[], None] = module.bench
    return bench


def run_one(name: str) -> Outcome:
    before = len(figures.RECORDED)
    try:
        bench = _bench_function(name)
        if bench is None:
            print(f"{name}: not available")
            return Outcome(name, "not available")
        bench()
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        return Outcome(name, "failed", len(figures.RECORDED) - before,
                       f"{type(exc).__name__}: {exc}")
    finally:
        sys.stdout.flush()
    recorded = len(figures.RECORDED) - before
    return Outcome(name, "ran" if recorded else "no figure", recorded)


def summary(outcomes: list[Outcome], recorded: list[Figure]) -> str:
    width = max([len(f.name) for f in recorded] + [len("figure")])
    lines = [f"{'figure':<{width}}  {'value':>10}  {'target':>12}  result"]
    for f in recorded:
        bound = "<=" if f.better == "lower" else ">="
        lines.append(
            f"{f.name:<{width}}  {f.value:>8.2f}{f.unit:<2}  "
            f"{bound} {f.target:>6g}{f.unit:<3}  {'pass' if f.meets else 'MISS'}"
        )
    for o in outcomes:
        if o.status == "not available":
            lines.append(f"{o.name}: not available (no such module)")
        elif o.status == "no figure":
            lines.append(f"{o.name}: FAILED, ran but recorded no figure (printed only)")
        elif o.status == "failed":
            lines.append(f"{o.name}: FAILED, {o.error[:200]}")
    missed = sum(not f.meets for f in recorded)
    failed = sum(o.fails for o in outcomes)
    lines.append(
        f"{len(recorded)} figures, {len(recorded) - missed} pass, {missed} MISS; "
        f"{failed} benchmarks failed, "
        f"{sum(o.status == 'not available' for o in outcomes)} not available"
    )
    return "\n".join(lines)


def _selected(args: list[str]) -> list[str]:
    if not args:
        return list(BENCHMARKS)
    chosen = []
    for arg in args:
        name = arg if arg in BENCHMARKS else f"bench_{arg}"
        if name not in BENCHMARKS:
            raise SystemExit(f"no benchmark {arg!r}; there are: {', '.join(BENCHMARKS)}")
        chosen.append(name)
    return chosen


def main(args: list[str]) -> int:
    names = _selected(args)
    print(f"deployhealth benchmarks ({sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}): every figure against a baseline from "
          f"this run, medians of at least {MIN_ROUNDS} rounds\n", flush=True)
    outcomes = []
    for name in names:
        outcomes.append(run_one(name))
        print(flush=True)
    print("summary")
    print(summary(outcomes, figures.RECORDED))
    bad = any(not f.meets for f in figures.RECORDED) or any(o.fails for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
