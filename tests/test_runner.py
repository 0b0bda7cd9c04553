"""The runner's promises: a family never raises and never outlives its deadline.

The probes here are test doubles handed to the runner (it takes any probe), not patches of
the project's own families; the families themselves are run for real elsewhere.
"""

from __future__ import annotations

import threading
import time

from support.coder_schema import check_section

from deployhealth.deadline import Deadline
from deployhealth.model import Section, Severity
from deployhealth.runner import DEADLINE_GRACE_SECONDS, run_families, run_probe
from deployhealth.settings import Secret, Settings


def test_an_exception_becomes_eunknown_with_class_and_message_and_no_secret():
    password = "Runner-S3cret-77"
    settings = Settings(database_url=Secret(f"postgresql://u:{password}@db:5432/coder"))

    def explodes(_settings: Settings, _deadline: Deadline) -> Section:
        raise ValueError(f"cannot parse reply from postgresql://u:{password}@db:5432/coder")

    section = run_probe("database", explodes, settings, Deadline.after(5))
    check_section("database", section)
    assert section.severity is Severity.ERROR
    assert section.error is not None
    assert section.error.startswith("EUNKNOWN: ValueError: cannot parse reply")
    assert password not in section.error
    assert "Traceback" not in section.error


def test_a_probe_that_hangs_is_abandoned_shortly_after_its_deadline():
    release = threading.Event()

    def hangs(_settings: Settings, _deadline: Deadline) -> Section:
        release.wait()  # ignores its deadline, as a wedged library call would
        return Section(Severity.OK)

    start = time.monotonic()
    section = run_probe("access_url", hangs, Settings(), Deadline.after(0.3))
    check_section("access_url", section)
    elapsed = time.monotonic() - start
    release.set()
    assert section.error is not None
    assert section.error.startswith("EUNKNOWN: the check did not finish within its 0.3 s deadline")
    # Returned by the backstop, not by the probe: within the grace, before any release.
    assert elapsed < 0.3 + DEADLINE_GRACE_SECONDS + 1.0


def test_checked_at_and_duration_are_set_by_the_runner():
    def quick(_settings: Settings, _deadline: Deadline) -> Section:
        return Section(Severity.OK, details={"x": 1})

    section = run_probe("database", quick, Settings(), Deadline.after(5))
    assert section.duration_ms >= 0
    assert (time.time() - section.checked_at.timestamp()) < 60


def test_families_run_concurrently_and_report_in_family_order():
    finished: list[str] = []
    # No access URL, no database: both families answer at once with their "not configured"
    # codes, and the on_done callback sees each exactly once.
    sections = run_families(
        Settings(), ["database", "access_url"], on_done=lambda n, _s: finished.append(n)
    )
    assert list(sections) == ["database", "access_url"]
    for name, section in sections.items():
        check_section(name, section)
    assert sorted(finished) == ["access_url", "database"]
    assert sections["access_url"].errors[0].code == "EACS01"
    assert sections["database"].errors[0].code == "EDB01"
