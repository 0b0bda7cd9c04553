"""provisioner_daemons: every code from the simulated deployment's daemons, over HTTP or SQL."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support.coder_schema import check_section
from support.deployment import api_settings, set_faults

from deployhealth.checks.provisioner_daemons import probe, section_properties
from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.model import Section, Severity
from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import CODER_VERSION, SimulatedDeployment
from deployhealth.sim.inventory import BUILTIN_KEY_ID, seed_database
from deployhealth.sim.tcp import free_port


def run(settings: Settings) -> Section:
    return check_section("provisioner_daemons", probe(settings, Deadline.after(10.0)))


def names(section: Section) -> list[str]:
    return [i["provisioner_daemon"]["name"] for i in section.to_dict()["items"]]


def daemon(name: str, version: str, api_version: str = "1.1", seen: float = 5.0) -> dict[str, Any]:
    when = datetime.now(UTC) - timedelta(seconds=seen)
    return {"id": f"id-{name}", "name": name, "version": version, "api_version": api_version,
            "last_seen_at": when.isoformat(), "provisioners": ["terraform"], "tags": {}}


def static(sim: SimulatedDeployment, *daemons: dict[str, Any]) -> Settings:
    return Settings(access_url=sim.url, static_provisioner_daemons=daemons)


# --- the simulated deployment -----------------------------------------------------------


def test_fresh_daemons_on_the_servers_version(sim: SimulatedDeployment) -> None:
    section = run(api_settings(sim))
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert "healthy" not in data  # as in Coder's report
    assert names(section) == ["provisioner-coder", "provisioner-research"]
    item = data["items"][0]
    assert item["warnings"] == []
    # Every field of Coder's codersdk.ProvisionerDaemon, as its API gave them.
    assert set(item["provisioner_daemon"]) == {
        "id", "organization_id", "key_id", "created_at", "last_seen_at", "name", "version",
        "api_version", "provisioners", "tags", "key_name", "status", "current_job",
        "previous_job",
    }
    assert item["provisioner_daemon"]["key_name"] == "coder-daemons"
    assert item["provisioner_daemon"]["status"] == "idle"
    assert item["provisioner_daemon"]["previous_job"]["status"] == "succeeded"
    assert item["provisioner_daemon"]["version"] == CODER_VERSION
    assert item["provisioner_daemon"]["provisioners"] == ["echo", "terraform"]
    json.dumps(data)


@pytest.mark.parametrize("mode", ["none", "stale"])
def test_no_daemon_seen_within_90_s_is_epd01(sim: SimulatedDeployment, mode: str) -> None:
    set_faults(sim, provisioners=mode)
    section = run(api_settings(sim))
    assert section.codes == ["EPD01"] and section.severity is Severity.ERROR
    assert section.to_dict()["items"] == []
    text = section.error or ""
    assert "no provisioner daemon was seen within the last 90 s" in text
    if mode == "stale":
        assert "2 known; the most recent was seen at " in text
    else:
        assert "the deployment has no provisioner daemons" in text


def test_older_minor_version_is_epd02(sim: SimulatedDeployment) -> None:
    set_faults(sim, provisioners="old-version")
    section = run(api_settings(sim))
    assert section.codes == ["EPD02"] and section.severity is Severity.WARNING
    (warning,) = section.warnings
    assert warning.message == (
        f"provisioner daemon 'provisioner-research' runs v2.16.4, the server runs "
        f"{CODER_VERSION}: their major.minor versions differ"
    )
    items = {i["provisioner_daemon"]["name"]: i for i in section.to_dict()["items"]}
    assert items["provisioner-research"]["warnings"] == [
        {"code": "EPD02", "message": warning.message}
    ]
    assert items["provisioner-coder"]["warnings"] == []


def test_other_api_major_version_is_epd03(sim: SimulatedDeployment) -> None:
    set_faults(sim, provisioners="old-api")
    section = run(api_settings(sim))
    assert section.codes == ["EPD03"] and section.severity is Severity.WARNING
    assert "speaks provisioner API 0.9, major version 0; the server's major version is 1" in (
        section.warnings[0].message
    )


def test_unparseable_version_is_eunknown(sim: SimulatedDeployment) -> None:
    set_faults(sim, provisioners="bad-version")
    section = run(api_settings(sim))
    assert section.codes == ["EUNKNOWN"] and section.severity is Severity.ERROR
    assert "'provisioner-research' reports version 'latest', which does not parse" in (
        section.error or ""
    )
    research = section.to_dict()["items"][1]
    assert research["warnings"][0]["code"] == "EUNKNOWN"


def test_database_source_gives_the_same_verdict(
    sim: SimulatedDeployment, coder_db: tuple[str, Callable[[str], object]]
) -> None:
    url, execute = coder_db
    set_faults(sim, provisioners="old-version")
    seed_database(sim, execute)
    settings = Settings(access_url=sim.url, database_url=Secret(url))  # database by default
    assert settings.inventory_source == "database"
    section = run(settings)
    assert section.codes == ["EPD02"]
    assert names(section) == ["provisioner-coder", "provisioner-research"]


# --- versions -------------------------------------------------------------------------


def test_patch_and_build_metadata_do_not_matter(sim: SimulatedDeployment) -> None:
    section = run(static(sim, daemon("a", "v2.18.0"), daemon("b", "2.18.7+abc")))
    assert section.codes == []


def test_dev_builds_always_match(sim: SimulatedDeployment) -> None:
    section = run(static(sim, daemon("dev", "v0.0.0-devel+1234abc"), daemon("zero", "v0.0.0")))
    assert section.codes == []


def test_newer_major_is_a_mismatch_and_bad_api_version_is_eunknown(
    sim: SimulatedDeployment,
) -> None:
    section = run(static(sim, daemon("new", "v3.0.0"), daemon("odd", "v2.18.1", "one")))
    assert sorted(section.codes) == ["EPD02", "EUNKNOWN"]
    assert "'odd' reports API version 'one', which does not parse" in (section.error or "")


def test_only_daemons_seen_within_90_s_count(sim: SimulatedDeployment) -> None:
    section = run(
        static(
            sim,
            daemon("b-fresh", "v2.18.1", seen=10),
            daemon("a-fresh", "v2.18.1", seen=80),
            daemon("stale", "v2.16.0", seen=100),
            {"name": "never", "version": "v2.18.1", "api_version": "1.1"},
        )
    )
    assert section.codes == []  # the stale daemon's old version does not count either
    assert names(section) == ["a-fresh", "b-fresh"]


def test_unreadable_buildinfo_is_eunknown_but_epd01_still_judged() -> None:
    settings = Settings(access_url=f"http://127.0.0.1:{free_port()}", inventory="static")
    section = run(settings)  # the operator's own list: no daemons
    assert sorted(section.codes) == ["EPD01", "EUNKNOWN"]
    assert "cannot read the server's version" in (section.error or "")
    assert "daemon versions are not compared" in (section.error or "")


# --- could not look is not "found none" -------------------------------------------------


def test_no_inventory_configured_is_not_checked_rather_than_none_found() -> None:
    section = run(Settings(access_url=f"http://127.0.0.1:{free_port()}"))
    assert section.codes == ["ENOTCHECKED"] and section.severity is Severity.WARNING
    message = next(w.message for w in section.warnings if w.code == "ENOTCHECKED")
    assert message.startswith("the provisioner daemons are not checked: no inventory source")
    assert "DEPLOYHEALTH_STATIC_PROVISIONER_DAEMONS" in message


def not_read(section: Section) -> None:
    """What every unread inventory shares: no items, no EPD01, no daemon count."""
    assert "EPD01" not in section.codes
    assert section.to_dict()["items"] == []
    assert section_properties(section) == {}


def test_rejected_token_is_epd04_not_epd01(sim: SimulatedDeployment) -> None:
    section = run(api_settings(sim, coder_token=Secret("expired-token-9")))
    assert section.codes == ["EPD04"] and section.severity is Severity.ERROR
    text = section.error or ""
    assert text.startswith("EPD04: cannot read the provisioner daemons (api inventory): GET ")
    assert "401 Unauthorized" in text and "expired-token-9" not in text
    assert text.endswith("nothing is known about them")
    not_read(section)


def test_unreachable_database_is_epd04_naming_the_source(sim: SimulatedDeployment) -> None:
    url = f"postgresql://coder:pw@127.0.0.1:{free_port()}/coder?sslmode=disable"
    section = run(Settings(access_url=sim.url, database_url=Secret(url)))
    assert section.codes == ["EPD04"]
    text = section.error or ""
    assert "cannot read the provisioner daemons (database inventory)" in text
    assert "cannot connect to" in text and ":pw@" not in text
    not_read(section)


def test_a_403_that_is_not_coders_licence_answer_is_epd04(sim: SimulatedDeployment) -> None:
    set_faults(sim, waf="block")
    section = run(api_settings(sim))
    assert section.codes == ["EPD04"] and section.severity is Severity.ERROR
    assert "answered 403 Forbidden" in (section.error or "")
    not_read(section)


# --- without a licence ----------------------------------------------------------------


def test_unlicensed_coder_that_lists_daemons_is_judged_as_usual(sim: SimulatedDeployment) -> None:
    set_faults(sim, licence="none")
    section = run(api_settings(sim))
    assert section.severity is Severity.OK and section.codes == []
    assert names(section) == ["provisioner-coder"]  # the default organization only
    assert "note" not in section.to_dict()


def test_unlicensed_coder_that_gates_the_list_is_enotchecked_without_a_database(
    sim: SimulatedDeployment,
) -> None:
    set_faults(sim, licence="none-old")
    section = run(api_settings(sim))
    assert section.codes == ["ENOTCHECKED"] and section.severity is Severity.WARNING
    (warning,) = section.warnings
    assert warning.message.startswith(
        "the provisioner daemons are not checked: the Coder API lists provisioner daemons "
        "only with an Enterprise licence (GET "
    )
    assert "403 Forbidden: External provisioner daemons is an Enterprise feature. " in (
        warning.message
    )
    assert warning.message.endswith(
        "set DEPLOYHEALTH_DATABASE_URL or DEPLOYHEALTH_DATABASE_SECRET to read them from "
        "Coder's provisioner_daemons table"
    )
    not_read(section)


def test_unlicensed_coder_that_gates_the_list_is_read_from_the_database(
    sim: SimulatedDeployment, coder_db: tuple[str, Callable[[str], object]]
) -> None:
    url, execute = coder_db
    set_faults(sim, licence="none-old")
    seed_database(sim, execute)
    execute("UPDATE provisioner_daemons SET version = 'v2.16.4'")  # only the table says so
    settings = api_settings(sim, database_url=Secret(url))
    assert settings.inventory_source == "api"
    section = run(settings)
    assert section.codes == ["EPD02"]  # judged as usual, on the database's rows
    assert names(section) == ["provisioner-coder"]
    daemon = section.to_dict()["items"][0]["provisioner_daemon"]
    assert daemon["key_id"] == BUILTIN_KEY_ID  # unlicensed: coderd's own daemons only
    note = section.to_dict()["note"]
    assert note.startswith("read from the database inventory: the Coder API lists ")
    assert "External provisioner daemons is an Enterprise feature. Contact sales!" in note
    assert section_properties(section) == {"provisioner_daemons_active": 1}


def test_unlicensed_list_and_an_unreachable_database_is_epd04_saying_both(
    sim: SimulatedDeployment,
) -> None:
    set_faults(sim, licence="none-old")
    url = f"postgresql://coder:pw@127.0.0.1:{free_port()}/coder?sslmode=disable"
    section = run(api_settings(sim, database_url=Secret(url)))
    assert section.codes == ["EPD04"]
    text = section.error or ""
    assert "only with an Enterprise licence" in text
    assert "and the database inventory failed: cannot connect to" in text
    not_read(section)


# --- metrics --------------------------------------------------------------------------


def test_active_daemons_property(sim: SimulatedDeployment) -> None:
    stream = io.StringIO()
    record = MetricsSink("DeployHealth", "coder", stream).section(
        "provisioner_daemons", run(api_settings(sim))
    )
    assert record["provisioner_daemons_active"] == 2
    assert json.loads(stream.getvalue())["provisioner_daemons_active"] == 2
    set_faults(sim, provisioners="none")
    record = MetricsSink("DeployHealth", "coder", None).section(
        "provisioner_daemons", run(api_settings(sim))
    )
    assert record["provisioner_daemons_active"] == 0
    assert record["SectionSeverity"] == 2
