"""The derp family's concurrency: 20 relay nodes cost about what one does (target <= 1.5x).

Each node is a real DERP relay (`DerpServer`) behind a `DelayProxy` that holds every chunk
50 ms each way, as a relay in another region would be. The family probes one node, then
twenty (twenty regions of one node each, like a global DERP map); both are medians over a
few rounds from the same run, so the ratio does not depend on this machine's speed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODES = 20
DELAY_SECONDS = 0.050
ROUNDS = 5
TARGET = 1.5


def _map(ports: list[int]) -> str:
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
                    "DERPPort": port,
                    "STUNPort": -1,
                    "ForceHTTP": True,
                }
            ],
        }
    return json.dumps({"Regions": regions})


def _median_seconds(settings: object, rounds: int) -> tuple[float, list[str]]:
    from deployhealth.checks.derp import probe
    from deployhealth.deadline import Deadline

    samples = []
    problems: list[str] = []
    for _ in range(rounds):
        start = time.perf_counter()
        section = probe(settings, Deadline.after(20))  # type: ignore[arg-type]
        samples.append(time.perf_counter() - start)
        if section.severity.value != "ok":
            problems.append(f"severity {section.severity.value}: {section.to_dict()}")
    return statistics.median(samples), problems


def bench() -> None:
    from deployhealth.settings import Settings
    from deployhealth.sim.derp import DerpServer
    from deployhealth.sim.tcp import DelayProxy

    with ExitStack() as stack:
        ports = []
        for _ in range(NODES):
            server = stack.enter_context(DerpServer())
            proxy = stack.enter_context(DelayProxy("127.0.0.1", server.port, DELAY_SECONDS))
            ports.append(proxy.port)
        one = Settings(derp_map=_map(ports[:1]))
        many = Settings(derp_map=_map(ports))
        _median_seconds(one, 1)  # warm: imports, first handshakes
        single, problems_one = _median_seconds(one, ROUNDS)
        together, problems_many = _median_seconds(many, ROUNDS)
    ratio = together / single
    verdict = "meets target" if ratio <= TARGET else "MISSES target"
    print(f"derp family, nodes {DELAY_SECONDS * 1000:.0f} ms away (median of {ROUNDS})")
    print(f"   1 node                 {single * 1000:8.1f} ms")
    print(f"   {NODES} nodes, concurrently {together * 1000:8.1f} ms")
    print(f"   ratio {NODES} / 1: {ratio:.2f}  (target <= {TARGET}: {verdict})")
    for problem in (problems_one + problems_many)[:3]:
        print(f"   warning: a round was not ok: {problem[:300]}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    bench()
