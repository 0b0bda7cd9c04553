"""Socket and TLS primitives for the clients that drive `socket` and `ssl` themselves.

The access_url and websocket families, pgconn, derpclient, stunclient and netguard each
speak their protocol by hand (to time its phases, cap what they read, or keep the socket
after an upgrade). What they share:

- `resolve_host`: getaddrinfo under a timeout. The system call has none, so a lookup that
  outlasts the budget is left to finish on a daemon thread (`getaddrinfo_within`).
- `connect_tcp`: the first address that accepts, each attempt under what is left.
- `tls_context` and `tls_handshake`: TLS verified against the system CA store or, as with
  requests, the CA bundle (file or directory) named by `REQUESTS_CA_BUNDLE`, else
  `SSL_CERT_FILE` (`ca_bundle`), read on every call.
- `PhaseError`: a failure in one named phase ("dns", "connect", "tls", ...), whose text the
  families put in their messages.
- The address policy for hosts the deployment hands us rather than the operator:
  `blocking_network` and `blocked_address_check` refuse link-local and instance-metadata
  addresses unless allow-listed (product.md, "Security").
- `open_files_limit`: how many sockets a fan-out may hold at once is a share of it.

Every socket operation gets what its budget has left, capped at `OPERATION_TIMEOUT_SECONDS`;
with nothing left it fails as timed out before it starts (zero would mean non-blocking).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.redact import safe_url

OPERATION_TIMEOUT_SECONDS = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443}

Address = tuple[socket.AddressFamily, tuple[Any, ...]]  # (family, sockaddr) to connect to
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressCheck = Callable[[str], str | None]  # an IP -> None when allowed, else why not


class PhaseError(Exception):
    """A request failed in one phase; `str()` is "[timeout: ]<phase>: <detail>"."""

    def __init__(self, phase: str, detail: str, *, timed_out: bool = False) -> None:
        self.phase = phase
        self.detail = detail
        self.timed_out = timed_out
        text = f"timeout: {phase}: {detail}" if timed_out else f"{phase}: {detail}"
        super().__init__(text)


class CertificateVerifyError(PhaseError):
    """The TLS handshake failed because the server's certificate did not verify."""


class LookupTimeout(TimeoutError):
    """getaddrinfo did not answer within its timeout; it may still finish on its thread."""


def open_files_limit() -> int | None:
    """This process's soft limit on open files; None where it is unknown or unlimited."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    return int(soft)


def phase_timeout(budget: Deadline, phase: str, cap: float = OPERATION_TIMEOUT_SECONDS) -> float:
    """The timeout for one operation of `phase`; PhaseError (timed out) when none is left."""
    try:
        return budget.timeout(cap)
    except DeadlineExceeded:
        raise PhaseError(phase, "no time left before it could start", timed_out=True) from None


# --- names and connections ------------------------------------------------------------


def getaddrinfo_within(
    host: str,
    port: int,
    timeout: float,
    *,
    socktype: socket.SocketKind = socket.SOCK_STREAM,
    thread_name: str = "",
) -> list[tuple[Any, ...]]:
    """socket.getaddrinfo, given up after `timeout` seconds with LookupTimeout.

    An IP literal is answered on the caller's thread; a name is looked up on a daemon
    thread, which is left behind when it outlasts the timeout. What getaddrinfo raises
    (socket.gaierror, UnicodeError for an unencodable name, ...) is raised here.
    """
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    outcome: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socktype))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    if literal:
        lookup()
    else:
        name = thread_name or f"dns-{host}"
        threading.Thread(target=lookup, name=name, daemon=True).start()
        if not done.wait(timeout):
            raise LookupTimeout(f"looking up {host} took longer than {timeout:.1f} s")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return list(result)


def resolve_host(host: str, port: int, budget: Deadline) -> list[Address]:
    """The TCP addresses of `host` within the budget; raises PhaseError("dns", ...)."""
    timeout = phase_timeout(budget, "dns")
    try:
        found = getaddrinfo_within(host, port, timeout)
    except LookupTimeout as exc:
        raise PhaseError("dns", str(exc), timed_out=True) from None
    except socket.gaierror as exc:
        raise PhaseError("dns", f"cannot resolve {host}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise PhaseError("dns", f"cannot resolve {host}: {type(exc).__name__}: {exc}") from None
    addresses = [(family, sockaddr) for family, _t, _p, _c, sockaddr in found]
    if not addresses:
        raise PhaseError("dns", f"{host} has no address")
    return addresses


def connect_tcp(addresses: Sequence[Address], budget: Deadline) -> socket.socket:
    """Connect to the first address that accepts; raises PhaseError("connect", ...)."""
    failures: list[str] = []
    for family, sockaddr in addresses:
        where = show_sockaddr(sockaddr)
        timeout = phase_timeout(budget, "connect")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except TimeoutError:
            sock.close()
            raise PhaseError(
                "connect", f"{where} did not accept within {timeout:.1f} s", timed_out=True
            ) from None
        except ConnectionRefusedError:
            sock.close()
            failures.append(f"{where} refused the connection")
            continue
        except OSError as exc:
            sock.close()
            failures.append(f"{where}: {exc.strerror or exc}")
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise PhaseError("connect", "; ".join(failures))


def parse_access_url(url: str) -> tuple[str, str, int]:
    """(scheme, host as it goes on the wire, port) of an access URL; ValueError saying why not.

    The access_url and websocket families both start from the access URL; they report a
    bad one under their own codes (EACS02, EWS01) with this message.
    """
    example = "expected an absolute http(s) URL such as https://coder.example.com"
    parts = urlsplit(url)
    url = safe_url(url)  # for the messages below: never the credentials it may carry
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"access URL {url!r} has {shown}: {example}")
    if not parts.hostname:
        raise ValueError(f"access URL {url!r} has no host: {example}")
    host = ascii_host(parts.hostname)
    if host is None:
        raise ValueError(f"access URL {url!r} has a host that is not a valid name: {example}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"access URL {url!r} has an invalid port: {example}") from None
    if any(c.isspace() for c in parts.netloc):
        raise ValueError(f"access URL {url!r} has spaces in its host: {example}")
    return scheme, host, port


def ascii_host(hostname: str) -> str | None:
    """The host as it goes on the wire: IDNA for international names, None if invalid."""
    try:
        ipaddress.ip_address(hostname)
        return hostname
    except ValueError:
        pass
    try:
        return hostname.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def show_sockaddr(sockaddr: tuple[Any, ...]) -> str:
    return host_port(str(sockaddr[0]), sockaddr[1])


def authority(host: str, port: int, scheme: str) -> str:
    """The Host header of an http(s) request: the port only when not the scheme's default."""
    if port == DEFAULT_PORTS[scheme]:
        return f"[{host}]" if ":" in host else host
    return host_port(host, port)


def error_text(exc: BaseException) -> str:
    """An OS or TLS error as a message ends: the TLS reason or the OS's own words."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- TLS ------------------------------------------------------------------------------


def ca_bundle() -> str | None:
    """The CA bundle that replaces the system store: REQUESTS_CA_BUNDLE, else SSL_CERT_FILE."""
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def tls_context() -> ssl.SSLContext:
    """Verified TLS with `ca_bundle()` or the system store; PhaseError("tls") if unloadable."""
    bundle = ca_bundle()
    try:
        if bundle is None:
            return ssl.create_default_context()
        if os.path.isdir(bundle):
            return ssl.create_default_context(capath=bundle)
        return ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise PhaseError("tls", f"cannot load the CA bundle {bundle!r}: {exc}") from None


def unverified_tls_context() -> ssl.SSLContext:
    """TLS that checks neither the chain nor the name: encryption only, or a peek at a cert."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_handshake(
    sock: socket.socket, context: ssl.SSLContext, host: str, budget: Deadline
) -> ssl.SSLSocket:
    """Wrap `sock` and shake hands with `host` (SNI and name check) within the budget.

    On failure the socket is closed and PhaseError("tls", ...) raised, CertificateVerifyError
    when the certificate did not verify.
    """
    timeout = phase_timeout(budget, "tls")
    sock.settimeout(timeout)
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except TimeoutError:
        tls.close()
        raise PhaseError(
            "tls", f"the handshake did not finish within {timeout:.1f} s", timed_out=True
        ) from None
    except ssl.SSLCertVerificationError as exc:
        tls.close()
        reason = exc.verify_message or exc.reason or str(exc)
        raise CertificateVerifyError("tls", f"certificate verify failed: {reason}") from None
    except (ssl.SSLError, OSError) as exc:
        tls.close()
        raise PhaseError("tls", f"handshake failed: {error_text(exc)}") from None
    return tls


# --- which addresses may be dialled ---------------------------------------------------


def networks(specs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(s, strict=False) for s in specs)


def blocking_network(
    address: str, blocked: Sequence[IPNetwork], allowed: Sequence[IPNetwork] = ()
) -> IPNetwork | None:
    """The blocked network `address` falls in, or None when it may be dialled.

    Raises ValueError when `address` is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += embedded_ipv4(ip)
    for candidate in candidates:
        if any(candidate in net for net in allowed if net.version == candidate.version):
            return None
    for candidate in candidates:
        for net in blocked:
            if net.version == candidate.version and candidate in net:
                return net
    return None


# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local use) and where, after each prefix
# length, the IPv4 address sits: (start bit of its first part, bits in it). Bits 64-71 are
# the reserved "u" octet, which the embedding skips.
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_RFC6052_LAYOUTS = {48: (48, 16), 56: (56, 8), 64: (72, 32), 96: (96, 32)}


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address `ip` may stand for: a route to 169.254.169.254 in IPv6 clothes.

    IPv4-mapped (`::ffff:a.b.c.d`, a dual-stack socket dials the IPv4 address), IPv4-
    compatible (`::a.b.c.d`, deprecated but still routed by some stacks), SIIT's translated
    form (`::ffff:0:a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d` and the local-use /48 at each RFC
    6052 prefix length), 6to4 (`2002:AABB:CCDD::/48`), Teredo (its server and its
    client) and ISATAP interface ids (`...:5efe:a.b.c.d`). Refusing one spelling and
    dialling another would be no guard at all.
    """
    value = int(ip)
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    high = value >> 32
    low = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if high == 0 and int(low) > 1:  # not :: nor ::1
        found.append(low)
    if high == 0xFFFF0000:
        found.append(low)
    if ip in _NAT64_WELL_KNOWN:
        found.append(low)
    elif ip in _NAT64_LOCAL:
        for start, first in _RFC6052_LAYOUTS.values():
            bits = (value >> (128 - start - first)) & ((1 << first) - 1)
            if first < 32:  # the rest follows the u octet (bits 64-71)
                rest = 32 - first
                bits = (bits << rest) | ((value >> (128 - 72 - rest)) & ((1 << rest) - 1))
            found.append(ipaddress.IPv4Address(bits))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found += list(ip.teredo)
    if (value >> 32) & 0xFDFFFFFF == 0x00005EFE:  # ISATAP: 0000:5efe or 0200:5efe
        found.append(low)
    return found


def blocked_address_check(allow: Iterable[str], blocked: Iterable[str]) -> AddressCheck:
    """An AddressCheck that refuses addresses in `blocked` unless they are in `allow`."""
    allowed_nets = networks(allow)
    blocked_nets = networks(blocked)

    def check(ip: str) -> str | None:
        try:
            net = blocking_network(ip, blocked_nets, allowed_nets)
        except ValueError:
            return f"{ip} is not an IP address"
        if net is None:
            return None
        address = ipaddress.ip_address(ip.split("%", 1)[0])
        return (
            f"refusing {address}: a link-local or instance-metadata address "
            f"({net}); allow it with DEPLOYHEALTH_SSRF_ALLOW"
        )

    return check
