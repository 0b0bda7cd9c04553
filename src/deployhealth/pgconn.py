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
- pg8000 trusts the peer: it allocates whatever message length the server declares and
  reads for as long as bytes come. So it never gets the socket itself but a
  `GuardedSocket`, whose stream checks every message header before pg8000 sees it (a
  message type PostgreSQL sends, a length of at most MAX_MESSAGE_BYTES), caps the bytes
  read between two `settimeout` calls (one request and its answer) at `read_limit`, and
  ends every read at an absolute deadline, so a peer that drips bytes cannot stretch a
  timeout either. A peer that breaks these rules is "not PostgreSQL" (ProtocolViolation),
  with what it sent. The price: pg8000 no longer sees an `ssl.SSLSocket`, so SCRAM
  channel binding (`-PLUS`) is not offered; plain SCRAM-SHA-256 still authenticates, as
  with libpq's `channel_binding=prefer` against a server that requires nothing more.
- After PostgreSQL answers the TLS request with its one byte, it says nothing until the
  client speaks. Bytes already waiting after that byte mean another protocol (an SSH
  banner starts with "S"), as libpq's check for CVE-2021-23222 also concludes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time

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

# The largest message PostgreSQL may send us: an error with a long detail, a wide row of
# the inventory's tables. The server's own limit on what it accepts is 1 GB; nothing we
# ask for comes near 1 MiB.
MAX_MESSAGE_BYTES = 1024 * 1024
# What one request and its answer may read (startup and authentication, one SELECT 1):
# a real server sends a few kilobytes. Small on purpose: pg8000 turns bytes into Python
# objects (rows, notices, parameters) at several times their size.
DEFAULT_READ_LIMIT = 256 * 1024
_RECV_BYTES = 64 * 1024
# Message types a PostgreSQL server sends (protocol 3.0, "Message Formats").
_BACKEND_TYPES = frozenset(b"RSKZTDCEINAnst123GHWdcv")


class ConnectError(Exception):
    """Connecting failed; the message says in which step and why, and is safe to show."""


class ProtocolViolation(Exception):
    """The peer broke the PostgreSQL protocol; the message says how, and is safe to show.

    Not an OSError on purpose: pg8000 turns those into a bare "network error".
    """


# --- connecting ----------------------------------------------------------------------


def connect(
    target: DatabaseTarget, budget: Deadline, *, read_limit: int = DEFAULT_READ_LIMIT
) -> tuple[pg8000.native.Connection, GuardedSocket]:
    """A connection and its socket, within the budget (capped at CONNECT_TIMEOUT_SECONDS).

    Call the socket's `settimeout` before each query: it is that query's whole budget,
    and it allows the query's answer `read_limit` bytes.
    """
    sock = _open_socket(target, budget)
    try:
        sock = _negotiate_tls(sock, target, budget)
        guarded = GuardedSocket(sock, read_limit)
        # Startup and authentication run under what is left of the connect budget.
        guarded.settimeout(_time_left(budget, "authentication"))
        try:
            conn = pg8000.native.Connection(
                user=target.user,
                password=target.password.reveal(),
                database=target.database,
                sock=guarded,
                ssl_context=False,
                application_name=APPLICATION_NAME,
            )
        except Exception as exc:
            raise ConnectError(explain(exc, "during startup and authentication")) from None
    except BaseException:
        sock.close()
        raise
    return conn, guarded


class GuardedSocket:
    """The socket as pg8000 gets it: every read bounded in size and in time.

    pg8000 uses only `makefile("rwb")` and `close()`; our callers use `settimeout`.
    """

    def __init__(self, sock: socket.socket, read_limit: int) -> None:
        self.raw = sock
        self.read_limit = read_limit
        self._until = time.monotonic()
        self._read = 0
        self._stream: _GuardedStream | None = None

    def settimeout(self, seconds: float) -> None:
        """Start one request: `seconds` for all of it, `read_limit` bytes for its answer."""
        self._until = time.monotonic() + seconds
        self._read = 0
        self.raw.settimeout(seconds)

    def makefile(self, mode: str = "rwb") -> _GuardedStream:
        if self._stream is None:
            self._stream = _GuardedStream(self)
        return self._stream

    def close(self) -> None:
        self.raw.close()

    def _left(self) -> float:
        left = self._until - time.monotonic()
        if left <= 0:
            # An OSError, so that pg8000 and explain() treat it as the timeout it is.
            raise TimeoutError("the request's time is up")
        return left

    def recv(self) -> bytes:
        self.raw.settimeout(self._left())
        data = self.raw.recv(_RECV_BYTES)
        self._read += len(data)
        if self._read > self.read_limit:
            raise ProtocolViolation(
                f"the server is not PostgreSQL, or is broken: it sent more than "
                f"{_size(self.read_limit)} in answer to one request"
            )
        return data

    def sendall(self, data: bytes) -> None:
        self.raw.settimeout(self._left())
        self.raw.sendall(data)


class _GuardedStream:
    """The file pg8000 reads messages from and writes them to, checking every header.

    pg8000 reads a 5-byte header (type, length) and then the body it declares; the
    header is checked as it is handed out, before pg8000 allocates the body.
    """

    def __init__(self, sock: GuardedSocket) -> None:
        self._sock = sock
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._header = bytearray()
        self._body_left = 0

    def read(self, size: int) -> bytes:
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolViolation(f"a read of {size} bytes was asked for")
        while len(self._inbox) < size:
            data = self._sock.recv()
            if not data:
                break  # pg8000 sees the short read and reports the closed connection
            self._inbox += data
        out = bytes(self._inbox[:size])
        del self._inbox[:size]
        self._check(out)
        return out

    def _check(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._body_left:
                taken = min(self._body_left, len(data) - at)
                self._body_left -= taken
                at += taken
                continue
            taken = min(5 - len(self._header), len(data) - at)
            self._header += data[at : at + taken]
            at += taken
            if len(self._header) < 5:
                continue
            kind, length = self._header[0], struct.unpack("!i", self._header[1:5])[0]
            header = bytes(self._header)
            self._header.clear()
            if kind not in _BACKEND_TYPES or not 4 <= length <= MAX_MESSAGE_BYTES + 4:
                seen = (header + data[at:] + bytes(self._inbox))[:64]
                raise ProtocolViolation(_foreign(seen, kind, length))
            self._body_left = length - 4

    def write(self, data: bytes) -> int:
        self._outbox += data
        return len(data)

    def flush(self) -> None:
        if self._outbox:
            data = bytes(self._outbox)
            self._outbox.clear()
            self._sock.sendall(data)

    def close(self) -> None:
        self._outbox.clear()


def _foreign(seen: bytes, kind: int, length: int) -> str:
    """Why the bytes a peer sent cannot be PostgreSQL, naming the protocol when it is plain."""
    said = _banner(seen)
    if said:
        return f"the server is not PostgreSQL: {said}"
    if kind in _BACKEND_TYPES:
        return (
            f"the server is not PostgreSQL, or is broken: it announced a message of "
            f"{length} bytes (at most {_size(MAX_MESSAGE_BYTES)} is allowed), "
            f"starting {seen[:16]!r}"
        )
    return f"the server is not PostgreSQL: it sent {seen[:16]!r} where a message was due"


def _banner(seen: bytes) -> str | None:
    line = seen.split(b"\n", 1)[0].rstrip(b"\r")[:60].decode("ascii", "replace")
    if seen.startswith(b"HTTP/"):
        return f"it answered in HTTP ({line!r})"
    if seen.startswith(b"SSH-"):
        return f"it sent an SSH banner ({line!r})"
    if seen[:1] in (b"+", b"-") and seen[1:4].isalpha():
        return f"it answered like a text protocol (Redis, POP3, ...): {line!r}"
    if seen[:3].isdigit() and seen[3:4] in (b" ", b"-"):
        return f"it sent a greeting like SMTP's or FTP's ({line!r})"
    return None


def _size(count: int) -> str:
    return f"{count // 1024 // 1024} MiB" if count >= 1024 * 1024 else f"{count // 1024} KiB"


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
    if not answer:
        raise ConnectError(
            "the server closed the connection at the TLS request (is it PostgreSQL?)"
        )
    more = _waiting(sock)
    if answer not in (b"S", b"N") or more:
        seen = answer + more
        said = _banner(seen) or f"it answered the TLS request with {seen[:16]!r}"
        raise ConnectError(f"the server is not PostgreSQL: {said}")
    if answer == b"N":
        if optional:
            return sock
        raise ConnectError(f"TLS: the server does not accept TLS, but sslmode={mode}")
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


def _waiting(sock: socket.socket) -> bytes:
    """Bytes the peer sent after its one-byte answer, without waiting for any."""
    # Python waits out a socket's timeout before any recv, whatever its flags: so none.
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(64, socket.MSG_PEEK)
    except OSError:
        return b""  # nothing waiting; a reset shows itself at the next step, named
    finally:
        sock.settimeout(timeout)


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


def close(conn: pg8000.native.Connection, sock: GuardedSocket) -> None:
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
    violation = _in_chain(exc, ProtocolViolation)
    if violation is not None:
        return f"{violation} ({when})"
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


def _in_chain(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


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
