"""workspace_proxy: every status and code from real proxies on 127.0.0.1 or real API answers.

The simulated deployment's proxies switch behaviour through its fault endpoint; tests that
need a particular set of proxies run a `ProxyFarm` (one asyncio server, a port per proxy)
and list them through the `static` inventory source.
"""

from __future__ import annotations

import io
import ipaddress
import json
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from support.coder_schema import check_section
from support.deployment import api_settings, set_faults

from deployhealth.checks.workspace_proxy import ENTRY_CHARS, probe
from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.model import Section, Severity
from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import CODER_VERSION, SimulatedDeployment
from deployhealth.sim.inventory import ProxyFarm, ProxyReply, SimProxy, proxy_replies
from deployhealth.sim.tcp import free_port
from deployhealth.store import ResultStore


def static_settings(*proxies: tuple[str, str], **overrides: Any) -> Settings:
    """Proxies by (name, url), created one day apart in the order given."""
    listed = tuple(
        {"id": f"id-{name}", "name": name, "path_app_url": url,
         "created_at": f"2024-01-{n + 1:02d}T00:00:00Z"}
        for n, (name, url) in enumerate(proxies)
    )
    return Settings(static_proxies=listed).with_overrides(**overrides)


def run(settings: Settings, deadline_seconds: float = 10.0) -> Section:
    return check_section(
        "workspace_proxy", probe(settings, Deadline.after(deadline_seconds))
    )


def regions(section: Section) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in section.to_dict()["workspace_proxies"]["regions"]}


def status(section: Section, name: str) -> str:
    return str(regions(section)[name]["status"]["status"])


def only_message(section: Section, code: str = "EWP04") -> str:
    found = [f.message for f in [*section.errors, *section.warnings] if f.code == code]
    assert len(found) == 1, section.to_dict()
    return found[0]


# --- the simulated deployment, through the api source ---------------------------------


def test_healthy_proxies(sim: SimulatedDeployment) -> None:
    section = run(api_settings(sim))
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert data["healthy"] is True
    listed = data["workspace_proxies"]["regions"]
    # The primary and the deleted proxy are skipped; the rest sorted by created_at.
    assert [r["name"] for r in listed] == ["eu", "us"]
    eu = listed[0]
    assert eu["healthy"] is True
    assert eu["status"]["status"] == "ok"
    assert eu["status"]["report"] == {"errors": [], "warnings": []}
    assert eu["path_app_url"].startswith("http://127.0.0.1:")
    assert set(eu) == {
        "id", "name", "display_name", "icon_url", "healthy", "path_app_url",
        "wildcard_hostname", "derp_enabled", "derp_only", "status", "created_at",
        "updated_at", "deleted", "version",
    }
    assert set(eu["status"]) == {"status", "report", "checked_at"}
    json.dumps(data)


@pytest.mark.parametrize(
    ("mode", "expected_status", "says"),
    [
        ("not-proxy", "unhealthy", "the URL is not a workspace proxy"),
        ("primary", "unhealthy", f"X-Coder-Build-Version {CODER_VERSION} but no proxy health "
                                 "report: it is a Coder server but not a workspace proxy"),
        ("wrong-content-type", "unhealthy", "content type 'text/plain; charset=utf-8', not "
                                            "application/json"),
        ("errors", "unhealthy", "cannot reach the primary: 503 Service Unavailable"),
        ("huge", "unhealthy", "more than 262144 bytes"),
        ("unreachable", "unreachable", "connect: "),
        ("unregistered", "unregistered", "has no URL"),
    ],
)
def test_one_bad_proxy_is_a_warning(
    sim: SimulatedDeployment, mode: str, expected_status: str, says: str
) -> None:
    set_faults(sim, proxy=mode)
    section = run(api_settings(sim))
    assert status(section, "eu") == "ok"
    assert status(section, "us") == expected_status
    assert regions(section)["us"]["healthy"] is False
    # One proxy still works: the section is a warning, the proxy's error a warning entry.
    assert section.severity is Severity.WARNING
    assert section.to_dict()["healthy"] is True
    message = only_message(section)
    assert message.startswith("us: ") and says in message
    assert regions(section)["us"]["status"]["report"]["errors"] == [message[len("us: "):]]


def test_unreachable_proxy_message_says_refused(sim: SimulatedDeployment) -> None:
    set_faults(sim, proxy="unreachable")
    message = only_message(run(api_settings(sim)))
    assert "/healthz-report: connect: 127.0.0.1:" in message and "connection refused" in message


def test_non_200_carries_coders_error_and_the_url(sim: SimulatedDeployment) -> None:
    set_faults(sim, proxy="http-error")
    section = run(api_settings(sim))
    assert status(section, "us") == "unhealthy"
    message = only_message(section)
    url = regions(section)["us"]["path_app_url"] + "/healthz-report"
    assert f"GET {url} answered 500 Internal Server Error" in message
    assert "Failed to compute the proxy health report" in message  # message
    assert "context deadline exceeded" in message  # detail
    assert "primary_access_url: timed out" in message  # validations
    assert f"try it by hand: curl -i {url}" in message


def test_proxy_warnings_make_the_section_a_warning(sim: SimulatedDeployment) -> None:
    set_faults(sim, proxy="warnings")
    section = run(api_settings(sim))
    assert status(section, "us") == "ok" and regions(section)["us"]["healthy"] is True
    assert section.severity is Severity.WARNING
    assert only_message(section) == "us: derp: 1 of 2 mesh peers unreachable"
    assert regions(section)["us"]["status"]["report"]["warnings"] == [
        "derp: 1 of 2 mesh peers unreachable"
    ]


def test_no_proxy_ok_is_an_error_with_every_proxy_error(sim: SimulatedDeployment) -> None:
    set_faults(sim, proxy="all-down")
    section = run(api_settings(sim))
    assert section.severity is Severity.ERROR
    data = section.to_dict()
    assert data["healthy"] is False
    assert {status(section, "eu"), status(section, "us")} == {"unreachable"}
    lines = data["error"].splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("EWP04: eu: GET ") and lines[1].startswith("EWP04: us: GET ")
    assert data["warnings"] == []


def test_no_proxies_is_ok(sim: SimulatedDeployment) -> None:
    section = run(Settings(inventory="static"))  # the operator's own list: none
    assert section.severity is Severity.OK and section.codes == []
    assert section.to_dict()["workspace_proxies"] == {"regions": []}


def test_no_inventory_configured_is_not_checked_rather_than_none_found() -> None:
    section = run(Settings())  # no token, no database, no list: nobody said
    assert section.codes == ["ENOTCHECKED"] and section.severity is Severity.WARNING
    message = section.warnings[0].message
    assert message.startswith("the workspace proxies are not checked: no inventory source")
    assert "DEPLOYHEALTH_CODER_TOKEN" in message and "DEPLOYHEALTH_STATIC_PROXIES" in message
    assert section.to_dict()["workspace_proxies"] == {"regions": []}


# --- without a licence: Coder's own report is ok with no proxies -------------------------


@pytest.mark.parametrize("licence", ["none", "none-old"])
def test_unlicensed_deployment_is_ok_with_a_note(sim: SimulatedDeployment, licence: str) -> None:
    set_faults(sim, licence=licence)
    section = run(api_settings(sim))
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert data["healthy"] is True and data["warnings"] == [] and "error" not in data
    assert data["workspace_proxies"] == {"regions": []}
    note = data["note"]
    assert note.startswith(
        "workspace proxies are an Enterprise feature this deployment is not licensed for (GET "
    )
    assert note.endswith(
        "/api/v2/workspaceproxies answered 403 Forbidden: Workspace Proxy is an Enterprise "
        "feature. Contact sales!): nothing to check"
    )


def test_licensed_deployment_has_no_note(sim: SimulatedDeployment) -> None:
    assert "note" not in run(api_settings(sim)).to_dict()


# --- EWP02: the inventory cannot be read --------------------------------------------


def test_bad_token_is_ewp02_with_coders_message(sim: SimulatedDeployment) -> None:
    section = run(api_settings(sim, coder_token=Secret("wrong-token-123")))
    assert section.codes == ["EWP02"] and section.severity is Severity.ERROR
    data = section.to_dict()
    assert data["healthy"] is False
    assert "api inventory" in data["error"]
    assert "401 Unauthorized: You are signed out or your session has expired" in data["error"]
    assert "wrong-token-123" not in json.dumps(data)
    assert data["workspace_proxies"] == {"regions": []}


def test_a_403_that_is_not_coders_licence_answer_is_ewp02(sim: SimulatedDeployment) -> None:
    set_faults(sim, waf="block")
    section = run(api_settings(sim))
    assert section.codes == ["EWP02"] and section.severity is Severity.ERROR
    assert "answered 403 Forbidden" in (section.error or "")
    assert "note" not in section.to_dict()


def test_unreachable_database_is_ewp02() -> None:
    url = f"postgresql://coder:secret-pw-456@127.0.0.1:{free_port()}/coder?sslmode=disable"
    section = run(Settings(database_url=Secret(url)))
    assert section.codes == ["EWP02"]
    assert "database inventory" in section.error
    assert "refused" in section.error and "secret-pw-456" not in section.error


# --- proxies of the tests' own making -------------------------------------------------


def test_unparseable_proxy_url_is_unhealthy(farm: ProxyFarm) -> None:
    good = farm.add(ProxyReply())
    section = run(static_settings(("good", good.url), ("bad", "eu.example.com:not-a-port")))
    assert status(section, "bad") == "unhealthy"
    assert "'eu.example.com:not-a-port' does not parse as an absolute http(s) URL" in (
        only_message(section)
    )


def test_static_proxies_need_no_ids(farm: ProxyFarm) -> None:
    good, bad = farm.add(ProxyReply()), farm.add(ProxyReply(status=503, body=b""))
    listed = ({"name": "a", "path_app_url": good.url}, {"name": "b", "path_app_url": bad.url})
    section = run(Settings(static_proxies=listed))
    assert [status(section, "a"), status(section, "b")] == ["ok", "unhealthy"]
    assert "answered 503 Service Unavailable: empty body" in only_message(section)


def test_unreadable_ca_bundle_fails_https_proxies_in_the_tls_phase(
    farm: ProxyFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/deployhealth-ca.pem")
    proxy = farm.add(ProxyReply())
    section = run(static_settings(("tls", f"https://127.0.0.1:{proxy.port}")))
    assert status(section, "tls") == "unreachable"
    assert "/healthz-report: tls: cannot load the CA bundle" in only_message(section)
    assert proxy.hits == 0


def test_report_errors_of_every_proxy_become_ewp04(farm: ProxyFarm) -> None:
    replies = proxy_replies(CODER_VERSION)
    ok = farm.add(replies["ok"])
    bad = farm.add(ProxyReply(body=b'{"errors": ["e1", "e2"], "warnings": ["w1"]}'))
    section = run(static_settings(("ok", ok.url), ("bad", bad.url)))
    assert section.severity is Severity.WARNING
    assert [w.message for w in section.warnings] == ["bad: e1", "bad: e2", "bad: w1"]
    assert {w.code for w in section.warnings} == {"EWP04"}


def test_report_nested_too_deeply_is_a_status_not_a_crash(farm: ProxyFarm) -> None:
    # 100,000 "[" is far deeper than Python's parser goes: RecursionError, not ValueError.
    deep = farm.add(ProxyReply(body=b"[" * 100_000))
    ok = farm.add(proxy_replies(CODER_VERSION)["ok"])
    section = run(static_settings(("deep", deep.url), ("ok", ok.url)))
    assert "EUNKNOWN" not in section.codes
    assert status(section, "ok") == "ok"
    assert status(section, "deep") != "ok"
    assert any("deep" in f.message for f in section.errors + section.warnings)


def test_chunked_report_is_read(farm: ProxyFarm) -> None:
    # A Go server sends larger reports chunked; the farm cannot, so a raw server does.
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            body = json.dumps({"errors": [], "warnings": ["w" * 3000, "last"]}).encode()
            chunks = b"".join(
                f"{len(body[i:i + 1000]):x}\r\n".encode() + body[i:i + 1000] + b"\r\n"
                for i in range(0, len(body), 1000)
            )
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        section = run(static_settings(("chunky", f"http://127.0.0.1:{port}")))
    finally:
        thread.join(5)
        listener.close()
    assert status(section, "chunky") == "ok"
    # Read to the last chunk; a long entry is kept to ENTRY_CHARS, saying it was cut.
    assert [w.message for w in section.warnings] == [
        "chunky: " + "w" * (ENTRY_CHARS - 1) + "…", "chunky: last"
    ]


def test_slow_proxy_times_out_as_unreachable_after_five_seconds(farm: ProxyFarm) -> None:
    slow = farm.add(ProxyReply(delay=10.0))
    started = time.monotonic()
    section = run(static_settings(("slow", slow.url)), deadline_seconds=8.0)
    elapsed = time.monotonic() - started
    assert 4.9 < elapsed < 6.0
    assert status(section, "slow") == "unreachable"
    assert "timeout: waiting for the response: not done within 5.0 s" in only_message(section)
    assert section.severity is Severity.ERROR  # the only proxy is not ok


def test_slow_proxy_does_not_hold_the_family_past_its_deadline(farm: ProxyFarm) -> None:
    ok = farm.add(ProxyReply())
    slow = farm.add(ProxyReply(delay=10.0))
    started = time.monotonic()
    section = run(static_settings(("ok", ok.url), ("slow", slow.url)), deadline_seconds=2.0)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 1.0
    assert status(section, "ok") == "ok"
    # Cut short by the family's deadline, not by its own 5 s: not probed, not "unreachable".
    assert status(section, "slow") == "unknown"
    assert section.codes == ["EWP01"] and section.severity is Severity.WARNING
    assert only_message(section, "EWP01") == (
        "1 of 2 workspace proxies were not probed before the family deadline (2.0 s): slow"
    )


def test_proxies_not_started_by_the_deadline_are_listed(farm: ProxyFarm) -> None:
    # One at a time, each answering after 0.4 s, within 1.5 s: the last ones never start.
    proxies = farm.add_many(8, ProxyReply(delay=0.4))
    settings = static_settings(
        *((f"p{n}", p.url) for n, p in enumerate(proxies)), proxy_concurrency=1
    )
    started = time.monotonic()
    section = run(settings, deadline_seconds=1.5)
    assert time.monotonic() - started < 2.5
    statuses = [status(section, f"p{n}") for n in range(8)]
    assert statuses[:2] == ["ok", "ok"] and statuses[-1] == "unknown"
    unprobed = [f"p{n}" for n, s in enumerate(statuses) if s == "unknown"]
    message = only_message(section, "EWP01")
    assert message.startswith(f"{len(unprobed)} of 8 workspace proxies were not probed")
    assert message.endswith(", ".join(unprobed))
    assert section.severity is Severity.WARNING
    assert sum(p.hits for p in proxies) < 8


def test_fifty_megabytes_stay_within_memory_and_time(farm: ProxyFarm) -> None:
    huge = farm.add(ProxyReply(size=50 * 1024 * 1024))
    tracemalloc.start()
    try:
        started = time.monotonic()
        section = run(static_settings(("huge", huge.url)), deadline_seconds=3.0)
        elapsed = time.monotonic() - started
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 3.0 + 1.0
    assert peak < 8 * 1024 * 1024
    assert status(section, "huge") == "unhealthy"
    assert "more than 262144 bytes" in only_message(section)


# --- the address guard ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254"),
        ("http://[fe80::1]:8080/", "fe80::1"),
        ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
    ],
    ids=["ipv4-metadata", "ipv6-metadata", "ipv6-link-local", "ipv4-mapped"],
)
def test_metadata_address_is_refused_without_a_connection(
    farm: ProxyFarm, connects: list[str], url: str, address: str
) -> None:
    good = farm.add(ProxyReply())
    section = run(static_settings(("good", good.url), ("meta", url)))
    assert status(section, "good") == "ok"
    assert status(section, "meta") == "unhealthy"
    message = only_message(section)
    assert f"refusing to fetch {url.rstrip('/')}" in message
    assert "link-local or instance-metadata address" in message
    assert "DEPLOYHEALTH_SSRF_ALLOW" in message
    # The good proxy was connected to; nothing went anywhere near the blocked address.
    assert "127.0.0.1" in connects
    blocked = ipaddress.ip_address(address)
    assert all(ipaddress.ip_address(a.split("%")[0]) != blocked for a in connects), connects
    assert not any(a.startswith(("169.254.", "fe80:", "fd00:ec2:")) for a in connects)


# --- metrics --------------------------------------------------------------------------


def test_proxy_status_per_proxy_in_one_record(farm: ProxyFarm) -> None:
    ok = farm.add(ProxyReply())
    bad = farm.add(ProxyReply(status=502, body=b"bad gateway", content_type="text/plain"))
    gone = f"http://127.0.0.1:{free_port()}"
    settings = static_settings(
        ("ok", ok.url), ("bad", bad.url), ("gone", gone), ("new", "")
    )
    section = run(settings)
    assert [status(section, n) for n in ("ok", "bad", "gone", "new")] == [
        "ok", "unhealthy", "unreachable", "unregistered",
    ]
    (error,) = regions(section)["bad"]["status"]["report"]["errors"]
    assert "answered 502 Bad Gateway: body 'bad gateway'" in error
    (record,) = _records(section)
    by_proxy = {p["name"]: (p["status"], p["status_value"]) for p in record["proxies"]}
    assert by_proxy == {
        "ok": ("ok", 1), "bad": ("unhealthy", -1), "gone": ("unreachable", -2),
        "new": ("unregistered", 0),
    }
    # One metric, no per-proxy dimension: the statuses are properties of the record.
    directive = record["_aws"]["CloudWatchMetrics"][0]
    assert directive["Dimensions"] == [["Deployment", "Section"]]
    assert [m["Name"] for m in directive["Metrics"]] == ["SectionSeverity"]


def test_unprobed_proxy_status_is_unknown(farm: ProxyFarm) -> None:
    slow = farm.add(ProxyReply(delay=10.0))
    section = run(static_settings(("slow", slow.url)), deadline_seconds=1.0)
    (record,) = _records(section)
    assert record["proxies"] == [{"name": "slow", "status": "unknown", "status_value": -3}]


def _records(section: Section) -> list[dict[str, Any]]:
    stream = io.StringIO()
    MetricsSink("DeployHealth", "coder", stream).section("workspace_proxy", section)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_sim_proxy_counts_requests(farm: ProxyFarm) -> None:
    proxy: SimProxy = farm.add(ProxyReply())
    run(static_settings(("one", proxy.url)))
    assert proxy.hits == 1


# --- 5,000 proxies: the section always fits the store ----------------------------------


def _random_errors(count: int) -> ProxyReply:
    # Distinct, incompressible text in every answer, as real errors with ids and addresses are.
    errors = [f"replica {uuid.uuid4()} unreachable: {uuid.uuid4().hex}" for _ in range(count)]
    body = json.dumps({"errors": errors, "warnings": []}).encode()
    return ProxyReply(body=body)


def test_five_thousand_proxies_fit_either_store_and_coders_schema(
    farm: ProxyFarm, store_factory: Callable[[], ResultStore]
) -> None:
    replies = proxy_replies(CODER_VERSION)
    proxies: list[SimProxy] = [
        *farm.add_many(3000, replies["ok"]),
        *farm.add_many(1200, lambda: _random_errors(3)),
        *farm.add_many(300, lambda: _random_errors(200)),  # a report far past any budget
        *farm.add_many(500, replies["not-proxy"]),
    ]
    listed = tuple(
        {"id": str(uuid.uuid4()), "name": f"proxy-{n:04d}-{uuid.uuid4().hex[:8]}",
         "path_app_url": f"http://127.0.0.1:{p.port}",
         "created_at": f"2024-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}.{n:06d}Z"}
        for n, p in enumerate(proxies)
    )
    section = run(Settings(static_proxies=listed), deadline_seconds=120.0)
    assert section.severity is Severity.WARNING
    assert len(json.dumps(section.to_stored())) < 400_000

    # Every proxy counts: 2,000 not ok, and the report says how many entries it left out.
    data = section.to_dict()
    kept = data["workspace_proxies"]["regions"]
    omitted = data["regions_omitted"]
    assert len(kept) + omitted["count"] == 5000
    assert omitted["ok"] + sum(r["status"]["status"] == "ok" for r in kept) == 3000
    # Not-ok proxies come first: a full entry for each that fits before any ok one.
    assert omitted["ok"] == 3000 - sum(r["status"]["status"] == "ok" for r in kept)
    assert all(len(r["status"]["report"]["errors"]) <= 10 for r in kept)
    assert section.warnings[-1].message.startswith("... and ")

    store = store_factory()
    store.put("workspace_proxy", section)
    stored = check_section("workspace_proxy", store.latest()["workspace_proxy"])
    assert stored.to_dict()["regions_omitted"] == omitted
    assert stored.to_dict()["workspace_proxies"]["regions"] == kept
    assert stored.codes == section.codes
