"""Sections and the report: the Coder-compatible shapes every family returns.

A family returns one `Section`. Its JSON form (`Section.to_dict`) is what Coder's
`/api/v2/debug/health` emits for the same section, plus deployhealth's own keys
`checked_at` and `duration_ms`. Family-specific keys live in `details` and are merged
into the top level of the JSON, so readers of Coder's report find them where they expect.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class Severity(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def worst(cls, severities: Iterable[Severity]) -> Severity:
        return max(severities, key=lambda s: s.rank, default=cls.OK)


_RANK = {Severity.OK: 0, Severity.WARNING: 1, Severity.ERROR: 2}


# Section keys, in report order. Coder's settings spell them in CamelCase; both are accepted.
SECTION_NAMES: tuple[str, ...] = (
    "access_url",
    "database",
    "websocket",
    "derp",
    "workspace_proxy",
    "provisioner_daemons",
    "entitlements",
)
CODER_SECTION_NAMES: dict[str, str] = {
    "access_url": "AccessURL",
    "database": "Database",
    "websocket": "Websocket",
    "derp": "DERP",
    "workspace_proxy": "WorkspaceProxy",
    "provisioner_daemons": "ProvisionerDaemons",
    "entitlements": "Entitlements",
}
_BY_ANY_SPELLING = {
    **{k.lower(): k for k in SECTION_NAMES},
    **{v.lower(): k for k, v in CODER_SECTION_NAMES.items()},
}


# The six sections of Coder's `HealthcheckReport` (codersdk/healthsdk), each with the keys Coder
# requires beyond BaseReport's (`severity`, `warnings`, `dismissed`) and `healthy`, at Go's zero
# values: what Coder's report carries for a section that found nothing. A section without
# them (a family abandoned at its deadline, a result stored by an older version) gets these.
CODER_SECTION_KEYS: dict[str, dict[str, Any]] = {
    "access_url": {"access_url": "", "reachable": False, "status_code": 0, "healthz_response": ""},
    "database": {"reachable": False, "latency": "", "latency_ms": 0, "threshold_ms": 0},
    "websocket": {"body": "", "code": 0},
    # `netcheck` and `netcheck_err` are omitempty in Coder's type: absent, never null.
    "derp": {"regions": {}, "netcheck_logs": []},
    "workspace_proxy": {"workspace_proxies": {"regions": []}},
    "provisioner_daemons": {"items": []},
}
# Go's zero values for a uuid.UUID and a time.Time: what Coder's report holds where a source
# does not know the value (Coder's Go client cannot decode "" or null into either).
ZERO_UUID = "00000000-0000-0000-0000-000000000000"
ZERO_TIME = "0001-01-01T00:00:00Z"


def coder_uuid(text: str) -> str:
    """`text` when it is a UUID, else Go's zero UUID.

    Coder's report types hold uuid.UUID values, and its Go client cannot decode anything else;
    an id only a static inventory gives ("eu-1", or none) is shown as the zero UUID.
    """
    try:
        return str(uuid.UUID(text))
    except (ValueError, AttributeError, TypeError):
        return ZERO_UUID


def coder_section_keys(name: str) -> dict[str, Any]:
    """A fresh copy of Coder's required keys of section `name` at zero values ({} for ours)."""
    return copy.deepcopy(CODER_SECTION_KEYS.get(name, {}))


class UnknownSectionError(ValueError):
    def __init__(self, name: str) -> None:
        known = ", ".join(SECTION_NAMES)
        super().__init__(f"unknown section {name!r}; known sections: {known}")
        self.name = name


def canonical_section(name: str) -> str:
    """Map `Database`, `database` or `DATABASE` to the snake_case key; raise on anything else."""
    try:
        return _BY_ANY_SPELLING[name.strip().lower()]
    except KeyError:
        raise UnknownSectionError(name) from None


@dataclass(frozen=True)
class Finding:
    """One coded observation. Severity OK marks a message-only code (it informs, never raises)."""

    code: str
    message: str
    severity: Severity = Severity.WARNING

    def text(self) -> str:
        return f"{self.code}: {self.message}"


# How far ahead of this machine's clock a result may be dated and still count as "now": clocks
# of the writer and the reader drift apart by seconds, never by minutes. A result dated further
# ahead (a clock that ran fast, then was corrected) is not believed: readiness fails it, and
# the store lets any later put replace it as latest (docs/design.md, "Result store").
FUTURE_TOLERANCE_SECONDS = 60.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


# The keys every section emits itself; `details` cannot override them.
_OWN_KEYS = frozenset(
    {"healthy", "severity", "warnings", "error", "dismissed", "checked_at", "duration_ms"}
)


@dataclass
class Section:
    """The result of one family run.

    `healthy` is None for sections that have no such key in Coder's report
    (provisioner_daemons); `dismissed` is never stored, it is applied at read time.
    """

    severity: Severity
    warnings: list[Finding] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)
    healthy: bool | None = True
    details: dict[str, Any] = field(default_factory=dict)
    checked_at: datetime = field(default_factory=utcnow)
    duration_ms: float = 0.0
    dismissed: bool = False

    @classmethod
    def from_findings(
        cls,
        findings: Iterable[Finding],
        details: Mapping[str, Any] | None = None,
        *,
        healthy: bool | None = None,
        healthy_key: bool = True,
    ) -> Section:
        """Build a section whose severity is the worst finding.

        Error-level findings make up `error`; the rest are `warnings`. Unless given,
        `healthy` is "no error" (most families' rule); `healthy_key=False` drops the key.
        """
        found = list(findings)
        errors = [f for f in found if f.severity is Severity.ERROR]
        warnings = [f for f in found if f.severity is not Severity.ERROR]
        severity = Severity.worst(f.severity for f in found)
        if not healthy_key:
            healthy_value: bool | None = None
        elif healthy is None:
            healthy_value = not errors
        else:
            healthy_value = healthy
        return cls(
            severity=severity,
            warnings=warnings,
            errors=errors,
            healthy=healthy_value,
            details=dict(details or {}),
        )

    @property
    def error(self) -> str | None:
        if not self.errors:
            return None
        return "\n".join(f.text() for f in self.errors)

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.errors] + [f.code for f in self.warnings]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.healthy is not None:
            out["healthy"] = self.healthy
        out["severity"] = self.severity.value
        out["warnings"] = [{"code": w.code, "message": w.message} for w in self.warnings]
        if self.errors:
            out["error"] = self.error
        out["dismissed"] = self.dismissed
        # A family detail named like one of the section's own keys (entitlements reports
        # Coder's `warnings` strings) must not replace it: readers rely on these shapes.
        out.update({k: v for k, v in self.details.items() if k not in _OWN_KEYS})
        out["checked_at"] = rfc3339(self.checked_at)
        out["duration_ms"] = round(self.duration_ms, 3)
        return out

    def to_stored(self) -> dict[str, Any]:
        """The stored form: the report form without `dismissed`, plus the structured errors."""
        out = self.to_dict()
        out.pop("dismissed", None)
        # Not "errors": entitlements has a detail of that name (Coder's entitlement errors).
        out["error_findings"] = [
            {"code": e.code, "message": e.message} for e in self.errors
        ]
        # Warnings keep their own severity so message-only codes survive a round trip.
        out["warnings_severity"] = [w.severity.value for w in self.warnings]
        return out

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> Section:
        data = dict(data)
        severities = data.pop("warnings_severity", None)
        warnings_raw = data.pop("warnings", []) or []
        if severities is None or len(severities) != len(warnings_raw):
            severities = [Severity.WARNING.value] * len(warnings_raw)
        warnings = [
            Finding(w["code"], w["message"], Severity(s))
            for w, s in zip(warnings_raw, severities, strict=True)
        ]
        errors = [
            Finding(e["code"], e["message"], Severity.ERROR)
            for e in data.pop("error_findings", []) or []
        ]
        data.pop("error", None)
        data.pop("dismissed", None)
        healthy = data.pop("healthy", None)
        severity = Severity(data.pop("severity"))
        checked_at = parse_rfc3339(data.pop("checked_at"))
        duration_ms = float(data.pop("duration_ms", 0.0))
        return cls(
            severity=severity,
            warnings=warnings,
            errors=errors,
            healthy=healthy,
            details=data,
            checked_at=checked_at,
            duration_ms=duration_ms,
        )


def section_failing(name: str, section: Section) -> bool:
    """Coder's rule: access_url fails above ok, every other section at error."""
    return severity_failing(name, section.severity)


def severity_failing(name: str, severity: Severity) -> bool:
    """`section_failing` for a section of this severity (what a summary knows)."""
    if name == "access_url":
        return severity is not Severity.OK
    return severity is Severity.ERROR


# How many of a section's latest results hysteresis (READY_FAIL_AFTER, READY_RECOVER_AFTER)
# looks back on: a summary's runs cover at most this many.
HYSTERESIS_WINDOW = 100


def moves_latest(new: float, current: float, now: float) -> bool:
    """Whether a result checked at `new` (epoch s) replaces the latest checked at `current`.

    Forward only, except past a latest dated in the future beyond the tolerance (a clock
    that ran fast): it would otherwise shadow every real result until the clock caught up.
    """
    return new > current or current > now + FUTURE_TOLERANCE_SECONDS


@dataclass(frozen=True)
class SectionSummary:
    """What readiness reads of a stored latest section, kept beside its full body.

    `runs` is the run-length record of the section's results in the order they became latest,
    oldest first: `(failing, count)` pairs, consecutive pairs differing in `failing`, counts
    adding up to at most HYSTERESIS_WINDOW; the last run ends with this result. Hysteresis
    computes its pass/fail state from it (readiness.hysteresis_failing) instead of replaying
    stored bodies. Always built by `summarize`, so that a summary never disagrees with the
    section stored beside it.
    """

    severity: Severity
    codes: tuple[str, ...]  # distinct, in the section's order (errors first)
    checked_at: datetime
    runs: tuple[tuple[bool, int], ...]

    def to_stored(self) -> str:
        """Compact JSON text: a few dozen bytes, stored beside the body in the same write."""
        return json.dumps(
            {
                "severity": self.severity.value,
                "codes": list(self.codes),
                "checked_at": rfc3339(self.checked_at),
                "runs": [[int(failing), count] for failing, count in self.runs],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_stored(cls, text: str) -> SectionSummary:
        return _summary_from_text(text)


# A stored summary changes once per check interval and is read on every /readyz: each text
# is decoded once. Summaries are immutable, so sharing one between readers is safe.
@functools.lru_cache(maxsize=256)
def _summary_from_text(text: str) -> SectionSummary:
    data = json.loads(text)
    return SectionSummary(
        Severity(data["severity"]),
        tuple(data["codes"]),
        parse_rfc3339(data["checked_at"]),
        tuple((bool(failing), int(count)) for failing, count in data["runs"]),
    )


def summarize(
    name: str,
    section: Section,
    previous: SectionSummary | None = None,
    *,
    now: float | None = None,
) -> SectionSummary:
    """The summary of `section` as it becomes latest, after `previous` (the latest it replaces).

    A previous latest dated more than FUTURE_TOLERANCE_SECONDS ahead of `now` (epoch s, the
    writer's clock) leaves its own result out of the runs, as replaying history at read time
    skipped such results; the results before it still count.
    """
    failing = section_failing(name, section)
    runs: list[tuple[bool, int]] = list(previous.runs) if previous is not None else []
    if previous is not None and runs:
        clock = time.time() if now is None else now
        if previous.checked_at.timestamp() > clock + FUTURE_TOLERANCE_SECONDS:
            last_failing, last_count = runs.pop()
            if last_count > 1:
                runs.append((last_failing, last_count - 1))
    if runs and runs[-1][0] == failing:
        runs[-1] = (failing, runs[-1][1] + 1)
    else:
        runs.append((failing, 1))
    excess = sum(count for _, count in runs) - HYSTERESIS_WINDOW
    while excess > 0:  # the oldest results fall out of the window
        first_failing, first_count = runs[0]
        if first_count > excess:
            runs[0] = (first_failing, first_count - excess)
            break
        runs.pop(0)
        excess -= first_count
    return SectionSummary(
        section.severity, tuple(dict.fromkeys(section.codes)), section.checked_at, tuple(runs)
    )


@dataclass
class Report:
    """The whole health report, shaped like Coder's `healthsdk.HealthcheckReport`.

    Coder's type requires all six of its sections and `coder_version`. A section without a
    result (a `check --section` run, a family that has not reported yet) is shown as an
    ENOTCHECKED warning at Coder's zero values (`not_checked`), and `coder_version` is ""
    when buildinfo could not be read. Such a section counts in `severity`; `healthy` judges
    the sections that have results (a section nobody checked has not failed).
    """

    deployment: str
    sections: dict[str, Section]
    time: datetime = field(default_factory=utcnow)
    coder_version: str | None = None

    def shown_sections(self) -> dict[str, Section]:
        """The sections as the JSON report shows them: Coder's six always, then ours."""
        out: dict[str, Section] = {}
        for name in SECTION_NAMES:
            section = self.sections.get(name)
            if section is None and name in CODER_SECTION_KEYS:
                section = not_checked(name, self.time)
            if section is not None:
                out[name] = section
        return out

    @property
    def severity(self) -> Severity:
        return Severity.worst(s.severity for s in self.shown_sections().values())

    @property
    def healthy(self) -> bool:
        # Dismissed sections still count: dismissal only hides a section from view.
        return not any(section_failing(name, s) for name, s in self.sections.items())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": rfc3339(self.time),
            "healthy": self.healthy,
            "severity": self.severity.value,
        }
        for name, section in self.shown_sections().items():
            data = section.to_dict()
            for key, zero in coder_section_keys(name).items():
                data.setdefault(key, zero)
            if name != "provisioner_daemons" and name in CODER_SECTION_KEYS:
                data.setdefault("healthy", section.severity is not Severity.ERROR)
            out[name] = data
        # Required in Coder's type: "" when no family could read the server's buildinfo.
        out["coder_version"] = self.coder_version or ""
        out["deployment"] = self.deployment
        return out

    def to_text(self) -> str:
        """Coder's `?format=text` form: time, overall health, then one `name: bool` per section.

        Coder prints derp, access_url, websocket, database in that order; the sections it
        does not print follow in report order. A section without a `healthy` key
        (provisioner_daemons) is healthy when it is below error.
        """
        # Go's time.RFC3339, as Coder formats it: whole seconds.
        when = self.time.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        lines = [f"time: {when}", f"healthy: {_go_bool(self.healthy)}"]
        order = ["derp", "access_url", "websocket", "database"]
        order += [n for n in SECTION_NAMES if n not in order]
        for name in order:
            section = self.sections.get(name)
            if section is None:
                continue
            healthy = section.healthy
            if healthy is None:
                healthy = section.severity is not Severity.ERROR
            lines.append(f"{name}: {_go_bool(healthy)}")
        return "\n".join(lines) + "\n"


def not_checked(name: str, when: datetime | None = None) -> Section:
    """The stand-in for a section of Coder's report that has no result: ENOTCHECKED."""
    message = (
        f"the {name} section has no result: it was not run (a `check --section` run checks "
        f"only the named sections) or its family has not reported yet; run it, or check "
        f"that the {name} family is scheduled and can write its results"
    )
    section = Section.from_findings(
        [Finding("ENOTCHECKED", message, Severity.WARNING)],
        coder_section_keys(name),
        healthy=False,
        healthy_key=name != "provisioner_daemons",
    )
    if when is not None:
        section.checked_at = when
    return section


def _go_bool(value: bool) -> str:
    return "true" if value else "false"
