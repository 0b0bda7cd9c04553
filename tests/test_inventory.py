"""The inventory's three sources read one simulated deployment the same way.

The `api` source talks to the simulated Coder server over HTTP; the `database` source reads
the same deployment written into a fresh database of the session's real PostgreSQL; the
`static` source reads the settings' lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from support.coder_schema import check_section
from support.deployment import api_settings, set_faults
from support.hostile import measured

from deployhealth.checks import entitlements, provisioner_daemons, workspace_proxy
from deployhealth.deadline import Deadline
from deployhealth.inventory import (
    ApiInventory,
    CoderAPI,
    DatabaseInventory,
    FeatureNotLicensed,
    InventoryError,
    StaticInventory,
    not_licensed_feature,
    open_inventory,
)
from deployhealth.model import Section
from deployhealth.runner import run_family
from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import CODER_VERSION, SimulatedDeployment
from deployhealth.sim.inventory import BUILTIN_KEY_ID, seed_database
from deployhealth.sim.postgres import LocalPostgres
from deployhealth.sim.tcp import ScriptedServer, free_port


def db_settings(sim: SimulatedDeployment, url: str, **overrides: Any) -> Settings:
    return api_settings(sim, database_url=Secret(url), inventory="database").with_overrides(
        **overrides
    )


def soon() -> Deadline:
    return Deadline.after(10.0)


# --- choosing the source ------------------------------------------------------------


def test_default_source_follows_what_is_configured() -> None:
    token = Settings(coder_token=Secret("t"), database_url=Secret("postgresql://u:p@h/db"))
    assert isinstance(open_inventory(token), ApiInventory)
    database = Settings(database_url=Secret("postgresql://u:p@h/db"))
    assert isinstance(open_inventory(database), DatabaseInventory)
    assert isinstance(open_inventory(Settings()), StaticInventory)
    chosen = token.with_overrides(inventory="static")
    assert isinstance(open_inventory(chosen), StaticInventory)


def test_database_source_without_a_database_says_so() -> None:
    with pytest.raises(InventoryError, match="needs a database"):
        open_inventory(Settings(inventory="database"))


# --- api ----------------------------------------------------------------------------


_JSON_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def _fixed(body: bytes) -> dict[str, bytes]:
    return {"reply": _JSON_200 + b"Content-Length: %d\r\n\r\n" % len(body) + body}


# A Coder API that answers every request the same hostile way, and what the message says.
HOSTILE_APIS: dict[str, tuple[dict[str, bytes], str]] = {
    "chunked body without end": (
        {
            "reply": _JSON_200 + b"Transfer-Encoding: chunked\r\n\r\n",
            "stream": b"10000\r\n" + b" " * 65536 + b"\r\n",
        },
        "the answer is larger than 8388608 bytes",
    ),
    "Content-Length of 1 TB": (
        {"reply": _JSON_200 + b"Content-Length: 1000000000000\r\n\r\n", "stream": b" " * 65536},
        "the answer is larger than 8388608 bytes",
    ),
    "10**6 nested arrays": (
        _fixed(b"[" * 1_000_000),
        "the answer holds more than 500000 JSON values",
    ),
    "100,000 nested arrays": (
        _fixed(b"[" * 100_000 + b"]" * 100_000),
        "answered 200 with JSON nested too deeply to parse",
    ),
    # 6 MB of text, 2 million dicts once parsed: about 150 MB.
    "two million empty objects": (
        _fixed(b"[" + b"{}," * 2_000_000 + b"{}]"),
        "the answer holds more than 500000 JSON values",
    ),
    "an error answer nested too deeply": (
        {"reply": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 50000\r\n\r\n" + b"[" * 50_000},
        "answered 403 Forbidden: [[[[",
    ),
}

# Each inventory family, and the code that says its inventory could not be read.
INVENTORY_FAMILIES = {"entitlements": "EENT04", "provisioner_daemons": "EPD04",
                      "workspace_proxy": "EWP02"}


@pytest.mark.parametrize("family", list(INVENTORY_FAMILIES))
@pytest.mark.parametrize("peer", list(HOSTILE_APIS))
def test_hostile_coder_api_is_a_coded_error_in_bounded_memory(family: str, peer: str) -> None:
    script, said = HOSTILE_APIS[peer]
    with ScriptedServer(**script) as server:  # type: ignore[arg-type]
        settings = Settings(
            access_url=f"http://127.0.0.1:{server.port}", coder_token=Secret("hostile-token"),
            inventory="api",
        )
        section, cost = measured(lambda: run_family(family, settings, Deadline.after(8.0)))
    check_section(family, section)
    code = INVENTORY_FAMILIES[family]
    assert code in section.codes and "EUNKNOWN" not in section.codes, section.codes
    assert said in section.error, section.error
    # The peer offered a terabyte, or text that parses into far more than it weighs.
    assert cost.peak < 48 * 1024 * 1024, cost
    assert cost.elapsed < 8.0


def test_api_source_reads_proxies_daemons_and_replicas(sim: SimulatedDeployment) -> None:
    inventory = open_inventory(api_settings(sim))
    try:
        proxies = inventory.proxies(soon())
        daemons = inventory.provisioner_daemons(soon())
        replicas = inventory.replicas(soon())
    finally:
        inventory.close()
    # The primary (listed first by Coder) and the deleted proxy are not workspace proxies.
    assert sorted(p.name for p in proxies) == ["eu", "us"]
    eu = next(p for p in proxies if p.name == "eu")
    assert eu.url.startswith("http://127.0.0.1:") and eu.display_name == "Europe"
    assert eu.created_at is not None and eu.created_at.tzinfo is not None
    # One daemon in each of the two organizations.
    assert sorted(d.name for d in daemons) == ["provisioner-coder", "provisioner-research"]
    assert len({d.organization_id for d in daemons}) == 2
    assert all(d.version == CODER_VERSION and d.api_version == "1.1" for d in daemons)
    assert all(d.provisioners == ("echo", "terraform") for d in daemons)
    assert [r.hostname for r in replicas] == ["coder-0"]
    assert replicas[0].database_latency_us == 1500
    # Coder's API does not say these; the replica counts as live.
    assert replicas[0].version is None and replicas[0].updated_at is None
    assert replicas[0].is_live()


def test_api_errors_carry_coders_message(sim: SimulatedDeployment) -> None:
    inventory = open_inventory(api_settings(sim, coder_token=Secret("not-the-token")))
    with pytest.raises(InventoryError) as caught:
        inventory.proxies(soon())
    text = str(caught.value)
    assert "/api/v2/workspaceproxies answered 401 Unauthorized" in text
    assert "You are signed out or your session has expired" in text
    assert "API key is invalid" in text
    assert "not-the-token" not in text


def test_api_unreachable_names_the_request(sim: SimulatedDeployment) -> None:
    api = CoderAPI(f"http://127.0.0.1:{free_port()}", "token-1234")
    try:
        with pytest.raises(InventoryError, match=r"/api/v2/replicas failed: connection refused"):
            api.get_json("/api/v2/replicas", soon())
    finally:
        api.close()


def test_api_without_token_is_refused_before_asking(sim: SimulatedDeployment) -> None:
    api = CoderAPI(sim.url, None)
    try:
        with pytest.raises(InventoryError, match="needs a Coder API token"):
            api.entitlements(soon())
        # buildinfo needs none.
        assert api.buildinfo(soon())["version"] == CODER_VERSION
    finally:
        api.close()


# --- Coder's licence refusal ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "feature"),
    [
        # RequireFeatureMW, and the word newer releases use for every feature.
        (403, b'{"message": "Workspace Proxy is an Enterprise feature. Contact sales!"}',
         "Workspace Proxy"),
        (403, b'{"message":"Workspace Proxy is a Premium feature. Contact sales!"}\n',
         "Workspace Proxy"),
        (403, b'{"message": "External provisioner daemons is an Enterprise feature. '
              b'Contact sales!"}', "External provisioner daemons"),
        # A bare 403: a token without the rights, or something in front of Coder.
        (403, b'{"message": "Forbidden.", "detail": "You don\'t have permission"}', None),
        (403, b"<html><head><title>403 Forbidden</title></head></html>", None),
        (403, b'{"message": "Workspace Proxy is an Enterprise feature."}', None),
        (403, b'["Workspace Proxy is an Enterprise feature. Contact sales!"]', None),
        # Coder's sentence under another status is not the feature gate.
        (401, b'{"message": "Workspace Proxy is an Enterprise feature. Contact sales!"}', None),
    ],
)
def test_the_licence_refusal_is_status_403_and_coders_sentence(
    status: int, body: bytes, feature: str | None
) -> None:
    found = not_licensed_feature(status, body)
    assert (found[0] if found else None) == feature


def test_api_source_of_an_unlicensed_deployment(sim: SimulatedDeployment) -> None:
    set_faults(sim, licence="none")
    inventory = open_inventory(api_settings(sim))
    try:
        with pytest.raises(FeatureNotLicensed) as caught:
            inventory.proxies(soon())
        assert caught.value.feature == "Workspace Proxy"
        assert str(caught.value) == (
            f"GET {sim.url}/api/v2/workspaceproxies answered 403 Forbidden: "
            "Workspace Proxy is an Enterprise feature. Contact sales!"
        )
        # Current releases list the daemons without a licence: coderd's own, one org.
        daemons = inventory.provisioner_daemons(soon())
        assert [(d.name, d.key_id) for d in daemons] == [("provisioner-coder", BUILTIN_KEY_ID)]
        set_faults(sim, licence="none-old")
        with pytest.raises(FeatureNotLicensed) as caught:
            inventory.provisioner_daemons(soon())
        assert caught.value.feature == "External provisioner daemons"
    finally:
        inventory.close()


def test_a_403_from_in_front_of_coder_is_a_plain_inventory_error(
    sim: SimulatedDeployment,
) -> None:
    set_faults(sim, waf="block")
    inventory = open_inventory(api_settings(sim))
    try:
        with pytest.raises(InventoryError) as caught:
            inventory.proxies(soon())
    finally:
        inventory.close()
    assert not isinstance(caught.value, FeatureNotLicensed)
    assert "/api/v2/workspaceproxies answered 403 Forbidden: <html>" in str(caught.value)


def test_database_of_an_unlicensed_deployment_matches_its_api(
    sim: SimulatedDeployment, coder_db: tuple[str, Callable[[str], object]]
) -> None:
    url, execute = coder_db
    set_faults(sim, licence="none")
    seed_database(sim, execute)
    database = open_inventory(db_settings(sim, url))
    api = open_inventory(api_settings(sim))
    try:
        assert database.proxies(soon()) == []  # no proxy can be created without the licence
        # The API adds status and jobs, which the database source leaves null (see below).
        from_api = [
            replace(d, status=None, current_job=None, previous_job=None)
            for d in api.provisioner_daemons(soon())
        ]
        assert database.provisioner_daemons(soon()) == from_api
    finally:
        database.close()
        api.close()


# --- database -----------------------------------------------------------------------


def test_database_source_reads_the_same_deployment(
    sim: SimulatedDeployment, coder_db: tuple[str, Callable[[str], object]]
) -> None:
    url, execute = coder_db
    seed_database(sim, execute)
    api = open_inventory(api_settings(sim))
    db = open_inventory(db_settings(sim, url))
    try:
        assert isinstance(db, DatabaseInventory)
        by_name = {p.name: p for p in api.proxies(soon())}
        assert {p.name: p for p in db.proxies(soon())} == by_name
        # Coder's API adds each daemon's status and jobs from its job tables; the database
        # source reads the daemons and their keys' names only (Coder's own report: null).
        from_api = [
            replace(d, status=None, current_job=None, previous_job=None)
            for d in api.provisioner_daemons(soon())
        ]
        from_db = db.provisioner_daemons(soon())
        assert sorted(from_db, key=lambda d: d.name) == sorted(from_api, key=lambda d: d.name)
        assert {d.key_name for d in from_db} == {"coder-daemons", "research-daemons"}
        rows = db.replicas(soon())
    finally:
        api.close()
        db.close()
    # The database also has a stopped, a crashed and a proxy's replica: none is live.
    assert sorted(r.hostname for r in rows) == [
        "coder-0", "coder-crashed", "coder-old", "proxy-eu-0",
    ]
    live = [r for r in rows if r.is_live()]
    assert [r.hostname for r in live] == ["coder-0"]
    assert live[0].version == CODER_VERSION and live[0].updated_at is not None


def test_api_source_keeps_every_field_coder_gives_a_daemon(sim: SimulatedDeployment) -> None:
    api = open_inventory(api_settings(sim))
    try:
        daemons = {d.name: d for d in api.provisioner_daemons(soon())}
    finally:
        api.close()
    idle, busy = daemons["provisioner-coder"], daemons["provisioner-research"]
    assert (idle.key_name, idle.status, idle.current_job) == ("coder-daemons", "idle", None)
    assert idle.previous_job is not None and idle.previous_job.status == "succeeded"
    assert idle.previous_job.template_display_name == "Docker"
    assert busy.status == "busy"
    assert busy.current_job is not None and busy.current_job.status == "running"
    shown = busy.to_dict()
    assert shown["key_name"] == "research-daemons"
    assert shown["current_job"]["template_name"] == "kubernetes"


def test_database_source_without_provisioner_keys_has_no_key_names(
    sim: SimulatedDeployment, coder_db: tuple[str, Callable[[str], object]]
) -> None:
    # Coder before provisioner keys (2.14) has no such table: still readable, key_name null.
    url, execute = coder_db
    seed_database(sim, execute)
    execute("DROP TABLE provisioner_keys")
    db = open_inventory(db_settings(sim, url))
    try:
        daemons = db.provisioner_daemons(soon())
    finally:
        db.close()
    assert len(daemons) == 2
    assert [d.key_name for d in daemons] == [None, None]
    assert all(d.to_dict()["key_name"] is None for d in daemons)


def test_database_source_reports_a_missing_table(
    sim: SimulatedDeployment, coder_db: tuple[str, Callable[[str], object]]
) -> None:
    url, _execute = coder_db
    inventory = open_inventory(db_settings(sim, url))
    try:
        with pytest.raises(InventoryError) as caught:
            inventory.proxies(soon())
    finally:
        inventory.close()
    assert 'relation "workspace_proxies" does not exist' in str(caught.value)


def test_database_source_unreachable_hides_the_password(pg: LocalPostgres) -> None:
    url = (
        f"postgresql://{pg.user}:{quote(pg.password, safe='')}@127.0.0.1:{free_port()}"
        "/coder?sslmode=disable"
    )
    inventory = open_inventory(Settings(database_url=Secret(url), inventory="database"))
    with pytest.raises(InventoryError) as caught:
        inventory.replicas(soon())
    text = str(caught.value)
    assert "refused" in text and pg.password not in text


# --- static -------------------------------------------------------------------------


def test_static_source_reads_the_settings_lists() -> None:
    now = datetime.now(UTC)
    settings = Settings(
        static_proxies=(
            {"name": "primary", "path_app_url": "https://coder.example.com"},
            {"id": "p1", "name": "eu", "path_app_url": "https://eu.example.com"},
            {"id": "p2", "name": "gone", "path_app_url": "https://x.example.com",
             "deleted": True},
        ),
        static_provisioner_daemons=(
            {"name": "p1", "version": "v2.18.1", "api_version": "1.1",
             "last_seen_at": now.isoformat(), "tags": {"scope": "organization"}},
        ),
        static_replicas=(
            {"hostname": "coder-0", "primary": True, "updated_at": now.isoformat()},
            {"hostname": "coder-1", "primary": True,
             "updated_at": (now - timedelta(minutes=2)).isoformat()},
        ),
    )
    inventory = open_inventory(settings)
    assert [p.name for p in inventory.proxies(soon())] == ["eu"]
    (daemon,) = inventory.provisioner_daemons(soon())
    assert daemon.last_seen_at is not None and daemon.tags == {"scope": "organization"}
    assert [r.hostname for r in inventory.replicas(soon()) if r.is_live()] == ["coder-0"]


def test_static_source_with_a_bad_time_says_which() -> None:
    settings = Settings(static_replicas=({"hostname": "coder-0", "updated_at": "yesterday"},))
    with pytest.raises(InventoryError, match="replica 'coder-0' updated_at"):
        open_inventory(settings).replicas(soon())


# --- the same sections from the api and the database ---------------------------------


def comparable(section: Section, drop: frozenset[str] = frozenset()) -> Any:
    """The section's JSON without what differs from run to run (times of the run)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if k not in {"checked_at", "duration_ms", *drop}
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(section.to_dict())


@pytest.mark.parametrize(
    "faults",
    [
        {"proxy": "ok", "provisioners": "ok", "replicas": "one"},
        {"proxy": "errors", "provisioners": "old-version", "replicas": "two-no-ha"},
        {"proxy": "unregistered", "provisioners": "stale", "replicas": "replica-error"},
    ],
    ids=["healthy", "degraded", "broken"],
)
def test_api_and_database_give_the_same_sections(
    sim: SimulatedDeployment,
    coder_db: tuple[str, Callable[[str], object]],
    faults: dict[str, str],
) -> None:
    url, execute = coder_db
    sim.set_faults(faults)
    seed_database(sim, execute)
    from_api = api_settings(sim)
    from_db = db_settings(sim, url)
    # The database cannot say a daemon's status or jobs (see above); all else is the same.
    unknown = {workspace_proxy: frozenset(), provisioner_daemons: frozenset(
        {"status", "current_job", "previous_job"})}
    for family, drop in unknown.items():
        api_section = family.probe(from_api, soon())
        db_section = family.probe(from_db, soon())
        assert comparable(db_section, drop) == comparable(api_section, drop), family.__name__
    # Coder's replicas API has no version or update time; everything else is the same.
    api_section = entitlements.probe(from_api, soon())
    db_section = entitlements.probe(from_db, soon())
    drop = frozenset({"version", "updated_at"})
    assert comparable(db_section, drop) == comparable(api_section, drop)
    assert db_section.codes == api_section.codes
