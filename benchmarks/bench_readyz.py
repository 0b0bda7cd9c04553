"""`/readyz` reads only what it judges, and SQLite retention costs O(1) per write.

All on SQLite in a temporary directory, the handler called in process with the event the
local server builds (`deployhealth.api.local.build_event`), so the figures are the handler's
own cost and not a server's or a network's:

(a) `/readyz` through the handler against a bare `store.snapshot()` of the same file
    (target <= 1.3x): readiness adds little to one read of the stored results;
(b) `/readyz` with a 1,000- and a 5,000-proxy workspace_proxy section stored (built by the
    family's own section builder) against the small case (target <= 1.3x each): readiness
    reads summaries, so a big stored section costs nothing;
(c) `/readyz` with READY_FAIL_AFTER=2 and 100 results of history per section against the
    same store without hysteresis (target <= 1.5x): the hysteresis state is kept, not
    replayed from history;
(d) a SQLite `put` after 100,000 stored results against a put into an empty store
    (target <= 2x): the retention delete walks an index range, not the table.

Each figure is the median of interleaved rounds (benchmarks/figures.py).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from figures import MIN_ROUNDS, Figure, interleaved_medians, record

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

REQUESTS = 1000  # /readyz calls per round
PUTS = 50  # puts per round
STORED_RESULTS = 100_000
HISTORY_PER_SECTION = 100
ROUNDS = MIN_ROUNDS + 2


def bench() -> None:
    print(
        "readyz, SQLite: /readyz through the handler in process (it reads only summaries), "
        f"and a put into a full store; medians of {ROUNDS} rounds",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-readyz-") as tmp:
        directory = Path(tmp)
        _handler_vs_snapshot(directory)
        _big_sections(directory)
        _hysteresis(directory)
        _put_after_many(directory)


# --- the pieces -------------------------------------------------------------------------


def _settings(path: Path, **changes: Any) -> Any:
    from deployhealth.settings import Settings, StoreLocation

    return Settings(name="bench", store=StoreLocation("sqlite", path=str(path)), **changes)


def _small_sections(now: datetime) -> dict[str, Any]:
    """One result per family, shaped like what each family stores (about 10 KB in all)."""
    from deployhealth.model import Finding, Section, Severity, coder_section_keys

    node = {
        "Name": "1a", "RegionID": 1, "HostName": "derp-1a.example.com", "IPv4": "", "IPv6": "",
        "STUNPort": 3478, "STUNOnly": False, "DERPPort": 443, "InsecureForTests": False,
        "ForceHTTP": False, "STUNTestIP": "", "CanPort80": False,
    }
    node_report = {
        "healthy": True, "severity": "ok", "warnings": [], "node": node,
        "node_info": {"TokenBucketBytesPerSecond": 0, "TokenBucketBytesBurst": 0},
        "can_exchange_messages": True, "round_trip_ping": "12.345ms",
        "round_trip_ping_ms": 12, "uses_websocket": False,
        "client_logs": [["derphttp.Client.Connect: connecting to https://derp-1a.example.com"]] * 2,
        "client_errs": [[], []], "stun": {"Enabled": True, "CanSTUN": True, "Error": None},
        "round_trip_ping_ms_exact": 12.345,
    }
    regions = {
        str(r): {
            "healthy": True, "severity": "ok", "warnings": [],
            "region": {"RegionID": r, "RegionCode": f"r{r}", "RegionName": f"Region {r}",
                       "Nodes": [node, node]},
            "node_reports": [node_report, node_report],
        }
        for r in (1, 2)
    }
    features = {
        f"feature_{n}": {"entitlement": "entitled", "enabled": True, "limit": 100, "actual": 7}
        for n in range(20)
    }
    daemon = {
        "id": "00000000-0000-4000-8000-000000000001", "created_at": "2024-01-01T00:00:00Z",
        "last_seen_at": "2024-01-01T00:00:00Z", "name": "provisioner-1", "version": "v2.16.0",
        "api_version": "1.2", "provisioners": ["terraform"], "tags": {"scope": "organization"},
        "key_name": "built-in", "status": "idle", "current_job": None, "previous_job": None,
    }
    details: dict[str, dict[str, Any]] = {
        "access_url": {"access_url": "https://coder.example.com", "reachable": True,
                       "status_code": 200, "healthz_response": "OK"},
        "database": {"reachable": True, "latency": "1.234ms", "latency_ms": 1,
                     "threshold_ms": 15},
        "websocket": {"body": "", "code": 101},
        "derp": {"regions": regions, "netcheck_logs": ["netcheck: report: udp=true v4=true"] * 3},
        "workspace_proxy": coder_section_keys("workspace_proxy"),
        "provisioner_daemons": {"items": [{"provisioner_daemon": daemon, "warnings": []}] * 2},
        "entitlements": {"features": features, "has_license": True, "trial": False},
    }
    out = {}
    for name, detail in details.items():
        findings = []
        if name == "derp":
            findings = [Finding("ESTUN02", "mapping varies by destination", Severity.OK)]
        section = Section.from_findings(findings, detail)
        section.checked_at = now
        section.duration_ms = 12.5
        out[name] = section
    return out


def _proxy_section(proxies: int, now: datetime) -> Any:
    """A workspace_proxy section for `proxies` proxies, by the family's own builder."""
    from deployhealth.checks import workspace_proxy as family
    from deployhealth.inventory import Proxy

    listed = [
        Proxy(
            id=f"00000000-0000-4000-8000-{n:012d}",
            name=f"proxy-{n}",
            display_name=f"Proxy {n}",
            icon_url="/emojis/1f310.png",
            url=f"https://proxy-{n}.example.com",
            wildcard_hostname=f"*.proxy-{n}.example.com",
            derp_enabled=True,
            created_at=now - timedelta(days=30),
            updated_at=now - timedelta(minutes=1),
            version="v2.16.0",
        )
        for n in range(proxies)
    ]
    rng = random.Random(proxies)
    outcomes = {}
    for n in range(proxies):
        if rng.random() < 0.02:  # a few unhealthy, as a real fleet has
            outcome = family._Outcome("unhealthy", errors=["healthz returned 502"])
        else:
            outcome = family._Outcome("ok")
        outcome.checked_at = now
        outcomes[n] = outcome
    regions = [family._region(p, outcomes[n]) for n, p in enumerate(listed)]
    section = family._verdict(listed, outcomes, regions, 30.0)
    section.checked_at = now
    return section


def _store(path: Path, sections: dict[str, Any]) -> Any:
    from deployhealth.store.sqlite import SQLiteStore

    store = SQLiteStore(str(path), "bench", 7)
    for name, section in sections.items():
        store.put(name, section)
    return store


def _readyz(settings: Any, store: Any) -> tuple[Callable[[], object], Callable[[], None]]:
    """A function making REQUESTS /readyz calls through the handler, and a closer."""
    from deployhealth.api.app import ApiContext, create_app
    from deployhealth.api.local import build_event
    from deployhealth.metrics import MetricsSink

    # The Ready metric is written, as in Lambda (stdout there), to a stream that drops it.
    sink_stream = open(os.devnull, "w")  # noqa: SIM115 (closed by the closer)
    metrics = MetricsSink(settings.metrics_namespace, settings.name, sink_stream)
    app = create_app(ApiContext(settings, store=store, metrics=metrics))
    event = build_event("GET", "/readyz", [("host", "x")], b"", "127.0.0.1")
    answer = app(dict(event))
    if answer["statusCode"] != 200:
        raise SystemExit(f"/readyz answered {answer['statusCode']}: {answer['body']}")

    def calls() -> None:
        for _ in range(REQUESTS):
            app(dict(event))

    def close() -> None:
        sink_stream.close()

    return calls, close


def _snapshots(store: Any) -> Callable[[], object]:
    def calls() -> None:
        for _ in range(REQUESTS):
            store.snapshot()

    return calls


def _per_call(seconds: float, calls: int = REQUESTS) -> str:
    return f"{seconds / calls * 1e6:.0f} us"


# --- (a) ----------------------------------------------------------------------------------


def _handler_vs_snapshot(directory: Path) -> None:
    path = directory / "small.db"
    store = _store(path, _small_sections(datetime.now(UTC)))
    readyz, close = _readyz(_settings(path), store)
    ours, base = interleaved_medians(readyz, _snapshots(store), ROUNDS)
    close()
    record(
        Figure(
            "readyz, SQLite: handler vs bare store.snapshot()",
            ours / base,
            1.3,
            detail=f"/readyz {_per_call(ours)}, snapshot() {_per_call(base)} a call",
        )
    )
    store.close()


# --- (b) ----------------------------------------------------------------------------------


def _big_sections(directory: Path) -> None:
    now = datetime.now(UTC)
    small_path = directory / "small-b.db"
    small_store = _store(small_path, _small_sections(now))
    small, close_small = _readyz(_settings(small_path), small_store)
    for proxies in (1000, 5000):
        path = directory / f"proxies-{proxies}.db"
        big = _proxy_section(proxies, now)
        store = _store(path, {**_small_sections(now), "workspace_proxy": big})
        del big
        # The section built here is garbage now: measure /readyz, not the collector walking it.
        gc.collect()
        stored = sqlite3.connect(path).execute(
            "SELECT length(body) FROM latest WHERE section = 'workspace_proxy'"
        ).fetchone()[0]
        big, close = _readyz(_settings(path), store)
        ours, base = interleaved_medians(big, small, ROUNDS)
        close()
        record(
            Figure(
                f"readyz, SQLite: {proxies:,}-proxy section stored vs small",
                ours / base,
                1.3,
                detail=(
                    f"{_per_call(ours)} vs {_per_call(base)} a call; the section's stored body "
                    f"is {stored / 1024:.0f} KB"
                ),
            )
        )
        store.close()
    close_small()
    small_store.close()


# --- (c) ----------------------------------------------------------------------------------


def _hysteresis(directory: Path) -> None:
    from deployhealth.model import Severity

    path = directory / "history.db"
    now = datetime.now(UTC)
    store = _store(path, {})
    rng = random.Random(7)
    # 100 results per section, one a minute, the last one passing: some failing ones among
    # them, so the record has runs to walk.
    for step in range(HISTORY_PER_SECTION):
        at = now - timedelta(minutes=HISTORY_PER_SECTION - 1 - step)
        for name, section in _small_sections(at).items():
            if step < HISTORY_PER_SECTION - 3 and rng.random() < 0.2:
                section.severity = Severity.ERROR
            store.put(name, section)
    held, close_held = _readyz(_settings(path, ready_fail_after=2), store)
    plain, close_plain = _readyz(_settings(path), store)
    ours, base = interleaved_medians(held, plain, ROUNDS)
    close_held()
    close_plain()
    record(
        Figure(
            f"readyz, SQLite: READY_FAIL_AFTER=2, {HISTORY_PER_SECTION} results a section, "
            "vs without",
            ours / base,
            1.5,
            detail=f"{_per_call(ours)} vs {_per_call(base)} a call",
        )
    )
    store.close()


# --- (d) ----------------------------------------------------------------------------------


def _put_after_many(directory: Path) -> None:
    from deployhealth.store.sqlite import SQLiteStore

    full_path = directory / "full.db"
    full = SQLiteStore(str(full_path), "bench", 7)
    # 100,000 results spread over the last six days (inside the 7-day retention, so the
    # puts below delete none of them), written in one transaction rather than 100,000 puts.
    now = time.time()
    sections = _small_sections(datetime.now(UTC))
    text = json.dumps(sections["database"].to_stored())
    names = list(sections)
    rows = [
        ("bench", names[n % len(names)], now - 6 * 86400 * (1 - n / STORED_RESULTS), text)
        for n in range(STORED_RESULTS)
    ]
    with sqlite3.connect(full_path) as raw:
        raw.executemany(
            "INSERT INTO history (deployment, section, checked_at, body) VALUES (?, ?, ?, ?)",
            rows,
        )
    raw.close()
    empty = SQLiteStore(str(directory / "empty.db"), "bench", 7)

    def puts(store: Any) -> Callable[[], None]:
        def run() -> None:
            # Each put a new result (it becomes latest): the whole write path.
            for n in range(PUTS):
                name = names[n % len(names)]
                store.put(name, dataclasses.replace(sections[name], checked_at=datetime.now(UTC)))

        return run

    ours, base = interleaved_medians(puts(full), puts(empty), ROUNDS)
    record(
        Figure(
            f"store, SQLite: put after {STORED_RESULTS:,} results vs into an empty store",
            ours / base,
            2.0,
            detail=f"{_per_call(ours, PUTS)} vs {_per_call(base, PUTS)} a put",
        )
    )
    full.close()
    empty.close()


if __name__ == "__main__":
    bench()
