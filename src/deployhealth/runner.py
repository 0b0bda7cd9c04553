"""Runs families: each under its deadline, never raising, all of them concurrently.

A probe respects its deadline through its socket timeouts; the runner is the backstop.
It runs the probe on a worker thread and, if the probe is still busy a moment after the
deadline, returns an EUNKNOWN section instead of waiting: a check that hangs is worse
than one that fails. The stuck thread is abandoned (daemon), never joined.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from deployhealth.checks import FAMILIES, Probe, family_hook, get_probe
from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.model import Finding, Section, Severity, coder_section_keys, utcnow
from deployhealth.redact import Redactor
from deployhealth.settings import Settings
from deployhealth.store import ResultStore, StoreUnavailable

# How long past its deadline a probe may take to hand back what it found.
DEADLINE_GRACE_SECONDS = 0.5


def run_family(family: str, settings: Settings, deadline: Deadline | None = None) -> Section:
    """Run one family and return its section; never raises, never outlives the deadline."""
    if deadline is None:
        deadline = Deadline.after(settings.deadline_for(family))
    return run_probe(family, lambda s, d: get_probe(family)(s, d), settings, deadline)


def run_probe(family: str, probe: Probe, settings: Settings, deadline: Deadline) -> Section:
    """Run `probe` on a worker thread under `deadline`: whatever it does, a section comes back.

    An exception becomes EUNKNOWN with its class and message (secrets scrubbed, no
    traceback); a probe still busy DEADLINE_GRACE_SECONDS after the deadline is abandoned
    and reported as EUNKNOWN too.
    """
    redactor = Redactor.for_settings(settings)
    started_at = utcnow()
    start = time.monotonic()
    outcome: list[Section | BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            outcome.append(probe(settings, deadline))
        except BaseException as exc:  # every failure becomes a section
            outcome.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=work, name=f"probe-{family}", daemon=True)
    worker.start()
    if not done.wait(deadline.remaining() + DEADLINE_GRACE_SECONDS):
        budget = deadline.at - start
        section = _unknown(family, f"the check did not finish within its {budget:.1f} s deadline")
    else:
        result = outcome[0]
        if isinstance(result, Section):
            section = result
        else:
            message = redactor.scrub(f"{type(result).__name__}: {result}")
            section = _unknown(family, message)
    # The backstop for secrets: whatever a probe quoted (an exception's text, a URL with
    # user:password@), nothing masked here reaches the output, the store or the API.
    section = redactor.scrub_section(section)
    section.checked_at = started_at
    section.duration_ms = (time.monotonic() - start) * 1000.0
    return section


def _unknown(family: str, message: str) -> Section:
    # With the keys Coder's report requires of the section, at Go's zero values, so that the
    # report keeps Coder's shape whatever happened to the probe.
    return Section.from_findings(
        [Finding("EUNKNOWN", message, Severity.ERROR)],
        coder_section_keys(family),
        healthy_key=family != "provisioner_daemons",
    )


def run_families(
    settings: Settings,
    families: Iterable[str] = FAMILIES,
    *,
    max_seconds: float | None = None,
    on_done: Callable[[str, Section], None] | None = None,
) -> dict[str, Section]:
    """Run families concurrently; `max_seconds` caps every family's deadline (force runs)."""
    names = list(dict.fromkeys(families))
    if not names:
        return {}

    def one(name: str) -> tuple[str, Section]:
        seconds = settings.deadline_for(name)
        if max_seconds is not None:
            seconds = min(seconds, max_seconds)
        section = run_family(name, settings, Deadline.after(seconds))
        if on_done is not None:
            on_done(name, section)
        return name, section

    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="family") as pool:
        results = dict(pool.map(one, names))
    return {name: results[name] for name in names}


@dataclass
class Recorder:
    """Stores each finished section, then emits its metrics; store failures are collected.

    A section that could not be stored emits no metric, so its SectionSeverity goes missing
    exactly when its stored result goes stale.

    A family with a `merge_previous` hook sees the stored latest section first, and what it
    returns is what gets recorded (and returned by run_and_record).
    """

    store: ResultStore | None
    metrics: MetricsSink | None
    store_errors: list[str] = field(default_factory=list)
    recorded: dict[str, Section] = field(default_factory=dict)

    def __call__(self, name: str, section: Section) -> None:
        merge = family_hook(name, "merge_previous")
        if merge is not None and self.store is not None:
            try:
                section = merge(self.store.latest().get(name), section)
            except StoreUnavailable as exc:
                self.store_errors.append(str(exc))
        self.recorded[name] = section
        if self.store is not None:
            try:
                self.store.put(name, section)
            except StoreUnavailable as exc:
                self.store_errors.append(str(exc))
                # No metric for a result that was not stored: readiness will find it stale,
                # and the section alarm (missing data breaches) must page for the same reason.
                return
        if self.metrics is not None:
            self.metrics.section(name, section)


def run_and_record(
    settings: Settings,
    families: Iterable[str],
    store: ResultStore | None,
    metrics: MetricsSink | None,
    *,
    max_seconds: float | None = None,
) -> tuple[dict[str, Section], list[str]]:
    """Run, store and measure; returns the recorded sections and any store errors."""
    recorder = Recorder(store, metrics)
    sections = run_families(settings, families, max_seconds=max_seconds, on_done=recorder)
    return {name: recorder.recorded.get(name, s) for name, s in sections.items()}, (
        recorder.store_errors
    )
