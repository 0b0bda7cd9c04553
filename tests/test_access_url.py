"""access_url: every code comes from a real fault on a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import io
import json
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from support.coder_schema import check_section
from support.tls import CertAuthority, Issued

from deployhealth.checks.access_url import probe
from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.model import Section, Severity, parse_rfc3339
from deployhealth.settings import Settings
from deployhealth.sim.tcp import free_port

Respond = Callable[[http.server.BaseHTTPRequestHandler], None]

# Every test starts from the system CA store, whatever the developer's shell sets.
pytestmark = pytest.mark.usefixtures("system_trust_only")


def _now_plus(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)


# --- servers ------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    port: int
    paths: list[str] = field(default_factory=list)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # The probe hangs up on purpose (capped bodies, second TLS handshakes).
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Start an HTTP(S) server on 127.0.0.1 whose every GET is answered by `respond`."""
    servers: list[_QuietServer] = []

    def start(
        respond: Respond, *, tls: Issued | None = None, host_in_url: str = "127.0.0.1"
    ) -> Served:
        paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                paths.append(self.path)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    respond(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert, tls.key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        # shutdown() is only noticed between polls; a short poll keeps teardown quick.
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        port = server.server_address[1]
        scheme = "https" if tls else "http"
        return Served(f"{scheme}://{host_in_url}:{port}", int(port), paths)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def reply(status: int, body: bytes = b"OK", headers: dict[str, str] | None = None) -> Respond:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def run(url: str | None, deadline_seconds: float = 10.0, **overrides: object) -> Section:
    settings = Settings(access_url=url).with_overrides(**overrides)
    return check_section("access_url", probe(settings, Deadline.after(deadline_seconds)))


def codes(section: Section) -> list[str]:
    return sorted(section.codes)


def message(section: Section, code: str) -> str:
    return next(f.message for f in section.errors + section.warnings if f.code == code)


# --- configuration ------------------------------------------------------------------


def test_no_access_url_is_eacs01() -> None:
    section = run(None)
    assert codes(section) == ["EACS01"]
    assert section.severity is Severity.ERROR
    assert section.healthy is False
    assert "DEPLOYHEALTH_ACCESS_URL" in message(section, "EACS01")


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "https://", "http://host:99999"])
def test_unusable_access_url_is_eacs02(url: str) -> None:
    section = run(url)
    assert codes(section) == ["EACS02"]
    assert section.severity is Severity.ERROR
    assert section.to_dict()["access_url"] == url


# --- request failures (EACS03) ------------------------------------------------------


def test_refused_connection_names_the_connect_phase() -> None:
    section = run(f"http://127.0.0.1:{free_port()}")
    assert codes(section) == ["EACS03"]
    text = message(section, "EACS03")
    assert "connect:" in text and "refused" in text
    data = section.to_dict()
    assert data["reachable"] is False and data["status_code"] == 0
    assert data["timings_ms"]["dns"] is not None
    assert data["timings_ms"]["first_byte"] is None


def test_unresolvable_name_names_the_dns_phase() -> None:
    # .invalid never resolves (RFC 6761); this is the one lookup, and no request follows.
    section = run("http://deployhealth-test.invalid")
    assert codes(section) == ["EACS03"]
    assert "dns: cannot resolve deployhealth-test.invalid" in message(section, "EACS03")


def test_server_that_never_answers_times_out_within_the_deadline() -> None:
    # A listening socket that never accepts: the kernel completes the handshake, then silence.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        section = run(f"http://127.0.0.1:{port}", deadline_seconds=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert codes(section) == ["EACS03"]
    assert message(section, "EACS03").startswith(
        f"GET http://127.0.0.1:{port}/healthz: timeout: waiting for the response"
    )


def test_self_signed_certificate_fails_in_the_tls_phase(
    serve: Callable[..., Served], ca: CertAuthority
) -> None:
    served = serve(reply(200), tls=ca.issue("self", _now_plus(365), self_signed=True))
    section = run(served.url)
    assert codes(section) == ["EACS03"]
    assert "tls: certificate verify failed: self-signed certificate" in message(section, "EACS03")
    assert served.paths == []  # no request goes over an unverified connection
    assert "tls_not_after" in section.to_dict()


def test_expired_certificate_is_eacs03_and_eacs06_error(
    serve: Callable[..., Served], ca: CertAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.bundle))
    served = serve(reply(200), tls=ca.issue("expired", _now_plus(-1)))
    section = run(served.url)
    assert codes(section) == ["EACS03", "EACS06"]
    assert "tls: certificate verify failed: certificate has expired" in message(section, "EACS03")
    assert next(f for f in section.errors if f.code == "EACS06").severity is Severity.ERROR
    assert "expired" in message(section, "EACS06")
    assert parse_rfc3339(section.to_dict()["tls_not_after"]) < dt.datetime.now(dt.UTC)


# --- answers ------------------------------------------------------------------------


def test_bad_gateway_is_eacs04_with_the_load_balancer_hint(serve: Callable[..., Served]) -> None:
    served = serve(reply(502, b"<html>502 Bad Gateway</html>"))
    section = run(served.url)
    assert codes(section) == ["EACS04"]
    assert section.severity is Severity.WARNING
    text = message(section, "EACS04")
    assert "502" in text and "proxy or load balancer" in text and "could not reach" in text
    data = section.to_dict()
    assert data["reachable"] is True
    assert data["healthy"] is False
    assert data["status_code"] == 502
    assert data["healthz_response"] == "<html>502 Bad Gateway</html>"


def test_ok_status_with_another_body_is_eacs05(serve: Callable[..., Served]) -> None:
    served = serve(reply(200, b"<html>Welcome to nginx!</html>"))
    section = run(served.url)
    assert codes(section) == ["EACS05"]
    assert section.severity is Severity.WARNING
    assert "nginx" in message(section, "EACS05")
    assert section.to_dict()["healthy"] is True  # healthy means "status 200", as in Coder


def test_certificate_expiring_soon_is_eacs06_warning(
    serve: Callable[..., Served], ca: CertAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.bundle))
    served = serve(reply(200), tls=ca.issue("soon", _now_plus(5)))
    section = run(served.url)
    assert codes(section) == ["EACS06"]
    assert section.severity is Severity.WARNING
    text = message(section, "EACS06")
    assert "expires in" in text and "days" in text
    data = section.to_dict()
    assert data["status_code"] == 200 and data["healthy"] is True
    left = parse_rfc3339(data["tls_not_after"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=4) < left <= dt.timedelta(days=5)

    # The EMF record's tls_days_left property says the same.
    stream = io.StringIO()
    MetricsSink("DeployHealth", "coder", stream).section("access_url", section)
    days_left = json.loads(stream.getvalue())["tls_days_left"]
    assert 4 < days_left <= 5


def test_expiry_window_is_configurable(
    serve: Callable[..., Served], ca: CertAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.bundle))
    served = serve(reply(200), tls=ca.issue("soon3", _now_plus(5)))
    assert codes(run(served.url, tls_expiry_warning_days=3.0)) == []


def test_healthy_http_deployment(serve: Callable[..., Served]) -> None:
    served = serve(reply(200, b"OK"))
    section = run(f"{served.url}/some/base/path?x=1")
    assert section.severity is Severity.OK and section.codes == []
    assert served.paths == ["/healthz"]  # the access URL's own path is replaced
    data = section.to_dict()
    assert data["healthy"] is True and data["reachable"] is True
    assert data["status_code"] == 200
    assert data["healthz_response"] == "OK"
    assert "tls_not_after" not in data
    timings = data["timings_ms"]
    assert timings["tls"] is None
    for phase in ("dns", "connect", "first_byte", "total"):
        assert isinstance(timings[phase], float) and timings[phase] >= 0.0
    assert timings["total"] >= timings["first_byte"]
    json.dumps(data)


def test_healthy_https_deployment(
    serve: Callable[..., Served], ca: CertAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.bundle))
    served = serve(reply(200, b"OK\n"), tls=ca.issue("good", _now_plus(90)))
    section = run(served.url)
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert isinstance(data["timings_ms"]["tls"], float)
    left = parse_rfc3339(data["tls_not_after"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < left <= dt.timedelta(days=90)
    # What the Logs Insights queries read (properties of the record, not metrics).
    record = MetricsSink("DeployHealth", "coder", None).section("access_url", section)
    assert record["access_url_status_code"] == 200
    assert 89 < record["tls_days_left"] <= 90


def test_chunked_body_is_decoded(serve: Callable[..., Served]) -> None:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"1;ext=1\r\nO\r\n1\r\nK\r\n0\r\n\r\n")

    section = run(serve(respond).url)
    assert section.codes == []
    assert section.to_dict()["healthz_response"] == "OK"


# --- redirects ----------------------------------------------------------------------


def test_same_host_redirect_is_followed(serve: Callable[..., Served]) -> None:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.path == "/healthz":
            reply(308, b"", {"Location": "/api/healthz"})(handler)
        else:
            reply(200, b"OK")(handler)

    served = serve(respond)
    section = run(served.url)
    assert section.codes == []
    assert served.paths == ["/healthz", "/api/healthz"]


def test_redirect_to_another_host_is_not_followed(serve: Callable[..., Served]) -> None:
    elsewhere = serve(reply(200, b"OK"), host_in_url="localhost")
    served = serve(reply(302, b"", {"Location": f"{elsewhere.url}/healthz"}))
    section = run(served.url)
    assert codes(section) == ["EACS04"]
    assert "another host" in message(section, "EACS04")
    assert section.to_dict()["status_code"] == 302
    assert elsewhere.paths == []


def test_redirect_loop_stops(serve: Callable[..., Served]) -> None:
    served = serve(reply(302, b"", {"Location": "/healthz"}))
    section = run(served.url)
    assert codes(section) == ["EACS04"]
    assert "redirects" in message(section, "EACS04")
    assert len(served.paths) == 4


# --- body cap -----------------------------------------------------------------------


FIFTY_MB = 50 * 1024 * 1024


def _huge(chunked: bool) -> Respond:
    block = b"x" * 65536

    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(FIFTY_MB))
        handler.end_headers()
        for _ in range(FIFTY_MB // len(block)):
            if chunked:
                handler.wfile.write(b"10000\r\n" + block + b"\r\n")
            else:
                handler.wfile.write(block)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")

    return respond


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_fifty_megabyte_body_is_capped(serve: Callable[..., Served], chunked: bool) -> None:
    served = serve(_huge(chunked))
    tracemalloc.start()
    try:
        started = time.monotonic()
        section = run(served.url, deadline_seconds=5.0)
        elapsed = time.monotonic() - started
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 6.0
    assert peak < 8 * 1024 * 1024
    assert codes(section) == ["EACS05"]
    assert section.to_dict()["healthz_response"] == "x" * 1024
