"""CloudWatch metrics as Embedded Metric Format records, built with Powertools.

One record per section run (dimensions Deployment and Section), one per readiness
evaluation (dimension Deployment). In Lambda the records go to stdout, where CloudWatch
Logs turns them into metrics; locally they go to stderr or nowhere, so that
`deployhealth check --json` keeps stdout for the report alone.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
    AmazonCloudWatchEMFProvider,
)

from deployhealth.model import Section, parse_rfc3339, section_failing


@dataclass(frozen=True)
class Datum:
    name: str
    unit: MetricUnit
    value: float


def _access_url_data(section: Section) -> Iterable[Datum]:
    status = section.details.get("status_code")
    if isinstance(status, int) and status > 0:
        yield Datum("AccessUrlStatusCode", MetricUnit.NoUnit, status)
    not_after = section.details.get("tls_not_after")
    if isinstance(not_after, str):
        left = (parse_rfc3339(not_after) - datetime.now(UTC)).total_seconds() / 86400
        yield Datum("TlsCertDaysLeft", MetricUnit.Count, round(left, 2))


def _database_data(section: Section) -> Iterable[Datum]:
    if section.details.get("reachable"):
        latency = section.details.get("latency_ms_exact", section.details.get("latency_ms"))
        if isinstance(latency, int | float):
            yield Datum("DatabaseLatencyMs", MetricUnit.Milliseconds, float(latency))


# Family-specific metrics; a family without an entry emits the common three only.
FAMILY_DATA: dict[str, Callable[[Section], Iterable[Datum]]] = {
    "access_url": _access_url_data,
    "database": _database_data,
}


class MetricsSink:
    """Writes EMF records to a stream, or drops them when the stream is None."""

    def __init__(self, namespace: str, deployment: str, stream: IO[str] | None) -> None:
        self.namespace = namespace
        self.deployment = deployment
        self.stream = stream
        self._lock = threading.Lock()

    def section(self, name: str, section: Section) -> dict[str, Any]:
        data = [
            Datum("SectionSeverity", MetricUnit.Count, section.severity.rank),
            Datum("SectionHealthy", MetricUnit.Count, 0 if section_failing(name, section) else 1),
            Datum("CheckDurationMs", MetricUnit.Milliseconds, section.duration_ms),
            *FAMILY_DATA.get(name, lambda _s: ())(section),
        ]
        return self._emit({"Deployment": self.deployment, "Section": name}, data)

    def ready(self, ready: bool) -> dict[str, Any]:
        return self._emit(
            {"Deployment": self.deployment}, [Datum("Ready", MetricUnit.Count, int(ready))]
        )

    def custom(self, dimensions: dict[str, str], data: Iterable[Datum]) -> dict[str, Any]:
        """For families with per-item dimensions (Region, Proxy)."""
        return self._emit({"Deployment": self.deployment, **dimensions}, list(data))

    def _emit(self, dimensions: dict[str, str], data: Iterable[Datum]) -> dict[str, Any]:
        # service="" on purpose: Powertools would otherwise add a `service` dimension from
        # POWERTOOLS_SERVICE_NAME, and the template's alarms match the exact dimension set.
        provider = AmazonCloudWatchEMFProvider(namespace=self.namespace, service="")
        for key, value in dimensions.items():
            provider.add_dimension(name=key, value=value)
        for datum in data:
            provider.add_metric(name=datum.name, unit=datum.unit, value=datum.value)
        record = provider.serialize_metric_set()
        if self.stream is not None:
            line = json.dumps(record, separators=(",", ":"))
            with self._lock:
                self.stream.write(line + "\n")
                self.stream.flush()
        return record
