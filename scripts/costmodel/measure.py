"""What one run of every function really writes: EMF records, DynamoDB items, store requests.

The simulated deployment of `deployhealth demo` (a real PostgreSQL through pgserver, the
sim's HTTP surfaces, DERP relay and STUN servers, workspace proxies, provisioner daemons) is
started on loopback, with a DynamoDB store on moto's server. Each scheduled function's work
runs as its Lambda function runs it, through `deployhealth.runner.run_and_record` with one
family, a `MetricsSink` writing to memory and the DynamoDB store; then `/readyz` through the
API app. Every function runs twice, and the second round is measured, so the store holds
what it holds in a steady state (the websocket family reads the stored latest section first).

Nothing here knows which metrics the library emits: they are counted in the records.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from deployhealth.model import Section
from deployhealth.settings import Secret, Settings
from deployhealth.store import ReadinessSnapshot, ResultStore, Snapshot

# A metric as CloudWatch bills it: namespace, name, and the dimension names with values.
Combination = tuple[str, str, tuple[tuple[str, str], ...]]

# The websocket idle probe's window in the measured run: long enough to hold a connection
# idle, short enough for a quick model. Its records and items have the field's shape.
MEASURED_IDLE_SECONDS = 1.0
# Bytes DynamoDB adds to every item for storage (not for request units).
ITEM_STORAGE_OVERHEAD = 100

API = "api"
WEBSOCKET_IDLE = "websocket_idle"


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    proxies: int | None = None  # None: the sim's own two proxies
    derp_regions: int | None = None  # None: the template's default map (embedded relay)


DEFAULTS = Scenario("a", "the template's defaults (the sim: 2 workspace proxies, Coder's "
                         "embedded DERP relay plus the template's STUN server)")
LARGE = Scenario("b", "50 workspace proxies and 5 DERP regions", proxies=50, derp_regions=5)
SCENARIOS = (DEFAULTS, LARGE)


@dataclass
class Run:
    """One invocation of one function, as measured on loopback."""

    function: str
    emf_records: list[dict[str, Any]] = field(default_factory=list)
    emf_bytes: int = 0  # the records as the function prints them, newline included
    # The library's log lines at INFO and above: (message, extra fields).
    log_records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    written_items: list[int] = field(default_factory=list)  # item sizes, one per PutItem
    latest_reads: int = 0  # Query of the deployment's latest partition
    history_reads: int = 0  # Query of one section's history
    # A put first reads the latest item (GetItem, consistent) for its hysteresis record;
    # DynamoDB bills a projected read by the whole item: 1 RRU per started 4 KB.
    put_read_units: int = 0
    seconds: float = 0.0

    @property
    def combinations(self) -> set[Combination]:
        return combinations(self.emf_records)


@dataclass
class Measurement:
    scenario: Scenario
    deployment: str
    namespace: str
    runs: dict[str, Run]
    latest_items: dict[str, int]  # sk -> item size in the deployment's latest partition
    retention_days: float  # history kept (DEPLOYHEALTH_HISTORY_RETENTION_DAYS)
    derp_regions: int  # regions in the DERP map the derp family probed
    proxies: int  # workspace proxies the workspace_proxy family probed

    @property
    def combinations(self) -> set[Combination]:
        out: set[Combination] = set()
        for run in self.runs.values():
            out |= run.combinations
        return out

    @property
    def latest_partition_bytes(self) -> int:
        return sum(self.latest_items.values())


# --- EMF and DynamoDB arithmetic -----------------------------------------------------------


def combinations(records: Sequence[dict[str, Any]]) -> set[Combination]:
    """Every (namespace, metric, dimensions with values) the EMF records publish."""
    out: set[Combination] = set()
    for record in records:
        for directive in record.get("_aws", {}).get("CloudWatchMetrics", []):
            namespace = str(directive.get("Namespace", ""))
            for dimension_set in directive.get("Dimensions", []) or [[]]:
                dims = tuple((str(d), str(record.get(d, ""))) for d in dimension_set)
                for metric in directive.get("Metrics", []):
                    out.add((namespace, str(metric.get("Name", "")), dims))
    return out


def item_size(item: dict[str, Any]) -> int:
    """An item's size as DynamoDB counts it: attribute names plus values (typed JSON)."""
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


def _value_size(value: dict[str, Any]) -> int:
    ((kind, raw),) = value.items()
    if kind == "S":
        return len(str(raw).encode())
    if kind == "N":
        return _number_size(str(raw))
    if kind == "B":
        return len(raw)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind in ("SS", "BS"):
        return sum(len(v) if kind == "BS" else len(str(v).encode()) for v in raw)
    if kind == "NS":
        return sum(_number_size(str(v)) for v in raw)
    if kind == "M":
        return 3 + sum(len(k.encode()) + _value_size(v) + 1 for k, v in raw.items())
    if kind == "L":
        return 3 + sum(_value_size(v) + 1 for v in raw)
    raise ValueError(f"unknown DynamoDB type {kind!r}")


def _number_size(text: str) -> int:
    """About one byte per two significant digits, plus one (DynamoDB's documented rule)."""
    digits = format(Decimal(text), "f").lstrip("-").replace(".", "").strip("0")
    return math.ceil(max(len(digits), 1) / 2) + 1


# --- a store that counts what it is asked --------------------------------------------------


class CountingStore:
    """The DynamoDB store, counting requests and measuring the items each put writes."""

    def __init__(self, inner: ResultStore, client: Any, table: str, deployment: str) -> None:
        self.description = inner.description
        self._inner = inner
        self._client = client
        self._table = table
        self._deployment = deployment
        self.run = Run("")

    def put(self, name: str, section: Section) -> None:
        self._inner.put(name, section)
        history = self._client.query(
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": f"{self._deployment}#history#{name}"}},
            ScanIndexForward=False,
            Limit=1,
        )["Items"]
        latest = self._client.get_item(
            TableName=self._table,
            Key={"pk": {"S": f"{self._deployment}#latest"}, "sk": {"S": name}},
        ).get("Item")
        self.run.written_items += [item_size(i) for i in [*history, *([latest] if latest else [])]]
        if latest:
            self.run.put_read_units += math.ceil(item_size(latest) / 4096)

    def snapshot(self) -> Snapshot:
        self.run.latest_reads += 1
        return self._inner.snapshot()

    def readiness_snapshot(self) -> ReadinessSnapshot:
        self.run.latest_reads += 1
        return self._inner.readiness_snapshot()

    def latest(self) -> dict[str, Section]:
        self.run.latest_reads += 1
        return self._inner.latest()

    def history(
        self, name: str, *, limit: int = 50, since: datetime | None = None
    ) -> list[Section]:
        self.run.history_reads += 1
        return self._inner.history(name, limit=limit, since=since)

    def dismissed(self) -> tuple[str, ...] | None:
        self.run.latest_reads += 1
        return self._inner.dismissed()

    def set_dismissed(self, sections: Sequence[str]) -> bool:
        return self._inner.set_dismissed(sections)

    def close(self) -> None:
        self._inner.close()

    def latest_items(self) -> dict[str, int]:
        items = self._client.query(
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": f"{self._deployment}#latest"}},
        )["Items"]
        return {i["sk"]["S"]: item_size(i) for i in items}


class _LogCapture(logging.Handler):
    """The library's log records at INFO and above (what a Lambda function would print)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _library_logs() -> Iterator[_LogCapture]:
    library = logging.getLogger("deployhealth")
    capture = _LogCapture()
    level, propagate = library.level, library.propagate
    library.setLevel(logging.INFO)  # POWERTOOLS_LOG_LEVEL=INFO, as the template sets
    library.propagate = False
    library.addHandler(capture)
    try:
        yield capture
    finally:
        library.removeHandler(capture)
        library.setLevel(level)
        library.propagate = propagate


# --- the run ---------------------------------------------------------------------------------


_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "costmodel",
    "AWS_SECRET_ACCESS_KEY": "costmodel",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # No developer profile may point the run elsewhere.
    "AWS_CONFIG_FILE": "/nonexistent/deployhealth-costmodel/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/deployhealth-costmodel/credentials",
}


@contextlib.contextmanager
def _aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(_AWS_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def measure(
    scenario: Scenario,
    *,
    deployment: str = "coder",
    namespace: str = "DeployHealth",
    stun_servers: int = 1,
    retention_days: float = 7.0,
) -> Measurement:
    """Run every function of the stack once (after a warm-up round) and measure it."""
    from moto.server import ThreadedMotoServer

    werkzeug = logging.getLogger("werkzeug")
    quiet = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one line per request otherwise
    with contextlib.ExitStack() as stack:
        stack.enter_context(_aws_env())
        stack.callback(werkzeug.setLevel, quiet)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        stack.callback(server.stop)
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        settings, derp_regions, proxies = stack.enter_context(
            _simulated_deployment(scenario, deployment, namespace, stun_servers)
        )
        measurement = _measure_on(scenario, settings, endpoint, retention_days)
        measurement.derp_regions, measurement.proxies = derp_regions, proxies
        return measurement


def _measure_on(
    scenario: Scenario, settings: Settings, endpoint: str, retention_days: float
) -> Measurement:
    import boto3

    from deployhealth.api.app import ApiContext, create_app
    from deployhealth.api.local import build_event
    from deployhealth.checks import FAMILIES
    from deployhealth.metrics import MetricsSink
    from deployhealth.runner import run_and_record
    from deployhealth.store.dynamodb import DynamoDBStore

    table = f"costmodel-{uuid.uuid4().hex[:8]}"
    inner = DynamoDBStore(
        table, settings.name, retention_days, region="us-east-1", endpoint_url=endpoint
    )
    inner.create_table()
    client = boto3.session.Session().client(
        "dynamodb", region_name="us-east-1", endpoint_url=endpoint
    )
    store = CountingStore(inner, client, table, settings.name)
    idle_settings = settings.with_overrides(
        websocket_idle_seconds=MEASURED_IDLE_SECONDS,
        deadlines={**settings.deadlines, "websocket": MEASURED_IDLE_SECONDS + 15.0},
    )
    jobs: list[tuple[str, str, Settings]] = [
        (WEBSOCKET_IDLE, "websocket", idle_settings),
        *((family, family, settings) for family in FAMILIES),
    ]
    event = build_event("GET", "/readyz", [("host", "deployhealth")], b"", "127.0.0.1")
    runs: dict[str, Run] = {}
    try:
        for measured in (False, True):
            for function, family, job_settings in jobs:
                stream = io.StringIO()
                store.run = Run(function)
                sink = MetricsSink(job_settings.metrics_namespace, job_settings.name, stream)
                with _library_logs() as logs:
                    start = time.perf_counter()
                    run_and_record(job_settings, [family], store, sink)
                    store.run.seconds = time.perf_counter() - start
                if measured:
                    runs[function] = _finish(store.run, stream, logs)
            stream = io.StringIO()
            store.run = Run(API)
            sink = MetricsSink(settings.metrics_namespace, settings.name, stream)
            app = create_app(ApiContext(settings, metrics=sink, store=store))
            with _library_logs() as logs:
                start = time.perf_counter()
                answer = app(event, None)
                store.run.seconds = time.perf_counter() - start
            if answer.get("statusCode") not in (200, 503):
                raise RuntimeError(f"/readyz answered {answer.get('statusCode')}: {answer}")
            if measured:
                runs[API] = _finish(store.run, stream, logs)
        latest = store.latest_items()
    finally:
        client.close()
        store.close()
    return Measurement(
        scenario, settings.name, settings.metrics_namespace, runs, latest, retention_days, 0, 0
    )


def _finish(run: Run, stream: io.StringIO, logs: _LogCapture) -> Run:
    text = stream.getvalue()
    run.emf_bytes = len(text.encode())
    run.emf_records = [json.loads(line) for line in text.splitlines() if line.strip()]
    run.log_records = [
        (record.getMessage(), {k: v for k, v in vars(record).items() if k not in _STANDARD})
        for record in logs.records
    ]
    return run


_STANDARD = {*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime"}


# --- the simulated deployment -------------------------------------------------------------


@contextlib.contextmanager
def _simulated_deployment(
    scenario: Scenario, deployment: str, namespace: str, stun_servers: int
) -> Iterator[tuple[Settings, int, int]]:
    """Settings that reach the simulated deployment, its DERP regions and its proxies."""
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.postgres import LocalPostgres
    from deployhealth.sim.stun import servers_of

    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(LocalPostgres(database="coder"))
        sim = stack.enter_context(SimulatedDeployment())
        stun = servers_of(sim)[: max(0, stun_servers)]
        derp_map = ""
        # The default map: Coder's embedded relay, plus one STUN-only region per server.
        regions = 1 + len(stun)
        if scenario.derp_regions:
            derp_map = stack.enter_context(_derp_regions(scenario.derp_regions, stun[0]))
            regions = scenario.derp_regions
        proxies = len(_live_proxies(sim)[0])
        if scenario.proxies is not None:
            stack.enter_context(_many_proxies(sim, scenario.proxies))
            proxies = scenario.proxies
        settings = Settings(
            name=deployment,
            metrics_namespace=namespace,
            access_url=sim.url,
            coder_token=Secret(sim.token),
            database_url=Secret(postgres.url),
            stun_servers=tuple(stun),
            derp_map=derp_map,
        )
        yield settings, regions, proxies


@contextlib.contextmanager
def _derp_regions(count: int, stun_address: str) -> Iterator[str]:
    """A DERP map of `count` regions, one relay each, each node with STUN as well."""
    from deployhealth.sim.derp import DerpServer

    stun_port = int(stun_address.rpartition(":")[2])
    with contextlib.ExitStack() as stack:
        regions: dict[str, Any] = {}
        for n in range(count):
            region_id = n + 1
            server = stack.enter_context(DerpServer())
            regions[str(region_id)] = {
                "RegionID": region_id,
                "RegionCode": f"r{region_id}",
                "RegionName": f"Region {region_id}",
                "Nodes": [server.node(f"{region_id}a", region_id, STUNPort=stun_port)],
            }
        yield json.dumps({"Regions": regions})


@contextlib.contextmanager
def _many_proxies(sim: Any, count: int) -> Iterator[None]:
    """The sim's /api/v2/workspaceproxies answering `count` healthy proxies, shaped as its
    own answer (the primary and the deleted proxy kept)."""
    from deployhealth.sim.inventory import ProxyFarm, ProxyReply

    live, others = _live_proxies(sim)
    shape = live[0]
    with ProxyFarm() as farm:
        servers = farm.add_many(count, ProxyReply())
        proxies = []
        for n, server in enumerate(servers):
            name = f"proxy-{n + 1:02d}"
            proxies.append({
                **shape,
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"costmodel/{name}")),
                "name": name,
                "display_name": f"Proxy {n + 1:02d}",
                "path_app_url": server.url,
                "wildcard_hostname": f"*.{name}.127.0.0.1:{server.port}",
            })
        body = {"regions": [others[0], *proxies, *others[1:]]}

        def answer_proxies(req: Any, _sim: Any) -> None:
            req.send_json(200, body)

        sim.route("GET", "/api/v2/workspaceproxies", answer_proxies)
        yield


def _live_proxies(sim: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The sim's workspace proxies, as its API lists them: (live ones, the rest)."""
    request = urllib.request.Request(
        f"{sim.url}/api/v2/workspaceproxies", headers={"Coder-Session-Token": sim.token}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        regions = json.load(answer)["regions"]
    live = [
        r for r in regions
        if r.get("path_app_url") and r["name"] != "primary" and not r.get("deleted")
    ]
    return live, [r for r in regions if r not in live]
