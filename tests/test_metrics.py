"""EMF records as CloudWatch will read them, from sections produced by real probes."""

from __future__ import annotations

import io
import json

import pytest

from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.runner import run_family
from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import SimulatedDeployment


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def value(record: dict, name: str) -> float:
    """Powertools writes each metric as a list of values; one run writes one."""
    (only,) = record[name]
    return only


def metric_names(record: dict) -> set[str]:
    return {m["Name"] for m in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]}


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> tuple[MetricsSink, io.StringIO]:
    # The template sets a Powertools service name; the alarms still must match
    # {Deployment, Section} exactly, so no `service` dimension may sneak in.
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "deployhealth")
    stream = io.StringIO()
    return MetricsSink("DeployHealth", "prod", stream), stream


def test_access_url_record_has_the_alarm_dimensions_and_status_code(sink):
    metrics, stream = sink
    with SimulatedDeployment() as sim:
        section = run_family("access_url", Settings(access_url=sim.url), Deadline.after(5))
    metrics.section("access_url", section)
    (record,) = records(stream)
    directive = record["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "DeployHealth"
    assert directive["Dimensions"] == [["Deployment", "Section"]]
    assert record["Deployment"] == "prod" and record["Section"] == "access_url"
    assert metric_names(record) >= {
        "SectionSeverity", "SectionHealthy", "CheckDurationMs", "AccessUrlStatusCode"
    }
    assert value(record, "SectionSeverity") == 0 and value(record, "SectionHealthy") == 1
    assert value(record, "AccessUrlStatusCode") == 200


def test_failing_access_url_reports_severity_and_unhealthy(sink):
    metrics, stream = sink
    with SimulatedDeployment() as sim:
        sim.set_faults({"healthz": "502"})
        section = run_family("access_url", Settings(access_url=sim.url), Deadline.after(5))
    metrics.section("access_url", section)
    (record,) = records(stream)
    # EACS04 is a warning, and the access URL fails above ok.
    assert value(record, "SectionSeverity") == 1 and value(record, "SectionHealthy") == 0
    assert value(record, "AccessUrlStatusCode") == 502


def test_database_record_has_latency(sink, local_postgres):
    metrics, stream = sink
    settings = Settings(database_url=Secret(local_postgres.url), db_latency_threshold_ms=1000)
    section = run_family("database", settings, Deadline.after(10))
    metrics.section("database", section)
    (record,) = records(stream)
    assert "DatabaseLatencyMs" in metric_names(record)
    assert value(record, "DatabaseLatencyMs") == section.details["latency_ms_exact"]


def test_unreachable_database_has_no_latency_but_severity_2(sink):
    metrics, stream = sink
    settings = Settings(database_url=Secret("postgresql://u:p@127.0.0.1:1/coder"))
    section = run_family("database", settings, Deadline.after(5))
    metrics.section("database", section)
    (record,) = records(stream)
    assert "DatabaseLatencyMs" not in metric_names(record)
    assert value(record, "SectionSeverity") == 2 and value(record, "SectionHealthy") == 0


def test_ready_record_has_only_the_deployment_dimension(sink):
    metrics, stream = sink
    metrics.ready(False)
    (record,) = records(stream)
    assert record["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Deployment"]]
    assert value(record, "Ready") == 0
