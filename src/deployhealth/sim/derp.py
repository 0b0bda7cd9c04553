"""A real DERP relay for the simulation and the tests: `/derp` on the sim, or its own server.

`register(sim)` adds `GET /derp` to the simulated deployment, as Coder serves its embedded
relay on the access URL: the raw `Upgrade: DERP` form (101, then frames on the request's
socket) and the WebSocket form (subprotocol `derp`, via sim/ws.py), `/derp/probe` and
`/derp/latency-check`, and `426 DERP requires connection upgrade` without an upgrade
header. The fault switch `derp` breaks it the ways a deployment breaks:

    ok              both forms work
    websocket-only  the raw upgrade is refused with 400, as by a proxy that drops
                    `Upgrade: DERP`; WebSocket still works (deployhealth reports EDERP01)
    down            503 to everything, as from a load balancer with no healthy target
    garbage         101, then random bytes instead of a ServerKey frame

`DerpServer` is the same relay on its own listener on 127.0.0.1 (optionally TLS), for maps
with several nodes, for nginx to sit in front of, and for the benchmark.

The relay is real: it keeps a map from public key to connection, delivers SendPacket to a
connected key as RecvPacket with the sender's key, and answers PeerGone(not here) for an
unknown key. Clients are registered before ServerInfo goes out, so a client that has its
ServerInfo can be sent to at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol, Self

from nacl.public import PrivateKey

from deployhealth.sim._service import Service
from deployhealth.wire import derp as wire

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimRequest, SimulatedDeployment

MODES = ("ok", "websocket-only", "down", "garbage")
HANDSHAKE_TIMEOUT_SECONDS = 10.0
_RECV_SIZE = 64 * 1024
_TEXT = "text/plain; charset=utf-8"


class _Stream(Protocol):
    def recv(self, timeout: float | None = None) -> bytes: ...  # b"" at the end or timeout
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class _RawStream:
    """The request's own socket after a 101: reads go through the handler's buffer."""

    def __init__(self, request: BaseHTTPRequestHandler) -> None:
        self.request = request
        self.sock: socket.socket = request.connection

    def recv(self, timeout: float | None = None) -> bytes:
        try:
            self.sock.settimeout(timeout)
            # read1: whatever is buffered or one socket read, never waiting for a full count.
            return self.request.rfile.read1(_RECV_SIZE)
        except (OSError, ValueError):
            return b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _WebSocketStream:
    """The same byte stream inside binary WebSocket messages."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    def recv(self, timeout: float | None = None) -> bytes:
        while True:
            try:
                kind, data = self.ws.recv(timeout)
            except (OSError, TimeoutError):
                return b""
            if kind == "close":
                return b""
            if kind == "binary":
                return bytes(data)
            if kind == "text":
                return str(data).encode()

    def send(self, data: bytes) -> None:
        self.ws.send_binary(data)

    def close(self) -> None:
        self.ws.abort()


class _Peer:
    def __init__(self, key: bytes, stream: _Stream, reader: wire.FrameReader) -> None:
        self.key = key
        self.stream = stream
        self.reader = reader  # holds any bytes the client sent right behind ClientInfo
        self.lock = threading.Lock()

    def send(self, data: bytes) -> bool:
        try:
            with self.lock:
                self.stream.send(data)
        except OSError:
            return False
        return True


class DerpRelay:
    """The relay: one server key, connected clients by public key, one thread per client."""

    def __init__(self) -> None:
        self.private = PrivateKey.generate()
        self.public_key = bytes(self.private.public_key)
        self._peers: dict[bytes, _Peer] = {}
        self._streams: set[_Stream] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.relayed = 0  # packets handed to a connected client, for tests and the demo

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._peers)

    def serve(self, stream: _Stream) -> None:
        """Run one client's connection until it ends; never raises."""
        with self._lock:
            if self._closed:
                stream.close()
                return
            self._streams.add(stream)
        peer: _Peer | None = None
        try:
            peer = self._handshake(stream)
            if peer is not None:
                self._relay(peer)
        except (OSError, wire.DerpProtocolError):
            pass  # a client that breaks the protocol or leaves is simply dropped
        finally:
            with self._lock:
                self._streams.discard(stream)
                if peer is not None and self._peers.get(peer.key) is peer:
                    del self._peers[peer.key]
            stream.close()

    def _handshake(self, stream: _Stream) -> _Peer | None:
        stream.send(wire.ServerKey(self.public_key).encode())
        reader = wire.FrameReader()
        # A client that connects and never says who it is does not hold a thread for ever.
        frame = _read_frame(stream, reader, HANDSHAKE_TIMEOUT_SECONDS)
        if frame is None or frame.type != wire.FrameType.CLIENT_INFO:
            return None
        message = wire.decode_frame(frame)
        if not isinstance(message, wire.ClientInfo):
            return None
        wire.open_client_info(message, self.private)  # proves the client holds its key
        peer = _Peer(message.key, stream, reader)
        with self._lock:
            self._peers[message.key] = peer
        peer.send(wire.build_server_info(self.private, message.key).encode())
        return peer

    def _relay(self, peer: _Peer) -> None:
        while (frame := _read_frame(peer.stream, peer.reader)) is not None:
            message = wire.decode_frame(frame)
            if isinstance(message, wire.SendPacket):
                with self._lock:
                    target = self._peers.get(message.destination)
                    if target is not None:
                        # Counted before the send: whoever saw the packet arrive sees it counted.
                        self.relayed += 1
                delivered = target is not None and target.send(
                    wire.RecvPacket(peer.key, message.data).encode()
                )
                if not delivered:
                    gone = wire.PeerGone(message.destination, wire.PeerGoneReason.NOT_HERE)
                    peer.send(gone.encode())
            elif isinstance(message, wire.Ping):
                peer.send(wire.Pong(message.data).encode())

    def close(self) -> None:
        """Drop every client: their serving threads end."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
            self._peers.clear()
        for stream in streams:
            stream.close()


def _read_frame(
    stream: _Stream, reader: wire.FrameReader, timeout: float | None = None
) -> wire.Frame | None:
    while (frame := reader.next_frame()) is None:
        data = stream.recv(timeout)
        if not data:
            return None
        reader.feed(data)
    return frame


# --- HTTP ------------------------------------------------------------------------------


def _send_plain(
    request: BaseHTTPRequestHandler, status: int, body: str, headers: dict[str, str] | None = None
) -> None:
    data = body.encode()
    fields = {"Content-Type": _TEXT, **(headers or {}), "Content-Length": str(len(data))}
    request.send_response(status)
    for name, value in fields.items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(data)


def handle_derp(request: BaseHTTPRequestHandler, relay: DerpRelay, mode: str) -> None:
    """`GET /derp` as Coder's relay answers it, under fault `mode`."""
    if mode == "down":
        _send_plain(request, 503, "no healthy upstream")
        return
    upgrade = request.headers.get("Upgrade", "").strip().lower()
    # As Go's net package does by default: without it, a relayed packet waits behind Nagle
    # for the ACK of the previous write, and every round trip gains ~40 ms of delayed ACK.
    with contextlib.suppress(OSError):
        request.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if upgrade == "websocket":
        from deployhealth.sim.ws import accept_websocket

        ws = accept_websocket(request, subprotocols=("derp",))  # type: ignore[arg-type]
        if ws is not None:
            relay.serve(_WebSocketStream(ws))
        return
    if upgrade != "derp":
        _send_plain(request, 426, "DERP requires connection upgrade")
        return
    if mode == "websocket-only":
        request.close_connection = True
        _send_plain(request, 400, "Bad Request: upgrade to DERP is not allowed here")
        return
    request.close_connection = True
    request.send_response_only(101, "Switching Protocols")
    request.send_header("Upgrade", "DERP")
    request.send_header("Connection", "Upgrade")
    request.send_header("Derp-Version", str(wire.PROTOCOL_VERSION))
    request.send_header("Derp-Public-Key", relay.public_key.hex())
    request.end_headers()
    if mode == "garbage":
        with contextlib.suppress(OSError):
            request.wfile.write(os.urandom(256))
        return
    relay.serve(_RawStream(request))


def _probe_route(request: BaseHTTPRequestHandler, mode: str) -> None:
    if mode == "down":
        _send_plain(request, 503, "no healthy upstream")
    else:
        _send_plain(request, 200, "")


def register(sim: SimulatedDeployment) -> None:
    """Add /derp, /derp/probe, /derp/latency-check and the `derp` fault switch to `sim`."""
    relay = DerpRelay()
    sim.on_close(relay.close)
    sim.fault("derp", MODES)

    def derp_route(request: SimRequest, sim: SimulatedDeployment) -> None:
        handle_derp(request, relay, sim.mode("derp"))

    def probe_route(request: SimRequest, sim: SimulatedDeployment) -> None:
        _probe_route(request, sim.mode("derp"))

    sim.route("GET", "/derp", derp_route)
    sim.route("GET", "/derp/probe", probe_route)
    sim.route("GET", "/derp/latency-check", probe_route)


# --- a standalone relay ----------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "derper-sim"
    owner: DerpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_text(
        self, status: int, body: str, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """What sim/ws.py calls to refuse an upgrade, as on the simulated deployment."""
        _send_plain(self, status, body, {"Content-Type": content_type, **(headers or {})})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with contextlib.suppress(OSError):
            if path == "/derp":
                handle_derp(self, self.owner.relay, self.owner.mode)
            elif path in ("/derp/probe", "/derp/latency-check"):
                _probe_route(self, self.owner.mode)
            else:
                _send_plain(self, 404, "not found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS is set up here, on the connection's own thread, so that a client that
        # stalls in its handshake cannot stall accept() for everyone else.
        if self.tls is not None:
            request.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up mid-stream on purpose (timeouts, closes)


class DerpServer(Service):
    """A DERP relay on its own 127.0.0.1 port; `mode` is one of MODES and may change live."""

    def __init__(
        self, *, mode: str = "ok", tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.relay = DerpRelay()
        handler = type("BoundDerpHandler", (_Handler,), {"owner": self})
        self._server = _Server((host, 0), handler)
        self._server.tls = tls
        self.host = host
        self.port = int(self._server.server_address[1])
        self.scheme = "https" if tls is not None else "http"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def node(self, name: str, region_id: int, **extra: Any) -> dict[str, Any]:
        """This server as a DERP map node (STUN off unless `extra` says otherwise)."""
        node: dict[str, Any] = {
            "Name": name,
            "RegionID": region_id,
            "HostName": self.host,
            "DERPPort": self.port,
            "STUNPort": -1,
            "ForceHTTP": self.scheme == "http",
        }
        node.update(extra)
        return node

    def start(self) -> Self:
        if self._thread is None:
            # A short poll keeps close() quick.
            self._thread = threading.Thread(
                target=self._server.serve_forever, args=(0.05,), name=f"derp-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        self.relay.close()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
