"""EMF records as CloudWatch will read them, from sections produced by real probes.

The metric set is fixed (docs/metrics.md): SectionSeverity {Deployment, Section} per section
and Ready {Deployment}. Everything else is a property of the same record, and the set of
metrics must not grow with the number of proxies or DERP regions.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.deployment import api_settings

from deployhealth import metrics as metrics_module
from deployhealth.checks import FAMILIES
from deployhealth.deadline import Deadline
from deployhealth.metrics import MAX_LIST_ITEMS, METRICS, MetricsSink
from deployhealth.model import SECTION_NAMES, Finding, Section, Severity
from deployhealth.runner import run_and_record, run_family
from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import SimulatedDeployment
from deployhealth.sim.derp import DerpServer
from deployhealth.sim.inventory import ProxyFarm, ProxyReply
from deployhealth.sim.postgres import LocalPostgres

NAMESPACE = "DeployHealth"
DEPLOYMENT = "prod"
DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
# CloudWatch's standard units (EMF rejects a record with any other).
UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
}

Combo = tuple[str, str, tuple[tuple[str, str], ...]]


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def value(record: dict, name: str) -> float:
    """A metric's one value: a plain number (EMF takes a number or a list of numbers)."""
    only = record[name]
    assert isinstance(only, int) and not isinstance(only, bool), only
    return only


def metric_names(record: dict) -> set[str]:
    return {m["Name"] for m in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]}


def assert_valid_emf(record: dict[str, Any]) -> None:
    """The structure CloudWatch needs to extract metrics, within EMF's and Logs' limits."""
    aws = record["_aws"]
    assert isinstance(aws["Timestamp"], int) and aws["Timestamp"] > 0
    (directive,) = aws["CloudWatchMetrics"]
    assert isinstance(directive["Namespace"], str) and directive["Namespace"]
    assert 1 <= len(directive["Metrics"]) <= 100
    for dimension_set in directive["Dimensions"]:
        assert 1 <= len(dimension_set) <= 9  # EMF's limit was 9 keys; it is 30 now
        for name in dimension_set:
            assert isinstance(record[name], str) and record[name], name
    for metric in directive["Metrics"]:
        assert set(metric) <= {"Name", "Unit", "StorageResolution"}
        assert metric["Unit"] in UNITS
        raw = record[metric["Name"]]
        values = raw if isinstance(raw, list) else [raw]
        assert 1 <= len(values) <= 100
        assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    assert len(json.dumps(record, separators=(",", ":"))) < metrics_module.MAX_RECORD_BYTES


def combos(found: list[dict[str, Any]]) -> set[Combo]:
    """Each distinct CloudWatch metric the records create: namespace, name, dimensions."""
    out: set[Combo] = set()
    for record in found:
        for directive in record["_aws"]["CloudWatchMetrics"]:
            for dimension_set in directive["Dimensions"]:
                dimensions = tuple((name, record[name]) for name in dimension_set)
                for metric in directive["Metrics"]:
                    out.add((directive["Namespace"], metric["Name"], dimensions))
    return out


# The documented set (docs/metrics.md): 7 + 1 metrics per deployment, whatever its size.
FIXED: set[Combo] = {
    (NAMESPACE, "SectionSeverity", (("Deployment", DEPLOYMENT), ("Section", name)))
    for name in SECTION_NAMES
} | {(NAMESPACE, "Ready", (("Deployment", DEPLOYMENT),))}


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> tuple[MetricsSink, io.StringIO]:
    # The template sets a Powertools service name; the alarms still must match
    # {Deployment, Section} exactly, so no `service` dimension may sneak in.
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "deployhealth")
    stream = io.StringIO()
    return MetricsSink(NAMESPACE, DEPLOYMENT, stream), stream


# --- one section at a time -------------------------------------------------------------


def test_access_url_record_has_one_metric_and_the_rest_as_properties(sink):
    metrics, stream = sink
    with SimulatedDeployment() as sim:
        section = run_family("access_url", Settings(access_url=sim.url), Deadline.after(5))
    returned = metrics.section("access_url", section)
    (record,) = records(stream)
    assert record == json.loads(json.dumps(returned))
    assert_valid_emf(record)
    directive = record["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == NAMESPACE
    assert directive["Dimensions"] == [["Deployment", "Section"]]
    assert directive["Metrics"] == [{"Name": "SectionSeverity", "Unit": "Count"}]
    assert record["Deployment"] == DEPLOYMENT and record["Section"] == "access_url"
    assert value(record, "SectionSeverity") == 0
    assert record["severity"] == "ok" and record["healthy"] is True and record["codes"] == []
    assert record["access_url_status_code"] == 200
    assert isinstance(record["duration_ms"], float) and record["duration_ms"] > 0
    assert "tls_days_left" not in record  # plain HTTP
    # Metrics and dimensions first, lists last (Logs Insights discovers the first fields).
    assert list(record)[:4] == ["_aws", "Deployment", "Section", "SectionSeverity"]
    assert list(record)[-1] == "codes"


def test_failing_access_url_reports_severity_and_unhealthy(sink):
    metrics, stream = sink
    with SimulatedDeployment() as sim:
        sim.set_faults({"healthz": "502"})
        section = run_family("access_url", Settings(access_url=sim.url), Deadline.after(5))
    metrics.section("access_url", section)
    (record,) = records(stream)
    # EACS04 is a warning, and the access URL fails above ok.
    assert value(record, "SectionSeverity") == 1
    assert record["severity"] == "warning" and record["healthy"] is False
    assert record["codes"] == ["EACS04"]
    assert record["access_url_status_code"] == 502


def test_database_record_has_latency(sink, local_postgres):
    metrics, stream = sink
    settings = Settings(database_url=Secret(local_postgres.url), db_latency_threshold_ms=1000)
    section = run_family("database", settings, Deadline.after(10))
    metrics.section("database", section)
    (record,) = records(stream)
    assert_valid_emf(record)
    assert metric_names(record) == {"SectionSeverity"}
    assert record["db_latency_ms"] == section.details["latency_ms_exact"]
    assert local_postgres.password not in stream.getvalue()


def test_unreachable_database_has_no_latency_but_severity_2(sink):
    metrics, stream = sink
    settings = Settings(database_url=Secret("postgresql://u:p@127.0.0.1:1/coder"))
    section = run_family("database", settings, Deadline.after(5))
    metrics.section("database", section)
    (record,) = records(stream)
    assert "db_latency_ms" not in record
    assert value(record, "SectionSeverity") == 2
    assert record["severity"] == "error" and record["healthy"] is False


def test_ready_record_has_only_the_deployment_dimension(sink):
    metrics, stream = sink
    metrics.ready(False)
    (record,) = records(stream)
    assert_valid_emf(record)
    assert record["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Deployment"]]
    assert metric_names(record) == {"Ready"}
    assert value(record, "Ready") == 0


def test_ready_record_is_what_powertools_builds_for_it(sink):
    # The Ready record is built once and filled in per answer: it must stay, byte for byte,
    # the record Powertools makes (with the value as a plain number, as every record has).
    from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
        AmazonCloudWatchEMFProvider,
    )

    metrics, stream = sink
    for ready in (True, False, True):
        metrics.ready(ready)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    for line, expected_value in zip(lines, (1, 0, 1), strict=True):
        timestamp = json.loads(line)["_aws"]["Timestamp"]
        provider = AmazonCloudWatchEMFProvider(namespace=NAMESPACE, service="")
        provider.add_dimension(name="Deployment", value=DEPLOYMENT)
        provider.add_metric(name="Ready", unit="Count", value=expected_value)
        provider.set_timestamp(timestamp)
        built = provider.serialize_metric_set()
        built["Ready"] = expected_value
        expected = {key: built[key] for key in ("_aws", "Deployment", "Ready")}
        assert line == json.dumps(expected, separators=(",", ":"))


# --- the metric set does not grow with the deployment -----------------------------------


def _derp_map(servers: list[DerpServer]) -> str:
    regions = {
        str(900 + n): {
            "RegionID": 900 + n,
            "RegionCode": f"r{900 + n}",
            "RegionName": f"Region {900 + n}",
            "Nodes": [server.node(f"{900 + n}a", 900 + n)],
        }
        for n, server in enumerate(servers)
    }
    return json.dumps({"Regions": regions})


@pytest.fixture
def derp_servers() -> Iterator[list[DerpServer]]:
    started: list[DerpServer] = []
    yield started
    for server in started:
        server.close()


def _fleet_records(
    sim: SimulatedDeployment,
    farm: ProxyFarm,
    pg: LocalPostgres,
    servers: list[DerpServer],
    *,
    proxies: int,
    regions: int,
) -> tuple[list[dict[str, Any]], str]:
    """Every family once against the sim, with `proxies` proxies (the last one answering
    502) and `regions` DERP regions; then one readiness answer. The records and the text."""
    stream = io.StringIO()
    sink = MetricsSink(NAMESPACE, DEPLOYMENT, stream)
    started = [DerpServer().start() for _ in range(regions)]
    servers.extend(started)
    settings = api_settings(
        sim, derp_map=_derp_map(started), database_url=Secret(pg.url),
        db_latency_threshold_ms=1000,
    )
    others = [name for name in FAMILIES if name != "workspace_proxy"]
    run_and_record(settings, others, None, sink, max_seconds=10)
    replies = [*farm.add_many(proxies - 1, ProxyReply()), farm.add(ProxyReply(status=502))]
    listed = tuple(
        {"id": f"id-p{n:02d}", "name": f"p{n:02d}", "path_app_url": proxy.url,
         "created_at": f"2024-01-01T00:{n // 60:02d}:{n % 60:02d}Z"}
        for n, proxy in enumerate(replies)
    )
    run_and_record(Settings(static_proxies=listed), ["workspace_proxy"], None, sink,
                   max_seconds=10)
    sink.ready(True)
    return records(stream), stream.getvalue()


def _only(found: list[dict[str, Any]], section: str) -> dict[str, Any]:
    (record,) = [r for r in found if r.get("Section") == section]
    return record


def test_metric_set_is_the_same_for_a_small_and_a_large_deployment(
    sim: SimulatedDeployment, farm: ProxyFarm, pg: LocalPostgres,
    derp_servers: list[DerpServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "deployhealth")
    small, _ = _fleet_records(sim, farm, pg, derp_servers, proxies=2, regions=1)
    for server in derp_servers:
        server.close()
    derp_servers.clear()
    large, text = _fleet_records(sim, farm, pg, derp_servers, proxies=50, regions=5)

    for found in (small, large):
        # One record per section run and one per readiness answer, every one valid EMF.
        assert len(found) == len(SECTION_NAMES) + 1
        assert sorted(r["Section"] for r in found if "Section" in r) == sorted(SECTION_NAMES)
        for record in found:
            assert_valid_emf(record)
    assert combos(small) == combos(large) == FIXED
    assert {(name, dims) for _, name, dims in _shapes(FIXED)} == set(METRICS)

    # The per-item values are all there, as properties of the one record.
    proxies = _only(large, "workspace_proxy")["proxies"]
    assert [p["name"] for p in proxies] == [f"p{n:02d}" for n in range(50)]
    assert [p["status"] for p in proxies] == ["ok"] * 49 + ["unhealthy"]
    assert [p["status_value"] for p in proxies] == [1] * 49 + [-1]
    assert len(_only(small, "workspace_proxy")["proxies"]) == 2
    regions = _only(large, "derp")["derp_regions"]
    assert [r["region"] for r in regions] == [str(900 + n) for n in range(5)]
    assert [r["code"] for r in regions] == [f"r{900 + n}" for n in range(5)]
    assert all(r["severity"] == "ok" and 0 < r["round_trip_ms"] < 1000 for r in regions)
    assert [r["region"] for r in _only(small, "derp")["derp_regions"]] == ["900"]
    assert "proxies_truncated" not in _only(large, "workspace_proxy")

    # The families' scalar properties are there too; no secret is.
    assert _only(large, "database")["db_latency_ms"] > 0
    assert _only(large, "access_url")["access_url_status_code"] == 200
    assert _only(large, "provisioner_daemons")["provisioner_daemons_active"] >= 0
    assert pg.password not in text and sim.token not in text


def _shapes(found: set[Combo]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(ns, name, tuple(d for d, _ in dims)) for ns, name, dims in found}


def test_docs_list_exactly_the_fixed_metric_set() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## The metric set", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+)\|", table, flags=re.MULTILINE)
    documented = {(name, tuple(re.findall(r"`(\w+)`", dims))) for name, dims in rows}
    assert documented == set(METRICS)


# --- bounds ---------------------------------------------------------------------------


def _proxy_section(count: int, bad_every: int = 7) -> Section:
    regions = [
        {"name": f"proxy-{n:04d}", "path_app_url": f"https://user:pw@p{n}.example.com",
         "status": {"status": "unhealthy" if n % bad_every == 0 else "ok"}}
        for n in range(count)
    ]
    findings = [Finding("EWP04", f"proxy-{n:04d}: down", Severity.WARNING)
                for n in range(0, count, bad_every)]
    return Section.from_findings(findings, {"workspace_proxies": {"regions": regions}})


def test_a_huge_fleet_is_capped_keeping_the_proxies_that_are_not_ok(sink):
    metrics, stream = sink
    metrics.section("workspace_proxy", _proxy_section(MAX_LIST_ITEMS + 100))
    (record,) = records(stream)
    assert_valid_emf(record)
    proxies = record["proxies"]
    assert len(proxies) == MAX_LIST_ITEMS
    assert record["proxies_truncated"] == 100
    bad = {f"proxy-{n:04d}" for n in range(0, MAX_LIST_ITEMS + 100, 7)}
    assert bad <= {p["name"] for p in proxies}
    assert [p["name"] for p in proxies] == sorted(p["name"] for p in proxies)  # order kept
    assert record["codes"] == ["EWP04"]  # distinct codes, not one per finding
    assert "pw@" not in stream.getvalue()  # no URL is copied


def test_a_record_over_the_byte_limit_drops_its_lists_but_keeps_the_metric(
    sink, monkeypatch: pytest.MonkeyPatch
):
    metrics, stream = sink
    monkeypatch.setattr(metrics_module, "MAX_RECORD_BYTES", 4096)
    metrics.section("workspace_proxy", _proxy_section(MAX_LIST_ITEMS + 100))
    (line,) = stream.getvalue().splitlines()
    assert len(line) <= 4096
    record = json.loads(line)
    assert_valid_emf(record)
    assert "proxies" not in record and record["proxies_truncated"] == MAX_LIST_ITEMS + 100
    assert value(record, "SectionSeverity") == 1 and record["codes"] == ["EWP04"]


def test_a_broken_or_greedy_hook_cannot_touch_the_metric(
    sink, monkeypatch: pytest.MonkeyPatch
):
    from deployhealth.checks import access_url, database

    def broken(section: Section) -> dict[str, Any]:
        raise RuntimeError("postgresql://u:secret@db/coder")

    def greedy(section: Section) -> dict[str, Any]:
        return {"SectionSeverity": 0, "Section": "x", "_aws": {}, "Ready": 1, "mine": 1}

    monkeypatch.setattr(access_url, "section_properties", broken)
    monkeypatch.setattr(database, "section_properties", greedy)
    metrics, stream = sink
    failing = Section(severity=Severity.ERROR, healthy=False)
    metrics.section("access_url", failing)
    metrics.section("database", failing)
    first, second = records(stream)
    for record in (first, second):
        assert_valid_emf(record)
        assert value(record, "SectionSeverity") == 2 and metric_names(record) == {
            "SectionSeverity"
        }
    assert first["properties_error"] == "RuntimeError" and "secret" not in stream.getvalue()
    assert second["Section"] == "database" and second["mine"] == 1 and "Ready" not in second
