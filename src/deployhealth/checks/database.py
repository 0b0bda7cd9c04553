"""database: connect with pg8000, then five `SELECT 1` round trips; the median is the latency.

Decisions:

- No database configured is EDB01 (error), not an `ok` section with a note: Coder cannot
  run without its PostgreSQL, so a watcher that is not told where it is cannot vouch for
  the deployment, and readiness must not pass by omission.
- The probe opens the TCP (or Unix) socket and negotiates TLS itself, then hands the socket
  to pg8000 (`sock=`, `ssl_context=False`). Owning the socket lets every query run under
  what is left of the 5 s query budget (pg8000 only sets a timeout once, at connect), and
  lets the message say whether DNS, connect, TLS or the server's answer failed.
- sslmode as libpq reads it: `disable` plain; `allow` and `prefer` try TLS without
  verification and fall back to plain on the same connection when the server declines;
  `require` TLS without verification; `verify-ca` verifies the chain; `verify-full` also
  the host name. The CA bundle is `PGSSLROOTCERT` when set (libpq's variable), else the
  system store. A Unix socket never uses TLS, as with libpq.
- The password is only handed to pg8000; every message is also scrubbed of it, and the
  target is named with `DatabaseTarget.describe()`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

import pg8000.exceptions
import pg8000.native

from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.metrics import Datum, MetricUnit
from deployhealth.model import Finding, Section, Severity
from deployhealth.net import PhaseError, connect_tcp, resolve_host, unverified_tls_context
from deployhealth.redact import Redactor
from deployhealth.settings import DatabaseTarget, Settings, SettingsError

CONNECT_TIMEOUT_SECONDS = 5.0
QUERIES_TIMEOUT_SECONDS = 5.0
PINGS = 5
APPLICATION_NAME = "deployhealth"

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class _ProbeFailure(Exception):
    """Ends the probe with EDB01; the message is already safe to show."""


def probe(settings: Settings, deadline: Deadline) -> Section:
    threshold = settings.db_latency_threshold_ms
    details: dict[str, Any] = {
        "reachable": False,
        "latency": "",
        "latency_ms": 0,
        "latency_ms_exact": None,
        "threshold_ms": int(threshold) if float(threshold).is_integer() else threshold,
        "connect_ms": None,
        "server_version": None,
    }
    try:
        target = settings.database()
    except SettingsError as exc:
        return _failed(f"the database setting is invalid: {exc}", details)
    if target is None:
        return _failed(
            "no database configured (set DEPLOYHEALTH_DATABASE_URL or "
            "DEPLOYHEALTH_DATABASE_SECRET)",
            details,
        )
    redactor = Redactor.for_settings(settings, extra=[target.password.reveal()])
    where = target.describe()

    started = time.monotonic()
    try:
        conn, sock = _connect(target, deadline.sooner(CONNECT_TIMEOUT_SECONDS))
    except _ProbeFailure as exc:
        return _failed(redactor.scrub(f"cannot connect to {where}: {exc}"), details)
    details["connect_ms"] = round((time.monotonic() - started) * 1000.0, 3)
    details["server_version"] = conn.parameter_statuses.get("server_version")

    try:
        latencies = _ping(conn, sock, deadline.sooner(QUERIES_TIMEOUT_SECONDS))
    except _ProbeFailure as exc:
        return _failed(redactor.scrub(f"{where}: {exc}"), details)
    finally:
        _close(conn, sock)

    # The third of the five, sorted: one slow outlier (a cold plan cache, a GC pause) in
    # either direction does not move it.
    median = sorted(latencies)[len(latencies) // 2]
    details.update(
        reachable=True,
        latency=f"{median:.3f}ms",
        latency_ms=int(median),
        latency_ms_exact=round(median, 3),
    )
    findings: list[Finding] = []
    if median >= threshold:
        spread = f"min {min(latencies):.3f} ms, max {max(latencies):.3f} ms"
        findings.append(
            Finding(
                "EDB02",
                f"{where}: median SELECT 1 latency {median:.3f} ms is at or above the "
                f"threshold of {threshold:g} ms ({spread})",
                Severity.WARNING,
            )
        )
    return Section.from_findings(findings, details, healthy=True)


def _failed(message: str, details: dict[str, Any]) -> Section:
    return Section.from_findings(
        [Finding("EDB01", message, Severity.ERROR)], details, healthy=False
    )


def _remaining(budget: Deadline, cap: float, doing: str) -> float:
    try:
        return budget.timeout(cap)
    except DeadlineExceeded:
        raise _ProbeFailure(f"timeout: no time left for {doing}") from None


# --- connecting ----------------------------------------------------------------------


def _connect(
    target: DatabaseTarget, budget: Deadline
) -> tuple[pg8000.native.Connection, socket.socket]:
    sock = _open_socket(target, budget)
    try:
        sock = _negotiate_tls(sock, target, budget)
        # Startup and authentication run under what is left of the connect budget.
        sock.settimeout(_remaining(budget, CONNECT_TIMEOUT_SECONDS, "authentication"))
        try:
            conn = pg8000.native.Connection(
                user=target.user,
                password=target.password.reveal(),
                database=target.database,
                sock=sock,
                ssl_context=False,
                application_name=APPLICATION_NAME,
            )
        except Exception as exc:
            raise _ProbeFailure(_explain(exc, "during startup and authentication")) from None
    except BaseException:
        sock.close()
        raise
    return conn, sock


def _open_socket(target: DatabaseTarget, budget: Deadline) -> socket.socket:
    if target.unix_socket:
        timeout = _remaining(budget, CONNECT_TIMEOUT_SECONDS, "connecting")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(target.unix_socket)
        except TimeoutError:
            sock.close()
            raise _ProbeFailure(
                f"timeout: the Unix socket {target.unix_socket} did not accept within "
                f"{timeout:.1f} s"
            ) from None
        except OSError as exc:
            sock.close()
            what = (
                "connection refused"
                if isinstance(exc, ConnectionRefusedError)
                else (exc.strerror or str(exc))
            )
            raise _ProbeFailure(f"{what}: Unix socket {target.unix_socket}") from None
        return sock
    try:
        sock = connect_tcp(resolve_host(target.host, target.port, budget), budget)
    except PhaseError as exc:
        raise _ProbeFailure(_phase_text(exc)) from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def _phase_text(exc: PhaseError) -> str:
    text = str(exc)
    if exc.phase == "connect" and not exc.timed_out and "refused" in text:
        return (
            f"connection refused: {text.removeprefix('connect: ')} (the database is stopped, "
            "or the host or port is wrong)"
        )
    if exc.phase == "connect" and exc.timed_out:
        return f"{text} (a security group or network ACL that drops packets looks like this)"
    if exc.phase == "dns":
        return f"DNS lookup failed ({text.removeprefix('dns: ')})"
    return text


def _negotiate_tls(sock: socket.socket, target: DatabaseTarget, budget: Deadline) -> socket.socket:
    """Send PostgreSQL's SSLRequest and wrap the socket as sslmode asks."""
    mode = target.sslmode
    if mode == "disable" or target.unix_socket:
        return sock
    optional = mode in ("allow", "prefer")
    try:
        sock.settimeout(_remaining(budget, CONNECT_TIMEOUT_SECONDS, "the TLS request"))
        sock.sendall(_SSL_REQUEST)
        answer = sock.recv(1)
    except TimeoutError:
        raise _ProbeFailure(
            "timeout: the server did not answer the TLS request (is it PostgreSQL?)"
        ) from None
    except OSError as exc:
        raise _ProbeFailure(f"the connection failed during the TLS request: {exc}") from None
    if answer != b"S":
        if optional and answer == b"N":
            return sock
        if answer == b"N":
            raise _ProbeFailure(f"TLS: the server does not accept TLS, but sslmode={mode}")
        raise _ProbeFailure(f"TLS: unexpected answer {answer!r} to the TLS request")
    context = _tls_context(mode)
    try:
        tls = context.wrap_socket(sock, server_hostname=target.host)
    except TimeoutError:
        raise _ProbeFailure("timeout: the TLS handshake did not finish") from None
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        raise _ProbeFailure(f"TLS: certificate verify failed (sslmode={mode}): {reason}") from None
    except (ssl.SSLError, OSError) as exc:
        raise _ProbeFailure(f"TLS: handshake failed: {_os_text(exc)}") from None
    return tls


def _tls_context(mode: str) -> ssl.SSLContext:
    if mode in ("verify-ca", "verify-full"):
        root = os.environ.get("PGSSLROOTCERT", "").strip() or None
        try:
            context = ssl.create_default_context(cafile=root)
        except (OSError, ssl.SSLError) as exc:
            raise _ProbeFailure(f"TLS: cannot load PGSSLROOTCERT {root!r}: {exc}") from None
        context.check_hostname = mode == "verify-full"
        return context
    return unverified_tls_context()


# --- measuring -----------------------------------------------------------------------


def _ping(conn: pg8000.native.Connection, sock: socket.socket, budget: Deadline) -> list[float]:
    latencies: list[float] = []
    for number in range(1, PINGS + 1):
        doing = f"query {number} of {PINGS} (SELECT 1)"
        sock.settimeout(_remaining(budget, QUERIES_TIMEOUT_SECONDS, doing))
        mark = time.perf_counter()
        try:
            rows = conn.run("SELECT 1")
        except Exception as exc:
            raise _ProbeFailure(_explain(exc, f"during {doing}")) from None
        latencies.append((time.perf_counter() - mark) * 1000.0)
        if rows != [[1]]:
            raise _ProbeFailure(f"{doing} returned {rows!r} instead of [[1]]")
    return latencies


def _close(conn: pg8000.native.Connection, sock: socket.socket) -> None:
    # A polite Terminate, but never a wait: the measurement is already done.
    with contextlib.suppress(Exception):
        sock.settimeout(0.2)
        conn.close()
    sock.close()


# --- explaining failures -------------------------------------------------------------


def _explain(exc: BaseException, when: str) -> str:
    """A message that tells authentication, unknown database, refused, timeout, TLS apart."""
    if isinstance(exc, pg8000.exceptions.DatabaseError):
        return _server_error(exc)
    cause = _root_cause(exc)
    if isinstance(cause, TimeoutError):
        return f"timeout: no answer from the server {when}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {_os_text(cause)} {when}"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused {when}"
    if isinstance(cause, OSError):
        return f"network error {when}: {_os_text(cause)}"
    if isinstance(exc, pg8000.exceptions.InterfaceError) and str(exc) == "network error":
        return f"the server closed the connection {when}"
    return f"{type(exc).__name__} {when}: {exc}"


# SQLSTATEs worth naming, with what they most often mean for Coder's database.
_SQLSTATES = {
    "28P01": "authentication failed",
    "28000": "authentication failed",
    "3D000": "database does not exist",
    "53300": "too many connections",
    "57P03": "the server is not accepting connections yet (starting up or shutting down)",
    "57P01": "the server is shutting down",
    "08P01": "protocol violation",
}


def _server_error(exc: pg8000.exceptions.DatabaseError) -> str:
    fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    code = str(fields.get("C", ""))
    message = str(fields.get("M", "")) or str(exc)
    kind = _SQLSTATES.get(code) or (
        "authentication failed" if code.startswith("28") else "the server refused"
    )
    return f"{kind}: {message} (SQLSTATE {code or 'unknown'})"


def _root_cause(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    current: BaseException = exc
    while id(current) not in seen:
        seen.add(id(current))
        nested = current.__cause__ or current.__context__
        if nested is None:
            break
        current = nested
    return current


def _os_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def section_metrics(section: Section) -> Iterator[Datum]:
    """DatabaseLatencyMs, when the database answered (see deployhealth.metrics)."""
    if section.details.get("reachable"):
        latency = section.details.get("latency_ms_exact", section.details.get("latency_ms"))
        if isinstance(latency, int | float):
            yield Datum("DatabaseLatencyMs", MetricUnit.Milliseconds, float(latency))
