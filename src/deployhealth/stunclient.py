"""STUN from one UDP socket to every server, as Tailscale's netcheck does it.

One socket per address family sends a binding request to every server at once and waits
for the answers; servers that stay quiet get the same request again (same transaction id,
as RFC 5389 retransmits) at the next try, a few tries of about 2 s each within the caller's
deadline. Using one socket is the point: a NAT that maps it to different public
`ip:port` pairs for different destinations is a "hard" NAT, and only answers to the same
local socket show it.

Each request is the 40-byte form Tailscale's client sends (SOFTWARE "tailnode" and a
FINGERPRINT, see `wire.stun.binding_request`): Tailscale's STUN server, which serves every
derper region, drops a bare request without a word, and a silent derper would look exactly
like a blocked UDP port (ESTUN01).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from deployhealth.deadline import Deadline
from deployhealth.net import AddressCheck, LookupTimeout, getaddrinfo_within, host_port
from deployhealth.wire import stun as wire

TRY_SECONDS = 2.0
TRIES = 3
# A STUN answer is a few dozen bytes; anything longer is cut here by the kernel, so a peer
# flooding 64 KiB datagrams costs 2 KiB per read and no more.
_DATAGRAM = 2048


@dataclass(frozen=True)
class StunTarget:
    key: Hashable  # what the caller files the answer under (a region and node)
    host: str  # a name or an IP literal
    port: int
    label: str = ""  # for log lines: which node this is

    @property
    def shown(self) -> str:
        return host_port(self.host, self.port)

    @property
    def name(self) -> str:
        return self.label or self.shown


@dataclass
class StunResult:
    target: StunTarget
    server_ip: str | None = None  # the address the request went to
    mapped_ip: str | None = None
    mapped_port: int | None = None
    rtt: float | None = None  # seconds, from the last (re)transmission to the answer
    error: str | None = None
    tries: int = 0

    @property
    def mapped(self) -> str | None:
        if self.mapped_ip is None:
            return None
        return host_port(self.mapped_ip, self.mapped_port)

    @property
    def answered(self) -> bool:
        return self.mapped_ip is not None


@dataclass
class StunRun:
    results: dict[Hashable, StunResult]
    logs: list[str] = field(default_factory=list)
    local_ports: dict[int, int] = field(default_factory=dict)  # IP version -> local port
    sent: set[int] = field(default_factory=set)  # IP versions a request could be sent on


@dataclass
class _Pending:
    target: StunTarget
    sockaddr: tuple[str, int] | tuple[str, int, int, int]
    family: socket.AddressFamily
    txid: bytes
    request: bytes
    sent_at: float = 0.0


def probe_all(
    targets: Sequence[StunTarget],
    deadline: Deadline,
    *,
    check_address: AddressCheck,
    tries: int = TRIES,
    try_seconds: float = TRY_SECONDS,
) -> StunRun:
    """Ask every target for our mapped address from one socket per family; never raises."""
    run = StunRun({t.key: StunResult(t) for t in targets})
    pending: dict[bytes, _Pending] = {}
    for target in targets:
        where, why = _resolve(target, deadline, check_address)
        result = run.results[target.key]
        if where is None:
            result.error = why
            run.logs.append(f"STUN {target.name}: {why}")
            continue
        family, sockaddr = where
        result.server_ip = str(sockaddr[0])
        txid, request = wire.binding_request()
        pending[txid] = _Pending(target, sockaddr, family, txid, request)
    if not pending:
        return run

    sockets: dict[socket.AddressFamily, socket.socket] = {}
    selector = selectors.DefaultSelector()
    try:
        for item in pending.values():
            if item.family not in sockets:
                try:
                    sock = socket.socket(item.family, socket.SOCK_DGRAM)
                except OSError as exc:
                    run.results[item.target.key].error = f"cannot open a UDP socket: {exc}"
                    continue
                sock.setblocking(False)
                sockets[item.family] = sock
                selector.register(sock, selectors.EVENT_READ)
        pending = {k: p for k, p in pending.items() if p.family in sockets}
        for attempt in range(1, tries + 1):
            if not pending or deadline.expired:
                break
            for item in list(pending.values()):
                result = run.results[item.target.key]
                result.tries = attempt
                item.sent_at = time.monotonic()
                try:
                    sockets[item.family].sendto(item.request, item.sockaddr)
                    run.sent.add(4 if item.family == socket.AF_INET else 6)
                except OSError as exc:
                    result.error = f"sending to {item.target.shown} failed: {exc.strerror or exc}"
                    run.logs.append(f"STUN {item.target.name}: {result.error}")
                    del pending[item.txid]
            for family, sock in sockets.items():
                with contextlib.suppress(OSError):
                    version = 4 if family == socket.AF_INET else 6
                    run.local_ports[version] = int(sock.getsockname()[1])
            window = deadline.sooner(try_seconds)
            _collect(selector, pending, run, window)
        for item in pending.values():
            result = run.results[item.target.key]
            waited = result.tries
            result.error = (
                f"no STUN answer from {item.target.shown} ({item.sockaddr[0]}) after "
                f"{waited} {'try' if waited == 1 else 'tries'}"
            )
            run.logs.append(f"STUN {item.target.name}: {result.error}")
    finally:
        selector.close()
        for sock in sockets.values():
            sock.close()
    return run


def _collect(
    selector: selectors.BaseSelector,
    pending: dict[bytes, _Pending],
    run: StunRun,
    window: Deadline,
) -> None:
    """Read answers until every pending request is answered or the window closes."""
    while pending:
        left = window.remaining()
        if left <= 0:
            return
        for key, _events in selector.select(left):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    data, source = sock.recvfrom(_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    # An ICMP error surfaced on the socket; the try's timeout reports it.
                    break
                received = time.monotonic()
                if received >= window.at:
                    return  # a flood of datagrams must not hold the reader past its window
                if len(data) < wire.HEADER_LEN:
                    continue
                item = pending.get(bytes(data[8:20]))
                if item is None:
                    continue  # a late answer to a finished request, or not ours
                result = run.results[item.target.key]
                try:
                    answer = wire.parse_binding_response(data, item.txid)
                except wire.StunParseError as exc:
                    result.error = f"{item.target.shown} answered, but: {exc}"
                    run.logs.append(f"STUN {item.target.name}: {result.error}")
                    del pending[item.txid]
                    continue
                result.mapped_ip, result.mapped_port = answer.ip, answer.port
                result.rtt = received - item.sent_at
                result.error = None
                run.logs.append(
                    f"STUN {item.target.name}: {source[0]} mapped us to "
                    f"{answer.address} in {result.rtt * 1000:.3f} ms"
                )
                del pending[item.txid]


def _resolve(
    target: StunTarget, deadline: Deadline, check_address: AddressCheck
) -> tuple[tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]] | None, str]:
    """The address to send to (IPv4 preferred, as netcheck's first probe), or why none.

    Not net.resolve_host: this wants UDP addresses, has the whole deadline rather than one
    operation's cap, and answers with a reason instead of raising (probe_all never raises).
    """
    host = target.host
    try:
        found = getaddrinfo_within(
            host,
            target.port,
            deadline.remaining(),
            socktype=socket.SOCK_DGRAM,
            thread_name=f"stun-dns-{host}",
        )
    except LookupTimeout:
        return None, f"looking up {host} did not finish before the deadline"
    except socket.gaierror as exc:
        return None, f"cannot resolve {host}: {exc.strerror or exc}"
    except Exception as exc:
        return None, f"cannot resolve {host}: {exc}"
    refused: list[str] = []
    candidates = []
    for family, _type, _proto, _name, sockaddr in found:
        why = check_address(str(sockaddr[0]))
        if why is None:
            candidates.append((family, sockaddr))
        else:
            refused.append(why)
    if not candidates:
        reason = "; ".join(dict.fromkeys(refused)) or "no address"
        return None, f"{host}: {reason}"
    candidates.sort(key=lambda c: 0 if c[0] == socket.AF_INET else 1)
    return candidates[0], ""
