"""derp: every code comes from a real fault, over real sockets on 127.0.0.1.

DERP relays are the sim's `/derp` or standalone `DerpServer`s; STUN servers are
`StunServer`s on UDP loopback (127.0.0.1, and 127.0.0.2 where "another IP" is needed);
nginx and coturn are the real programs.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.coder_schema import check_section
from support.hostile import (
    OPCODE_BINARY,
    OPCODE_CONT,
    measured,
    ws_accept,
    ws_frame,
    ws_frame_header,
)
from support.peers import require_program, running_nginx

from deployhealth import readiness
from deployhealth.api.page import render_page
from deployhealth.checks.derp import (
    go_duration,
    probe,
    section_properties,
    server_info_message,
)
from deployhealth.deadline import Deadline
from deployhealth.derpclient import DerpClient, NodeTarget
from deployhealth.model import Report, Section, Severity
from deployhealth.net import blocked_address_check
from deployhealth.runner import run_probe
from deployhealth.settings import Settings
from deployhealth.sim.deployment import SimulatedDeployment
from deployhealth.sim.derp import DerpServer
from deployhealth.sim.stun import StunServer, servers_of
from deployhealth.sim.tcp import BlackHoleServer, ScriptedServer, free_port
from deployhealth.stunclient import StunTarget, probe_all
from deployhealth.wire import derp as wire
from deployhealth.wire import stun as stun_wire

# Every test starts from the system CA store, whatever the developer's shell sets.
pytestmark = pytest.mark.usefixtures("system_trust_only")


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatedDeployment]:
    with SimulatedDeployment() as deployment:
        yield deployment


@pytest.fixture
def sim(shared_sim: SimulatedDeployment) -> Iterator[SimulatedDeployment]:
    """The module's simulated deployment, with every fault switched back off afterwards."""
    yield shared_sim
    shared_sim.set_faults({"reset": ""})


@pytest.fixture
def derp_servers() -> Iterator[Callable[..., DerpServer]]:
    started: list[DerpServer] = []

    def start(**kwargs: Any) -> DerpServer:
        server = DerpServer(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def stun_servers() -> Iterator[Callable[..., StunServer]]:
    started: list[StunServer] = []

    def start(**kwargs: Any) -> StunServer:
        server = StunServer(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def region(region_id: int, *nodes: dict[str, Any], name: str = "") -> dict[str, Any]:
    return {
        "RegionID": region_id,
        "RegionCode": f"r{region_id}",
        "RegionName": name or f"Region {region_id}",
        "Nodes": list(nodes),
    }


def derp_map(*regions: dict[str, Any]) -> str:
    return json.dumps({"Regions": {str(r["RegionID"]): r for r in regions}})


def refused_node(name: str, region_id: int) -> dict[str, Any]:
    return {
        "Name": name, "RegionID": region_id, "HostName": "127.0.0.1",
        "DERPPort": free_port(), "STUNPort": -1, "ForceHTTP": True,
    }


def stun_node(name: str, region_id: int, server: StunServer | str) -> dict[str, Any]:
    address = server if isinstance(server, str) else server.address
    host, _sep, port = address.rpartition(":")
    return {
        "Name": name, "RegionID": region_id, "HostName": host,
        "STUNOnly": True, "STUNPort": int(port),
    }


def run(settings: Settings, seconds: float = 10.0) -> Section:
    return check_section("derp", probe(settings, Deadline.after(seconds)))


def node_report(section: Section, region_id: int, index: int = 0) -> dict[str, Any]:
    return section.details["regions"][str(region_id)]["node_reports"][index]


def codes(section: Section) -> list[str]:
    return [w.code for w in section.warnings]


# --- the embedded relay on the simulated deployment --------------------------------------


def test_healthy_embedded_relay_relays_a_packet_over_raw_derp(sim):
    section = run(Settings(access_url=sim.url))
    report = section.to_dict()
    assert report["healthy"] is True and report["severity"] == "ok"
    assert report["warnings"] == [] and "error" not in report
    node = node_report(section, 999)
    assert node["can_exchange_messages"] is True
    assert node["uses_websocket"] is False
    # Tailscale's derp.ServerInfoMessage as Coder reports it, not the server's raw
    # {"version": 2}: the sim sets no rate limit, so both are 0 ("unspecified").
    assert node["node_info"] == {"TokenBucketBytesPerSecond": 0, "TokenBucketBytesBurst": 0}
    # No STUN error, no netcheck_err key (omitempty in Coder's type).
    assert "netcheck_err" not in report
    assert node["round_trip_ping"].endswith(("s", "ns", "µs", "ms"))
    assert node["round_trip_ping_ms"] < 1000
    assert node["client_errs"] == [[], []]
    assert node["stun"] == {"Enabled": False, "CanSTUN": False, "Error": None}
    assert "error" not in node
    # The whole report survives JSON, as the store and the API need.
    assert json.loads(json.dumps(report))["regions"]["999"]["healthy"] is True


def test_node_info_is_tailscales_server_info_message():
    # What a rate-limiting derper sends (its serverInfo JSON), as Coder's node report shows it.
    sent = {"version": 2, "TokenBucketBytesPerSecond": 125000, "TokenBucketBytesBurst": 500000}
    assert server_info_message(sent) == {
        "TokenBucketBytesPerSecond": 125000, "TokenBucketBytesBurst": 500000,
    }
    # Go's decoder ignores case; anything not an integer is "unspecified", 0.
    odd = {"tokenbucketbytespersecond": 7, "TokenBucketBytesBurst": "lots"}
    assert server_info_message(odd) == {"TokenBucketBytesPerSecond": 7, "TokenBucketBytesBurst": 0}
    assert server_info_message({}) == {"TokenBucketBytesPerSecond": 0, "TokenBucketBytesBurst": 0}


def test_default_map_is_coders_embedded_relay_at_the_access_url_plus_stun_regions(sim):
    host, port = "127.0.0.1", int(sim.url.rsplit(":", 1)[1])
    stun_addresses = servers_of(sim)
    section = run(Settings(access_url=sim.url + "/some/path", stun_servers=tuple(stun_addresses)))
    regions = section.details["regions"]
    assert sorted(regions) == ["1000", "1001", "999"]
    embedded = regions["999"]["region"]
    assert embedded["RegionName"] == "Coder Embedded Relay" and embedded["EmbeddedRelay"] is True
    assert embedded["Nodes"] == [
        {
            "Name": "999b", "RegionID": 999, "HostName": host, "DERPPort": port,
            "STUNPort": -1, "ForceHTTP": True,
        }
    ]
    for index, address in enumerate(stun_addresses):
        stun_region = regions[str(1000 + index)]["region"]
        (node,) = stun_region["Nodes"]
        assert stun_region["RegionID"] == 1000 + index
        assert node["STUNOnly"] is True and f"{node['HostName']}:{node['STUNPort']}" == address
    assert section.severity is Severity.OK
    assert section.details["derp_map_source"] == "default"


def test_default_map_for_an_https_access_url_uses_tls_on_443():
    from deployhealth.checks.derp import default_map

    derp, notes = default_map(Settings(access_url="https://coder.example.com"))
    (node,) = derp["Regions"]["999"]["Nodes"]
    assert node["HostName"] == "coder.example.com" and node["DERPPort"] == 443
    assert node["ForceHTTP"] is False and node["STUNPort"] == -1
    assert notes == []


def test_websocket_only_proxy_gives_ederp01_and_the_packet_still_goes_through(sim):
    sim.set_faults({"derp": "websocket-only"})
    section = run(Settings(access_url=sim.url))
    node = node_report(section, 999)
    assert node["uses_websocket"] is True
    assert node["can_exchange_messages"] is True
    assert node["severity"] == "warning" and node["healthy"] is True
    assert [w["code"] for w in node["warnings"]] == ["EDERP01"]
    assert section.severity is Severity.WARNING and section.healthy is True
    assert codes(section) == ["EDERP01"]
    assert "Upgrade: DERP" in section.warnings[0].message
    assert any("retrying over WebSocket" in line for line in node["client_logs"][0])


def test_relay_that_is_down_is_an_error_naming_the_status(sim):
    sim.set_faults({"derp": "down"})
    section = run(Settings(access_url=sim.url))
    node = node_report(section, 999)
    assert node["can_exchange_messages"] is False and node["severity"] == "error"
    assert "503" in node["error"]
    assert section.severity is Severity.ERROR and section.healthy is False
    assert section.details["regions"]["999"]["healthy"] is False
    # The cause where on-call looks: the section's own error, one line naming region and node.
    assert section.codes == ["EDERP03"]
    assert section.error.startswith(
        "EDERP03: region 999 (Coder Embedded Relay) is unhealthy: node 999b: cannot exchange"
    )
    assert "503" in section.error


def test_a_node_down_is_named_by_readyz_and_the_health_page(sim):
    sim.set_faults({"derp": "down"})
    settings = Settings(access_url=sim.url, gating_sections=("derp",))
    section = run(settings)
    verdict = readiness.evaluate(settings, {"derp": section}, ["derp"])
    assert verdict.text(verbose=False).splitlines()[0] == "[-]derp failed: EDERP03"
    page = render_page(Report("coder", {"derp": section}), ["derp"], {})
    assert "EDERP03</code></a>: region 999 (Coder Embedded Relay) is unhealthy: node 999b" in page


def test_garbage_instead_of_server_key_is_a_clear_error_not_a_crash(sim):
    sim.set_faults({"derp": "garbage"})
    section = run(Settings(access_url=sim.url))
    node = node_report(section, 999)
    assert node["severity"] == "error" and node["can_exchange_messages"] is False
    assert "ServerKey" in node["error"]
    assert section.severity is Severity.ERROR


def test_sim_answers_like_a_derp_server_to_plain_http(sim):
    host, port = sim.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/derp")
        response = conn.getresponse()
        assert (response.status, response.read()) == (426, b"DERP requires connection upgrade")
        for path in ("/derp/probe", "/derp/latency-check"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()


# --- standalone relays: several nodes, refusals, TLS ----------------------------------------


def test_a_refused_port_makes_the_node_and_its_region_fail():
    settings = Settings(derp_map=derp_map(region(7, refused_node("7a", 7))))
    section = run(settings)
    node = node_report(section, 7)
    assert node["healthy"] is False and node["severity"] == "error"
    assert "refused" in node["error"]
    assert any("refused" in e for e in node["client_errs"][0] + node["client_errs"][1])
    assert section.details["regions"]["7"]["healthy"] is False
    assert section.severity is Severity.ERROR and section.healthy is False


def test_one_of_two_nodes_down_is_ederp02_and_the_region_stays_healthy(derp_servers):
    good = derp_servers()
    settings = Settings(
        derp_map=derp_map(region(3, good.node("3a", 3), refused_node("3b", 3), name="Frankfurt"))
    )
    section = run(settings)
    reports = section.details["regions"]["3"]
    assert reports["healthy"] is True and reports["severity"] == "warning"
    assert [r["node"]["Name"] for r in reports["node_reports"]] == ["3a", "3b"]
    assert reports["node_reports"][0]["severity"] == "ok"
    assert reports["node_reports"][1]["severity"] == "error"
    assert codes(section) == ["EDERP02"]
    assert "Frankfurt" in section.warnings[0].message and "3b" in section.warnings[0].message
    assert section.severity is Severity.WARNING and section.healthy is True


def test_a_proxy_that_refuses_both_upgrades_is_an_error_naming_both(map_server):
    url = map_server(b"<html>Forbidden</html>", 403)
    node = {
        "Name": "waf", "RegionID": 9, "HostName": "127.0.0.1",
        "DERPPort": int(url.split(":")[2].split("/")[0]), "STUNPort": -1, "ForceHTTP": True,
    }
    section = run(Settings(derp_map=derp_map(region(9, node))))
    report = node_report(section, 9)
    assert report["severity"] == "error" and report["uses_websocket"] is False
    assert "Upgrade: DERP was refused (403" in report["error"]
    assert "WebSocket fallback failed too" in report["error"]
    assert "EDERP01" not in codes(section)


def test_two_of_two_nodes_down_fails_the_region():
    settings = Settings(derp_map=derp_map(region(4, refused_node("4a", 4), refused_node("4b", 4))))
    section = run(settings)
    reports = section.details["regions"]["4"]
    assert reports["healthy"] is False and reports["severity"] == "error"
    assert "2 of 2 nodes" in reports["error"]
    assert "EDERP02" not in codes(section)
    assert section.codes == ["EDERP03"]
    assert "region 4 (Region 4) is unhealthy: 2 of 2 nodes are not ok: node 4a: " in section.error
    assert "node 4b: cannot exchange messages:" in section.error and "refused" in section.error


def test_many_regions_are_probed_at_once(derp_servers):
    servers = [derp_servers() for _ in range(6)]
    regions = [region(10 + i, s.node(f"{10 + i}a", 10 + i)) for i, s in enumerate(servers)]
    section = run(Settings(derp_map=derp_map(*regions)))
    failed = {k: r.get("error") for k, r in section.details["regions"].items() if not r["healthy"]}
    assert failed == {}
    assert section.severity is Severity.OK
    assert all(s.relay.relayed >= 1 for s in servers)


def test_relay_answers_peer_gone_for_an_unknown_key(derp_servers):
    server = derp_servers()
    deadline = Deadline.after(5)
    logs: list[str] = []
    target = NodeTarget.from_node(server.node("x", 1))
    client = DerpClient.connect(
        target, deadline, check_address=blocked_address_check((), ()), log=logs.append
    )
    try:
        stranger = bytes(range(32))
        client.send_packet(stranger, b"\x01", deadline)
        message = client.recv(deadline)
    finally:
        client.close()
    assert message == wire.PeerGone(stranger, wire.PeerGoneReason.NOT_HERE)
    assert client.server_key == server.relay.public_key


def test_tls_node_is_verified_against_the_configured_ca_bundle(derp_servers, ca, monkeypatch):
    issued = ca.issue("derp")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    server = derp_servers(tls=context)
    settings = Settings(derp_map=derp_map(region(5, server.node("5a", 5))))

    untrusted = node_report(run(settings), 5)
    assert untrusted["severity"] == "error"
    assert "certificate verify failed" in untrusted["error"]

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.bundle))
    trusted = node_report(run(settings), 5)
    assert trusted["can_exchange_messages"] is True and trusted["severity"] == "ok"


# --- STUN ------------------------------------------------------------------------------------


def test_stun_answers_fill_netcheck(stun_servers):
    first = stun_servers(host="127.0.0.1")
    second = stun_servers(host="127.0.0.2")
    section = run(Settings(stun_servers=(first.address, second.address)))
    assert section.severity is Severity.OK and codes(section) == []
    for region_id in (1000, 1001):
        assert node_report(section, region_id)["stun"] == {
            "Enabled": True, "CanSTUN": True, "Error": None
        }
    netcheck = section.details["netcheck"]
    assert netcheck["UDP"] is True and netcheck["MappingVariesByDestIP"] is False
    assert netcheck["GlobalV4"].startswith("127.0.0.1:")
    assert set(netcheck["RegionLatency"]) == {"1000", "1001"}
    assert all(isinstance(v, int) and v > 0 for v in netcheck["RegionLatency"].values())
    # One socket for all servers: both saw the same source address and port.
    assert first.answered >= 1 and second.answered >= 1
    assert first.last_client == second.last_client
    assert netcheck["GlobalV4"] == "{}:{}".format(*first.last_client)


def test_sim_stun_server_drops_a_bare_request_and_answers_deployhealths(stun_servers):
    server = stun_servers()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5.0)
        bare_txid, bare = stun_wire.bare_binding_request()
        client.sendto(bare, (server.host, server.port))
        assert server.wait_for_dropped(1)
        assert server.last_drop is not None and "no SOFTWARE" in server.last_drop
        txid, request = stun_wire.binding_request()
        client.sendto(request, (server.host, server.port))
        # One server thread reads in order: had the bare request been answered, that answer
        # would have arrived first.
        data, _source = client.recvfrom(2048)
    answer = stun_wire.parse_binding_response(data)
    assert answer.txid == txid != bare_txid
    assert server.last_client is not None
    assert answer.address == "{}:{}".format(*server.last_client)
    assert (server.dropped, server.requests, server.answered) == (1, 1, 1)


def test_a_stun_only_region_on_a_tailscale_style_server_is_ok(stun_servers):
    # The sim's server answers only requests with SOFTWARE "tailnode" and a FINGERPRINT,
    # as derper does; a region served by it alone, from a DERP map, must be ok.
    strict = stun_servers()
    section = run(Settings(derp_map=derp_map(region(8, stun_node("8a", 8, strict)))))
    assert "ESTUN01" not in codes(section) and codes(section) == []
    regional = section.details["regions"]["8"]
    assert regional["healthy"] is True and regional["severity"] == "ok"
    node = node_report(section, 8)
    assert node["stun"] == {"Enabled": True, "CanSTUN": True, "Error": None}
    assert section.severity is Severity.OK
    assert strict.dropped == 0 and strict.answered >= 1
    # The same server as DEPLOYHEALTH_STUN_SERVERS: its own STUN-only region 1000.
    listed = run(Settings(stun_servers=(strict.address,)))
    assert listed.details["regions"]["1000"]["severity"] == "ok" and codes(listed) == []
    assert strict.dropped == 0


def test_hard_nat_is_estun02_a_message_that_does_not_raise_the_severity(stun_servers):
    first = stun_servers(host="127.0.0.1")
    second = stun_servers(host="127.0.0.2", port_offset=7)
    section = run(Settings(stun_servers=(first.address, second.address)))
    assert codes(section) == ["ESTUN02"]
    (message,) = section.warnings
    assert message.severity is Severity.OK and "hard NAT" in message.message
    assert section.severity is Severity.OK and section.healthy is True
    assert section.details["netcheck"]["MappingVariesByDestIP"] is True


def test_two_servers_at_one_ip_cannot_tell_hard_nat(stun_servers):
    first = stun_servers(host="127.0.0.1")
    second = stun_servers(host="127.0.0.1", port_offset=7)
    section = run(Settings(stun_servers=(first.address, second.address)))
    assert "ESTUN02" not in codes(section)
    assert section.details["netcheck"]["MappingVariesByDestIP"] is None


def test_all_stun_servers_silent_is_estun01(stun_servers):
    quiet = [stun_servers(silent=True), stun_servers(host="127.0.0.2", silent=True)]
    section = run(Settings(stun_servers=tuple(s.address for s in quiet)), seconds=3.0)
    assert "ESTUN01" in codes(section)
    assert Severity.WARNING.rank <= section.severity.rank
    node = node_report(section, 1000)
    assert node["stun"]["Enabled"] is True and node["stun"]["CanSTUN"] is False
    assert "no STUN answer" in node["stun"]["Error"]
    assert section.details["netcheck"]["UDP"] is False
    # The nodes are at error (Coder's rule), so the section is, and says which and why.
    assert section.codes == ["EDERP03", "ESTUN01"]
    assert section.severity is Severity.ERROR
    assert section.error.startswith("EDERP03: 2 of 2 regions are unhealthy: ")
    assert "\n" not in section.error
    for region_id, name in ((1000, "Coder STUN 0"), (1001, "Coder STUN 1")):
        assert (
            f"region {region_id} ({name}) is unhealthy: node {region_id}stun0: STUN failed:"
            in section.error
        )
    assert all(s.requests >= 1 for s in quiet)


def test_one_stun_server_answering_is_enough_for_no_estun01(stun_servers):
    section = run(
        Settings(stun_servers=(stun_servers().address, stun_servers(silent=True).address)),
        seconds=3.0,
    )
    assert "ESTUN01" not in codes(section)
    assert node_report(section, 1000)["stun"]["CanSTUN"] is True
    assert node_report(section, 1001)["severity"] == "error"


def test_node_with_stun_and_derp_needs_both(derp_servers, stun_servers):
    server = derp_servers()
    stun = stun_servers(silent=True)
    node = server.node("6a", 6, STUNPort=stun.port)
    section = run(Settings(derp_map=derp_map(region(6, node))), seconds=3.0)
    report = node_report(section, 6)
    assert report["can_exchange_messages"] is True
    assert report["severity"] == "error" and "STUN" in report["error"]
    assert "ESTUN01" in codes(section)


def test_sim_stun_fault_switch(sim):
    settings = Settings(access_url=sim.url, stun_servers=tuple(servers_of(sim)))
    sim.set_faults({"stun": "hard-nat"})
    assert codes(run(settings)) == ["ESTUN02"]
    sim.set_faults({"stun": "silent"})
    assert "ESTUN01" in codes(run(settings, seconds=3.0))
    sim.set_faults({"stun": "ok"})
    assert codes(run(settings)) == []


# --- where the map comes from ------------------------------------------------------------


def test_map_from_a_file(derp_servers, tmp_path):
    server = derp_servers()
    path = tmp_path / "derpmap.json"
    path.write_text(derp_map(region(21, server.node("21a", 21))))
    section = run(Settings(derp_map=str(path)))
    assert section.severity is Severity.OK
    assert node_report(section, 21)["can_exchange_messages"] is True
    assert section.details["derp_map_source"] == str(path)


@pytest.fixture
def map_server() -> Iterator[Callable[[bytes, int], str]]:
    """Serve fixed bytes with a fixed status at http://127.0.0.1:<port>/derpmap.json."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(body: bytes, status: int = 200) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/derpmap.json"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_map_from_an_http_url(derp_servers, map_server):
    server = derp_servers()
    url = map_server(derp_map(region(22, server.node("22a", 22))).encode(), 200)
    section = run(Settings(derp_map=url))
    assert section.severity is Severity.OK
    assert node_report(section, 22)["can_exchange_messages"] is True


def test_map_url_that_redirects_or_fails_is_reported(map_server):
    for status in (302, 500):
        url = map_server(b"{}", status)
        section = run(Settings(derp_map=url))
        assert section.codes == ["EUNKNOWN"] and section.severity is Severity.ERROR
        assert f"answered {status}" in section.error


def test_a_token_in_the_map_url_never_reaches_the_report(derp_servers, map_server):
    secret = "s3cr3t-map-token"
    server = derp_servers()
    good = map_server(derp_map(region(23, server.node("23a", 23))).encode(), 200)
    failing = map_server(b"nope", 500)
    for url in (good, failing, f"http://127.0.0.1:{free_port()}/derpmap.json"):
        section = run(Settings(derp_map=f"{url}?token={secret}"))
        assert secret not in json.dumps(section.to_dict()), url


def test_map_url_body_is_capped(map_server):
    url = map_server(b" " * (1024 * 1024 + 10), 200)
    section = run(Settings(derp_map=url))
    assert "larger than" in section.error


def test_map_url_that_never_answers_is_bounded_by_the_deadline():
    with BlackHoleServer() as hole:
        started = time.monotonic()
        section = run_probe(
            "derp", probe, Settings(derp_map=f"http://127.0.0.1:{hole.port}/derpmap.json"),
            Deadline.after(2.0),
        )
        check_section("derp", section)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert section.codes == ["EUNKNOWN"] and "took longer than" in section.error


def test_map_url_at_the_metadata_address_is_refused_before_connecting():
    section = run(Settings(derp_map="http://169.254.169.254/latest/derpmap.json"))
    assert section.codes == ["EUNKNOWN"]
    assert "169.254.169.254" in section.error and "DEPLOYHEALTH_SSRF_ALLOW" in section.error


def test_node_at_a_metadata_address_is_refused_unless_allow_listed():
    node = {"Name": "m", "RegionID": 1, "HostName": "169.254.169.254", "STUNPort": -1}
    section = run(Settings(derp_map=derp_map(region(1, node))), seconds=3.0)
    report = node_report(section, 1)
    assert "refusing 169.254.169.254" in report["error"]


def test_a_map_that_is_not_a_derp_map_says_so(tmp_path):
    cases = {
        "{not json": "not valid JSON",
        '{"regions": {}}': 'no "Regions" object',
        '{"Regions": {"1": {"RegionID": "one", "Nodes": []}}}': "not a number",
        str(tmp_path / "missing.json"): "cannot read",
    }
    for text, expected in cases.items():
        section = run(Settings(derp_map=text))
        assert section.codes == ["EUNKNOWN"], text
        assert expected in section.error, (text, section.error)


def test_nothing_to_check_is_not_ok_and_says_what_to_configure():
    section = run(Settings())
    assert section.severity is Severity.WARNING and section.codes == ["ENOTCHECKED"]
    assert "no access URL" in section.warnings[0].message
    assert "DEPLOYHEALTH_DERP_MAP" in section.warnings[0].message
    assert any("no access URL" in line for line in section.details["netcheck_logs"])


def test_a_map_without_regions_is_not_checked_rather_than_ok():
    section = run(Settings(derp_map='{"Regions": {}}'))
    assert section.codes == ["ENOTCHECKED"] and section.severity is Severity.WARNING
    assert "the DERP map from inline JSON has no regions" in section.warnings[0].message


# --- deadlines -------------------------------------------------------------------------------


def test_family_returns_within_its_deadline_against_black_holes(stun_servers):
    with BlackHoleServer() as hole:
        quiet = stun_servers(silent=True)
        node = {
            "Name": "bh", "RegionID": 8, "HostName": "127.0.0.1", "DERPPort": hole.port,
            "STUNPort": quiet.port, "ForceHTTP": True,
        }
        settings = Settings(derp_map=derp_map(region(8, node)))
        started = time.monotonic()
        section = check_section("derp", run_probe("derp", probe, settings, Deadline.after(2.5)))
        elapsed = time.monotonic() - started
        assert hole.accepted >= 2
    assert elapsed < 2.5 + 1.0
    assert section.codes != ["EUNKNOWN"]  # the family itself returned, not the runner
    report = node_report(section, 8)
    assert report["severity"] == "error"
    assert "no answer in time" in report["error"] and "no STUN answer" in report["error"]


# --- hostile relays and map servers: memory and time stay bounded ---------------------------

# Far below what the peers offer (4 GiB or 2**62 announced, or streams without end), and
# above the caps (1 MiB DERP frames, 2 MiB WebSocket messages, a 1 MiB map).
MEMORY_BOUND = 24 * 1024 * 1024
DERP_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
ZEROS = b"\0" * 65536


def refuse_derp_then(websocket_reply: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Refuse `Upgrade: DERP` with 426 as Coder does without the header; the WebSocket gets
    `websocket_reply`."""

    def reply(head: bytes) -> bytes:
        if re.search(rb"(?im)^upgrade:\s*derp\s*$", head):
            return b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n"
        return websocket_reply(head)

    return reply


HOSTILE_RELAYS: dict[str, tuple[dict[str, Any], str]] = {
    # name: (ScriptedServer script, what the node's error says)
    "raw frame announcing 4 GiB": (
        {"reply": DERP_101 + b"\x01\xff\xff\xff\xff", "stream": ZEROS},
        "announces 4294967295 bytes, above the 1048576-byte limit",
    ),
    "raw stream of zeros": (
        {"reply": DERP_101, "stream": ZEROS},
        "17 frames of unknown types in a row: not a DERP server",
    ),
    "raw upgrade head without end": (
        {"reply": b"HTTP/1.1 101 Switching Protocols\r\n", "stream": b"X-Junk: a\r\n" * 4096},
        "the response head is longer than 16384 bytes",
    ),
    "websocket frame announcing 2**62 bytes": (
        {
            "reply": refuse_derp_then(
                ws_accept(ws_frame_header(OPCODE_BINARY, 2**62), subprotocol="derp")
            ),
            "stream": ZEROS,
        },
        "a frame announcing 4611686018427387904 bytes, above the 2097152-byte limit",
    ),
    "websocket continuation frames without end": (
        {
            "reply": refuse_derp_then(
                ws_accept(ws_frame(OPCODE_BINARY, ZEROS, fin=False), subprotocol="derp")
            ),
            "stream": ws_frame(OPCODE_CONT, ZEROS, fin=False),
        },
        "a fragmented message of more than 2097152 bytes",
    ),
    "websocket upgrade head without end": (
        {
            "reply": refuse_derp_then(lambda _head: b"HTTP/1.1 101 Switching Protocols\r\n"),
            "stream": b"X-Junk: " + b"a" * 4096 + b"\r\n",
        },
        "the response head is longer than 65536 bytes",
    ),
    "websocket refusal with a body of 100 GB": (
        {
            "reply": refuse_derp_then(
                lambda _head: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100000000000\r\n\r\n"
            ),
            "stream": b"x" * 65536,
        },
        "answered 403 Forbidden: 'xxxx",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_RELAYS))
def test_hostile_relay_fails_the_node_in_bounded_memory_and_time(name: str) -> None:
    script, said = HOSTILE_RELAYS[name]
    with ScriptedServer(**script) as server:
        node = {
            "Name": "hostile", "RegionID": 9, "HostName": "127.0.0.1", "DERPPort": server.port,
            "STUNPort": -1, "ForceHTTP": True,
        }
        settings = Settings(derp_map=derp_map(region(9, node)))
        section, cost = measured(
            lambda: check_section("derp", run_probe("derp", probe, settings, Deadline.after(5.0)))
        )
    report = node_report(section, 9)
    assert report["severity"] == "error"
    assert said in report["error"], report["error"]
    assert section.codes == ["EDERP03"]
    assert cost.peak < MEMORY_BOUND, cost
    assert cost.elapsed < 5.0


class _StunFlooder:
    """A UDP peer that answers a binding request with 60 KB datagrams, as fast as it can,
    until it is stopped: never a STUN answer, always more to read."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._flood, daemon=True)
        self.thread.start()

    def _flood(self) -> None:
        _request, client = self.sock.recvfrom(2048)
        junk = b"\xff" * 60_000
        while not self.stop.is_set():
            with contextlib.suppress(OSError):  # the client's buffer full, or it is gone
                self.sent += self.sock.sendto(junk, client)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_stun_peer_flooding_datagrams_is_no_answer_in_bounded_memory_and_time() -> None:
    flooder = _StunFlooder()
    try:
        target = StunTarget("flood", "127.0.0.1", flooder.port)
        run_, cost = measured(
            lambda: probe_all(
                [target], Deadline.after(3.0), check_address=lambda _ip: None, try_seconds=1.0
            )
        )
    finally:
        flooder.close()
    result = run_.results["flood"]
    assert result.error is not None and result.error.startswith("no STUN answer from 127.0.0.1")
    assert flooder.sent > 16 * 1024 * 1024  # far more than was ever held
    assert cost.peak < 4 * 1024 * 1024, cost
    assert cost.elapsed < 3.0 + 0.5


MAP_STREAMS = {
    "chunked without end": b"Transfer-Encoding: chunked\r\n\r\n",
    "Content-Length of 1 TB": b"Content-Length: 1000000000000\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MAP_STREAMS))
def test_map_url_streaming_without_end_is_capped(name: str) -> None:
    chunked = "chunked" in name
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + MAP_STREAMS[name]
    stream = b"10000\r\n" + b" " * 65536 + b"\r\n" if chunked else b" " * 65536
    with ScriptedServer(reply=head, stream=stream) as server:
        settings = Settings(derp_map=f"http://127.0.0.1:{server.port}/derpmap.json")
        section, cost = measured(
            lambda: check_section("derp", run_probe("derp", probe, settings, Deadline.after(5.0)))
        )
    assert "larger than 1048576 bytes" in section.error
    assert cost.peak < MEMORY_BOUND, cost
    assert cost.elapsed < 5.0


# --- EMF properties --------------------------------------------------------------------------


def test_properties_carry_the_round_trip_per_region_and_stun_reachability(sim):
    settings = Settings(access_url=sim.url, stun_servers=tuple(servers_of(sim)))
    section = run(settings)
    properties = section_properties(section)
    assert properties["stun_reachable"] == 1
    # STUN-only regions relay nothing: only the embedded relay has a round trip.
    timed = [r for r in properties["derp_regions"] if "round_trip_ms" in r]
    assert [r["region"] for r in timed] == ["999"]
    assert 0 < timed[0]["round_trip_ms"] < 1000 and timed[0]["severity"] == "ok"
    assert {r["region"] for r in properties["derp_regions"]} == set(section.details["regions"])

    sim.set_faults({"stun": "silent", "derp": "down"})
    failing = section_properties(run(settings, seconds=3.0))
    assert failing["stun_reachable"] == 0
    assert all("round_trip_ms" not in r for r in failing["derp_regions"])


def test_round_trip_text_is_go_duration():
    assert go_duration(0.0012345678) == "1.234568ms"
    assert go_duration(0.000000999) == "999ns"
    assert go_duration(0.0000015) == "1.5µs"
    assert go_duration(0.25) == "250ms"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(62.5) == "1m2.5s"
    assert go_duration(3600) == "1h0m0s"
    assert go_duration(0) == "0s"


# --- interop with real peers -----------------------------------------------------------------


class _Process:
    """A child process whose output is watched for a line that says it is ready."""

    def __init__(self, argv: list[str], ready: str, cwd: Path) -> None:
        self.lines: list[str] = []
        self._ready = ready
        self._seen = threading.Event()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self._ready in line:
                self._seen.set()
        self._seen.set()  # exited: wake the waiter, which then sees why

    def wait_ready(self, timeout: float = 10.0) -> None:
        self._seen.wait(timeout)
        if self.proc.poll() is not None or not any(self._ready in x for x in self.lines):
            output = "\n".join(self.lines[-30:])
            pytest.fail(f"{self.proc.args[0]} did not start:\n{output}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


NGINX_CONF = """
pid {prefix}/nginx.pid;
error_log stderr notice;
events {{}}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    # Like a load balancer that only knows WebSockets: any other Upgrade is dropped.
    map $http_upgrade $pass_upgrade {{ ~*^websocket$ websocket; default ""; }}
    map $http_upgrade $pass_connection {{ ~*^websocket$ upgrade; default close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $pass_upgrade;
            proxy_set_header Connection $pass_connection;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def test_nginx_that_forwards_only_websocket_upgrades_gives_ederp01(derp_servers, tmp_path):
    upstream = derp_servers()
    port = free_port()
    (tmp_path / "tmp").mkdir()
    conf = NGINX_CONF.format(prefix=tmp_path, port=port, upstream=upstream.port)
    with running_nginx(tmp_path, conf, port):
        node = {
            "Name": "ngx", "RegionID": 30, "HostName": "127.0.0.1", "DERPPort": port,
            "STUNPort": -1, "ForceHTTP": True,
        }
        section = run(Settings(derp_map=derp_map(region(30, node))))
    report = node_report(section, 30)
    assert report["uses_websocket"] is True
    assert report["can_exchange_messages"] is True
    assert codes(section) == ["EDERP01"] and section.severity is Severity.WARNING
    # nginx stripped the header, so the relay itself answered 426 through it.
    assert any("426" in line for line in report["client_logs"][0])
    assert upstream.relay.relayed >= 1


def test_coturn_answers_stun_and_the_mapped_address_is_reported(tmp_path):
    turnserver = require_program("turnserver", "coturn")
    port = free_port()
    process = _Process(
        [
            turnserver, "-n", "-v", "--no-cli", "--stun-only", "--no-tls", "--no-dtls",
            "--listening-ip=127.0.0.1", f"--listening-port={port}",
            "--log-file=stdout", "--simple-log",
            f"--pidfile={tmp_path / 'turnserver.pid'}", f"--userdb={tmp_path / 'turndb'}",
        ],
        "UDP listener opened on",
        tmp_path,
    )
    try:
        process.wait_ready()
        section = run(Settings(stun_servers=(f"127.0.0.1:{port}",)))
    finally:
        process.stop()
    # An RFC 5389 server that knows nothing of Tailscale answers the request with
    # SOFTWARE "tailnode" and FINGERPRINT just as it answered a bare one.
    node = node_report(section, 1000)
    assert node["stun"] == {"Enabled": True, "CanSTUN": True, "Error": None}
    assert section.severity is Severity.OK and codes(section) == []
    netcheck = section.details["netcheck"]
    assert netcheck["UDP"] is True
    assert netcheck["GlobalV4"].startswith("127.0.0.1:")
    assert int(netcheck["GlobalV4"].rsplit(":", 1)[1]) > 0
