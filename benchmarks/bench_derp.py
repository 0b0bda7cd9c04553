"""The derp family over a global map: 50 regions cost about what one does (target <= 1.3x).

Each region is one real DERP relay (`DerpServer`) behind a `DelayProxy` that holds every
chunk 50 ms each way, as a relay in another region would be. The family probes one region
(the baseline) and fifty, rounds interleaved, medians of at least MIN_ROUNDS, in the same
run, so the ratio does not depend on this machine's speed. Every node's job runs at once
(derp.job_ceiling is far above 50 nodes), so fifty regions should cost about one.

The relays and their delays run in RELAY_PROCESSES child processes: a real deployment's
relays do not share deployhealth's CPU, and here they would otherwise share its GIL. Not all
in one: fifty relays and their delays are 150 threads, and in one process their contention
for its GIL (handing it over every 5 ms) added up to a fifth to the fifty-region run, noise
that belongs to the simulation, not to the family.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import MIN_ROUNDS, Figure, interleaved_medians, record  # noqa: E402

REGIONS = 50
RELAY_PROCESSES = 5
DELAY_SECONDS = 0.050
TARGET = 1.3

# The relays: one DerpServer and one DelayProxy per region; prints their ports, then runs
# until the benchmark closes its stdin.
_RELAYS = """
import sys
from contextlib import ExitStack
from deployhealth.sim.derp import DerpServer
from deployhealth.sim.tcp import DelayProxy
with ExitStack() as stack:
    ports = []
    for _ in range(int(sys.argv[1])):
        server = stack.enter_context(DerpServer())
        proxy = stack.enter_context(DelayProxy("127.0.0.1", server.port, float(sys.argv[2])))
        ports.append(proxy.port)
    print(" ".join(str(p) for p in ports), flush=True)
    sys.stdin.read()
"""


def _map(ports: list[str]) -> str:
    regions = {}
    for index, port in enumerate(ports):
        region_id = 100 + index
        regions[str(region_id)] = {
            "RegionID": region_id,
            "RegionCode": f"r{region_id}",
            "RegionName": f"Region {region_id}",
            "Nodes": [
                {
                    "Name": f"{region_id}a",
                    "RegionID": region_id,
                    "HostName": "127.0.0.1",
                    "DERPPort": int(port),
                    "STUNPort": -1,
                    "ForceHTTP": True,
                }
            ],
        }
    return json.dumps({"Regions": regions})


def _ports(process: subprocess.Popen[str]) -> list[str]:
    assert process.stdout is not None
    return process.stdout.readline().split()


def bench() -> None:
    from deployhealth.checks.derp import job_ceiling, probe
    from deployhealth.deadline import Deadline
    from deployhealth.settings import Settings

    print(f"derp: {REGIONS} regions {DELAY_SECONDS * 1000:.0f} ms away vs one region")
    share = REGIONS // RELAY_PROCESSES
    relays = [
        subprocess.Popen(
            [sys.executable, "-c", _RELAYS, str(share), str(DELAY_SECONDS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(RELAY_PROCESSES)
    ]
    problems: list[str] = []

    def run(settings: Settings) -> None:
        section = probe(settings, Deadline.after(20))
        if section.severity.value != "ok":
            problems.append(f"severity {section.severity.value}: {section.error}")

    try:
        ports = [port for process in relays for port in _ports(process)]
        if len(ports) != REGIONS:
            raise RuntimeError(f"the relay processes started {len(ports)} relays, not {REGIONS}")
        one = Settings(derp_map=_map(ports[:1]))
        many = Settings(derp_map=_map(ports))
        run(many)  # warm: imports, every relay's first accept
        together, single = interleaved_medians(
            lambda: run(many), lambda: run(one), rounds=MIN_ROUNDS
        )
    finally:
        for process in relays:
            if process.stdin is not None:
                process.stdin.close()
        for process in relays:
            process.wait(timeout=30)

    record(
        Figure(
            f"derp, {REGIONS} regions at {DELAY_SECONDS * 1000:.0f} ms vs one region",
            together / single,
            TARGET,
            detail=(
                f"{REGIONS} regions {together * 1000:.0f} ms, one region {single * 1000:.0f} ms "
                f"(medians of {MIN_ROUNDS}, interleaved); {REGIONS} node jobs at once "
                f"(ceiling here {job_ceiling()}); relays in {RELAY_PROCESSES} processes"
            ),
        )
    )
    for problem in problems[:3]:
        print(f"   ! a round was not ok: {problem[:300]}")
    if problems:
        raise RuntimeError(f"{len(problems)} rounds were not ok: the figure measured failures")


if __name__ == "__main__":
    bench()
