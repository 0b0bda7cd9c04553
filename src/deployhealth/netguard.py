"""Fetching URLs that the deployment hands us, without being turned against our own host.

A proxy URL or a DERP host comes from the watched deployment, not from the operator: whoever
can register a workspace proxy can make deployhealth fetch any URL from inside the VPC. The
one target that matters there is the instance-metadata service (credentials of the Lambda
role), so link-local and metadata addresses (`settings.BLOCKED_NETWORKS`) are refused unless
`settings.ssrf_allow` names them. The rule itself, `net.blocking_network`, is shared with the
DERP and STUN clients.

The rule is one function, used twice: `vet(url)` / `vet_async(url)` (and `HostVetting`,
which does it once per host for a whole fan-out) resolve the host themselves (getaddrinfo,
bounded by a timeout: the system call has none) and refuse, with a message naming the URL
and the address, when any address falls in a blocked network. At that
point nothing has been connected. The connection that follows goes to the vetted socket
address itself, never to a second lookup, so a name cannot answer "harmless" to the check
and "metadata" to the connect (DNS rebinding). The URL is unchanged: the Host header, SNI
and certificate checks still use the name.

Two clients are built on it:

- `fetch()` (asyncio): one GET, straight to the vetted address, the whole exchange under the
  budget (`asyncio.timeout`), the body capped. The workspace proxy family fans out hundreds
  of these on one thread: threads running requests cost about 1 ms of GIL-bound CPU per
  request, four to five times the wall time of asyncio for 500 proxies. The answer is read
  by an asyncio.Protocol, not streams, whose machinery was most of a fan-out's CPU.
- `GuardedSession` (requests): a requests adapter whose urllib3 connections never resolve
  anything; they connect only to the addresses the same thread vetted a moment before for
  that host and port (a thread-local pin). A connection the session did not vet (a
  redirect, a direct use of the adapter) is refused, not resolved: the guard fails closed.
  A watchdog thread shuts a socket down when its request's budget ends, because socket
  timeouts bound each read, not a whole answer, and a server that trickles a byte every few
  seconds would otherwise hold a request for ever. `blocked=()` keeps the pinning, DNS
  timeout and budget without the address policy (the operator's own access URL).

Both ignore the environment (`HTTP(S)_PROXY`, .netrc: with a forward proxy the socket would
go to the proxy and the pin would prove nothing), follow no redirects, keep no cookies, ask
for `Connection: close` and `Accept-Encoding: identity` (a small compressed body can expand
without bound), and read bodies up to a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import http.cookiejar
import ipaddress
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.net import (
    DEFAULT_PORTS,
    Address,
    IPNetwork,
    PhaseError,
    authority,
    blocking_network,
    ca_bundle,
    networks,
    resolve_host,
    show_sockaddr,
    tls_context,
)
from deployhealth.redact import safe_url
from deployhealth.settings import BLOCKED_NETWORKS, Settings

_READ_SIZE = 16 * 1024


class GuardError(Exception):
    """A request the guard would not or could not make; the message is safe to show."""


class BlockedAddressError(GuardError):
    """The URL's host is, or resolves to, a blocked address. No socket was opened to it."""

    def __init__(self, url: str, host: str, address: str, network: IPNetwork) -> None:
        self.url = url
        self.address = address
        self.network = network
        where = address if host == address else f"{host} resolves to {address}, which"
        super().__init__(
            f"refusing to fetch {safe_url(url)}: {where} is a link-local or instance-metadata "
            f"address (in {network}); add it to DEPLOYHEALTH_SSRF_ALLOW if this is intended"
        )


class FetchError(GuardError):
    """A request failed in one phase (dns, connect, tls, ...); the message names it."""

    def __init__(self, url: str, phase: str, detail: str, *, timed_out: bool = False) -> None:
        self.url = url
        self.phase = phase
        self.timed_out = timed_out
        shown = f"timeout: {phase}: {detail}" if timed_out else f"{phase}: {detail}"
        super().__init__(f"GET {safe_url(url)}: {shown}")


class ResolveError(FetchError):
    """The URL does not parse, or its host did not resolve in time."""

    def __init__(self, url: str, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(url, "dns", detail, timed_out=timed_out)


class UnvettedConnectionError(GuardError):
    """A connection was asked for a host and port this thread had not vetted."""


@dataclass(frozen=True)
class Vetted:
    """A URL whose host resolved to `addresses`, every one of them allowed."""

    url: str
    host: str  # as urllib3 names the pool: lower case, no brackets, no trailing dot
    port: int
    addresses: tuple[Address, ...]


def _host_key(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _target(url: str) -> tuple[str, str, int]:
    """(scheme, host as urllib3 names it, port) of an absolute http(s) URL."""
    scheme, host, port, _target_path = _parsed(url)
    return scheme, host, port


def _parsed(url: str) -> tuple[str, str, int, str]:
    """`_target`, and the request target (path and query) to ask for."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or DEFAULT_PORTS.get(scheme, 0)
    except ValueError as exc:
        raise ResolveError(url, f"the URL does not parse: {exc}") from None
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ResolveError(url, "not an absolute http(s) URL")
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, _host_key(parts.hostname), port, request_target


def _check(
    url: str,
    host: str,
    port: int,
    found: Sequence[Address],
    blocked: Sequence[IPNetwork],
    allowed: Sequence[IPNetwork],
) -> Vetted:
    refused = _first_blocked(found, blocked, allowed)
    if refused is not None:
        raise BlockedAddressError(url, host, *refused)
    if not found:
        raise ResolveError(url, f"{host} has no address")
    return Vetted(url, host, port, tuple(dict.fromkeys(found)))


def _first_blocked(
    found: Sequence[Address], blocked: Sequence[IPNetwork], allowed: Sequence[IPNetwork]
) -> tuple[str, IPNetwork] | None:
    """The first address found that is blocked, and the network that blocks it; else None.

    The host is refused outright, even if it has other, harmless addresses: a name that
    can answer with the metadata address may do so on the next lookup.
    """
    for _family, sockaddr in found:
        address = str(sockaddr[0])
        net = blocking_network(address, blocked, allowed)
        if net is not None:
            return address.split("%", 1)[0], net
    return None


def vet(
    url: str,
    budget: Deadline,
    *,
    blocked: Sequence[IPNetwork] | None = None,
    allowed: Sequence[IPNetwork] = (),
) -> Vetted:
    """Resolve the URL's host within the budget; raise BlockedAddressError or ResolveError."""
    _scheme, host, port = _target(url)
    try:
        found = resolve_host(host, port, budget)
    except PhaseError as exc:
        raise ResolveError(url, exc.detail, timed_out=exc.timed_out) from None
    return _check(url, host, port, found, _blocked(blocked), allowed)


def _blocked(blocked: Sequence[IPNetwork] | None) -> Sequence[IPNetwork]:
    return _default_blocked() if blocked is None else blocked


@functools.cache
def _default_blocked() -> tuple[IPNetwork, ...]:
    # Parsed once: a fan-out over 5,000 proxies spent a third of a second re-parsing them.
    return networks(BLOCKED_NETWORKS)


async def vet_async(
    url: str,
    budget: Deadline,
    *,
    blocked: Sequence[IPNetwork] | None = None,
    allowed: Sequence[IPNetwork] = (),
) -> Vetted:
    """`vet` for asyncio: a slow resolver holds only this coroutine, never the loop."""
    _scheme, host, port = _target(url)
    return await HostVetting(blocked=blocked, allowed=allowed).vet(url, host, port, budget)


class HostVetting:
    """One fan-out's vetting, done once per host and shared by every URL on that host.

    Thousands of proxies on a few hosts (or one load balancer) then cost a few lookups and
    address checks, not one of each per proxy: the answer depends on the host only, the
    port is put into the vetted socket addresses afterwards. It is kept only as long as
    the fan-out that made it (one family run), and every connection still goes to the
    vetted address itself, so sharing it opens no gap between check and connect. A waiter
    keeps its own budget: a lookup started by a probe with less time left is not cut short
    for the others.
    """

    def __init__(
        self, *, blocked: Sequence[IPNetwork] | None = None, allowed: Sequence[IPNetwork] = ()
    ) -> None:
        self.blocked = _blocked(blocked)
        self.allowed = tuple(allowed)
        self._hosts: dict[str, asyncio.Future[tuple[Address, ...]]] = {}

    async def vet(self, url: str, host: str, port: int, budget: Deadline) -> Vetted:
        """The URL's host vetted (BlockedAddressError, ResolveError), with `port` filled in."""
        answer = self._hosts.get(host)
        if answer is None:
            answer = self._hosts[host] = asyncio.get_running_loop().create_future()
            self._look_up(host, answer)
        if not answer.done():
            timeout = budget.remaining()
            try:
                await asyncio.wait_for(asyncio.shield(answer), timeout)
            except TimeoutError:
                raise ResolveError(
                    url, f"looking up {host} took longer than {timeout:.1f} s", timed_out=True
                ) from None
            except Exception:
                if not answer.done():
                    raise
        failure = answer.exception()
        if failure is None:
            addresses = tuple((family, (a[0], port, *a[2:])) for family, a in answer.result())
            return Vetted(url, host, port, addresses)
        if isinstance(failure, _Blocked):
            raise BlockedAddressError(url, host, failure.address, failure.network)
        if isinstance(failure, _NoAddress):
            raise ResolveError(url, f"{host} has no address")
        if isinstance(failure, socket.gaierror):
            raise ResolveError(url, f"cannot resolve {host}: {failure.strerror or failure}")
        raise ResolveError(url, f"cannot resolve {host}: {failure}")

    def _look_up(self, host: str, answer: asyncio.Future[tuple[Address, ...]]) -> None:
        loop = asyncio.get_running_loop()

        def settle(result: list[Address] | BaseException) -> None:
            if answer.done():
                return
            if not isinstance(result, BaseException):
                result = self._judged(result)
            if isinstance(result, BaseException):
                answer.set_exception(result)
                answer.exception()  # seen: a failure nobody waits for is not logged at exit
            else:
                answer.set_result(result)

        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            pass
        else:  # an IP literal: getaddrinfo only spells it, no lookup, so on the loop
            settle(_getaddrinfo(host))
            return

        # A daemon thread, not the loop's executor: asyncio.run() joins its executor on
        # exit, and a resolver that hangs must not hold the family past its deadline. Nor
        # net.getaddrinfo_within: it blocks the calling thread, here the loop, while it
        # waits.
        def lookup() -> None:
            result = _getaddrinfo(host)
            with contextlib.suppress(RuntimeError):  # the loop closed while we looked
                loop.call_soon_threadsafe(settle, result)

        threading.Thread(target=lookup, name=f"dns-{host}", daemon=True).start()

    def _judged(self, found: list[Address]) -> tuple[Address, ...] | Exception:
        """`_check`'s rule, as the outcome every waiter on this host reads."""
        refused = _first_blocked(found, self.blocked, self.allowed)
        if refused is not None:
            return _Blocked(*refused)
        if not found:
            return _NoAddress()
        return tuple(dict.fromkeys(found))


class _Blocked(Exception):
    def __init__(self, address: str, network: IPNetwork) -> None:
        super().__init__(address)
        self.address = address
        self.network = network


class _NoAddress(Exception):
    pass


def _getaddrinfo(host: str) -> list[Address] | BaseException:
    """The host's stream addresses (port 0), or what getaddrinfo raised."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except BaseException as exc:
        return exc
    return [(info[0], info[4]) for info in infos]


# --- one GET with asyncio --------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    status: int
    reason: str
    headers: Mapping[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes
    truncated: bool  # the body was longer than the cap


HEADER_CAP = 64 * 1024


async def fetch(
    url: str,
    budget: Deadline,
    *,
    headers: Mapping[str, str] | None = None,
    cap: int = 64 * 1024,
    blocked: Sequence[IPNetwork] | None = None,
    allowed: Sequence[IPNetwork] = (),
    tls: ssl.SSLContext | None = None,
    user_agent: str = "deployhealth/0.1",
    vetting: HostVetting | None = None,
) -> Fetched:
    """GET `url` within the budget, to a vetted address only; the body is cut at `cap` bytes.

    Raises BlockedAddressError before any connection, FetchError naming the phase that
    failed (dns, connect, tls, sending the request, waiting for the response, reading the
    body), and never waits past the budget. `vetting` shares each host's vetting across
    the fetches of one fan-out; its networks then replace `blocked` and `allowed`.
    """
    scheme, host, port, request_target = _parsed(url)
    allowance = budget.remaining()
    phase = "dns"
    answer: _Answer | None = None
    try:
        async with asyncio.timeout(allowance):
            if vetting is None:
                vetting = HostVetting(blocked=blocked, allowed=allowed)
            vetted = await vetting.vet(url, host, port, budget)
            phase = "connect"
            request = _request_bytes(request_target, host, port, scheme, headers, user_agent)
            transport, answer = await _open(url, vetted, scheme, tls, request, cap)
            try:
                return await answer.fetched
            finally:
                answer.fetched.cancel()  # settled: what the closing connection says is moot
                transport.close()
    except TimeoutError:
        spent = f"not done within {allowance:.1f} s"
        raise FetchError(url, _phase(phase, answer), spent, timed_out=True) from None
    except ssl.SSLCertVerificationError as exc:  # before ValueError: it is one too
        reason_text = exc.verify_message or exc.reason or str(exc)
        raise FetchError(url, "tls", f"certificate verify failed: {reason_text}") from None
    except ssl.SSLError as exc:
        raise FetchError(url, "tls", f"handshake failed: {exc.reason or exc}") from None
    except ValueError as exc:
        raise FetchError(
            url, _phase(phase, answer), f"malformed or cut-short HTTP answer ({exc})"
        ) from None
    except ConnectionRefusedError:
        raise FetchError(url, _phase(phase, answer), "connection refused") from None
    except OSError as exc:
        detail = exc.strerror or str(exc) or type(exc).__name__
        raise FetchError(url, _phase(phase, answer), detail) from None


def _phase(before: str, answer: _Answer | None) -> str:
    return before if answer is None else answer.phase


async def _open(
    url: str,
    vetted: Vetted,
    scheme: str,
    tls: ssl.SSLContext | None,
    request: bytes,
    cap: int,
) -> tuple[asyncio.BaseTransport, _Answer]:
    loop = asyncio.get_running_loop()
    context = None
    if scheme == "https":
        try:
            context = tls if tls is not None else tls_context()
        except PhaseError as exc:
            raise FetchError(url, "tls", exc.detail) from None
    unsent = request if context is not None else b""  # TLS: after the handshake
    failures: list[str] = []
    for family, sockaddr in vetted.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The vetted socket address itself: no second lookup between check and connect.
            await _connect(loop, sock, sockaddr)
            if context is None:
                # Plain HTTP: the request goes out in the same step that saw the connection
                # up, not a loop pass or two later from connection_made. A fan-out starts
                # hundreds of probes in one pass; each pass a probe waits for puts its
                # request behind every other probe's setup, and a wave of 512 answers came
                # back about 70 ms after their 200 ms (benchmarks/bench_proxies.py).
                await loop.sock_sendall(sock, request)
        except OSError as exc:
            sock.close()
            what = "connection refused" if isinstance(exc, ConnectionRefusedError) else (
                exc.strerror or str(exc)
            )
            failures.append(f"{show_sockaddr(sockaddr)}: {what}")
            continue
        except BaseException:
            sock.close()
            raise
        try:
            return await loop.create_connection(
                lambda: _Answer(unsent, cap, loop.create_future()),
                sock=sock,
                ssl=context,
                server_hostname=vetted.host if context is not None else None,
            )
        except BaseException:
            sock.close()
            raise
    raise FetchError(url, "connect", "; ".join(failures))


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, sockaddr: tuple[Any, ...]
) -> None:
    """`sock` (non-blocking) connected to `sockaddr`, without a loop pass if it is up at once.

    loop.sock_connect always waits for the socket to turn writable when connect() says
    "in progress", which it says even on loopback, where the handshake is done by the time
    it returns; asking for the peer's address tells which.
    """
    try:
        sock.connect(sockaddr)
        return
    except (BlockingIOError, InterruptedError):
        pass
    try:
        sock.getpeername()
        return
    except OSError:
        pass  # not connected yet
    writable: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(sock.fileno(), settle)
    try:
        await writable
    finally:
        loop.remove_writer(sock.fileno())
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


def _request_bytes(
    target: str,
    host: str,
    port: int,
    scheme: str,
    headers: Mapping[str, str] | None,
    user_agent: str,
) -> bytes:
    lines = {
        "Host": authority(host, port, scheme),
        "User-Agent": user_agent,
        "Accept": "*/*",
        "Accept-Encoding": "identity",
        **dict(headers or {}),
        "Connection": "close",
    }
    head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    return (head + "\r\n").encode("latin-1")


class _Answer(asyncio.Protocol):
    """One HTTP/1.1 response, read as the transport delivers it, into `fetched`.

    A protocol rather than asyncio streams: a fan-out of thousands of GETs spent most of
    its CPU in the streams' machinery (a reader, a writer, a drain and a wake-up of the
    task for every read), where a protocol is a few callbacks per response. The answer
    is settled as soon as it is complete or past the cap; bytes beyond the cap are never
    kept (the caller closes the connection). Errors are ValueError (malformed or cut
    short) or OSError (the connection failed), which `fetch` names with `phase`.
    """

    def __init__(self, request: bytes, cap: int, fetched: asyncio.Future[Fetched]) -> None:
        self.phase = "sending the request"
        self.fetched = fetched
        self._request = request
        self._cap = cap
        self._data = bytearray()
        self._head: tuple[int, str, dict[str, str]] | None = None
        self._body_at = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._request:  # empty when `_open` sent it already (plain HTTP)
            cast(asyncio.Transport, transport).write(self._request)
        self.phase = "waiting for the response"

    def data_received(self, data: bytes) -> None:
        if self.fetched.done():
            return
        self._data += data
        self._advance(eof=False)

    def eof_received(self) -> bool:
        self._advance(eof=True)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._advance(eof=True)
        elif not self.fetched.done():
            self.fetched.set_exception(exc)

    def _advance(self, *, eof: bool) -> None:
        if self.fetched.done():
            return
        try:
            result = self._complete(eof)
        except ValueError as exc:
            self.fetched.set_exception(exc)
            return
        if result is not None:
            self.fetched.set_result(result)

    def _complete(self, eof: bool) -> Fetched | None:
        """The answer if it is complete (or past the cap); None while more may come."""
        if self._head is None:
            end = self._data.find(b"\r\n\r\n", 0, HEADER_CAP + 4)
            if end < 0:
                if len(self._data) > HEADER_CAP:
                    raise ValueError(f"the response head is longer than {HEADER_CAP} bytes")
                if eof:
                    raise ValueError("the connection closed before the response head ended")
                return None
            self._head = _parse_head(bytes(self._data[:end]))
            self._body_at = end + 4
            self.phase = "reading the body"
        status, reason, found = self._head
        data, at, cap = self._data, self._body_at, self._cap
        have = len(data) - at
        if "chunked" in found.get("transfer-encoding", "").lower():
            decoded = _dechunk(bytes(data[at:]), cap)
            if decoded is None:
                if eof:
                    raise ValueError("the connection closed inside a chunked body")
                return None
            body, truncated = decoded
        elif (length := found.get("content-length")) is not None:
            total = int(length)
            wanted = min(total, cap)
            if have < wanted:
                if eof:
                    raise ValueError(f"{have} bytes of a {total}-byte body")
                return None
            body, truncated = bytes(data[at : at + wanted]), total > cap
        elif have > cap:
            body, truncated = bytes(data[at : at + cap]), True
        elif eof:
            body, truncated = bytes(data[at:]), False
        else:
            return None
        return Fetched(status, reason, found, body, truncated)


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not code.isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0][:60]!r}")
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return int(code), reason.strip(), found


def _dechunk(data: bytes, cap: int) -> tuple[bytes, bool] | None:
    """A chunked body decoded, cut at `cap` (True when cut); None while it is incomplete."""
    body = bytearray()
    at = 0
    while True:
        end = data.find(b"\r\n", at, at + 1024)
        if end < 0:
            if len(data) - at >= 1024:
                raise ValueError("a chunk size line longer than 1024 bytes")
            return None
        size = int(data[at:end].split(b";", 1)[0].strip(), 16)
        at = end + 2
        if size == 0:
            return bytes(body), False
        body += data[at : at + min(size, cap + 1 - len(body))]
        if len(body) > cap:
            return bytes(body[:cap]), True
        if len(data) < at + size + 2:
            return None
        at += size + 2


# --- pinned connections ---------------------------------------------------------------


@dataclass(frozen=True)
class _Pin:
    vetted: Vetted
    budget: Deadline
    watchdog: _Watchdog


_pins = threading.local()


class _PinnedConnectionMixin:
    """Connects to the addresses this thread vetted for the host, never to a fresh lookup."""

    # Provided by urllib3's HTTPConnection.
    host: str
    port: int
    timeout: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        pin: _Pin | None = getattr(_pins, "current", None)
        key = _host_key(self.host)
        if pin is None or pin.vetted.host != key or pin.vetted.port != self.port:
            raise UnvettedConnectionError(
                f"refusing to connect to {self.host}:{self.port}: the address was not vetted "
                "(a redirect, or a request made outside GuardedSession.get)"
            )
        # urllib3 sets the connect timeout here, or a sentinel meaning "the default".
        cap = float(self.timeout) if isinstance(self.timeout, int | float) else 5.0
        failures: list[str] = []
        for family, sockaddr in pin.vetted.addresses:
            try:
                timeout = pin.budget.timeout(cap)
            except DeadlineExceeded:
                raise ConnectTimeoutError(self, f"no time left to connect to {key}") from None
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(timeout)
                pin.watchdog.watch(sock, pin.budget)
                sock.connect(sockaddr)
            except TimeoutError:
                sock.close()
                raise ConnectTimeoutError(
                    self, f"connection to {show_sockaddr(sockaddr)} timed out after {timeout:.1f} s"
                ) from None
            except OSError as exc:
                sock.close()
                failures.append(f"{show_sockaddr(sockaddr)}: {exc.strerror or exc}")
                continue
            return sock
        raise NewConnectionError(
            cast(HTTPConnection, self), "; ".join(failures) or f"{key} has no address"
        )


class _PinnedHTTPConnection(_PinnedConnectionMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnectionMixin, HTTPSConnection):
    pass


class _NoReuseMixin:
    """Closes a connection instead of pooling it: each request connects to what it vetted.

    A pooled connection would outlive the budget its watchdog entry was made for, and a
    server that ignores `Connection: close` could have hung up by the time it is reused.
    """

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn.close()
        super()._put_conn(None)  # type: ignore[misc]  # the slot, without the connection


class _PinnedHTTPPool(_NoReuseMixin, HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(_NoReuseMixin, HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class _PinnedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _PinnedHTTPPool,
            "https": _PinnedHTTPSPool,
        }


# --- the watchdog ---------------------------------------------------------------------


class _Watchdog:
    """One thread that shuts sockets down when their request's budget ends.

    `shutdown` (not `close`) is what wakes a thread blocked in recv on the same socket;
    a socket already closed by its owner has no descriptor left and is skipped, so a
    reused descriptor number is never touched.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, sock: socket.socket, budget: Deadline) -> None:
        with self._wake:
            if self._closed:
                return
            heapq.heappush(self._heap, (budget.at, next(self._order), sock))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="netguard-watchdog", daemon=True
                )
                self._thread.start()
            # Wake the thread only when its next wake-up moves earlier: with hundreds of
            # probes sharing one deadline, waking it for each would only burn the GIL.
            if self._heap[0][2] is sock:
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            due = [sock for _at, _n, sock in self._heap]
            self._heap.clear()
            self._wake.notify()
        for sock in due:
            _shutdown(sock)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (
                    not self._heap or self._heap[0][0] > time.monotonic()
                ):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wake.wait(wait)
                if self._closed:
                    return
                _at, _n, sock = heapq.heappop(self._heap)
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    if sock.fileno() == -1:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- the session ----------------------------------------------------------------------


class GuardedSession:
    """requests, with every connection vetted, pinned and bounded by the request's budget.

    `blocked=()` keeps the pinning, the DNS timeout and the budget watchdog without the
    address policy: for URLs the operator configured (the access URL).
    """

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        blocked: Iterable[str] = BLOCKED_NETWORKS,
        pool_size: int = 10,
        user_agent: str = "deployhealth/0.1",
    ) -> None:
        self.allowed = networks(allow)
        self.blocked = networks(blocked)
        self._watchdog = _Watchdog()
        self._session = requests.Session()
        self._session.trust_env = False
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._session.headers.update(
            {"User-Agent": user_agent, "Accept-Encoding": "identity", "Connection": "close"}
        )
        adapter = _PinnedAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    @classmethod
    def for_settings(
        cls, settings: Settings, *, pool_size: int = 10, user_agent: str = "deployhealth/0.1"
    ) -> GuardedSession:
        return cls(allow=settings.ssrf_allow, pool_size=pool_size, user_agent=user_agent)

    def vet(self, url: str, budget: Deadline) -> Vetted:
        return vet(url, budget, blocked=self.blocked, allowed=self.allowed)

    def get(
        self,
        url: str,
        budget: Deadline,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_cap: float = 5.0,
    ) -> requests.Response:
        """GET with the body left unread (`stream=True`): read it with `read_capped`.

        Raises GuardError before any connection, or what requests raises.
        """
        vetted = self.vet(url, budget)
        try:
            timeout = budget.timeout(timeout_cap)
        except DeadlineExceeded:
            raise FetchError(url, "connect", "no time left", timed_out=True) from None
        _pins.current = _Pin(vetted, budget, self._watchdog)
        try:
            return self._session.get(
                url,
                headers=dict(headers or {}),
                timeout=(timeout, timeout),
                stream=True,
                allow_redirects=False,
                # trust_env is off (for the proxies' sake), so the CA bundle variables that
                # access_url and fetch() honour are passed on here.
                verify=ca_bundle() or True,
            )
        finally:
            _pins.current = None

    def close(self) -> None:
        self._session.close()
        self._watchdog.close()

    def __enter__(self) -> GuardedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_capped(response: requests.Response, limit: int, budget: Deadline) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, read within the budget; True when there was more.

    The body is taken as sent (no decompression: a small compressed body can expand without
    bound). The connection is closed afterwards, never returned half-read to a pool.
    """
    data = bytearray()
    try:
        while len(data) <= limit:
            if budget.expired:
                raise TimeoutError("the budget ended while reading the body")
            chunk = response.raw.read(min(_READ_SIZE, limit + 1 - len(data)), decode_content=False)
            if not chunk:
                return bytes(data), False
            data += chunk
        return bytes(data[:limit]), True
    finally:
        response.close()
