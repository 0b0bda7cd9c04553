"""entitlements: every code from the simulated deployment's licence and replicas."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from support.coder_schema import check_section
from support.deployment import api_settings, set_faults

from deployhealth.checks.entitlements import probe
from deployhealth.deadline import Deadline
from deployhealth.model import Section, Severity
from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import CODER_VERSION, SimulatedDeployment
from deployhealth.sim.inventory import HA_ERROR, LICENSE_WARNING, REPLICA_ERROR, seed_database
from deployhealth.sim.tcp import free_port


def run(settings: Settings) -> Section:
    return check_section("entitlements", probe(settings, Deadline.after(10.0)))


def hosts(section: Section) -> list[str]:
    return [r["hostname"] for r in section.to_dict()["replicas"]]


def test_one_replica_is_ok(sim: SimulatedDeployment) -> None:
    section = run(api_settings(sim))
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert data["healthy"] is True and data["has_license"] is True
    assert data["errors"] == []
    assert data["high_availability"] == {"entitlement": "not_entitled", "enabled": False}
    assert data["replicas"] == [
        {"hostname": "coder-0", "region_id": 999, "version": None, "error": "",
         "updated_at": None, "database_latency_ms": 1.5}
    ]
    json.dumps(data)


def test_two_replicas_without_ha_is_eent01(sim: SimulatedDeployment) -> None:
    set_faults(sim, replicas="two-no-ha")
    section = run(api_settings(sim))
    assert section.severity is Severity.ERROR and set(section.codes) == {"EENT01"}
    data = section.to_dict()
    assert data["healthy"] is False
    assert data["errors"] == [HA_ERROR]
    lines = data["error"].splitlines()
    assert lines[0] == f"EENT01: {HA_ERROR}"
    assert lines[1].startswith(
        "EENT01: 2 live primary replicas (coder-0, coder-1) while high_availability is "
        "not_entitled: users will be unable to connect to workspaces"
    )
    assert hosts(section) == ["coder-0", "coder-1"]


def test_two_replicas_without_ha_is_eent01_even_when_coder_is_silent(
    sim: SimulatedDeployment,
) -> None:
    set_faults(sim, replicas="two-no-ha", entitlements="silent")
    section = run(api_settings(sim))
    assert section.codes == ["EENT01"]
    assert section.to_dict()["errors"] == []  # the deployment itself said nothing
    assert "2 live primary replicas" in (section.error or "")


def test_two_replicas_with_ha_is_ok(sim: SimulatedDeployment) -> None:
    set_faults(sim, replicas="two-ha")
    section = run(api_settings(sim))
    assert section.codes == [] and hosts(section) == ["coder-0", "coder-1"]
    assert section.to_dict()["high_availability"] == {"entitlement": "entitled", "enabled": True}


def test_licence_warning_is_eent02(sim: SimulatedDeployment) -> None:
    set_faults(sim, entitlements="expiring")
    section = run(api_settings(sim))
    assert section.codes == ["EENT02"] and section.severity is Severity.WARNING
    assert section.warnings[0].message == LICENSE_WARNING
    assert section.to_dict()["healthy"] is True


def test_replica_error_is_eent03(sim: SimulatedDeployment) -> None:
    set_faults(sim, replicas="replica-error")
    section = run(api_settings(sim))
    assert section.codes == ["EENT03"] and section.severity is Severity.WARNING
    assert section.warnings[0].message == f"replica coder-1 reports: {REPLICA_ERROR}"
    assert section.to_dict()["replicas"][1]["error"] == REPLICA_ERROR


# --- credentials ----------------------------------------------------------------------


def test_no_token_is_not_checked_a_warning_that_says_what_to_set() -> None:
    section = run(Settings(access_url="https://coder.example.com"))
    # Neither the entitlements nor (no inventory either) the replicas were read: one
    # ENOTCHECKED, not an EUNKNOWN for replicas nobody configured.
    assert section.codes == ["ENOTCHECKED"] and section.severity is Severity.WARNING
    data = section.to_dict()
    assert data["healthy"] is True
    assert "the entitlements are not checked: no Coder API token is configured" in (
        data["warnings"][0]["message"]
    )
    assert data["has_license"] is None
    assert data["high_availability"] == {"entitlement": None, "enabled": None}


def test_no_token_still_reads_replicas_from_the_database(
    sim: SimulatedDeployment, coder_db: tuple[str, Callable[[str], object]]
) -> None:
    url, execute = coder_db
    set_faults(sim, replicas="replica-error")
    seed_database(sim, execute)
    section = run(Settings(access_url=sim.url, database_url=Secret(url)))
    assert sorted(section.codes) == ["EENT03", "ENOTCHECKED"]
    # Only live primaries: not the stopped, the crashed, nor the proxy's replica.
    assert hosts(section) == ["coder-0", "coder-1"]
    assert "2 live primary replicas are running, and whether high availability is licensed" in (
        section.warnings[0].message
    )
    first = section.to_dict()["replicas"][0]
    assert first["version"] == CODER_VERSION and first["updated_at"] is not None


def test_a_rejected_token_is_eent04(sim: SimulatedDeployment) -> None:
    section = run(api_settings(sim, coder_token=Secret("stale-token-42")))
    assert set(section.codes) == {"EENT04"} and section.severity is Severity.ERROR
    text = section.error or ""
    assert "cannot read the entitlements: GET " in text and "401 Unauthorized" in text
    assert "stale-token-42" not in json.dumps(section.to_dict())


def test_an_answer_without_features_is_eent04_not_a_licence_verdict(
    sim: SimulatedDeployment,
) -> None:
    set_faults(sim, entitlements="no-features", replicas="two-ha")
    section = run(api_settings(sim))
    # Not EENT01: a missing high_availability is not "not_entitled".
    assert section.codes == ["EENT04"] and section.severity is Severity.ERROR
    assert section.error == (
        "EENT04: cannot judge the entitlements: GET /api/v2/entitlements answered without a "
        "features object"
    )
    assert section.to_dict()["has_license"] is None


def test_a_403_from_in_front_of_coder_is_eent04(sim: SimulatedDeployment) -> None:
    set_faults(sim, waf="block")
    section = run(api_settings(sim))
    assert set(section.codes) == {"EENT04"} and section.severity is Severity.ERROR
    assert "answered 403 Forbidden" in (section.error or "")


# --- without a licence ----------------------------------------------------------------


def test_unlicensed_single_replica_is_ok(sim: SimulatedDeployment) -> None:
    set_faults(sim, licence="none-old")
    section = run(api_settings(sim))
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert data["healthy"] is True and data["has_license"] is False
    assert data["errors"] == []
    assert data["high_availability"] == {"entitlement": "not_entitled", "enabled": False}
    assert hosts(section) == ["coder-0"]


def test_unlicensed_two_replicas_is_eent01_with_coders_message(
    sim: SimulatedDeployment,
) -> None:
    set_faults(sim, licence="none", replicas="two-no-ha")
    section = run(api_settings(sim))
    assert section.severity is Severity.ERROR and set(section.codes) == {"EENT01"}
    assert section.to_dict()["errors"] == [
        "You have multiple replicas but high availability is an Enterprise feature. You will "
        "be unable to connect to workspaces."
    ]


def test_unreachable_deployment_is_eent04() -> None:
    settings = Settings(access_url=f"http://127.0.0.1:{free_port()}", coder_token=Secret("tok1"))
    section = run(settings)
    assert set(section.codes) == {"EENT04"}
    assert "connection refused" in (section.error or "")


# --- live replicas --------------------------------------------------------------------


def test_only_live_primaries_count(sim: SimulatedDeployment) -> None:
    now = datetime.now(UTC)
    replicas = (
        {"hostname": "coder-0", "primary": True, "updated_at": now.isoformat()},
        {"hostname": "coder-old", "primary": True,
         "updated_at": (now - timedelta(seconds=20)).isoformat()},
        {"hostname": "coder-stopped", "primary": True, "updated_at": now.isoformat(),
         "stopped_at": now.isoformat()},
        {"hostname": "proxy-0", "primary": False, "updated_at": now.isoformat()},
    )
    section = run(api_settings(sim, inventory="static", static_replicas=replicas))
    assert hosts(section) == ["coder-0"] and section.codes == []


def test_stale_second_primary_does_not_trigger_eent01(sim: SimulatedDeployment) -> None:
    now = datetime.now(UTC)
    replicas = (
        {"hostname": "coder-0", "primary": True, "updated_at": now.isoformat()},
        {"hostname": "coder-1", "primary": True,
         "updated_at": (now - timedelta(seconds=16)).isoformat()},
    )
    section = run(api_settings(sim, inventory="static", static_replicas=replicas))
    assert section.codes == []
    fresh = (*replicas[:1], {**replicas[1], "updated_at": now.isoformat()})
    section = run(api_settings(sim, inventory="static", static_replicas=fresh))
    assert section.codes == ["EENT01"]
