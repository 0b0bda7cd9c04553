"""Connecting to the deployment's PostgreSQL within a deadline, and saying why it failed.

The database family and the `database` inventory source both connect here:
`connect(target, budget)` returns a pg8000 connection and the socket under it, and every
failure is a ConnectError whose message says which step failed (DNS, connect, TLS,
startup and authentication) and never holds the password. `explain(exc, when)` words a
failure of a query on that connection the same way.

Decisions:

- The socket (TCP or Unix) and TLS are opened here, then the socket is handed to pg8000
  (`sock=`, `ssl_context=False`). Owning the socket lets every query run under what is left
  of its caller's budget (pg8000 only sets a timeout once, at connect), and lets the
  message say whether DNS, connect, TLS or the server's answer failed.
- sslmode as libpq reads it: `disable` plain; `allow` and `prefer` try TLS without
  verification and fall back to plain on the same connection when the server declines;
  `require` TLS without verification; `verify-ca` verifies the chain; `verify-full` also
  the host name. The CA bundle is `PGSSLROOTCERT` when set (libpq's variable), else the
  system store. A Unix socket never uses TLS, as with libpq.
- The password is only handed to pg8000. Messages are built from what the OS and the
  server said, and callers still scrub them of the password and name the target with
  `DatabaseTarget.describe()`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct

import pg8000.exceptions
import pg8000.native

from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.net import (
    PhaseError,
    connect_tcp,
    error_text,
    resolve_host,
    unverified_tls_context,
)
from deployhealth.settings import DatabaseTarget

CONNECT_TIMEOUT_SECONDS = 5.0
APPLICATION_NAME = "deployhealth"

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class ConnectError(Exception):
    """Connecting failed; the message says in which step and why, and is safe to show."""


# --- connecting ----------------------------------------------------------------------


def connect(
    target: DatabaseTarget, budget: Deadline
) -> tuple[pg8000.native.Connection, socket.socket]:
    """A connection and its socket, within the budget (capped at CONNECT_TIMEOUT_SECONDS).

    Set the socket's timeout before each query: pg8000 keeps whatever timeout it finds.
    """
    sock = _open_socket(target, budget)
    try:
        sock = _negotiate_tls(sock, target, budget)
        # Startup and authentication run under what is left of the connect budget.
        sock.settimeout(_time_left(budget, "authentication"))
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
            raise ConnectError(explain(exc, "during startup and authentication")) from None
    except BaseException:
        sock.close()
        raise
    return conn, sock


def _open_socket(target: DatabaseTarget, budget: Deadline) -> socket.socket:
    if target.unix_socket:
        timeout = _time_left(budget, "connecting")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(target.unix_socket)
        except TimeoutError:
            sock.close()
            raise ConnectError(
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
            raise ConnectError(f"{what}: Unix socket {target.unix_socket}") from None
        return sock
    try:
        sock = connect_tcp(resolve_host(target.host, target.port, budget), budget)
    except PhaseError as exc:
        raise ConnectError(_phase_text(exc)) from None
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


def _time_left(budget: Deadline, doing: str) -> float:
    try:
        return budget.timeout(CONNECT_TIMEOUT_SECONDS)
    except DeadlineExceeded:
        raise ConnectError(f"timeout: no time left for {doing}") from None


def _negotiate_tls(sock: socket.socket, target: DatabaseTarget, budget: Deadline) -> socket.socket:
    """Send PostgreSQL's SSLRequest and wrap the socket as sslmode asks."""
    mode = target.sslmode
    if mode == "disable" or target.unix_socket:
        return sock
    optional = mode in ("allow", "prefer")
    try:
        sock.settimeout(_time_left(budget, "the TLS request"))
        sock.sendall(_SSL_REQUEST)
        answer = sock.recv(1)
    except TimeoutError:
        raise ConnectError(
            "timeout: the server did not answer the TLS request (is it PostgreSQL?)"
        ) from None
    except OSError as exc:
        raise ConnectError(f"the connection failed during the TLS request: {exc}") from None
    if answer != b"S":
        if optional and answer == b"N":
            return sock
        if answer == b"N":
            raise ConnectError(f"TLS: the server does not accept TLS, but sslmode={mode}")
        raise ConnectError(f"TLS: unexpected answer {answer!r} to the TLS request")
    context = _tls_context(mode)
    try:
        tls = context.wrap_socket(sock, server_hostname=target.host)
    except TimeoutError:
        raise ConnectError("timeout: the TLS handshake did not finish") from None
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        raise ConnectError(f"TLS: certificate verify failed (sslmode={mode}): {reason}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConnectError(f"TLS: handshake failed: {error_text(exc)}") from None
    return tls


def _tls_context(mode: str) -> ssl.SSLContext:
    if mode in ("verify-ca", "verify-full"):
        root = os.environ.get("PGSSLROOTCERT", "").strip() or None
        try:
            context = ssl.create_default_context(cafile=root)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"TLS: cannot load PGSSLROOTCERT {root!r}: {exc}") from None
        context.check_hostname = mode == "verify-full"
        return context
    return unverified_tls_context()


def close(conn: pg8000.native.Connection, sock: socket.socket) -> None:
    # A polite Terminate, but never a wait: whatever the connection was for is done.
    with contextlib.suppress(Exception):
        sock.settimeout(0.2)
        conn.close()
    sock.close()


# --- explaining failures -------------------------------------------------------------


def explain(exc: BaseException, when: str) -> str:
    """A message that tells authentication, unknown database, refused, timeout, TLS apart."""
    if isinstance(exc, pg8000.exceptions.DatabaseError):
        return _server_error(exc)
    cause = _root_cause(exc)
    if isinstance(cause, TimeoutError):
        return f"timeout: no answer from the server {when}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {error_text(cause)} {when}"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused {when}"
    if isinstance(cause, OSError):
        return f"network error {when}: {error_text(cause)}"
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
