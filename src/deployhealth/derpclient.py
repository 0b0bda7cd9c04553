"""A DERP client: enough of Tailscale's `derphttp` to prove a relay node passes packets.

Connecting: `GET /derp` with `Upgrade: DERP` over TCP (TLS unless the node is ForceHTTP),
`101 Switching Protocols`, then frames on the raw stream: the server's ServerKey, our
ClientInfo (sealed to the server's key), its ServerInfo. When the server or a proxy in
front of it refuses the upgrade with a 4xx, the client dials again and speaks the same
byte stream inside binary WebSocket messages (subprotocol `derp`), as Coder's clients do
behind load balancers that drop `Upgrade: DERP`; the client then says it `uses_websocket`.

Why not `requests` or `http.client`: a raw upgrade needs the socket itself after the
response headers, and bytes the server sent right behind them (the ServerKey) must not
be lost in a library's buffer. So the request is written and the head read by hand, and
the rest of the stream goes to the frame reader.

Every socket operation gets a timeout clipped to the caller's deadline; addresses in
link-local or instance-metadata ranges are refused unless allow-listed (product.md,
"Security"), because node host names come from a DERP map the deployment hands us.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.public import PrivateKey

from deployhealth import wsclient
from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.net import (
    AddressCheck,
    PhaseError,
    authority,
    connect_tcp,
    error_text,
    resolve_host,
    tls_context,
    tls_handshake,
)
from deployhealth.wire import derp as wire

USER_AGENT = "deployhealth/0.1 (+derp check)"
HEAD_CAP = 16 * 1024
# One operation (a read, a connect) never waits longer than this, deadline permitting.
OPERATION_TIMEOUT_SECONDS = 5.0
_RECV_SIZE = 64 * 1024
# A WebSocket message carries whatever the server wrote at once: a frame of up to
# wire.MAX_FRAME_LEN, perhaps with smaller ones buffered around it. A message above this
# is refused before it is read.
WS_MESSAGE_CAP = 2 * wire.MAX_FRAME_LEN
# Frames of a type the handshake does not know are skipped, but not without end: a stream
# of them (zeros make 5-byte frames of type 0) is not a DERP server.
MAX_SKIPPED_FRAMES = 16
_SHOWN_BODY = 200
_KNOWN_TYPES = frozenset(t.value for t in wire.FrameType)

Log = Callable[[str], None]


class DerpError(Exception):
    """Connecting or talking to a node failed; `str()` starts with the phase."""

    def __init__(self, phase: str, detail: str) -> None:
        self.phase = phase
        super().__init__(f"{phase}: {detail}")


@dataclass(frozen=True)
class NodeTarget:
    """Where a DERP node's `/derp` lives, derived from a DERP map node."""

    scheme: str  # "https" or "http"
    host: str  # what is dialled and named in Host and TLS SNI
    port: int

    @classmethod
    def from_node(cls, node: dict[str, Any]) -> NodeTarget:
        """Coder's rule: https://HostName (or IPv4 when no HostName)[:DERPPort]/derp."""
        scheme = "http" if node.get("ForceHTTP") else "https"
        host = str(node.get("HostName") or node.get("IPv4") or "").strip()
        if not host:
            raise DerpError("dial", "the node has neither HostName nor IPv4")
        port = node.get("DERPPort") or 0
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise DerpError("dial", f"DERPPort {port!r} is not a port number")
        return cls(scheme, host, port or (443 if scheme == "https" else 80))

    @property
    def authority(self) -> str:
        return authority(self.host, self.port, self.scheme)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}/derp"

    @property
    def websocket_url(self) -> str:
        return f"{'wss' if self.scheme == 'https' else 'ws'}://{self.authority}/derp"


# --- transports: the same byte stream over a raw socket or inside WebSocket messages ----


class _RawTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes, deadline: Deadline) -> None:
        self.sock.settimeout(_timeout(deadline, "send"))
        self.sock.sendall(data)

    def recv(self, timeout: float) -> bytes | None:
        """Bytes, b"" at end of stream, None when nothing came within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(_RECV_SIZE)
        except TimeoutError:
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _WebSocketTransport:
    def __init__(self, ws: wsclient.BoundedWebSocket) -> None:
        self.ws = ws

    def send(self, data: bytes, deadline: Deadline) -> None:
        self.ws.settimeout(_timeout(deadline, "send"))
        self.ws.send_binary(data)

    def recv(self, timeout: float) -> bytes | None:
        import websocket

        self.ws.settimeout(timeout)
        # However fast the server sends, a read ends with its timeout.
        self.ws.until(time.monotonic() + timeout)
        try:
            opcode, data = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            return None
        except websocket.WebSocketConnectionClosedException:
            return b""
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return b""
        return bytes(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close(timeout=0.2)


_Transport = _RawTransport | _WebSocketTransport


# --- the client ---------------------------------------------------------------------------


@dataclass
class DerpClient:
    transport: _Transport
    private: PrivateKey
    server_key: bytes
    server_info: dict[str, Any]
    uses_websocket: bool
    log: Log
    reader: wire.FrameReader = field(default_factory=wire.FrameReader)

    @property
    def public_key(self) -> bytes:
        return bytes(self.private.public_key)

    @classmethod
    def connect(
        cls, target: NodeTarget, deadline: Deadline, *, check_address: AddressCheck, log: Log
    ) -> DerpClient:
        """Dial, upgrade (falling back to WebSocket on a 4xx) and complete the handshake."""
        private = PrivateKey.generate()
        log(f"connecting to {target.url} (Upgrade: DERP)")
        sock, leftover, status, reason = _upgrade(target, deadline, check_address)
        if status == 101:
            transport: _Transport = _RawTransport(sock)
            uses_websocket = False
        else:
            sock.close()
            shown = leftover[:_SHOWN_BODY].decode("utf-8", "replace").strip()
            log(
                f"GET {target.url} with Upgrade: DERP answered {status} {reason}"
                + (f" ({shown!r})" if shown else "")
                + "; retrying over WebSocket (subprotocol derp)"
            )
            try:
                transport = _dial_websocket(target, deadline, check_address)
            except DerpError as exc:
                raise DerpError(
                    exc.phase,
                    f"Upgrade: DERP was refused ({status} {reason}".rstrip()
                    + f") and the WebSocket fallback failed too: {str(exc).split(': ', 1)[-1]}",
                ) from None
            leftover = b""
            uses_websocket = True
            log(f"connected to {target.websocket_url} over WebSocket")
        client = cls(transport, private, b"", {}, uses_websocket, log)
        try:
            client.reader.feed(leftover)
            client._handshake(deadline)
        except BaseException:
            transport.close()
            raise
        return client

    def _handshake(self, deadline: Deadline) -> None:
        first = self._next_known(deadline, "reading ServerKey")
        if first.type != wire.FrameType.SERVER_KEY:
            raise DerpError(
                "handshake",
                f"expected a ServerKey frame first, got {wire.frame_name(first.type)}",
            )
        try:
            self.server_key = wire.parse_server_key(first.payload).key
            info = wire.build_client_info(self.private, self.server_key)
        except wire.DerpProtocolError as exc:
            raise DerpError("handshake", f"reading ServerKey: {exc}") from None
        self._send(info.encode(), deadline, "sending ClientInfo")
        second = self._next_known(deadline, "reading ServerInfo")
        if second.type != wire.FrameType.SERVER_INFO:
            raise DerpError(
                "handshake",
                f"expected ServerInfo after ClientInfo, got {wire.frame_name(second.type)}",
            )
        try:
            message = wire.decode_frame(second)
            if not isinstance(message, wire.ServerInfo):  # decode_frame's contract; for typing
                raise wire.DerpProtocolError("ServerInfo frame did not decode as ServerInfo")
            self.server_info = wire.open_server_info(message, self.private, self.server_key)
        except wire.DerpProtocolError as exc:
            raise DerpError("handshake", f"reading ServerInfo: {exc}") from None
        self.log(
            f"handshake done: server key {self.server_key.hex()[:16]}..., "
            f"our key {self.public_key.hex()[:16]}..., ServerInfo {self.server_info}"
        )

    def _next_known(self, deadline: Deadline, doing: str) -> wire.Frame:
        """The next frame of a known type; a few of unknown types are skipped by length."""
        for _skipped in range(MAX_SKIPPED_FRAMES + 1):
            frame = self._frame(deadline, doing)
            if frame is None:
                raise DerpError("handshake", f"{doing}: nothing arrived before the deadline")
            if frame.type in _KNOWN_TYPES:
                return frame
            self.log(f"{doing}: skipped a frame of {wire.frame_name(frame.type)}")
        raise DerpError(
            "protocol",
            f"{doing}: {MAX_SKIPPED_FRAMES + 1} frames of unknown types in a row: "
            "not a DERP server, or a broken one",
        )

    def _frame(self, deadline: Deadline, doing: str) -> wire.Frame | None:
        """The next whole frame, or None when the deadline passes first."""
        while True:
            try:
                frame = self.reader.next_frame()
            except wire.DerpProtocolError as exc:
                raise DerpError("protocol", f"{doing}: {exc}") from None
            if frame is not None:
                return frame
            left = deadline.remaining()
            if left <= 0:
                return None
            try:
                data = self.transport.recv(min(left, OPERATION_TIMEOUT_SECONDS))
            except (OSError, ValueError) as exc:
                raise DerpError("read", f"{doing}: {_describe(exc)}") from None
            except Exception as exc:  # websocket-client's own errors
                raise DerpError("read", f"{doing}: {type(exc).__name__}: {exc}") from None
            if data is None:
                continue
            if not data:
                partial = self.reader.pending
                tail = f" ({partial} bytes of an unfinished frame)" if partial else ""
                raise DerpError("read", f"{doing}: the server closed the connection{tail}")
            self.reader.feed(data)

    def _send(self, data: bytes, deadline: Deadline, doing: str) -> None:
        try:
            self.transport.send(data, deadline)
        except DerpError:
            raise
        except (OSError, ValueError) as exc:
            raise DerpError("write", f"{doing}: {_describe(exc)}") from None
        except Exception as exc:  # websocket-client's own errors
            raise DerpError("write", f"{doing}: {type(exc).__name__}: {exc}") from None

    def send_packet(self, destination: bytes, data: bytes, deadline: Deadline) -> None:
        self._send(wire.SendPacket(destination, data).encode(), deadline, "sending a packet")

    def recv(self, deadline: Deadline) -> wire.Message | None:
        """The next message for the caller, or None at the deadline.

        Pings are answered and keep-alives dropped here, as every DERP client does.
        """
        while True:
            frame = self._frame(deadline, "waiting for a packet")
            if frame is None:
                return None
            try:
                message = wire.decode_frame(frame)
            except wire.DerpProtocolError as exc:
                raise DerpError("protocol", str(exc)) from None
            if message is None or isinstance(message, wire.KeepAlive):
                continue
            if isinstance(message, wire.Ping):
                self._send(wire.Pong(message.data).encode(), deadline, "answering a ping")
                continue
            if isinstance(message, wire.Health):
                self.log(f"server health: {message.problem or 'ok'}")
                continue
            return message

    def close(self) -> None:
        self.transport.close()


# --- dialling -------------------------------------------------------------------------


def _timeout(deadline: Deadline, doing: str) -> float:
    try:
        return deadline.timeout(OPERATION_TIMEOUT_SECONDS)
    except DeadlineExceeded:
        raise DerpError(doing, "no time left before the deadline") from None


def _describe(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else error_text(exc)


def _dial(target: NodeTarget, deadline: Deadline, check_address: AddressCheck) -> socket.socket:
    """TCP, then TLS unless the node is ForceHTTP."""
    try:
        addresses = resolve_host(target.host, target.port, deadline)
    except PhaseError as exc:
        raise DerpError(exc.phase, exc.detail) from None
    allowed = []
    refused = []
    for family, sockaddr in addresses:
        why = check_address(str(sockaddr[0]))
        if why is None:
            allowed.append((family, sockaddr))
        else:
            refused.append(why)
    if not allowed:
        raise DerpError("dial", f"{target.host}: {'; '.join(dict.fromkeys(refused))}")
    try:
        sock = connect_tcp(allowed, deadline)
    except PhaseError as exc:
        raise DerpError(exc.phase, exc.detail) from None
    if target.scheme != "https":
        return sock
    try:
        return tls_handshake(sock, tls_context(), target.host, deadline)
    except PhaseError as exc:
        sock.close()
        raise DerpError(exc.phase, exc.detail) from None


def _upgrade(
    target: NodeTarget, deadline: Deadline, check_address: AddressCheck
) -> tuple[socket.socket, bytes, int, str]:
    """Send `GET /derp` with Upgrade: DERP; (socket, bytes after the head, status, reason).

    For 101 the bytes after the head are the start of the frame stream; otherwise they
    are the start of the body, kept to quote in messages.
    """
    sock = _dial(target, deadline, check_address)
    request = (
        "GET /derp HTTP/1.1\r\n"
        f"Host: {target.authority}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Connection: Upgrade\r\n"
        "Upgrade: DERP\r\n\r\n"
    ).encode("ascii")
    try:
        sock.settimeout(_timeout(deadline, "upgrade"))
        sock.sendall(request)
        head = bytearray()
        while b"\r\n\r\n" not in head:
            if len(head) > HEAD_CAP:
                raise DerpError("upgrade", f"the response head is longer than {HEAD_CAP} bytes")
            sock.settimeout(_timeout(deadline, "upgrade"))
            chunk = sock.recv(_RECV_SIZE)
            if not chunk:
                raise DerpError(
                    "upgrade",
                    f"GET {target.url}: the server closed the connection before answering"
                    if not head
                    else f"GET {target.url}: the connection closed inside the response head",
                )
            head += chunk
    except DerpError:
        sock.close()
        raise
    except (OSError, ValueError) as exc:
        sock.close()
        if isinstance(exc, TimeoutError):
            raise DerpError("upgrade", f"GET {target.url}: no answer in time") from None
        raise DerpError("upgrade", f"GET {target.url}: {_describe(exc)}") from None
    raw_head, _sep, rest = bytes(head).partition(b"\r\n\r\n")
    status_line = raw_head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        sock.close()
        raise DerpError("upgrade", f"GET {target.url}: not an HTTP answer: {status_line[:80]!r}")
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    if status == 101 or 400 <= status < 500:
        return sock, rest, status, reason
    sock.close()
    shown = rest[:_SHOWN_BODY].decode("utf-8", "replace").strip()
    detail = f"GET {target.url} with Upgrade: DERP answered {status} {reason}".rstrip()
    if status in (502, 503, 504):
        detail += " (a proxy or load balancer could not reach the relay)"
    raise DerpError("upgrade", detail + (f": {shown!r}" if shown else ""))


def _dial_websocket(
    target: NodeTarget, deadline: Deadline, check_address: AddressCheck
) -> _WebSocketTransport:
    sock = _dial(target, deadline, check_address)
    # The socket is ours (address checks, TLS with our trust store), and so is the opening
    # handshake: websocket-client's own reads header lines and a refused answer's body
    # without a limit. It only frames the messages, under wsclient's caps.
    try:
        budget = deadline.sooner(OPERATION_TIMEOUT_SECONDS)
        key = wsclient.send_upgrade(
            sock, budget, path="/derp", authority=target.authority, user_agent=USER_AGENT,
            extra=["Sec-WebSocket-Protocol: derp"],
        )
        status, reason, headers = wsclient.read_head(sock, budget)
        if status != 101:
            body = wsclient.read_body(sock, headers, budget)
            shown = body[:_SHOWN_BODY].strip()
            raise DerpError(
                "websocket",
                f"GET {target.websocket_url} answered {status} {reason}".rstrip()
                + (f": {shown!r}" if shown else ""),
            )
        wsclient.check_upgrade(headers, key, "derp")
    except PhaseError as exc:
        sock.close()
        raise DerpError("websocket", f"{target.websocket_url}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return _WebSocketTransport(wsclient.BoundedWebSocket(sock, max_message=WS_MESSAGE_CAP))
