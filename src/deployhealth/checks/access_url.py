"""access_url: `GET <access_url>/healthz`, as Coder's own health check does it.

Why a small hand-rolled HTTP/1.1 client instead of requests: the section reports how long
each phase took (DNS, connect, TLS, first byte) and, when the certificate cannot be
verified, still reports when it expires. requests (urllib3) exposes neither per-phase
timings nor the peer certificate of a failed handshake, so the probe drives `socket` and
`ssl` itself. It only ever sends one fixed GET, so the client stays small: it resolves,
connects, handshakes, sends, and reads a status line, headers and a capped body
(Content-Length, chunked, or until close).

Behaviour worth knowing:

- The whole request, redirects included, has a 5 s budget, clipped by the family deadline;
  every socket operation gets what is left of it, so a server that trickles bytes cannot
  hold the probe past it.
- Redirects (301, 302, 303, 307, 308) are followed only to the same host name (a scheme or
  port change is allowed, e.g. an ALB's http -> https redirect), at most `MAX_REDIRECTS`.
  A redirect to another host is reported as the non-200 answer it is, and not fetched.
- TLS is verified against the system CA store. As with requests, the environment variable
  `REQUESTS_CA_BUNDLE`, else `SSL_CERT_FILE`, names a CA bundle (file or directory) that
  replaces it; it is read on every probe.
- When verification fails, a second, unverified handshake reads the certificate only to
  report its expiry (EACS06, `tls_not_after`); nothing is sent over that connection.
- `timings_ms`: `dns`, `connect`, `tls` are the durations of those phases of the last
  request; `first_byte` is the time from sending the request to the first byte of the
  answer; `total` covers the whole probe, redirects included. A phase that did not happen
  (TLS over http, or a phase after the failure) is null.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.model import Finding, Section, Severity, parse_rfc3339, rfc3339
from deployhealth.net import (
    DEFAULT_PORTS,
    CertificateVerifyError,
    PhaseError,
    ascii_host,
    authority,
    connect_tcp,
    error_text,
    parse_access_url,
    phase_timeout,
    resolve_host,
    show_sockaddr,
    tls_context,
    tls_handshake,
    unverified_tls_context,
)
from deployhealth.redact import safe_url
from deployhealth.settings import Settings

REQUEST_TIMEOUT_SECONDS = 5.0
BODY_CAP = 64 * 1024
HEADER_CAP = 64 * 1024
REPORTED_BODY_CAP = 1024
MAX_REDIRECTS = 3
USER_AGENT = "deployhealth/0.1 (+access_url check)"

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PROXY_STATUSES = frozenset({502, 503, 504})
_RECV_SIZE = 16 * 1024
_PATH_SAFE = "/%:@!$&'()*+,;=-._~?"


@dataclass
class _Target:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"

    @property
    def authority(self) -> str:
        return authority(self.host, self.port, self.scheme)


@dataclass
class _Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _Exchange:
    """What one request produced, filled in as it goes so that a failure keeps the timings."""

    timings: dict[str, float | None] = field(
        default_factory=lambda: {"dns": None, "connect": None, "tls": None, "first_byte": None}
    )
    not_after: datetime | None = None


def probe(settings: Settings, deadline: Deadline) -> Section:
    started = time.monotonic()
    configured = (settings.access_url or "").strip()
    details: dict[str, Any] = {
        # As configured, less any user:password@ or token in it (Coder shows it as given).
        "access_url": safe_url(configured),
        "reachable": False,
        "status_code": 0,
        "healthz_response": "",
        "timings_ms": dict.fromkeys(("dns", "connect", "tls", "first_byte", "total")),
    }
    if not configured:
        missing = "no access URL configured (set DEPLOYHEALTH_ACCESS_URL)"
        return _section([Finding("EACS01", missing, Severity.ERROR)], details)
    try:
        scheme, host, port = parse_access_url(configured)
    except ValueError as exc:
        return _section([Finding("EACS02", str(exc), Severity.ERROR)], details)
    # The health endpoint lives at the root, whatever path the access URL carries.
    target = _Target(scheme, host, port, "/healthz")

    findings: list[Finding] = []
    budget = deadline.sooner(REQUEST_TIMEOUT_SECONDS)
    exchange = _Exchange()
    response: _Response | None = None
    try:
        # Built on first https use only: a broken CA bundle must not fail an http check.
        context: ssl.SSLContext | None = None
        redirects = 0
        while True:
            exchange = _Exchange()
            if target.scheme == "https" and context is None:
                context = tls_context()
            response = _request(target, context, budget, exchange)
            location = response.headers.get("location")
            if response.status not in _REDIRECTS or not location:
                break
            following = _redirect_target(target, location)
            if following is None:
                findings.append(
                    Finding(
                        "EACS04",
                        f"GET {target.url} answered {response.status} {response.reason}, "
                        f"redirecting to {location!r}: a redirect to another host is not followed",
                        Severity.WARNING,
                    )
                )
                break
            if redirects >= MAX_REDIRECTS:
                findings.append(
                    Finding(
                        "EACS04",
                        f"GET {target.url} answered {response.status}: stopped after "
                        f"{MAX_REDIRECTS} redirects",
                        Severity.WARNING,
                    )
                )
                break
            redirects += 1
            target = following
    except PhaseError as exc:
        response = None
        findings.append(Finding("EACS03", f"GET {target.url}: {exc}", Severity.ERROR))

    timings = {k: _ms(v) for k, v in exchange.timings.items()}
    timings["total"] = _ms(time.monotonic() - started)
    details["timings_ms"] = timings
    if response is not None:
        details["reachable"] = True
        details["status_code"] = response.status
        text = response.body.decode("utf-8", errors="replace")
        details["healthz_response"] = text[:REPORTED_BODY_CAP]
        if not findings:
            findings += _judge(target, response, text)
    if exchange.not_after is not None:
        details["tls_not_after"] = rfc3339(exchange.not_after)
        expiry = _expiry(exchange.not_after, settings.tls_expiry_warning_days)
        if expiry is not None:
            findings.append(expiry)
    healthy = details["reachable"] and details["status_code"] == 200
    return _section(findings, details, healthy=healthy)


def _section(findings: list[Finding], details: dict[str, Any], *, healthy: bool = False) -> Section:
    return Section.from_findings(findings, details, healthy=healthy)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _redirect_target(current: _Target, location: str) -> _Target | None:
    """The next request of a same-host redirect, or None when it leads elsewhere."""
    parts = urlsplit(urljoin(current.url, location))
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    host = ascii_host(parts.hostname)
    if host is None or host.rstrip(".") != current.host.lower().rstrip("."):
        return None
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    # Re-quoted so that a Location with raw non-ASCII characters still makes a valid request.
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    return _Target(scheme, current.host, port, path)


def _judge(target: _Target, response: _Response, text: str) -> list[Finding]:
    if response.status != 200:
        message = f"GET {target.url} answered {response.status} {response.reason}".rstrip()
        if response.status in _PROXY_STATUSES:
            message += (
                ": a proxy or load balancer answered because it could not reach the server "
                "behind it (check the target group's health and the Coder server)"
            )
        return [Finding("EACS04", message, Severity.WARNING)]
    if text.strip() != "OK":
        shown = text.strip()[:80]
        return [
            Finding(
                "EACS05",
                f"GET {target.url} answered 200 with {shown!r} instead of 'OK': the request most "
                "likely reached something other than the deployment (wrong DNS record, captive "
                "portal or virtual host)",
                Severity.WARNING,
            )
        ]
    return []


def _expiry(not_after: datetime, warning_days: float) -> Finding | None:
    left = not_after - datetime.now(UTC)
    when = rfc3339(not_after)
    if left <= timedelta(0):
        return Finding("EACS06", f"the TLS certificate expired at {when}", Severity.ERROR)
    if left <= timedelta(days=warning_days):
        days = left.total_seconds() / 86400
        return Finding(
            "EACS06",
            f"the TLS certificate expires in {days:.1f} days (at {when})",
            Severity.WARNING,
        )
    return None


# --- the client -------------------------------------------------------------------


def _request(
    target: _Target, context: ssl.SSLContext | None, budget: Deadline, exchange: _Exchange
) -> _Response:
    """One GET; timings and the certificate's expiry land in `exchange` even on failure."""
    timings = exchange.timings
    mark = time.monotonic()
    addresses = resolve_host(target.host, target.port, budget)
    timings["dns"] = time.monotonic() - mark

    mark = time.monotonic()
    sock: socket.socket = connect_tcp(addresses, budget)
    timings["connect"] = time.monotonic() - mark
    peer = show_sockaddr(sock.getpeername())
    try:
        if context is not None:
            mark = time.monotonic()
            sock = _handshake(sock, context, target, budget, exchange)
            timings["tls"] = time.monotonic() - mark
        request = (
            f"GET {target.path} HTTP/1.1\r\n"
            f"Host: {target.authority}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            "Accept: */*\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii", errors="strict")
        try:
            sock.settimeout(phase_timeout(budget, "sending the request"))
            sock.sendall(request)
        except TimeoutError:
            raise PhaseError("sending the request", f"{peer} stalled", timed_out=True) from None
        except OSError as exc:
            raise PhaseError("sending the request", f"{peer}: {error_text(exc)}") from None
        return _read_response(sock, budget, timings, time.monotonic())
    finally:
        sock.close()


def _handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    target: _Target,
    budget: Deadline,
    exchange: _Exchange,
) -> ssl.SSLSocket:
    try:
        tls = tls_handshake(sock, context, target.host, budget)
    except CertificateVerifyError:
        exchange.not_after = _peek_not_after(target, budget)
        raise
    der = tls.getpeercert(binary_form=True)
    if der:
        exchange.not_after = not_after_from_der(der)
    return tls


def _peek_not_after(target: _Target, budget: Deadline) -> datetime | None:
    """Read the certificate of a server that failed verification, only to report its expiry."""
    try:
        sock = connect_tcp(resolve_host(target.host, target.port, budget), budget)
    except PhaseError:
        return None
    try:
        sock.settimeout(budget.timeout(REQUEST_TIMEOUT_SECONDS))
        with unverified_tls_context().wrap_socket(sock, server_hostname=target.host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, DeadlineExceeded):
        return None
    finally:
        sock.close()
    return not_after_from_der(der) if der else None


class _Reader:
    """Buffered reads from a socket, each under what is left of the request budget."""

    def __init__(self, sock: socket.socket, budget: Deadline) -> None:
        self.sock = sock
        self.budget = budget
        self.buffer = bytearray()
        self.eof = False
        self.phase = "waiting for the response"

    def fill(self) -> bool:
        """Read once more; False at end of stream."""
        if self.eof:
            return False
        timeout = phase_timeout(self.budget, self.phase)
        try:
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise PhaseError(
                self.phase, f"nothing received for {timeout:.1f} s", timed_out=True
            ) from None
        except OSError as exc:
            raise PhaseError(self.phase, error_text(exc)) from None
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def line(self, cap: int) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                out = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return out
            if len(self.buffer) > cap:
                raise PhaseError(self.phase, f"a line is longer than {cap} bytes")
            if not self.fill():
                raise PhaseError(self.phase, "the connection closed in the middle of a line")

    def take(self, size: int) -> bytes:
        """Up to `size` bytes; fewer only at end of stream."""
        while len(self.buffer) < size and self.fill():
            pass
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out


def _read_response(
    sock: socket.socket, budget: Deadline, timings: dict[str, float | None], sent: float
) -> _Response:
    reader = _Reader(sock, budget)
    if not reader.fill():
        raise PhaseError(reader.phase, "the server closed the connection without answering")
    timings["first_byte"] = time.monotonic() - sent
    reader.phase = "reading the headers"
    while True:
        status, reason, headers = _read_head(reader)
        # Interim 1xx answers precede the real one.
        if not 100 <= status < 200 or status == 101:
            break
    reader.phase = "reading the body"
    return _Response(status, reason, headers, _read_body(reader, status, headers))


def _read_head(reader: _Reader) -> tuple[int, str, dict[str, str]]:
    consumed = 0
    status_line = reader.line(HEADER_CAP)
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise PhaseError("reading the headers", f"not an HTTP answer: {status_line[:80]!r}")
    status = int(parts[1])
    reason = parts[2].strip() if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    while True:
        line = reader.line(HEADER_CAP)
        consumed += len(line) + 2
        if consumed > HEADER_CAP:
            raise PhaseError("reading the headers", f"headers longer than {HEADER_CAP} bytes")
        if not line:
            return status, reason, headers
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value


def _read_body(reader: _Reader, status: int, headers: dict[str, str]) -> bytes:
    """The body, cut at BODY_CAP: the rest is never read, the connection is closed instead."""
    if status in (204, 304):
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _read_chunked(reader)
    length_text = headers.get("content-length")
    if length_text is not None:
        try:
            length = int(length_text.split(",")[0].strip())
        except ValueError:
            raise PhaseError(
                "reading the body", f"invalid Content-Length {length_text!r}"
            ) from None
        body = reader.take(min(length, BODY_CAP))
        if len(body) < min(length, BODY_CAP):
            raise PhaseError(
                "reading the body",
                f"the connection closed after {len(body)} of {length} bytes",
            )
        return body
    # No length: the body runs to the end of the connection (we asked for Connection: close).
    return reader.take(BODY_CAP)


def _read_chunked(reader: _Reader) -> bytes:
    body = bytearray()
    while True:
        size_line = reader.line(1024).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise PhaseError("reading the body", f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            return bytes(body)
        wanted = min(size, BODY_CAP - len(body))
        data = reader.take(wanted)
        body += data
        if len(data) < wanted:
            raise PhaseError("reading the body", "the connection closed inside a chunk")
        if len(body) >= BODY_CAP:
            return bytes(body)
        reader.take(size - wanted)
        if reader.line(1024):
            raise PhaseError("reading the body", "a chunk is not followed by CRLF")


# --- certificate expiry, without a dependency on `cryptography` ----------------------


def not_after_from_der(der: bytes) -> datetime | None:
    """The notAfter of a DER X.509 certificate, or None if it cannot be read.

    The stdlib only decodes certificates that verified; this walks the few DER fields
    in front of `validity` so that an unverifiable certificate's expiry is still known.
    """
    try:
        _tag, start, _end = _der_item(der, 0)  # Certificate
        _tag, pos, _end = _der_item(der, start)  # TBSCertificate
        tag, _start, end = _der_item(der, pos)
        if tag == 0xA0:  # explicit [0] version
            pos = end
        for _ in range(3):  # serialNumber, signature, issuer
            _tag, _start, pos = _der_item(der, pos)
        tag, start, _end = _der_item(der, pos)  # validity
        if tag != 0x30:
            return None
        _tag, _start, pos = _der_item(der, start)  # notBefore
        tag, start, end = _der_item(der, pos)  # notAfter
        return _der_time(tag, der[start:end].decode("ascii"))
    except (IndexError, ValueError):
        return None


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER item at `pos`."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _der_time(tag: int, text: str) -> datetime | None:
    if not text.endswith("Z"):
        return None
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049
        moment = datetime.strptime(text, "%y%m%d%H%M%SZ")
        if moment.year >= 2050:
            moment = moment.replace(year=moment.year - 100)
    elif tag == 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        moment = datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        return None
    return moment.replace(tzinfo=UTC)


def section_properties(section: Section) -> dict[str, Any]:
    """`access_url_status_code` (when /healthz answered) and `tls_days_left` (HTTPS).

    Properties of the section's EMF record, not metrics (see deployhealth.metrics).
    """
    properties: dict[str, Any] = {}
    status = section.details.get("status_code")
    if isinstance(status, int) and not isinstance(status, bool) and status > 0:
        properties["access_url_status_code"] = status
    not_after = section.details.get("tls_not_after")
    if isinstance(not_after, str):
        left = (parse_rfc3339(not_after) - datetime.now(UTC)).total_seconds() / 86400
        properties["tls_days_left"] = round(left, 2)
    return properties
