"""CloudWatch metrics as Embedded Metric Format records, built with Powertools.

A custom metric costs $0.30 a month per metric name and set of dimension values, so the
metrics are few and fixed, and never grow with the deployment (docs/metrics.md):

    SectionSeverity  {Deployment, Section}  0 ok, 1 warning, 2 error   each section record
    Ready            {Deployment}           1 ready, 0 not ready       each readiness answer

That is one SectionSeverity per section (seven) plus one Ready per deployment. Nothing else
is declared in `_aws.CloudWatchMetrics`: every other value is a *property* of the same
record, a top-level key that CloudWatch keeps in the log event and Logs Insights can query,
at no metric cost. Powertools writes them with `add_metadata`, whose keys become top-level
keys of the record.

One record per section run. Its properties: `severity` ("ok", "warning", "error"),
`healthy` (bool, Coder's rule: access_url fails above ok, the others at error), `duration_ms`
(float) and `codes` (the section's distinct codes), then whatever the family's
`section_properties(section) -> dict[str, Any]` hook returns (found by name with
`deployhealth.checks.family_hook`): scalars, and per-item values as one list of small flat
objects (`derp_regions`, `proxies`). A hook reads only the section's details, which are
already scrubbed of secrets, and copies named values, never free text or URLs.

Bounds (a CloudWatch Logs event is at most 256 KB; EMF allows 100 metrics and 30
dimensions, far above the one metric and two dimensions here): a list longer than
MAX_LIST_ITEMS keeps that many items, those not "ok" first, and `<key>_truncated` says how
many were left out (absent when none were); strings are clipped to MAX_TEXT characters; and
should a record still exceed MAX_RECORD_BYTES, its per-item lists are left out (their
`<key>_truncated` then says how many items they had), so that the metric always gets
through. A hook that raises costs its own properties only (`properties_error` names the
exception class).

In the record, the dimensions and the metric come first, then scalar properties, then
lists: Logs Insights discovers a limited number of fields per JSON event, and the lists are
read with `jsonParse(@message)` and `unnest` anyway (docs/metrics.md). The metric's value is
a plain number rather than Powertools' one-item list (EMF takes either), so that it is a
number field in Logs Insights too.

In Lambda the records go to stdout, where CloudWatch Logs turns them into metrics; locally
they go to stderr or nowhere, so that `deployhealth check --json` keeps stdout for the
report alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
    AmazonCloudWatchEMFProvider,
)

from deployhealth.checks import family_hook
from deployhealth.model import Section, section_failing

# The hook a family module may define next to `probe`:
#   section_properties(section) -> dict[str, Any]   properties of the section's own record
SECTION_PROPERTIES = "section_properties"

SECTION_SEVERITY = "SectionSeverity"
READY = "Ready"
# The whole metric set: (name, dimension names). Nothing else is ever declared a metric.
METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (SECTION_SEVERITY, ("Deployment", "Section")),
    (READY, ("Deployment",)),
)

MAX_LIST_ITEMS = 500
MAX_TEXT = 128
# Under CloudWatch Logs' 256 KB per event (which counts 26 bytes of overhead), with room.
MAX_RECORD_BYTES = 200 * 1024

# Keys a property may not take: they are the record's structure, metrics and dimensions.
_RESERVED = frozenset({"_aws", "Deployment", "Section", SECTION_SEVERITY, READY})
_TRUNCATED = "_truncated"


@dataclass(frozen=True)
class Datum:
    name: str
    unit: MetricUnit
    value: int


class MetricsSink:
    """Writes EMF records to a stream, or drops them when the stream is None."""

    def __init__(self, namespace: str, deployment: str, stream: IO[str] | None) -> None:
        self.namespace = namespace
        self.deployment = deployment
        self.stream = stream
        self._lock = threading.Lock()
        # Every /readyz writes a Ready record; all of it but the timestamp and the value is
        # the same each time, so it is built (through Powertools) once, here.
        self._ready = _ReadyTemplate(self._record(*self._ready_parts(0)))

    def section(self, name: str, section: Section) -> dict[str, Any]:
        """The section's one record: SectionSeverity, and every other value as a property."""
        properties: dict[str, Any] = {
            "severity": section.severity.value,
            "healthy": not section_failing(name, section),
            "duration_ms": round(section.duration_ms, 1),
            "codes": list(dict.fromkeys(section.codes)),
        }
        hook = family_hook(name, SECTION_PROPERTIES)
        if hook is not None:
            try:
                extra = dict(hook(section))
            except Exception as exc:  # a broken hook must not cost the alarm its data point
                extra = {"properties_error": type(exc).__name__}
            properties.update(
                (str(key), value) for key, value in extra.items() if key not in _RESERVED
            )
        return self._emit(
            {"Deployment": self.deployment, "Section": name},
            Datum(SECTION_SEVERITY, MetricUnit.Count, section.severity.rank),
            properties,
        )

    def ready(self, ready: bool) -> dict[str, Any]:
        record, line = self._ready.fill(int(time.time() * 1000), int(ready))
        if line is None:  # Powertools changed its record's shape: the general path
            return self._emit(*self._ready_parts(int(ready)))
        self._write(line)
        return record

    def _ready_parts(self, value: int) -> tuple[dict[str, str], Datum, dict[str, Any]]:
        return {"Deployment": self.deployment}, Datum(READY, MetricUnit.Count, value), {}

    def _emit(
        self, dimensions: dict[str, str], datum: Datum, properties: dict[str, Any]
    ) -> dict[str, Any]:
        bounded = _bounded(properties)
        record = self._record(dimensions, datum, bounded)
        line = _line(record)
        if len(line) > MAX_RECORD_BYTES:  # ASCII (json.dumps escapes the rest): chars = bytes
            record = self._record(dimensions, datum, _without_item_lists(bounded))
            line = _line(record)
        self._write(line)
        return record

    def _write(self, line: str) -> None:
        if self.stream is not None:
            with self._lock:
                self.stream.write(line + "\n")
                self.stream.flush()

    def _record(
        self, dimensions: dict[str, str], datum: Datum, properties: dict[str, Any]
    ) -> dict[str, Any]:
        # service="" on purpose: Powertools would otherwise add a `service` dimension from
        # POWERTOOLS_SERVICE_NAME, and the template's alarms match the exact dimension set.
        provider = AmazonCloudWatchEMFProvider(namespace=self.namespace, service="")
        for key, value in dimensions.items():
            provider.add_dimension(name=key, value=value)
        provider.add_metric(name=datum.name, unit=datum.unit, value=datum.value)
        for key, value in properties.items():
            provider.add_metadata(key=key, value=value)
        serialized: dict[str, Any] = dict(provider.serialize_metric_set())
        # Powertools writes [value]; EMF also takes a plain number, which Logs Insights can
        # then query as the number it is (a list would become a `SectionSeverity.0` field).
        serialized[datum.name] = datum.value
        # Powertools puts metadata before the metric values; lists go last instead.
        head = ["_aws", *dimensions, datum.name]
        scalars = [k for k, v in properties.items() if not isinstance(v, list)]
        lists = [k for k, v in properties.items() if isinstance(v, list)]
        return {key: serialized[key] for key in [*head, *scalars, *lists]}


class _ReadyTemplate:
    """The Ready record built once, its timestamp and value filled in per call.

    The line is the template's own JSON text cut at the two numbers that change, so it is
    byte for byte what `_emit` writes for the same timestamp and value.
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self._record = record
        aws = record["_aws"]
        keys = list(record)
        # The shape this relies on: `_aws` first with `Timestamp` first in it, and the metric
        # value last. If Powertools ever builds it otherwise, `fill` says so (None).
        self._ok = keys[0] == "_aws" and keys[-1] == READY and next(iter(aws)) == "Timestamp"
        self._prefix = self._middle = ""
        if self._ok:
            text = _line({**record, "_aws": {**aws, "Timestamp": 0}, READY: 0})
            head, tail = '{"_aws":{"Timestamp":0', f',"{READY}":0}}'
            self._ok = text.startswith(head) and text.endswith(tail)
            self._prefix = '{"_aws":{"Timestamp":'
            self._middle = text[len(head) : -len(tail)] + f',"{READY}":'

    def fill(self, timestamp: int, value: int) -> tuple[dict[str, Any], str | None]:
        record = dict(self._record)
        record["_aws"] = {**self._record["_aws"], "Timestamp": timestamp}
        record[READY] = value
        if not self._ok:
            return record, None
        return record, f"{self._prefix}{timestamp}{self._middle}{value}}}"


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), default=str)


def _bounded(properties: dict[str, Any]) -> dict[str, Any]:
    """Lists capped at MAX_LIST_ITEMS (items not "ok" kept first) and their text clipped."""
    out: dict[str, Any] = {}
    for key, value in properties.items():
        if not isinstance(value, list):
            out[key] = _clip(value)
            continue
        kept = value
        if len(value) > MAX_LIST_ITEMS:
            order = sorted(range(len(value)), key=lambda n: _is_ok(value[n]))
            chosen = sorted(order[:MAX_LIST_ITEMS])
            kept = [value[n] for n in chosen]
            out[key + _TRUNCATED] = len(value) - len(kept)
        out[key] = [_clip(item) for item in kept]
    return out


def _without_item_lists(bounded: dict[str, Any]) -> dict[str, Any]:
    """The last resort for a record over MAX_RECORD_BYTES: counts instead of item lists."""
    out = dict(bounded)
    for key, value in bounded.items():
        if isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
            del out[key]
            out[key + _TRUNCATED] = len(value) + bounded.get(key + _TRUNCATED, 0)
    return out


def _is_ok(item: Any) -> bool:
    if not isinstance(item, Mapping):
        return True
    return item.get("status", item.get("severity", "ok")) == "ok"


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, Mapping):
        return {str(k): _clip(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clip(v) for v in value]
    return value
