"""The report is Coder's `HealthcheckReport`: all seven families against the simulated
deployment, healthy and under every fault it can inject, build a report that validates
against tests/schema/healthcheck_report.schema.json (written from Coder's sources) and our
code table; and the check fails when a key Coder requires goes missing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from support.coder_schema import check_report, code_errors, schema_errors
from support.deployment import api_settings, set_faults

from deployhealth.api.app import build_report
from deployhealth.checks import FAMILIES
from deployhealth.runner import run_families
from deployhealth.settings import Secret, Settings
from deployhealth.sim.demo import SLOW_DATABASE_DELAY_SECONDS
from deployhealth.sim.deployment import CODER_VERSION, SimulatedDeployment
from deployhealth.sim.postgres import LocalPostgres
from deployhealth.sim.stun import servers_of
from deployhealth.sim.tcp import DelayProxy


def _fault_cases() -> list[tuple[str, str]]:
    """Every (switch, mode) the sim offers besides the healthy defaults, read from a sim."""
    sim = SimulatedDeployment()
    try:
        modes = sim.fault_modes()
    finally:
        sim.close()
    return [(name, mode) for name, all_modes in modes.items() for mode in all_modes[1:]]


CASES = [("healthy", ""), *_fault_cases()]


class Deployment:
    """The sim, with the database fault switch wired to a latency proxy before the real
    PostgreSQL as the demo wires it ("down" closes the proxy: connections are refused)."""

    def __init__(self, pg: LocalPostgres) -> None:
        self.proxy = DelayProxy(pg.host, pg.port, 0.0)
        self.proxy.start()
        self.sim = SimulatedDeployment(on_database=self._database).start()
        url = pg.url.replace(f":{pg.port}/", f":{self.proxy.port}/")
        self.settings: Settings = api_settings(
            self.sim,
            database_url=Secret(url),
            stun_servers=tuple(servers_of(self.sim)),
            # The faults decide the verdicts; a loaded CI machine must not add EDB02.
            db_latency_threshold_ms=1000.0,
        )

    def _database(self, mode: str) -> None:
        if mode == "down":
            self.proxy.close()
        else:
            self.proxy.delay_seconds = SLOW_DATABASE_DELAY_SECONDS if mode == "slow" else 0.0

    def report(self) -> dict[str, Any]:
        sections = run_families(self.settings, FAMILIES)
        return build_report(self.settings, sections, dismissed=()).to_dict()

    def close(self) -> None:
        self.sim.close()
        self.proxy.close()


@pytest.fixture
def deployment(pg: LocalPostgres) -> Iterator[Deployment]:
    running = Deployment(pg)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize(("fault", "mode"), CASES, ids=[f"{f}={m}" if m else f for f, m in CASES])
def test_every_family_writes_coders_report(deployment: Deployment, fault: str, mode: str) -> None:
    if mode:
        set_faults(deployment.sim, **{fault: mode})
    report = check_report(deployment.report())
    assert set(FAMILIES) <= set(report)
    # From the server's buildinfo, which every fault leaves readable.
    assert report["coder_version"] == CODER_VERSION


@pytest.fixture
def valid_report(deployment: Deployment) -> dict[str, Any]:
    report = deployment.report()
    check_report(report)
    return report


def _node(report: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] = report["derp"]["regions"]["999"]["node_reports"][0]
    return node


@pytest.mark.parametrize(
    ("what", "damage"),
    [
        ("coder_version", lambda r: r.pop("coder_version")),
        ("derp", lambda r: r.pop("derp")),
        ("node_info", lambda r: _node(r).pop("node_info")),
        # The server's raw ServerInfo JSON is not Coder's derp.ServerInfoMessage.
        ("TokenBucketBytesPerSecond", lambda r: _node(r).update(node_info={"version": 2})),
        # omitempty in Coder's type: absent or a string, never null.
        ("netcheck_err", lambda r: r["derp"].update(netcheck_err=None)),
        ("key_name", lambda r: r["provisioner_daemons"]["items"][0]["provisioner_daemon"].pop(
            "key_name")),
        ("id", lambda r: r["provisioner_daemons"]["items"][0]["provisioner_daemon"].update(
            id="daemon-1")),
        ("Error", lambda r: _node(r)["stun"].pop("Error")),
        ("severity", lambda r: r["database"].update(severity="critical")),
    ],
)
def test_a_report_without_what_coder_requires_fails(
    valid_report: dict[str, Any], what: str, damage: Any
) -> None:
    broken = copy.deepcopy(valid_report)
    damage(broken)
    problems = schema_errors(broken)
    assert problems, f"removing or breaking {what} went unnoticed"
    assert any(what in p for p in problems), problems
    with pytest.raises(AssertionError, match="HealthcheckReport"):
        check_report(broken)


def test_codes_must_sit_where_their_severity_allows(valid_report: dict[str, Any]) -> None:
    database = copy.deepcopy(valid_report["database"])
    # EDB01 is an error code: as a warning entry it would understate the problem.
    database["warnings"] = [{"code": "EDB01", "message": "refused"}]
    assert any("EDB01 has severity error" in p for p in code_errors("database", database))
    # EDB02 is a warning without an error_when: it cannot make up `error`.
    database["warnings"] = []
    database["error"] = "EDB02: slow"
    assert any("EDB02" in p for p in code_errors("database", database))
    database["error"] = "EXYZ99: invented"
    assert any("not in deployhealth.codes.CODES" in p for p in code_errors("database", database))
    database["error"] = "EDERP01: wrong section"
    assert any("belongs to section derp" in p for p in code_errors("database", database))


def test_a_section_at_error_must_say_why(valid_report: dict[str, Any]) -> None:
    derp = copy.deepcopy(valid_report["derp"])
    # What a failing relay used to look like: severity error, the cause only in the nodes.
    derp["severity"] = "error"
    derp.pop("error", None)
    assert "derp is at error but its `error` names no code" in code_errors("derp", derp)
