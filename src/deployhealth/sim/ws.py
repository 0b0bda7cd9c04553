"""Server-side WebSocket for the simulation, on wsproto (sans-IO).

A sim route upgrades its own request, then speaks frames on the request's socket:

    def handle(request: SimRequest, sim: SimulatedDeployment) -> None:
        ws = accept_websocket(request, subprotocols=("derp",))
        if ws is None:
            return  # not a valid upgrade: already answered 4xx
        with ws:
            kind, data = ws.recv(timeout=10)
            ...

- The handshake is wsproto's. http.server has already parsed the request line and the
  headers, so they are handed back to wsproto as bytes: it validates them and writes the
  101. Nothing can be buffered behind them, because a client may not send a frame before
  it has read the 101 (RFC 6455, section 4.1).
- A request that is not a valid upgrade is answered as Coder's WebSocket library answers
  it: 426 without `Upgrade: websocket` and `Connection: Upgrade`, 426 with
  `Sec-WebSocket-Version: 13` for another version, 400 for a missing key, version or Host.
  When `subprotocols`
  is given, the client must offer one of them (the first one the server lists wins),
  otherwise the upgrade is refused with 400.
- `recv(timeout)` returns `(kind, data)`: "text" (str), "binary" (bytes), "ping" and
  "pong" (the payload), "close" (the reason; `close_code` holds the code, 1006 when the
  peer vanished without a close frame). Pings and a peer's close are answered before they
  are reported. Fragmented messages come back whole. Once closed, every `recv` returns
  ("close", reason) again. TimeoutError when nothing arrives in time. One thread receives.
- Sends are thread-safe: a ping thread and an echo loop can share one socket.
- `close()` sends a close frame and waits briefly for the answer; `abort()` drops the TCP
  connection without one, as a load balancer's idle timeout does, and may be called from
  any thread (it wakes a blocked `recv`).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal, NamedTuple, Self

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimRequest

__all__ = ["Received", "ServerWebSocket", "accept_websocket"]

Kind = Literal["text", "binary", "close", "ping", "pong"]

# A send that cannot complete in this long means the peer stopped reading: give up on it.
SEND_TIMEOUT_SECONDS = 5.0
CLOSE_WAIT_SECONDS = 1.0
ABNORMAL_CLOSURE = 1006
_RECV_SIZE = 64 * 1024


class Received(NamedTuple):
    kind: Kind
    data: str | bytes


def accept_websocket(
    request: SimRequest, subprotocols: Sequence[str] = ()
) -> ServerWebSocket | None:
    """Upgrade `request` to a WebSocket; None when it was refused (already answered)."""
    # Whatever happens, this connection carries no further HTTP requests.
    request.close_connection = True
    lines = [request.requestline, *(f"{k}: {v}" for k, v in request.headers.items())]
    # http.server decoded the head as Latin-1, so this gives wsproto the bytes on the wire.
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    conn = WSConnection(ConnectionType.SERVER)
    try:
        conn.receive_data(head)
        event = next(conn.events(), None)
    except RemoteProtocolError as exc:
        _refuse_invalid(request, exc)
        return None
    if not isinstance(event, Request):
        request.send_text(400, "WebSocket protocol violation: incomplete request", _TEXT)
        return None
    chosen = next((p for p in subprotocols if p in event.subprotocols), None)
    if subprotocols and chosen is None:
        wanted = " or ".join(repr(p) for p in subprotocols)
        request.send_text(
            400, f"WebSocket protocol violation: the client must offer subprotocol {wanted}", _TEXT
        )
        return None
    sock: socket.socket = request.connection
    try:
        sock.settimeout(SEND_TIMEOUT_SECONDS)
        sock.sendall(conn.send(AcceptConnection(subprotocol=chosen)))
    except OSError:
        return None  # the client left during the handshake
    return ServerWebSocket(sock, conn, chosen)


_TEXT = "text/plain; charset=utf-8"


def _refuse_invalid(request: SimRequest, exc: RemoteProtocolError) -> None:
    connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    upgrade = request.headers.get("Upgrade", "").strip().lower()
    body = f"WebSocket protocol violation: {exc}"
    if "upgrade" not in connection or upgrade != "websocket":
        request.send_text(426, body, _TEXT, {"Upgrade": "websocket"})
        return
    hint = exc.event_hint
    status = getattr(hint, "status_code", 400)
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in getattr(hint, "headers", [])
    }
    request.send_text(status, body, _TEXT, headers)


class ServerWebSocket:
    """The server end of an accepted WebSocket (see the module docstring)."""

    def __init__(self, sock: socket.socket, conn: WSConnection, subprotocol: str | None) -> None:
        self.subprotocol = subprotocol
        self.close_code: int | None = None
        self.close_reason = ""
        self._sock = sock
        self._conn = conn
        # Guards wsproto's state and the socket's write side: sends come from any thread.
        self._lock = threading.Lock()
        self._received: deque[Received] = deque()
        self._text: list[str] = []
        self._binary: list[bytes] = []
        self._aborted = False
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    # --- sending ------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._send(TextMessage(data=text))

    def send_binary(self, data: bytes) -> None:
        self._send(BytesMessage(data=data))

    def ping(self, payload: bytes = b"") -> None:
        self._send(Ping(payload=payload))

    def _send(self, event: Event) -> None:
        with self._lock:
            if self._aborted or self._conn.state is not ConnectionState.OPEN:
                raise ConnectionError("the WebSocket is closed")
            self._sock.sendall(self._conn.send(event))

    # --- receiving ----------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Received:
        """The next message or control frame; TimeoutError after `timeout` seconds of silence."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._received:
                return self._received.popleft()
            if self.close_code is not None:
                return Received("close", self.close_reason)
            wait = None if end is None else end - time.monotonic()
            if wait is not None and wait <= 0:
                raise TimeoutError(f"no WebSocket message within {timeout:g} s")
            if self._readable(wait):
                try:
                    data = self._sock.recv(_RECV_SIZE)
                except OSError:
                    data = b""  # a reset is the peer vanishing, like an EOF
                self._feed(data)

    def _readable(self, wait: float | None) -> bool:
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True  # decrypted bytes wait in the TLS layer, where poll cannot see them
        millis = None if wait is None else max(1, int(wait * 1000))
        return bool(self._poll.poll(millis))

    def _feed(self, data: bytes) -> None:
        with self._lock:
            if self._conn.state is ConnectionState.CLOSED:
                if not data and self.close_code is None:
                    self._closed_by(ABNORMAL_CLOSURE, "")
                return
            # None tells wsproto the transport ended: it reports close code 1006.
            self._conn.receive_data(data or None)
            for event in self._conn.events():
                self._on_event(event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TextMessage):
            self._text.append(event.data)
            if event.message_finished:
                self._received.append(Received("text", "".join(self._text)))
                self._text = []
        elif isinstance(event, BytesMessage):
            self._binary.append(bytes(event.data))
            if event.message_finished:
                self._received.append(Received("binary", b"".join(self._binary)))
                self._binary = []
        elif isinstance(event, Ping):
            self._write_quietly(event.response())
            self._received.append(Received("ping", bytes(event.payload)))
        elif isinstance(event, Pong):
            self._received.append(Received("pong", bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            if self._conn.state is ConnectionState.REMOTE_CLOSING:
                self._write_quietly(event.response())
            elif self._conn.state is ConnectionState.OPEN:
                # A frame wsproto could not parse: it reports the close code to send.
                self._write_quietly(CloseConnection(code=event.code, reason=event.reason))
            self._closed_by(event.code, event.reason or "")

    def _write_quietly(self, event: Event) -> None:
        # The peer may already be gone; its absence shows up as the next read's EOF.
        with contextlib.suppress(OSError, LocalProtocolError):
            self._sock.sendall(self._conn.send(event))

    def _closed_by(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._received.append(Received("close", reason))
        # After the close handshake the server ends the TCP connection (RFC 6455, 7.1.1).
        # SHUT_WR, not a full close: a close with unread input would send a reset that can
        # overtake the close frame on its way to the client.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    # --- closing ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.close_code is not None or self._aborted

    def close(self, code: int = 1000, reason: str = "", wait: float = CLOSE_WAIT_SECONDS) -> None:
        """Send a close frame and wait up to `wait` seconds for the peer's answer."""
        if self._aborted:
            return
        with self._lock:
            if self._conn.state is ConnectionState.OPEN:
                self._write_quietly(CloseConnection(code=code, reason=reason))
        end = time.monotonic() + wait
        while self.close_code is None:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                self.recv(left)  # messages still in flight are dropped: we are leaving
            except TimeoutError:
                break
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame; safe from any thread."""
        self._aborted = True
        # shutdown, not close: it wakes a recv blocked in poll, and the fd stays the
        # handler's to close, so it cannot be reused under that poll.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            self.close(1000 if exc is None else 1011)
