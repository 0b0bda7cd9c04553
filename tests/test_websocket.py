"""websocket: every code from a real fault, over real sockets on 127.0.0.1.

The server is the simulated deployment's `/api/v2/debug/ws` (sim/wsecho.py), and for the
proxy cases a real nginx started from a generated config in front of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.coder_schema import check_section
from support.hostile import OPCODE_CONT, OPCODE_TEXT, measured, ws_accept, ws_frame, ws_frame_header
from support.peers import running_nginx
from support.tls import CertAuthority

from deployhealth.checks.websocket import merge_previous, probe
from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.model import Section, Severity
from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import SimRequest, SimulatedDeployment
from deployhealth.sim.tcp import BlackHoleServer, ScriptedServer, free_port
from deployhealth.sim.ws import accept_websocket
from deployhealth.store.sqlite import SQLiteStore

TOKEN = "sim-token"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatedDeployment]:
    with SimulatedDeployment() as running:
        yield running


@pytest.fixture(autouse=True)
def healthy_sim(sim: SimulatedDeployment, system_trust_only: None) -> Iterator[None]:
    """Every test starts from a healthy sim and the system CA store."""
    sim.set_faults({"reset": ""})
    yield
    sim.set_faults({"reset": ""})


def run(
    url: str | None,
    *,
    idle: float = 0.0,
    deadline: float = 15.0,
    token: str | None = TOKEN,
) -> Section:
    settings = Settings(
        access_url=url,
        coder_token=Secret(token) if token is not None else None,
        websocket_idle_seconds=idle,
    )
    return check_section("websocket", probe(settings, Deadline.after(deadline)))


def codes(section: Section) -> list[str]:
    return sorted(section.codes)


def message(section: Section, code: str) -> str:
    return next(f.message for f in section.errors + section.warnings if f.code == code)


def metrics(section: Section) -> dict[str, object]:
    return MetricsSink("DeployHealth", "coder", None).section("websocket", section)


# --- configuration and dial (EWS01) -------------------------------------------------


def test_no_access_url_is_ews01() -> None:
    section = run(None)
    assert codes(section) == ["EWS01"]
    assert section.severity is Severity.ERROR and section.healthy is False
    assert "no access URL configured" in message(section, "EWS01")


def test_unusable_access_url_is_ews01() -> None:
    section = run("ftp://coder.example.com")
    assert codes(section) == ["EWS01"]
    assert "scheme 'ftp'" in message(section, "EWS01")


def test_refused_dial_is_ews01() -> None:
    port = free_port()
    section = run(f"http://127.0.0.1:{port}")
    assert codes(section) == ["EWS01"]
    text = message(section, "EWS01")
    assert f"ws://127.0.0.1:{port}/api/v2/debug/ws" in text
    assert "connect:" in text and "refused" in text
    assert section.to_dict()["code"] == 0


def test_wrong_token_keeps_the_401_status_and_body(sim: SimulatedDeployment) -> None:
    section = run(sim.url, token="not-the-token")
    assert codes(section) == ["EWS01"]
    data = section.to_dict()
    assert data["code"] == 401
    body = json.loads(data["body"])
    assert body["detail"] == "API key is invalid."
    text = message(section, "EWS01")
    assert "401" in text and "token was refused" in text
    assert "not-the-token" not in json.dumps(data)


def test_missing_token_says_none_is_configured(sim: SimulatedDeployment) -> None:
    section = run(sim.url, token=None)
    assert section.to_dict()["code"] == 401
    assert "no session token is configured" in message(section, "EWS01")


def test_load_balancer_refusing_the_upgrade_is_ews01(sim: SimulatedDeployment) -> None:
    sim.set_faults({"websocket": "refuse"})
    section = run(sim.url)
    assert codes(section) == ["EWS01"]
    data = section.to_dict()
    assert data["code"] == 503
    assert "503 Service Temporarily Unavailable" in data["body"]
    assert "could not reach the server behind it" in message(section, "EWS01")


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the probe hangs up once it has read enough of a body


@pytest.fixture
def answering() -> Iterator[Callable[[Answer], str]]:
    """An HTTP server on 127.0.0.1 that answers every GET with one fixed answer."""
    servers: list[_QuietServer] = []

    def start(answer: Answer) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_redirect_is_reported_not_followed(answering: Callable[[Answer], str]) -> None:
    url = answering(Answer(302, b"", {"Location": "https://elsewhere.example.com/"}))
    section = run(url)
    assert codes(section) == ["EWS01"]
    assert section.to_dict()["code"] == 302
    assert "redirects are not followed" in message(section, "EWS01")


def test_huge_refusal_body_is_capped(answering: Callable[[Answer], str]) -> None:
    url = answering(Answer(403, b"x" * (10 * 1024 * 1024), {"Content-Type": "text/html"}))
    section = run(url)
    data = section.to_dict()
    assert data["code"] == 403
    assert data["body"] == "x" * 4096


def test_refusal_body_nested_too_deeply_is_still_ews01(answering: Callable[[Answer], str]) -> None:
    # 4 KiB of "[" is deeper than Python's JSON parser goes: RecursionError, not ValueError.
    section = run(answering(Answer(403, b"[" * 4096, {"Content-Type": "application/json"})))
    assert codes(section) == ["EWS01"]
    assert "answered 403" in message(section, "EWS01")


def test_server_that_never_answers_returns_within_the_deadline() -> None:
    with BlackHoleServer() as hole:
        started = time.monotonic()
        section = run(f"http://127.0.0.1:{hole.port}", deadline=1.5)
        elapsed = time.monotonic() - started
        assert hole.accepted == 1
    assert elapsed < 1.5 + 1.0
    assert codes(section) == ["EWS01"]
    assert "timeout" in message(section, "EWS01")


# --- hostile servers: memory and time stay bounded -----------------------------------

# Far below what the peers offer (2**62 bytes, or a stream without end), far above the caps.
MEMORY_BOUND = 8 * 1024 * 1024


def test_endless_handshake_head_is_ews01_in_bounded_memory() -> None:
    junk = b"X-Junk: " + b"a" * 4096 + b"\r\n"
    with ScriptedServer(reply=b"HTTP/1.1 101 Switching Protocols\r\n", stream=junk) as server:
        section, cost = measured(lambda: run(f"http://127.0.0.1:{server.port}", deadline=5.0))
    assert codes(section) == ["EWS01"]
    assert "the response head is longer than 65536 bytes" in message(section, "EWS01")
    assert cost.peak < MEMORY_BOUND
    assert cost.elapsed < 5.0


def test_frame_announcing_2_to_the_62_bytes_is_ews03_before_reading_it() -> None:
    script = ws_accept(ws_frame_header(OPCODE_TEXT, 2**62))
    with ScriptedServer(reply=script, stream=b"\0" * 65536) as server:
        section, cost = measured(lambda: run(f"http://127.0.0.1:{server.port}", deadline=5.0))
    assert section.to_dict()["code"] == 101
    assert codes(section) == ["EWS03"]
    assert message(section, "EWS03") == (
        "received incorrect message: the server sent a frame announcing 4611686018427387904 "
        'bytes, above the 65536-byte limit of this client, wanted "0"'
    )
    assert cost.peak < MEMORY_BOUND
    assert cost.elapsed < 5.0


def test_continuation_frames_without_end_are_ews03_at_the_message_cap() -> None:
    piece = b"a" * 16384
    script = ws_accept(ws_frame(OPCODE_TEXT, piece, fin=False))
    with ScriptedServer(reply=script, stream=ws_frame(OPCODE_CONT, piece, fin=False)) as server:
        section, cost = measured(lambda: run(f"http://127.0.0.1:{server.port}", deadline=5.0))
        sent = server.sent
    assert codes(section) == ["EWS03"]
    assert "a fragmented message of more than 65536 bytes" in message(section, "EWS03")
    assert sent > 65536  # the peer offered more than the cap, and it was not all kept
    assert cost.peak < MEMORY_BOUND
    assert cost.elapsed < 5.0


def test_a_message_trickling_without_end_is_ews02_at_the_deadline() -> None:
    # Every frame arrives well within a socket timeout: only a stop in time ends the read.
    script = ws_accept(ws_frame(OPCODE_TEXT, b"a", fin=False))
    stream = ws_frame(OPCODE_CONT, b"a", fin=False)
    with ScriptedServer(reply=script, stream=stream, interval=0.02) as server:
        section, cost = measured(lambda: run(f"http://127.0.0.1:{server.port}", deadline=2.0))
    assert codes(section) == ["EWS02"]
    assert message(section, "EWS02") == (
        "read message: timeout: the time ran out with a message still arriving"
    )
    assert cost.elapsed < 2.0 + 0.5
    assert cost.peak < MEMORY_BOUND


# --- the echo (EWS02, EWS03) --------------------------------------------------------


def test_server_closing_after_the_handshake_is_ews02(sim: SimulatedDeployment) -> None:
    sim.set_faults({"websocket": "close-after-handshake"})
    section = run(sim.url)
    assert codes(section) == ["EWS02"]
    assert section.to_dict()["code"] == 101
    assert message(section, "EWS02") == (
        "read message: the server closed the connection (close 1001 'goodbye')"
    )


def test_wrong_echo_is_ews03(sim: SimulatedDeployment) -> None:
    sim.set_faults({"websocket": "wrong-echo"})
    section = run(sim.url)
    assert codes(section) == ["EWS03"]
    assert message(section, "EWS03") == 'received incorrect message: wanted "0", got "not 0"'
    assert section.healthy is False


def test_binary_echo_is_ews03(sim: SimulatedDeployment) -> None:
    sim.set_faults({"websocket": "binary-echo"})
    section = run(sim.url)
    assert codes(section) == ["EWS03"]
    assert "incorrect message type: binary" in message(section, "EWS03")


def test_healthy_echo(sim: SimulatedDeployment) -> None:
    section = run(f"{sim.url}/some/base/path")
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert data["healthy"] is True
    assert data["code"] == 101 and data["body"] == ""
    assert data["idle_survived"] is None and data["server_pings"] is None
    assert data["idle_seconds"] == 0
    json.dumps(data)
    record = metrics(section)
    assert "ws_idle_survived" not in record and "ws_server_pings" not in record


# --- the idle probe (EWS04) ---------------------------------------------------------


def test_idle_probe_passes_when_the_server_pings(sim: SimulatedDeployment) -> None:
    sim.set_faults({"websocket-ping": "0.5s"})
    section = run(sim.url, idle=1.6)
    assert section.codes == []
    data = section.to_dict()
    assert data["idle_survived"] is True
    assert data["idle_seconds"] == 1.6
    assert data["server_pings"] >= 2
    assert data["idle_checked_at"] is not None
    record = metrics(section)
    assert record["ws_idle_survived"] == 1 and record["ws_idle_carried_over"] == 0
    assert record["ws_server_pings"] == data["server_pings"]


def test_connection_cut_while_idle_is_ews04(sim: SimulatedDeployment) -> None:
    sim.set_faults({"websocket": "cut-idle"})
    section = run(sim.url, idle=3.0)
    assert codes(section) == ["EWS04"]
    assert section.severity is Severity.WARNING
    assert section.healthy is True  # the echo itself worked
    data = section.to_dict()
    assert data["idle_survived"] is False
    assert data["server_pings"] == 0
    assert 0.9 <= data["idle_closed_after_seconds"] < 3.0
    text = message(section, "EWS04")
    assert "of a 3 s idle window, with 0 server pings" in text
    assert "dropped without a close frame" in text
    assert "60 s on an AWS ALB" in text
    assert metrics(section)["ws_idle_survived"] == 0


def test_server_ending_an_idle_session_itself_is_no_verdict_not_ews04() -> None:
    # Coder's own echo handler gives each message a timeout, then closes with 1008.
    def coder_like_echo(request: SimRequest, _sim: SimulatedDeployment) -> None:
        ws = accept_websocket(request)
        if ws is None:
            return
        with ws:
            while True:
                try:
                    kind, data = ws.recv(timeout=0.5)
                except TimeoutError:
                    ws.close(1008, "timed out")
                    return
                if kind == "close":
                    return
                if kind == "text" and isinstance(data, str):
                    ws.send_text(data)

    with SimulatedDeployment() as coder:
        coder.route("GET", "/api/v2/debug/ws", coder_like_echo)
        section = run(coder.url, idle=2.0)
    # A WebSocket close is not a proxy's silent idle cut: no warning, and no verdict either.
    assert codes(section) == []
    data = section.to_dict()
    assert data["idle_survived"] is None
    assert "the server closed it (close 1008 'timed out')" in data["idle_inconclusive"]
    assert section.to_dict()["idle_closed_after_seconds"] < 2.0


def test_idle_window_is_clipped_to_the_deadline(sim: SimulatedDeployment) -> None:
    sim.set_faults({"websocket-ping": "0.5s"})
    started = time.monotonic()
    section = run(sim.url, idle=30.0, deadline=4.0)
    elapsed = time.monotonic() - started
    assert elapsed < 4.0 + 1.0
    data = section.to_dict()
    assert data["idle_survived"] is True
    assert data["idle_seconds_configured"] == 30.0
    assert 0 < data["idle_seconds"] < 4.0


# --- keeping the idle verdict across echo-only runs ---------------------------------


def test_echo_only_run_carries_the_stored_idle_verdict(
    sim: SimulatedDeployment, tmp_path: Path
) -> None:
    store = SQLiteStore(str(tmp_path / "results.db"), "coder", 7.0)
    try:
        sim.set_faults({"websocket": "cut-idle"})
        store.put("websocket", run(sim.url, idle=1.5))
        sim.set_faults({"reset": ""})
        echo_only = run(sim.url)
        previous = store.latest()["websocket"]
        merged = merge_previous(previous, echo_only)
        store.put("websocket", merged)
        shown = store.latest()["websocket"]
    finally:
        store.close()
    assert codes(shown) == ["EWS04"]
    assert shown.severity is Severity.WARNING and shown.healthy is True
    data = shown.to_dict()
    assert data["idle_survived"] is False and data["idle_carried_over"] is True
    assert data["idle_seconds"] == 1.5
    assert data["idle_checked_at"] == previous.to_dict()["idle_checked_at"]
    record = metrics(shown)
    assert record["ws_idle_survived"] == 0 and record["ws_idle_carried_over"] == 1

    # An old verdict is not carried, and a run with its own verdict keeps it.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert merge_previous(previous, echo_only, now=later).to_dict()["idle_survived"] is None
    sim.set_faults({"websocket-ping": "0.5s"})
    fresh = run(sim.url, idle=1.0)
    assert merge_previous(previous, fresh).to_dict()["idle_survived"] is True


# --- through a real nginx -----------------------------------------------------------


@dataclass
class Nginx:
    url: str
    tls_url: str
    ca_bundle: Path


NGINX_CONF = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    # Like an ALB's idle timeout, much shorter: an upgraded connection whose server side
    # sends nothing for 2 s is closed.
    proxy_read_timeout 2s;
    proxy_send_timeout 2s;
    send_timeout 2s;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /api/v2/debug/ws {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(
    sim: SimulatedDeployment, ca: CertAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    prefix = tmp_path_factory.mktemp("nginx")
    server = ca.issue("nginx")
    port, tls_port = free_port(), free_port()
    conf = NGINX_CONF.format(
        # As root, nginx's workers would otherwise drop to "nobody", who cannot enter
        # pytest's private temporary directories.
        user="user root;" if os.geteuid() == 0 else "",
        prefix=prefix,
        port=port,
        tls_port=tls_port,
        cert=server.cert,
        key=server.key,
        upstream=sim.url.rsplit(":", 1)[1],
    )
    with running_nginx(prefix, conf, port, tls_port):
        yield Nginx(f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}", ca.bundle)


def test_nginx_read_timeout_cuts_a_session_without_pings(
    sim: SimulatedDeployment, nginx: Nginx
) -> None:
    sim.set_faults({"websocket": "no-pings"})
    section = run(nginx.url, idle=4.0, deadline=4.0 + 15.0)
    assert codes(section) == ["EWS04"]
    data = section.to_dict()
    assert data["idle_survived"] is False
    assert data["server_pings"] == 0
    # nginx's proxy_read_timeout is 2 s: the connection died then, not at the window's end.
    assert 1.5 <= data["idle_closed_after_seconds"] < 4.0
    text = message(section, "EWS04")
    assert "dropped without a close frame" in text and "60 s on an AWS ALB" in text


def test_server_pings_keep_a_session_alive_through_nginx(
    sim: SimulatedDeployment, nginx: Nginx
) -> None:
    sim.set_faults({"websocket-ping": "0.5s"})
    section = run(nginx.url, idle=4.0, deadline=4.0 + 15.0)
    assert section.codes == []
    data = section.to_dict()
    assert data["idle_survived"] is True
    assert data["server_pings"] >= 4


def test_wss_through_nginx_is_verified(nginx: Nginx, monkeypatch: pytest.MonkeyPatch) -> None:
    untrusted = run(nginx.tls_url)
    assert codes(untrusted) == ["EWS01"]
    assert "tls: certificate verify failed" in message(untrusted, "EWS01")

    monkeypatch.setenv("SSL_CERT_FILE", str(nginx.ca_bundle))
    trusted = run(nginx.tls_url)
    assert trusted.codes == []
    assert trusted.to_dict()["code"] == 101


def test_wrong_token_through_nginx_keeps_coders_answer(nginx: Nginx) -> None:
    section = run(nginx.url, token="nope")
    data = section.to_dict()
    assert data["code"] == 401
    assert json.loads(data["body"])["message"].startswith("You are signed out")
