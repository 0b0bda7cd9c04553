"""The workspace_proxy family's fan-out: 5,000 proxies near the floor (target <= 1.3x).

Each proxy is its own URL (its own port on 127.0.0.1) and answers its health report after
200 ms, as a proxy in another region would. The family probes them `proxy_concurrency` at
a time on one asyncio loop, so no run can beat the floor: ceil(5,000 / proxies at once)
waves of 200 ms. The figure is the median run against that floor, computed from the
concurrency the family actually uses (`workspace_proxy.concurrency`, which the open-files
limit may lower), and printed. The default `proxy_concurrency`, 512, is what is measured: it
is the most Lambda's 1,024 open files allow (one socket a probe, half the descriptors), so
this is the family as deployed.

The time above the floor is CPU: each wave's probes are started and read one after another
on the loop, and the proxies' own process answers them one after another too. The rounds of
one proxy (the fixed cost of a run) are interleaved with the figure's as context, and this
process's CPU per proxy is printed; so is the peak memory of a run (tracemalloc), as
information.

The proxies run in FARM_PROCESSES child processes (each one asyncio loop serving its share
of the 5,000 ports): a real deployment's proxies do not share deployhealth's CPU, and here
they would otherwise share its GIL. Two, not one: a wave's 512 requests arrive at once, and
with one process behind them each probe took about 30 ms longer (median 294 ms against 264 ms
for a 200 ms answer), time the simulation added, not the family.
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import MIN_ROUNDS, Figure, record  # noqa: E402

PROXIES = 5000
DELAY_SECONDS = 0.200
TARGET = 1.3
FARM_PROCESSES = 2

# The proxies: one ProxyFarm serving that many ports; prints them, then runs until the
# benchmark closes its stdin. It needs a descriptor per port, more than a default soft
# limit of 1,024, so it raises its own soft limit to the hard one. Its loop is uvloop's:
# the simulated proxies stand for other machines, and the less of this machine's cores
# they take, the less they decide the figure.
_FARM = """
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
try:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
except ImportError:
    pass
from deployhealth.sim.inventory import ProxyFarm, ProxyReply
with ProxyFarm() as farm:
    proxies = farm.add_many(int(sys.argv[1]), ProxyReply(delay=float(sys.argv[2])))
    print(" ".join(str(p.port) for p in proxies), flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def farm(count: int, delay: float, processes: int = FARM_PROCESSES) -> Iterator[list[str]]:
    """The ports of `count` simulated proxies, served by `processes` child processes."""
    shares = [count // processes + (n < count % processes) for n in range(processes)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _FARM, str(share), str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for share in shares
    ]
    try:
        ports = []
        for child in children:
            assert child.stdout is not None
            ports += child.stdout.readline().split()
        if len(ports) != count:
            raise RuntimeError(f"the proxy processes started {len(ports)} proxies, not {count}")
        yield ports
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            child.wait(timeout=60)


def proxy_settings(ports: list[str]) -> Any:
    from deployhealth.settings import Settings

    proxies = tuple(
        {
            "id": f"proxy-{n}",
            "name": f"proxy-{n:04d}",
            "path_app_url": f"http://127.0.0.1:{port}",
            "created_at": "2024-01-01T00:00:00Z",
        }
        for n, port in enumerate(ports)
    )
    return Settings(static_proxies=proxies)


class Runs:
    """Runs of the family, timed, with what went wrong kept for the report."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def run(self, settings: Any) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one run."""
        from deployhealth.checks.workspace_proxy import probe
        from deployhealth.deadline import Deadline

        cpu, start = time.process_time(), time.perf_counter()
        section = probe(settings, Deadline.after(60))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if section.severity.value != "ok":
            self.problems.append(f"{section.codes} {section.error}")
        return wall, cpu


def _peak(runs: Runs, settings: Any) -> int:
    tracemalloc.start()
    try:
        runs.run(settings)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench() -> None:
    from deployhealth.checks.workspace_proxy import concurrency

    print(f"7. workspace_proxy: {PROXIES} proxies answering after "
          f"{DELAY_SECONDS * 1000:.0f} ms vs the floor")
    runs = Runs()
    with farm(PROXIES, DELAY_SECONDS) as ports:
        one, everyone = proxy_settings(ports[:1]), proxy_settings(ports)
        at_once = concurrency(everyone)
        runs.run(everyone)  # warm: imports, every port's first accept

        walls, cpus, singles = [], [], []
        for _ in range(MIN_ROUNDS):
            singles.append(runs.run(one)[0])
            wall, cpu = runs.run(everyone)
            walls.append(wall)
            cpus.append(cpu)
        peak = _peak(runs, everyone)

    waves = math.ceil(PROXIES / at_once)
    floor = waves * DELAY_SECONDS
    median = statistics.median(walls)
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"   floor: ceil({PROXIES} / {at_once} at once) x {DELAY_SECONDS * 1000:.0f} ms "
          f"= {floor * 1000:.0f} ms (proxy_concurrency {at_once}; open-files limit {soft})")
    record(
        Figure(
            f"workspace_proxy, {PROXIES} proxies at {DELAY_SECONDS * 1000:.0f} ms vs the floor",
            median / floor,
            TARGET,
            detail=(
                f"{median * 1000:.0f} ms (median of {MIN_ROUNDS}; fastest "
                f"{min(walls) * 1000:.0f} ms), floor {floor * 1000:.0f} ms; CPU "
                f"{statistics.median(cpus) / PROXIES * 1000:.3f} ms a proxy; one proxy "
                f"{statistics.median(singles) * 1000:.0f} ms (interleaved)"
            ),
        )
    )
    print(f"   info: peak memory of a run (tracemalloc) {peak / 1024 / 1024:.1f} MiB, "
          f"{peak / PROXIES / 1024:.1f} KiB a proxy")
    for problem in runs.problems[:3]:
        print(f"   ! a run was not ok: {problem[:200]}")
    if runs.problems:
        raise RuntimeError(f"{len(runs.problems)} runs were not ok: the figure measured failures")


if __name__ == "__main__":
    bench()
