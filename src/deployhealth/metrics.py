"""CloudWatch metrics as Embedded Metric Format records, built with Powertools.

One record per section run (dimensions Deployment and Section), one per readiness
evaluation (dimension Deployment). In Lambda the records go to stdout, where CloudWatch
Logs turns them into metrics; locally they go to stderr or nowhere, so that
`deployhealth check --json` keeps stdout for the report alone.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
    AmazonCloudWatchEMFProvider,
)

from deployhealth.checks import family_hook
from deployhealth.model import Section, section_failing


@dataclass(frozen=True)
class Datum:
    name: str
    unit: MetricUnit
    value: float


# A family module may define, next to `probe`:
#   section_metrics(section) -> Iterable[Datum]    extra data in the section's own record
#   item_metrics(section) -> Iterable[tuple[dict[str, str], list[Datum]]]
#                                                   records with extra dimensions (Region, Proxy)
SECTION_METRICS = "section_metrics"
ITEM_METRICS = "item_metrics"


class MetricsSink:
    """Writes EMF records to a stream, or drops them when the stream is None."""

    def __init__(self, namespace: str, deployment: str, stream: IO[str] | None) -> None:
        self.namespace = namespace
        self.deployment = deployment
        self.stream = stream
        self._lock = threading.Lock()

    def section(self, name: str, section: Section) -> dict[str, Any]:
        """The section's record (returned), then any per-item records of its family."""
        extra = family_hook(name, SECTION_METRICS)
        data = [
            Datum("SectionSeverity", MetricUnit.Count, section.severity.rank),
            Datum("SectionHealthy", MetricUnit.Count, 0 if section_failing(name, section) else 1),
            Datum("CheckDurationMs", MetricUnit.Milliseconds, section.duration_ms),
            *(extra(section) if extra else ()),
        ]
        record = self._emit({"Deployment": self.deployment, "Section": name}, data)
        items = family_hook(name, ITEM_METRICS)
        for dimensions, item_data in items(section) if items else ():
            if item_data:
                self._emit(
                    {"Deployment": self.deployment, "Section": name, **dimensions}, item_data
                )
        return record

    def ready(self, ready: bool) -> dict[str, Any]:
        return self._emit(
            {"Deployment": self.deployment}, [Datum("Ready", MetricUnit.Count, int(ready))]
        )

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
