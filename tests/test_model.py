"""Sections and the report keep Coder's shapes (checks.md) and its roll-up rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from support.coder_schema import check_report

from deployhealth.model import (
    CODER_SECTION_NAMES,
    SECTION_NAMES,
    Finding,
    Report,
    Section,
    Severity,
    UnknownSectionError,
    canonical_section,
    parse_rfc3339,
    rfc3339,
    section_failing,
)

CHECKED = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def ok(**details: object) -> Section:
    return Section(severity=Severity.OK, checked_at=CHECKED, details=dict(details))


def at(severity: Severity, *, healthy: bool | None = True) -> Section:
    return Section(severity=severity, healthy=healthy, checked_at=CHECKED)


# --- Severity and findings ----------------------------------------------------------


def test_severity_ranks_and_worst() -> None:
    assert [s.rank for s in (Severity.OK, Severity.WARNING, Severity.ERROR)] == [0, 1, 2]
    assert Severity.worst([Severity.WARNING, Severity.ERROR, Severity.OK]) is Severity.ERROR
    assert Severity.worst([Severity.OK, Severity.WARNING]) is Severity.WARNING
    assert Severity.worst([]) is Severity.OK
    assert Severity("warning") is Severity.WARNING


def test_from_findings_splits_errors_and_warnings() -> None:
    section = Section.from_findings(
        [
            Finding("EDB02", "slow"),
            Finding("EDB01", "refused", Severity.ERROR),
            Finding("ESTUN02", "hard NAT", Severity.OK),
        ],
        {"reachable": False},
    )
    assert section.severity is Severity.ERROR
    assert [f.code for f in section.errors] == ["EDB01"]
    assert [f.code for f in section.warnings] == ["EDB02", "ESTUN02"]
    assert section.healthy is False
    assert section.codes == ["EDB01", "EDB02", "ESTUN02"]
    assert section.details == {"reachable": False}


def test_from_findings_healthy_rules() -> None:
    assert Section.from_findings([]).healthy is True
    assert Section.from_findings([]).severity is Severity.OK
    # A message-only code informs without raising the severity.
    assert Section.from_findings([Finding("ESTUN02", "x", Severity.OK)]).severity is Severity.OK
    assert Section.from_findings([Finding("EACS04", "502")], healthy=False).healthy is False
    assert Section.from_findings([], healthy_key=False).healthy is None


# --- a section's JSON form ----------------------------------------------------------


def test_to_dict_keys_are_coders() -> None:
    section = Section.from_findings(
        [Finding("EDB01", "refused", Severity.ERROR), Finding("EDB02", "slow")],
        {"reachable": False, "latency": "", "threshold_ms": 15},
    )
    section.checked_at = CHECKED
    section.duration_ms = 1.23456

    out = section.to_dict()

    assert list(out)[:5] == ["healthy", "severity", "warnings", "error", "dismissed"]
    assert out["healthy"] is False
    assert out["severity"] == "error"
    assert out["warnings"] == [{"code": "EDB02", "message": "slow"}]
    assert out["error"] == "EDB01: refused"
    assert out["dismissed"] is False
    assert out["reachable"] is False and out["threshold_ms"] == 15
    assert out["checked_at"] == "2024-05-01T12:00:00.123456Z"
    assert out["duration_ms"] == 1.235
    json.dumps(out)  # plain JSON


def test_to_dict_omits_error_when_none_and_warnings_are_never_null() -> None:
    out = ok().to_dict()
    assert "error" not in out
    assert out["warnings"] == []


def test_to_dict_joins_several_errors() -> None:
    section = Section.from_findings(
        [Finding("EWP04", "a: down", Severity.ERROR), Finding("EWP04", "b: down", Severity.ERROR)]
    )
    assert section.to_dict()["error"] == "EWP04: a: down\nEWP04: b: down"


def test_section_without_healthy_key() -> None:
    out = at(Severity.OK, healthy=None).to_dict()
    assert "healthy" not in out


def test_dismissed_is_shown_but_never_stored() -> None:
    section = ok()
    section.dismissed = True
    assert section.to_dict()["dismissed"] is True
    assert "dismissed" not in section.to_stored()
    assert Section.from_stored(section.to_stored()).dismissed is False


def test_details_cannot_replace_the_sections_own_keys() -> None:
    # Entitlements carries Coder's `errors`/`warnings` strings among its details.
    section = Section.from_findings(
        [Finding("EENT02", "licence expires soon")],
        {"warnings": ["licence expires soon"], "errors": ["no HA"], "has_license": True},
    )
    section.checked_at = CHECKED

    out = section.to_dict()
    assert out["warnings"] == [{"code": "EENT02", "message": "licence expires soon"}]
    assert out["errors"] == ["no HA"]

    back = Section.from_stored(json.loads(json.dumps(section.to_stored())))
    assert back.warnings == section.warnings
    assert back.details["errors"] == ["no HA"]
    assert back.to_dict() == out


def test_stored_round_trip_keeps_everything() -> None:
    section = Section(
        severity=Severity.ERROR,
        warnings=[Finding("EDERP01", "websocket"), Finding("ESTUN02", "nat", Severity.OK)],
        errors=[Finding("EDERP02", "region down", Severity.ERROR)],
        healthy=False,
        details={"regions": {"999": {"node_reports": [{"round_trip_ping_ms": 1.5}]}}},
        checked_at=CHECKED,
        duration_ms=10.5,
    )
    assert Section.from_stored(json.loads(json.dumps(section.to_stored()))) == section


def test_rfc3339_round_trip() -> None:
    assert rfc3339(CHECKED) == "2024-05-01T12:00:00.123456Z"
    assert parse_rfc3339("2024-05-01T12:00:00.123456Z") == CHECKED
    plus_two = timezone(timedelta(hours=2))
    assert rfc3339(CHECKED.astimezone(plus_two)) == "2024-05-01T12:00:00.123456Z"
    assert parse_rfc3339("2024-05-01T14:00:00.123456+02:00") == CHECKED


# --- section names -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "key"),
    [
        ("Database", "database"),
        ("database", "database"),
        ("DATABASE", "database"),
        (" database ", "database"),
        ("DERP", "derp"),
        ("derp", "derp"),
        ("AccessURL", "access_url"),
        ("access_url", "access_url"),
        ("WorkspaceProxy", "workspace_proxy"),
        ("ProvisionerDaemons", "provisioner_daemons"),
        ("Websocket", "websocket"),
        ("Entitlements", "entitlements"),
    ],
)
def test_canonical_section_accepts_both_spellings(spelling: str, key: str) -> None:
    assert canonical_section(spelling) == key


def test_every_section_has_a_coder_name() -> None:
    assert set(CODER_SECTION_NAMES) == set(SECTION_NAMES)
    for key, coder in CODER_SECTION_NAMES.items():
        assert canonical_section(coder) == key


@pytest.mark.parametrize("name", ["databse", "", "access-url", "health"])
def test_canonical_section_rejects_unknown_and_lists_known(name: str) -> None:
    with pytest.raises(UnknownSectionError) as caught:
        canonical_section(name)
    message = str(caught.value)
    assert repr(name) in message
    for known in SECTION_NAMES:
        assert known in message
    assert isinstance(caught.value, ValueError)


# --- the report ----------------------------------------------------------------------


def test_section_failing_follows_coder() -> None:
    assert section_failing("access_url", at(Severity.WARNING))
    assert not section_failing("access_url", at(Severity.OK))
    assert not section_failing("database", at(Severity.WARNING))
    assert section_failing("database", at(Severity.ERROR))


def test_report_rolls_up_worst_severity() -> None:
    report = Report(
        "prod",
        {"database": at(Severity.WARNING), "derp": at(Severity.OK)},
        time=CHECKED,
    )
    assert report.severity is Severity.WARNING
    assert report.healthy is True  # a database warning does not fail
    # Nothing checked is never ok: every missing section of Coder's is an ENOTCHECKED warning.
    assert Report("prod", {}, time=CHECKED).severity is Severity.WARNING
    assert Report("prod", {}, time=CHECKED).healthy is True


def test_report_unhealthy_when_access_url_warns() -> None:
    report = Report("prod", {"access_url": at(Severity.WARNING)}, time=CHECKED)
    assert report.healthy is False
    assert report.to_dict()["healthy"] is False


def test_report_unhealthy_when_any_section_errors() -> None:
    report = Report(
        "prod", {"access_url": at(Severity.OK), "derp": at(Severity.ERROR)}, time=CHECKED
    )
    assert report.healthy is False
    assert report.severity is Severity.ERROR


def test_dismissed_sections_still_count() -> None:
    failing = at(Severity.ERROR, healthy=False)
    failing.dismissed = True
    report = Report("prod", {"access_url": at(Severity.OK), "database": failing}, time=CHECKED)
    assert report.healthy is False
    assert report.severity is Severity.ERROR
    assert report.to_dict()["database"]["dismissed"] is True


def test_report_to_dict_shape() -> None:
    report = Report(
        "prod",
        {"entitlements": ok(), "access_url": ok(), "derp": ok()},
        time=CHECKED,
        coder_version="v2.14.0",
    )
    out = report.to_dict()
    assert list(out) == [
        "time",
        "healthy",
        "severity",
        *SECTION_NAMES,
        "coder_version",
        "deployment",
    ]
    assert out["time"] == "2024-05-01T12:00:00.123456Z"
    assert out["deployment"] == "prod"
    assert out["coder_version"] == "v2.14.0"
    # Required in Coder's type: "" when buildinfo could not be read, never missing.
    assert Report("prod", {}, time=CHECKED).to_dict()["coder_version"] == ""
    check_report(out)


def test_sections_without_a_result_are_enotchecked_at_coders_zero_values() -> None:
    report = Report("prod", {"database": at(Severity.OK)}, time=CHECKED)
    out = check_report(report.to_dict())
    # Coder's six sections are always there; ours (entitlements) only with a result.
    assert "entitlements" not in out
    derp = out["derp"]
    assert derp["severity"] == "warning"
    assert [w["code"] for w in derp["warnings"]] == ["ENOTCHECKED"]
    assert "derp" in derp["warnings"][0]["message"]
    assert derp["regions"] == {} and derp["netcheck_logs"] == []
    assert "netcheck_err" not in derp and "netcheck" not in derp
    assert out["provisioner_daemons"]["items"] == []
    assert "healthy" not in out["provisioner_daemons"]
    assert out["access_url"]["status_code"] == 0
    # Counted in the severity; the database, the only section checked, decides `healthy`.
    assert out["severity"] == "warning"
    assert out["healthy"] is True


def test_a_section_without_coders_keys_gets_their_zero_values() -> None:
    # E.g. a family abandoned at its deadline, or a result stored by an older version.
    bare = Section.from_findings([Finding("EUNKNOWN", "timed out", Severity.ERROR)])
    out = Report("prod", {"websocket": bare}, time=CHECKED).to_dict()
    assert out["websocket"]["code"] == 0 and out["websocket"]["body"] == ""
    check_report(out)


def test_to_text_is_coders_short_form() -> None:
    report = Report(
        "prod",
        {
            "database": at(Severity.OK),
            "access_url": at(Severity.WARNING, healthy=False),
            "entitlements": at(Severity.OK),
            "derp": at(Severity.OK),
            "websocket": at(Severity.OK),
            "provisioner_daemons": at(Severity.ERROR, healthy=None),
            "workspace_proxy": at(Severity.WARNING, healthy=True),
        },
        time=CHECKED,
    )
    assert report.to_text() == (
        "time: 2024-05-01T12:00:00Z\n"
        "healthy: false\n"
        "derp: true\n"
        "access_url: false\n"
        "websocket: true\n"
        "database: true\n"
        "workspace_proxy: true\n"
        "provisioner_daemons: false\n"
        "entitlements: true\n"
    )


def test_to_text_skips_missing_sections_and_judges_keyless_ones_by_severity() -> None:
    report = Report(
        "prod",
        {"database": at(Severity.OK), "provisioner_daemons": at(Severity.WARNING, healthy=None)},
        time=CHECKED,
    )
    assert report.to_text().splitlines() == [
        "time: 2024-05-01T12:00:00Z",
        "healthy: true",
        "database: true",
        "provisioner_daemons: true",
    ]
