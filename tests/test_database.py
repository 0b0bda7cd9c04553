"""database: every code comes from a real fault in front of a real PostgreSQL on 127.0.0.1."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest
from support.coder_schema import check_section

from deployhealth.checks.database import probe
from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.model import Section, Severity
from deployhealth.settings import Secret, Settings
from deployhealth.sim.postgres import LocalPostgres
from deployhealth.sim.tcp import BlackHoleServer, DelayProxy


def url(
    pg: LocalPostgres,
    *,
    port: int | None = None,
    password: str | None = None,
    database: str | None = None,
    sslmode: str = "disable",
) -> str:
    secret = pg.password if password is None else password
    return (
        f"postgresql://{quote(pg.user, safe='')}:{quote(secret, safe='')}@127.0.0.1:"
        f"{pg.port if port is None else port}/{database or pg.database}?sslmode={sslmode}"
    )


def run(database_url: str | None, deadline_seconds: float = 10.0, **overrides: object) -> Section:
    settings = Settings(
        database_url=Secret(database_url) if database_url is not None else None
    ).with_overrides(**overrides)
    return check_section("database", probe(settings, Deadline.after(deadline_seconds)))


def only_error(section: Section) -> str:
    assert section.codes == ["EDB01"]
    assert section.severity is Severity.ERROR
    data = section.to_dict()
    assert data["healthy"] is False and data["reachable"] is False
    assert data["error"].startswith("EDB01: ")
    return str(data["error"])


def everything(section: Section) -> str:
    return json.dumps(section.to_dict()) + json.dumps(section.to_stored())


# --- healthy ------------------------------------------------------------------------


def test_healthy_database(pg: LocalPostgres) -> None:
    section = run(url(pg))
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert data["healthy"] is True and data["reachable"] is True
    exact = data["latency_ms_exact"]
    assert isinstance(exact, float) and exact > 0
    assert data["latency_ms"] == int(exact)
    assert data["latency"] == f"{exact:.3f}ms"
    assert data["threshold_ms"] == 15
    assert isinstance(data["connect_ms"], float)
    assert data["server_version"].split(".")[0].isdigit()
    assert pg.password not in everything(section)
    # The EMF record's db_latency_ms property (what Logs Insights reads) is the exact median.
    record = MetricsSink("DeployHealth", "coder", None).section("database", section)
    assert record["db_latency_ms"] == exact


def test_prefer_falls_back_to_plain_when_the_server_has_no_tls(pg: LocalPostgres) -> None:
    assert run(url(pg, sslmode="prefer")).codes == []


def test_unix_socket(pg: LocalPostgres) -> None:
    # libpq's spelling: an empty host, the socket directory in ?host=, the port as usual.
    section = run(
        f"postgresql://{pg.user}:{quote(pg.password, safe='')}@:{pg.port}/{pg.database}"
        f"?host={pg.socket_dir}&sslmode=prefer"
    )
    assert section.codes == [], section.error
    assert section.to_dict()["reachable"] is True


# --- EDB01 --------------------------------------------------------------------------


def test_stopped_database_is_refused() -> None:
    with LocalPostgres() as stopped:
        stopped.stop()
        text = only_error(run(url(stopped)))
    assert "connection refused" in text
    assert f"127.0.0.1:{stopped.port}" in text


def test_wrong_password_is_an_authentication_failure(pg: LocalPostgres) -> None:
    wrong = "not-the-Password-7f3a9c"
    section = run(url(pg, password=wrong))
    text = only_error(section)
    assert "authentication failed" in text
    assert f"{pg.user}@127.0.0.1:{pg.port}/{pg.database}" in text
    assert wrong not in everything(section)
    assert quote(wrong, safe="") not in everything(section)
    assert pg.password not in everything(section)


def test_unknown_database(pg: LocalPostgres) -> None:
    text = only_error(run(url(pg, database="no_such_db")))
    assert "database does not exist" in text and "no_such_db" in text


def test_tls_required_but_not_offered(pg: LocalPostgres) -> None:
    text = only_error(run(url(pg, sslmode="require")))
    assert "TLS" in text and "sslmode=require" in text


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
def test_black_hole_times_out_within_the_deadline(sslmode: str) -> None:
    with BlackHoleServer() as hole:
        started = time.monotonic()
        section = run(
            f"postgresql://coder:pw-123@127.0.0.1:{hole.port}/coder?sslmode={sslmode}",
            deadline_seconds=1.0,
        )
        elapsed = time.monotonic() - started
        assert hole.wait_for_accepted(1, timeout=5)
    assert elapsed < 2.0
    assert "timeout" in only_error(section)


def test_no_database_configured_is_an_error() -> None:
    text = only_error(run(None))
    assert "no database configured" in text and "DEPLOYHEALTH_DATABASE_URL" in text


# --- EDB02 --------------------------------------------------------------------------


def test_slow_network_is_edb02(pg: LocalPostgres) -> None:
    # Each direction is held 20 ms, so every round trip takes at least 40 ms.
    with DelayProxy(pg.host, pg.port, 0.02) as proxy:
        section = run(url(pg, port=proxy.port), db_latency_threshold_ms=10)
    assert section.codes == ["EDB02"]
    assert section.severity is Severity.WARNING
    data = section.to_dict()
    assert data["healthy"] is True and data["reachable"] is True
    assert data["latency_ms"] >= 40
    assert data["threshold_ms"] == 10
    message = section.warnings[0].message
    assert "threshold of 10 ms" in message and data["latency"].removesuffix("ms") in message
