"""The workspace_proxy family's fan-out: 500 proxies cost about what one does (target <= 3x).

Each proxy is its own URL (its own port on 127.0.0.1) and answers its health report after
200 ms, as a proxy in another region would. Probed one after another, 500 of them would take
500 times one probe (100 s); the family probes them `proxy_concurrency` at a time on one
asyncio loop. The baseline is the same family probing one proxy, measured in the same run,
so the ratio does not depend on this machine's speed; so is the memory baseline
(tracemalloc's peak for one proxy).

The proxies run in a child process (one asyncio server on 500 ports): a real deployment's
proxies do not share deployhealth's CPU, and here they would otherwise share its GIL.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROXIES = 500
DELAY_SECONDS = 0.200
ROUNDS = 3
TARGET = 3.0
CONTEXT_CONCURRENCY = (64, 256, 512)

_SERVER = """
import sys
from deployhealth.sim.inventory import ProxyFarm, ProxyReply
with ProxyFarm() as farm:
    proxies = farm.add_many(int(sys.argv[1]), ProxyReply(delay=float(sys.argv[2])))
    print(" ".join(str(p.port) for p in proxies), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


def _settings(ports: list[str], concurrency: int | None = None) -> Any:
    from deployhealth.settings import Settings

    proxies = tuple(
        {
            "id": f"proxy-{n}",
            "name": f"proxy-{n:03d}",
            "path_app_url": f"http://127.0.0.1:{port}",
            "created_at": "2024-01-01T00:00:00Z",
        }
        for n, port in enumerate(ports)
    )
    settings = Settings(static_proxies=proxies)
    if concurrency is not None:
        settings = settings.with_overrides(proxy_concurrency=concurrency)
    return settings


def _run(settings: Any) -> tuple[float, str]:
    from deployhealth.checks.workspace_proxy import probe
    from deployhealth.deadline import Deadline

    start = time.perf_counter()
    section = probe(settings, Deadline.after(60))
    elapsed = time.perf_counter() - start
    problem = "" if section.severity.value == "ok" else f"{section.codes} {section.error}"
    return elapsed, problem


def _median(settings: Any, rounds: int) -> tuple[float, list[str]]:
    samples, problems = [], []
    for _ in range(rounds):
        elapsed, problem = _run(settings)
        samples.append(elapsed)
        if problem:
            problems.append(problem)
    return statistics.median(samples), problems


def _peak(settings: Any) -> int:
    tracemalloc.start()
    try:
        _run(settings)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from deployhealth.settings import Settings

    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(PROXIES), str(DELAY_SECONDS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ports = server.stdout.readline().split()
        if len(ports) != PROXIES:
            raise RuntimeError(f"the proxy server started {len(ports)} proxies, not {PROXIES}")
        one, everyone = _settings(ports[:1]), _settings(ports)
        default = Settings().proxy_concurrency
        _run(one)  # warm: imports, first TLS/DNS setup, the child's first accept

        single, problems = _median(one, ROUNDS)
        together, more = _median(everyone, ROUNDS)
        problems += more
        single_peak, together_peak = _peak(one), _peak(everyone)
        context = {c: _median(_settings(ports, c), 1)[0] for c in CONTEXT_CONCURRENCY}
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)

    ratio = together / single
    verdict = "meets target" if ratio <= TARGET else "MISSES target"
    print(f"workspace_proxy: {PROXIES} proxies answering after {DELAY_SECONDS * 1000:.0f} ms")
    print(f"   one proxy (baseline)          {single * 1000:8.1f} ms (median of {ROUNDS})")
    print(f"   {PROXIES} proxies, concurrency {default:<4}  {together * 1000:8.1f} ms")
    print(f"   ratio {PROXIES} / one: {ratio:.2f}  (target <= {TARGET:g}: {verdict}; "
          f"one at a time would be {PROXIES}x)")
    for concurrency, seconds in context.items():
        print(f"     at concurrency {concurrency:<4}          {seconds * 1000:8.1f} ms "
              f"({seconds / single:.2f}x)")
    print(f"   peak memory (tracemalloc): one proxy {single_peak / 1024:.0f} KiB, "
          f"{PROXIES} proxies {together_peak / 1024:.0f} KiB "
          f"({together_peak / max(1, PROXIES) / 1024:.1f} KiB per proxy)")
    for problem in problems[:3]:
        print(f"   ! a run was not ok: {problem[:200]}")


if __name__ == "__main__":
    bench()
