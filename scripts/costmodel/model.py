"""The monthly bill of the stack: template.yaml's resources x measured runs x assumptions.

`estimate(template, measurement, assumptions)` returns the line items; it does no I/O, so a
test can change the template (or the assumptions) and compare totals without measuring again.
What comes from where:

- the template (under its parameter values; a resource whose Condition is false is absent):
  functions, their memory (Globals merged) and schedules, alarms and the metrics each reads,
  composite alarms, dashboards, the Route 53 health check and its options, log retention;
- the measurement (scripts/costmodel/measure.py): per function and run, the EMF records (the
  distinct metrics, the bytes logged), the DynamoDB items written and the store reads;
- the assumptions below: what loopback cannot tell (durations in a region, cold starts, how
  often something polls /readyz). docs/cost.md explains each.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from costmodel.cfn import Template
from costmodel.measure import API, ITEM_STORAGE_OVERHEAD, WEBSOCKET_IDLE, Measurement
from costmodel.prices import GB, PRICES

# Route 53's health-checking regions, all used when a health check sets no `Regions`.
ROUTE53_DEFAULT_REGIONS = (
    "us-east-1", "us-west-1", "us-west-2", "eu-west-1",
    "ap-southeast-1", "ap-southeast-2", "ap-northeast-1", "sa-east-1",
)

# Seconds a run takes in a region, by family, with the deployment across the internet
# (loopback runs take a few ms and say nothing about this). docs/cost.md gives the reasons.
FIELD_SECONDS: Mapping[str, float] = MappingProxyType({
    "access_url": 0.3,  # DNS, TCP, TLS handshake, GET /healthz, certificate read
    "database": 0.5,  # TCP, TLS, SCRAM authentication, five SELECT 1 round trips
    "websocket": 0.5,  # TLS, the upgrade, the echoes, the close
    "derp": 1.0,  # per region, concurrently: TLS, DERP handshake, a packet both ways, STUN
    "workspace_proxy": 0.4,  # the inventory call, then every proxy's /healthz-report at once
    "provisioner_daemons": 0.4,  # organizations, then each organization's daemons
    "entitlements": 0.4,  # entitlements and replicas
})


@dataclass(frozen=True)
class Assumptions:
    days_per_month: float = 30.4
    field_seconds: Mapping[str, float] = field(default_factory=lambda: dict(FIELD_SECONDS))
    # Probes run concurrently, so size adds little: the slowest of more targets.
    seconds_per_extra_derp_region: float = 0.1
    seconds_per_extra_proxy: float = 0.01
    # Each scheduled run writes two items (history and latest), ~20 ms each in a region.
    store_seconds: float = 0.04
    # The idle probe lasts its idle window plus the dial, the echoes around it and the close.
    idle_extra_seconds: float = 5.0
    # A warm /readyz: one DynamoDB Query and the answer.
    api_seconds: float = 0.03
    # The API function keeps the snapshot it read for this long (per warm environment), so
    # its reads are at most one per this many seconds, however often /readyz is called.
    api_readiness_cache_seconds: float = field(default_factory=lambda: _readiness_cache())
    # Cold starts (INIT, billed since 2025-08-01): a function invoked every few minutes keeps
    # its environment for hours; one invoked less often than every `warm_gap_minutes` starts
    # cold every time.
    cold_starts_per_day: float = 12.0
    warm_gap_minutes: float = 10.0
    init_seconds: float = 1.0
    # Who calls /readyz through the HTTP API besides Route 53: a load balancer, an uptime
    # probe (requests a minute; none by default).
    probe_requests_per_minute: float = 0.0
    # Route 53: requests each health-checking region sends every RequestInterval. AWS says the
    # endpoint sees about one request every two seconds at 30 s, i.e. ~15 checkers in all.
    route53_checkers_per_region: float = 1.0
    route53_endpoint_is_aws: bool = False
    # Alarm e-mails (state changes) a month.
    alarm_emails_per_month: float = 100.0
    # Lambda writes START, END and REPORT lines per invocation (text log format).
    platform_log_bytes: int = 0  # 0: computed from representative lines (platform_bytes())


@dataclass(frozen=True)
class LineItem:
    service: str
    item: str
    quantity: float
    unit: str
    price_key: str
    note: str = ""

    @property
    def unit_price(self) -> float:
        return PRICES[self.price_key].amount

    @property
    def monthly(self) -> float:
        return self.quantity * self.unit_price


@dataclass
class Estimate:
    title: str
    lines: list[LineItem]
    notes: list[str] = field(default_factory=list)
    functions: list[FunctionCost] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(line.monthly for line in self.lines)


@dataclass(frozen=True)
class Function:
    logical_id: str
    kind: str  # a family, WEBSOCKET_IDLE, API, or "other"
    memory_mb: int
    rate_minutes: float | None  # None: not scheduled
    idle_seconds: float
    log_retention_days: float | None  # None: never expires


@dataclass
class FunctionCost:
    function: Function
    invocations: float
    seconds: float  # billed duration per invocation, as assumed
    measured_seconds: float  # the same work on loopback
    cold_starts: float
    log_bytes: float  # per invocation
    write_units: float  # per invocation
    read_units: float  # per invocation
    history_items: float  # kept within the retention window
    history_bytes: float


# --- reading the template ----------------------------------------------------------------


def functions(template: Template) -> list[Function]:
    out = []
    for logical_id, resource in template.resources("AWS::Serverless::Function"):
        props = template.function_properties(resource)
        env = props["Environment"]["Variables"]
        code = str(props.get("CodeUri", "")).rstrip("/")
        kind = "other"
        if code.startswith("functions/checks/"):
            kind = code.rpartition("/")[2]
        elif code == "functions/api":
            kind = API
        idle = float(env.get("DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS") or 0)
        if kind == "websocket" and idle > 0:
            kind = WEBSOCKET_IDLE
        rate = None
        for event in (props.get("Events") or {}).values():
            if event.get("Type") == "Schedule":
                rate = rate_minutes(str(event["Properties"]["Schedule"]))
        out.append(Function(
            logical_id, kind, int(props.get("MemorySize", 128)), rate, idle,
            _retention(template, props),
        ))
    return out


def rate_minutes(expression: str) -> float:
    """Minutes between runs of an EventBridge rate() expression."""
    match = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", expression)
    if not match:
        raise ValueError(f"the cost model reads rate() schedules only, not {expression!r}")
    unit = {"minute": 1, "hour": 60, "day": 1440}[match[2].rstrip("s")]
    return int(match[1]) * unit


def _retention(template: Template, props: dict[str, Any]) -> float | None:
    ref = (props.get("LoggingConfig") or {}).get("LogGroup")
    if isinstance(ref, dict) and "Ref" in ref:
        for logical_id, group in template.resources("AWS::Logs::LogGroup"):
            if logical_id == ref["Ref"]:
                days = template.properties(group).get("RetentionInDays")
                return float(days) if days not in (None, "") else None
    return None  # Lambda's default group /aws/lambda/<name>: kept forever


def alarm_metrics(template: Template) -> int:
    """Metrics read by the standard alarms: one each, or each MetricStat of a math alarm."""
    count = 0
    for _, alarm in template.resources("AWS::CloudWatch::Alarm"):
        props = template.properties(alarm)
        if "Metrics" in props:
            count += sum(1 for m in props["Metrics"] if "MetricStat" in m)
        else:
            count += 1
    return count


# --- the estimate ------------------------------------------------------------------------


def estimate(
    template: Template,
    measurement: Measurement,
    assumptions: Assumptions | None = None,
) -> Estimate:
    a = assumptions or Assumptions()
    month_minutes = a.days_per_month * 1440
    lines: list[LineItem] = []
    notes: list[str] = []

    # --- who calls the API ---
    route53 = list(template.resources("AWS::Route53::HealthCheck"))
    api_requests = a.probe_requests_per_minute * month_minutes
    checker_requests = 0.0
    for _, check in route53:
        config = template.properties(check)["HealthCheckConfig"]
        regions = config.get("Regions") or ROUTE53_DEFAULT_REGIONS
        interval = float(config.get("RequestInterval", 30))
        checker_requests += (
            len(regions) * a.route53_checkers_per_region * month_minutes * 60 / interval
        )
    api_requests += checker_requests

    # --- functions ---
    costs = [
        _function_cost(f, measurement, a, api_requests) for f in functions(template)
    ]
    scheduled = [c for c in costs if c.function.rate_minutes is not None]
    checks = [c for c in scheduled if c.function.kind != WEBSOCKET_IDLE]
    idle = [c for c in scheduled if c.function.kind == WEBSOCKET_IDLE]
    api = [c for c in costs if c.function.kind == API]

    def gb_seconds(group: list[FunctionCost]) -> float:
        return sum(c.invocations * c.seconds * c.function.memory_mb / 1024 for c in group)

    lines.append(LineItem(
        "Lambda", f"requests ({len(costs)} functions)",
        sum(c.invocations for c in costs), "requests", "lambda_request",
    ))
    lines.append(LineItem(
        "Lambda", f"compute: {len(checks)} scheduled check functions", gb_seconds(checks),
        "GB-s", "lambda_gb_second_arm64",
    ))
    for c in idle:
        lines.append(LineItem(
            "Lambda",
            f"compute: websocket idle probe ({c.seconds:.0f} s every "
            f"{c.function.rate_minutes:g} min)",
            gb_seconds([c]), "GB-s", "lambda_gb_second_arm64",
        ))
    lines.append(LineItem(
        "Lambda", "compute: API function (/readyz)", gb_seconds(api), "GB-s",
        "lambda_gb_second_arm64",
    ))
    lines.append(LineItem(
        "Lambda", "compute: cold starts (INIT)",
        sum(c.cold_starts * a.init_seconds * c.function.memory_mb / 1024 for c in costs),
        "GB-s", "lambda_gb_second_arm64",
    ))
    lines.append(LineItem(
        "API Gateway", "HTTP API requests (/readyz probes)", api_requests, "requests",
        "apigw_http_request",
    ))

    # --- DynamoDB ---
    lines.append(LineItem(
        "DynamoDB", "on-demand writes", sum(c.invocations * c.write_units for c in costs),
        "WRU", "dynamodb_write_unit",
    ))
    lines.append(LineItem(
        "DynamoDB", "on-demand reads (strongly consistent)",
        sum(c.invocations * c.read_units for c in costs), "RRU", "dynamodb_read_unit",
    ))
    tables = list(template.resources("AWS::DynamoDB::Table"))
    table_gb = 0.0
    if tables:
        latest = sum(b + ITEM_STORAGE_OVERHEAD for b in measurement.latest_items.values())
        table_gb = (sum(c.history_bytes for c in costs) + latest) / GB
        lines.append(LineItem(
            "DynamoDB", "storage (history within retention + latest)", table_gb, "GB-month",
            "dynamodb_storage",
        ))
        for _, table in tables:
            pitr = template.properties(table).get("PointInTimeRecoverySpecification") or {}
            if str(pitr.get("PointInTimeRecoveryEnabled", "")).lower() == "true":
                lines.append(LineItem(
                    "DynamoDB", "point-in-time recovery", table_gb, "GB-month", "dynamodb_pitr"
                ))

    # --- CloudWatch ---
    combos = sorted(measurement.combinations)
    lines.append(LineItem(
        "CloudWatch", "custom metrics (distinct metric x dimensions in the EMF)", len(combos),
        "metrics", "cw_custom_metric",
    ))
    lines.append(LineItem(
        "CloudWatch", f"alarms ({len(list(template.resources('AWS::CloudWatch::Alarm')))}"
        " standard)", alarm_metrics(template), "alarm metrics", "cw_alarm_standard",
    ))
    lines.append(LineItem(
        "CloudWatch", "composite alarms",
        len(list(template.resources("AWS::CloudWatch::CompositeAlarm"))), "alarms",
        "cw_alarm_composite",
    ))
    lines.append(LineItem(
        "CloudWatch", "dashboards", len(list(template.resources("AWS::CloudWatch::Dashboard"))),
        "dashboards", "cw_dashboard",
    ))
    ingested = sum(c.invocations * c.log_bytes for c in costs)
    lines.append(LineItem(
        "CloudWatch", "Logs ingestion (EMF records, log lines, Lambda's own)", ingested / GB,
        "GB", "cw_logs_ingestion",
    ))
    stored = 0.0
    for c in costs:
        days = c.function.log_retention_days
        if days is None:
            days = 365.0
            notes.append(f"{c.function.logical_id} logs to a group that never expires: "
                         "its storage is counted at one year's worth")
        stored += c.invocations * c.log_bytes * days / a.days_per_month
    lines.append(LineItem(
        "CloudWatch", "Logs storage (retention window, uncompressed)", stored / GB,
        "GB-month", "cw_logs_storage",
    ))

    # --- Route 53, SNS, EventBridge ---
    for logical_id, check in route53:
        config = template.properties(check)["HealthCheckConfig"]
        kind = str(config.get("Type", "HTTP"))
        features = [
            name for name, on in (
                ("HTTPS", kind.startswith("HTTPS")),
                ("string matching", kind.endswith("STR_MATCH")),
                ("fast interval", float(config.get("RequestInterval", 30)) < 30),
                ("latency measurement", str(config.get("MeasureLatency", "")).lower() == "true"),
            ) if on
        ]
        who = "aws" if a.route53_endpoint_is_aws else "other"
        endpoint = "AWS endpoint" if a.route53_endpoint_is_aws else "non-AWS endpoint"
        lines.append(LineItem(
            "Route 53", f"health check {logical_id} ({endpoint})", 1, "checks", f"r53_check_{who}"
        ))
        if features:
            lines.append(LineItem(
                "Route 53", f"health check options: {', '.join(features)}", len(features),
                "features", f"r53_feature_{who}",
            ))
        regions = config.get("Regions")
        notes.append(
            f"{logical_id}: {len(regions or ROUTE53_DEFAULT_REGIONS)} checker regions "
            f"({'Regions set in the template' if regions else 'Regions not set: all'}), "
            f"{a.route53_checkers_per_region:g} request each per "
            f"{config.get('RequestInterval', 30)} s = {checker_requests:,.0f} requests a month"
        )
    emails = [s for _, s in template.resources("AWS::SNS::Subscription")
              if str(template.properties(s).get("Protocol")) == "email"]
    topics = list(template.resources("AWS::SNS::Topic"))
    if topics:
        lines.append(LineItem(
            "SNS", f"alarm e-mails ({len(emails)} e-mail subscription"
            f"{'' if len(emails) == 1 else 's'}; the topic is free)",
            a.alarm_emails_per_month * len(emails), "e-mails", "sns_email",
        ))
    lines.append(LineItem(
        "EventBridge", "scheduled rules", len(scheduled), "rules", "eventbridge_schedule"
    ))

    names = [f"{ns}/{name} {{{', '.join(f'{k}={v}' for k, v in dims)}}}"
             for ns, name, dims in combos]
    return Estimate("", lines, notes, costs, names)


def _function_cost(
    f: Function,
    m: Measurement,
    a: Assumptions,
    api_requests: float,
) -> FunctionCost:
    month_minutes = a.days_per_month * 1440
    run = m.runs.get(f.kind)
    if f.kind == API:
        invocations = api_requests
        seconds = a.api_seconds
        gap = 1.0 / (api_requests / month_minutes) if api_requests else math.inf
    else:
        invocations = month_minutes / f.rate_minutes if f.rate_minutes else 0.0
        gap = f.rate_minutes or math.inf
        if f.kind == WEBSOCKET_IDLE:
            seconds = f.idle_seconds + a.idle_extra_seconds
        else:
            seconds = a.field_seconds.get(f.kind, 1.0)
            if f.kind == "derp":
                seconds += a.seconds_per_extra_derp_region * max(0, m.derp_regions - 1)
            if f.kind == "workspace_proxy":
                seconds += a.seconds_per_extra_proxy * max(0, m.proxies - 1)
        seconds += a.store_seconds
    if invocations == 0:
        cold = 0.0
    elif gap > a.warm_gap_minutes:
        cold = invocations
    else:
        cold = min(invocations, a.cold_starts_per_day * a.days_per_month)
    log_bytes = platform_bytes(f.memory_mb) if a.platform_log_bytes == 0 else a.platform_log_bytes
    write_units = read_units = 0.0
    history_items = history_bytes = 0.0
    measured = 0.0
    if run is not None:
        measured = run.seconds
        log_bytes += run.emf_bytes
        if f.kind != API:
            log_bytes += powertools_line_bytes(f, "check finished", _finished_extra(m))
        log_bytes += sum(powertools_line_bytes(f, msg, extra) for msg, extra in run.log_records)
        write_units = sum(math.ceil(size / 1024) for size in run.written_items)
        reads = run.latest_reads * math.ceil(max(m.latest_partition_bytes, 1) / 4096)
        # A history page is one small Query; a put reads the latest item it replaces.
        read_units = reads + run.history_reads + run.put_read_units
        if f.kind == API and invocations and a.api_readiness_cache_seconds > 0:
            most = month_minutes * 60 / a.api_readiness_cache_seconds
            read_units *= min(1.0, most / invocations)
        if run.written_items and f.rate_minutes:
            retention_minutes = m.retention_days * 1440
            history_items = retention_minutes / f.rate_minutes
            history_bytes = history_items * (run.written_items[0] + ITEM_STORAGE_OVERHEAD)
    return FunctionCost(
        f, invocations, seconds, measured, cold, log_bytes, write_units, read_units,
        history_items, history_bytes,
    )


def _readiness_cache() -> float:
    """The API function's snapshot cache (0, i.e. a read per request, if it has none)."""
    from deployhealth.aws import api_function

    return float(getattr(api_function, "READINESS_CACHE_SECONDS", 0.0))


# --- log lines as Lambda writes them --------------------------------------------------------

_REQUEST_ID = "3f1c0e4e-5d1f-4b8e-9a5e-0c1f2d3e4f5a"


def platform_bytes(memory_mb: int) -> int:
    """START, END and REPORT, as Lambda writes them for a function in the text log format."""
    lines = (
        f"START RequestId: {_REQUEST_ID} Version: $LATEST\n",
        f"END RequestId: {_REQUEST_ID}\n",
        f"REPORT RequestId: {_REQUEST_ID}\tDuration: 312.45 ms\tBilled Duration: 313 ms\t"
        f"Memory Size: {memory_mb} MB\tMax Memory Used: 98 MB\t\n",
    )
    return sum(len(line.encode()) for line in lines)


def powertools_line_bytes(f: Function, message: str, extra: Mapping[str, Any]) -> int:
    """One Powertools Logger JSON line with the Lambda context, as the functions log."""
    name = f"deployhealth-{f.logical_id}-a1B2c3D4e5F6"
    record = {
        "level": "INFO",
        "location": "handler:57",
        "message": message,
        "timestamp": "2026-12-02 10:00:00,123+0000",
        "service": "deployhealth",
        "cold_start": False,
        "function_name": name,
        "function_memory_size": str(f.memory_mb),
        "function_arn": f"arn:aws:lambda:us-east-1:123456789012:function:{name}",
        "function_request_id": _REQUEST_ID,
        "section": f.kind,
        **extra,
        "xray_trace_id": "1-6751a2b0-0123456789abcdef01234567",
    }
    return len(json.dumps(record, default=str).encode()) + 1


def _finished_extra(m: Measurement) -> dict[str, Any]:
    """The extra keys of the check handler's "check finished" line."""
    return {"severity": "ok", "codes": [], "deployment": m.deployment, "duration_ms": 312.4}
