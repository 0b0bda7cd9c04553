"""STUN servers on UDP loopback: answer binding requests, stay silent, or act as a hard NAT.

`StunServer` behaves like Tailscale's STUN server (derper, net/stunserver): it answers a
binding request only when it carries SOFTWARE "tailnode" and a right FINGERPRINT, last
(`wire.stun.parse_binding_request` checks that), with XOR-MAPPED-ADDRESS set to the address
the request came from and nothing else. Anything else, a bare 20-byte request included, is
dropped without an answer and counted in `dropped` (Tailscale counts it as "not_stun"), the
reason kept in `last_drop`. `port_offset` adds to the reported port, which is what a hard
NAT does (a different public mapping per destination); `silent` never answers, as when a
security group drops UDP 3478. Both can change while it runs.

`register(sim)` starts two of them with the simulated deployment, at 127.0.0.1 and
127.0.0.2 (both loopback on Linux; the second falls back to 127.0.0.1 elsewhere), so that
"two STUN servers at different IPs" exists for the hard-NAT check. `servers_of(sim)` lists
them as "host:port" for DEPLOYHEALTH_STUN_SERVERS. The fault switch `stun`:

    ok        both answer with the true mapping
    silent    neither answers (deployhealth reports ESTUN01)
    hard-nat  the second reports a different port (deployhealth reports ESTUN02)
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from typing import TYPE_CHECKING, Self

from deployhealth.sim._service import Service
from deployhealth.wire import stun as wire

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimulatedDeployment

MODES = ("ok", "silent", "hard-nat")
# The second sim server's offset in "hard-nat" mode.
HARD_NAT_PORT_OFFSET = 1
_DATAGRAM = 2048
_JOIN_TIMEOUT = 5.0


class StunServer(Service):
    """A STUN server on UDP `host` (loopback only) and a free or given port."""

    def __init__(
        self,
        *,
        port_offset: int = 0,
        silent: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.port_offset = port_offset
        self.silent = silent
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.host, self.port = self._sock.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Condition()
        self._requests = 0
        self._answered = 0
        self._dropped = 0
        self.last_client: tuple[str, int] | None = None  # where the last request came from
        self.last_drop: str | None = None  # why the last dropped datagram was dropped

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def answered(self) -> int:
        with self._lock:
            return self._answered

    @property
    def dropped(self) -> int:
        """Datagrams that were not a binding request Tailscale's server answers."""
        with self._lock:
            return self._dropped

    def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self._requests >= count, timeout)

    def wait_for_dropped(self, count: int = 1, timeout: float = 5.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self._dropped >= count, timeout)

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name=f"stun-{self.address}", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
        for sock in (self._sock, self._wake_r, self._wake_w):
            sock.close()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _events in selector.select():
                    if key.fileobj is self._sock:
                        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                data, (ip, port, *_rest) = self._sock.recvfrom(_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error from an earlier answer: the next datagram is fine
            try:
                txid = wire.parse_binding_request(data)
            except wire.StunParseError as exc:
                # Dropped without an answer, as Tailscale's server drops what its own
                # client would not send: the client only ever sees silence.
                with self._lock:
                    self._dropped += 1
                    self.last_drop = str(exc)
                    self._lock.notify_all()
                continue
            with self._lock:
                self._requests += 1
                self.last_client = (ip, port)
                if not self.silent:
                    # Counted before the answer leaves: whoever got it sees it counted.
                    self._answered += 1
                self._lock.notify_all()
            if self.silent:
                continue
            mapped_port = (port + self.port_offset) % 65536
            with contextlib.suppress(OSError):
                self._sock.sendto(wire.binding_response(txid, ip, mapped_port), (ip, port))


_SERVERS: dict[int, list[StunServer]] = {}


def servers_of(sim: SimulatedDeployment) -> list[str]:
    """The sim's STUN servers as "host:port", for DEPLOYHEALTH_STUN_SERVERS."""
    return [server.address for server in _SERVERS.get(id(sim), [])]


def register(sim: SimulatedDeployment) -> None:
    """Start the sim's two STUN servers and add the `stun` fault switch."""
    first = StunServer(host="127.0.0.1").start()
    try:
        second = StunServer(host="127.0.0.2").start()
    except OSError:
        # Not every system routes all of 127/8 to loopback; one IP still checks STUN.
        second = StunServer(host="127.0.0.1").start()
    servers = [first, second]
    _SERVERS[id(sim)] = servers

    def apply(mode: str) -> None:
        for server in servers:
            server.silent = mode == "silent"
            server.port_offset = 0
        if mode == "hard-nat":
            second.port_offset = HARD_NAT_PORT_OFFSET

    def close() -> None:
        _SERVERS.pop(id(sim), None)
        for server in servers:
            server.close()

    sim.fault("stun", MODES, apply)
    sim.on_close(close)
