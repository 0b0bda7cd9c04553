"""`make bench`: deployhealth's speed targets, as ratios against baselines from the same run.

1. `check` of all families against the slowest single family (target <= 1.2): the families
   run concurrently, so the whole should cost about its slowest part.
2. A warm `/readyz` through the API handler, with the store on loopback (DynamoDB over HTTP),
   against a bare `store.latest()` (target <= 1.5x): readiness adds little to its one read.
3. Cold start: a fresh interpreter importing a check handler and the API handler, as
   Lambda's INIT does, against a bare interpreter start (`python -c pass`); the import itself
   (the difference) has a target of 300 ms, and the modules that dominate it are named.
4. The derp family over 20 nodes each 50 ms away, against one node (target <= 1.5x).
5. The workspace_proxy family over 500 proxies answering after 200 ms, against one proxy
   (target <= 3x), and its peak memory.

Everything runs on 127.0.0.1: a simulated deployment, a real PostgreSQL, moto's DynamoDB.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

# Siblings: `python benchmarks/run.py` puts this folder first on sys.path.
import bench_cold_start
import bench_derp
import bench_proxies

ROUNDS = 7
READYZ_REQUESTS = 300


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def verdict(value: float, target: float) -> str:
    return "meets target" if value <= target else "MISSES target"


def bench_check_concurrency() -> None:
    from deployhealth.checks import FAMILIES
    from deployhealth.runner import run_families
    from deployhealth.settings import Secret, Settings
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.postgres import LocalPostgres
    from deployhealth.sim.stun import servers_of
    from deployhealth.sim.tcp import DelayProxy

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
            singles = {
                name: median_seconds(lambda n=name: run_families(settings, [n]), ROUNDS)
                for name in FAMILIES
            }
            together = median_seconds(lambda: run_families(settings), ROUNDS)
    slowest_name = max(singles, key=lambda n: singles[n])
    slowest = singles[slowest_name]
    ratio = together / slowest
    print("1. check, all families vs the slowest single family")
    for name, seconds in singles.items():
        print(f"   {name:<22} {seconds * 1000:8.1f} ms (median of {ROUNDS})")
    print(f"   {'all, concurrently':<22} {together * 1000:8.1f} ms")
    print(f"   ratio all / slowest ({slowest_name}): {ratio:.2f}  (target <= 1.2: "
          f"{verdict(ratio, 1.2)})")


def bench_readyz() -> None:
    import logging

    from moto.server import ThreadedMotoServer

    from deployhealth.api.app import ApiContext, create_app
    from deployhealth.api.local import build_event
    from deployhealth.model import Section, Severity
    from deployhealth.settings import Settings, StoreLocation
    from deployhealth.store.dynamodb import DynamoDBStore

    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        store = DynamoDBStore("bench", "bench", 7.0, region="us-east-1", endpoint_url=endpoint)
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
            store.latest()
        # Interleaved rounds, so drift in the moto server affects both sides alike.
        bare, handler = [], []
        for _ in range(READYZ_REQUESTS):
            start = time.perf_counter()
            store.latest()
            bare.append(time.perf_counter() - start)
            start = time.perf_counter()
            readyz()
            handler.append(time.perf_counter() - start)
        store.close()
    finally:
        server.stop()
    b, h = statistics.median(bare), statistics.median(handler)
    ratio = h / b
    print("2. warm /readyz through the handler vs a bare store read (DynamoDB on loopback)")
    print(f"   bare store.latest()    {b * 1000:8.3f} ms (median of {READYZ_REQUESTS})")
    print(f"   /readyz handler        {h * 1000:8.3f} ms")
    print(f"   ratio handler / bare: {ratio:.2f}  (target <= 1.5: {verdict(ratio, 1.5)})")


def main() -> int:
    print(f"deployhealth benchmarks ({sys.version.split()[0]}, {os.cpu_count()} cores)\n")
    bench_check_concurrency()
    print()
    bench_readyz()
    print()
    bench_cold_start.bench()
    print()
    bench_derp.bench()
    print()
    bench_proxies.bench()
    return 0


if __name__ == "__main__":
    sys.exit(main())
