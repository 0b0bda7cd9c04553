"""Readiness: can the deployment serve right now, judged from stored results.

Pure functions of (settings, latest results, dismissed, excluded, now), so the API, the
CLI and tests share one rule set:

- a gating section passes when its latest result is fresh and not failing;
- no result yet, or a stale one, fails: unknown is not ready;
- so does a result dated more than `FUTURE_TOLERANCE_SECONDS` ahead of now: a clock that ran
  fast must not make an old result look fresh for as long as it ran ahead;
- dismissed sections are not gating; excluded ones are listed but not judged;
- optional hysteresis: fail after N consecutive failing results, recover after M passing.

`evaluate_summaries` judges from the stored summaries (what `/readyz` reads: severity, codes,
checked time and the run-length record of recent results); `evaluate` from full sections,
replaying `history` for hysteresis. Both apply the same rules through `_judge`.

What is shown is only check names and codes: `/readyz` is public.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from deployhealth.model import (
    FUTURE_TOLERANCE_SECONDS,
    HYSTERESIS_WINDOW,
    Section,
    SectionSummary,
    section_failing,
    severity_failing,
    summarize,
    utcnow,
)
from deployhealth.settings import Settings

__all__ = [
    "HYSTERESIS_WINDOW",
    "CheckStatus",
    "Readiness",
    "evaluate",
    "evaluate_summaries",
    "gating_sections",
    "hysteresis_failing",
]


@dataclass(frozen=True)
class CheckStatus:
    name: str
    status: str  # "ok", "failed" or "excluded"
    reason: str = ""  # for failed: the codes, "no result yet" or "stale ..."
    codes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        if self.status == "ok":
            return f"[+]{self.name} ok"
        if self.status == "excluded":
            return f"[+]{self.name} excluded: ok"
        return f"[-]{self.name} failed: {self.reason}"


@dataclass(frozen=True)
class Readiness:
    checks: tuple[CheckStatus, ...]
    evaluated_at: datetime = field(default_factory=utcnow)

    @property
    def ready(self) -> bool:
        return all(c.passed for c in self.checks)

    def text(self, verbose: bool) -> str:
        if self.ready and not verbose:
            return "ok"
        shown = self.checks if verbose else [c for c in self.checks if not c.passed]
        lines = [c.line() for c in shown]
        lines.append("readyz check passed" if self.ready else "readyz check failed")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "checks": [
                {"name": c.name, "status": c.status, "reason": c.reason, "codes": list(c.codes)}
                for c in self.checks
            ],
        }


def gating_sections(settings: Settings, dismissed: Iterable[str]) -> list[str]:
    gone = set(dismissed)
    return [s for s in settings.gating_sections if s not in gone]


def evaluate(
    settings: Settings,
    latest: Mapping[str, Section],
    sections: Sequence[str],
    *,
    excluded: Iterable[str] = (),
    history: Callable[[str], list[Section]] | None = None,
    now: datetime | None = None,
) -> Readiness:
    """Judge `sections` (already filtered for dismissal) from their latest results.

    `history(name)` returns past results newest first; it is only called when hysteresis
    is configured, so the default path is the single read of `latest`.
    """
    now = now or utcnow()
    hysteresis = _hysteresis_on(settings)

    def judge(name: str) -> CheckStatus:
        section = latest.get(name)
        summary = None if section is None else summarize(name, section)
        replay: Callable[[], bool] | None = None
        if hysteresis and history is not None and section is not None:
            replay = _replayer(settings, name, section, history, now)
        return _judge(settings, name, summary, replay, now)

    return _evaluate(sections, excluded, now, judge)


def evaluate_summaries(
    settings: Settings,
    summaries: Mapping[str, SectionSummary],
    sections: Sequence[str],
    *,
    excluded: Iterable[str] = (),
    now: datetime | None = None,
) -> Readiness:
    """`evaluate` from stored summaries: hysteresis reads each summary's runs, no history."""
    now = now or utcnow()
    hysteresis = _hysteresis_on(settings)

    def judge(name: str) -> CheckStatus:
        summary = summaries.get(name)
        replay: Callable[[], bool] | None = None
        if hysteresis and summary is not None:
            replay = functools.partial(
                hysteresis_failing,
                summary.runs,
                settings.ready_fail_after,
                settings.ready_recover_after,
            )
        return _judge(settings, name, summary, replay, now)

    return _evaluate(sections, excluded, now, judge)


def _evaluate(
    sections: Sequence[str],
    excluded: Iterable[str],
    now: datetime,
    judge: Callable[[str], CheckStatus],
) -> Readiness:
    """Every section judged in order, the excluded ones listed but not judged."""
    skip = set(excluded)
    checks = (
        CheckStatus(name, "excluded") if name in skip else judge(name) for name in sections
    )
    return Readiness(tuple(checks), now)


def _hysteresis_on(settings: Settings) -> bool:
    return settings.ready_fail_after > 1 or settings.ready_recover_after > 1


def _replayer(
    settings: Settings,
    name: str,
    section: Section,
    history: Callable[[str], list[Section]],
    now: datetime,
) -> Callable[[], bool]:
    def replay() -> bool:
        # Results dated in the future are not replayed: they would count as the newest.
        horizon = now + timedelta(seconds=FUTURE_TOLERANCE_SECONDS)
        past = [s for s in history(name) if s.checked_at <= horizon]
        return _replay(
            name, past or [section], settings.ready_fail_after, settings.ready_recover_after
        )

    return replay


def _judge(
    settings: Settings,
    name: str,
    latest: SectionSummary | None,
    replay: Callable[[], bool] | None,
    now: datetime,
) -> CheckStatus:
    """One section's verdict; `replay()` gives the hysteresis state when it applies."""
    if latest is None:
        return CheckStatus(name, "failed", "no result yet")
    age = (now - latest.checked_at).total_seconds()
    if -age > FUTURE_TOLERANCE_SECONDS:
        return CheckStatus(
            name,
            "failed",
            f"dated in the future: last result {-age:.0f} s ahead of this clock "
            f"(tolerance {FUTURE_TOLERANCE_SECONDS:.0f} s)",
        )
    if age > settings.stale_after:
        return CheckStatus(
            name,
            "failed",
            f"stale: last result {age:.0f} s ago (limit {settings.stale_after:.0f} s)",
        )
    newest_failing = severity_failing(name, latest.severity)
    failing = replay() if replay is not None else newest_failing
    if not failing:
        return CheckStatus(name, "ok")
    # A failing section without a code (a DERP region whose nodes failed) still says why.
    codes = latest.codes or (f"severity {latest.severity.value}",)
    if not newest_failing:
        # Held failed by hysteresis while the newest result already passes.
        return CheckStatus(
            name, "failed", f"recovering ({settings.ready_recover_after} passing needed)", codes
        )
    return CheckStatus(name, "failed", " ".join(codes), codes)


def hysteresis_failing(
    runs: Sequence[tuple[bool, int]], fail_after: int, recover_after: int
) -> bool:
    """`_replay`'s state machine over a run-length record (oldest first), in O(runs).

    Within a failing run the count of consecutive failures climbs from 1 to its length, so
    the state turns failing when the run reaches `fail_after`; a passing run likewise.
    """
    failing = False
    for run_failing, count in runs:
        if run_failing:
            if count >= fail_after:
                failing = True
        elif count >= recover_after:
            failing = False
    return failing


def _replay(name: str, newest_first: list[Section], fail_after: int, recover_after: int) -> bool:
    """Replay past results oldest first through the N-fail / M-recover state machine."""
    failing = False
    fails = passes = 0
    for section in reversed(newest_first[:HYSTERESIS_WINDOW]):
        if section_failing(name, section):
            fails, passes = fails + 1, 0
            if fails >= fail_after:
                failing = True
        else:
            fails, passes = 0, passes + 1
            if passes >= recover_after:
                failing = False
    return failing
