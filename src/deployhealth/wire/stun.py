"""STUN binding requests and responses (RFC 5389), the part netcheck and DERP nodes use.

A message is a 20-byte header (type, body length, the magic cookie 0x2112A442, a 12-byte
transaction id) and attributes, each padded to 4 bytes. The mapped address comes in
XOR-MAPPED-ADDRESS (0x0020, or 0x8020 from servers that predate the RFC number) or, from
old servers, MAPPED-ADDRESS (0x0001).

Requests are built as Tailscale's own client builds them (tailscale/tailscale
net/stun/stun.go, `Request`), because Tailscale's STUN server (derper, net/stunserver) drops
anything else without a word: the header announces a 20-byte body; SOFTWARE (0x8022) with
the 8 bytes "tailnode" (a multiple of 4: no padding); then FINGERPRINT (0x8028, 4 bytes),
the CRC-32 (IEEE) of every byte before it, header included with its length already
counting the fingerprint, XOR 0x5354554E. 40 bytes in all. Any RFC 5389 server answers
that too: SOFTWARE is informational and FINGERPRINT is standard.

`parse_binding_request` is the server's side and checks what Tailscale's `ParseBindingRequest`
checks: a binding request, a SOFTWARE attribute whose value is exactly "tailnode", a
FINGERPRINT as the last attribute, and its CRC right. (It also checks the header's length
against the datagram, as RFC 5389 says to, which Tailscale's server does not.)

Responses: Tailscale's server sends XOR-MAPPED-ADDRESS alone; others (coturn, pion) add
SOFTWARE, FINGERPRINT and more. A FINGERPRINT is read and reported (`fingerprint_ok`) but
never refused, and bytes after the announced body are ignored, as Tailscale's client
(`ParseResponse`) does.

Pure: malformed input raises `StunParseError` with a message saying what was wrong, and
nothing else escapes (tests/test_wire_stun.py holds the module to that).
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
TXID_LEN = 12
DEFAULT_PORT = 3478

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_ERROR_CODE = 0x0009
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Servers written against the RFC 5389 drafts used this number; Tailscale accepts it too.
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020

# What Tailscale's client puts in SOFTWARE, and its server insists on.
TAILSCALE_SOFTWARE = b"tailnode"
# RFC 5389 section 15.5: the CRC-32 is XORed with this ("STUN") so that a message
# carrying another protocol's CRC at the same place does not pass for STUN.
FINGERPRINT_XOR = 0x5354554E
FINGERPRINT_LEN = 8  # attribute header (4) + CRC (4)

_HEADER = struct.Struct(">HHI12s")
_COOKIE = struct.pack(">I", MAGIC_COOKIE)
_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02


class StunParseError(ValueError):
    """The datagram is not the STUN message expected: the message says why."""


@dataclass(frozen=True)
class BindingResponse:
    txid: bytes
    ip: str
    port: int
    xor: bool  # False when only the legacy MAPPED-ADDRESS was present
    # True or False when the response ends in a FINGERPRINT that is right or wrong; None
    # when it carries none (Tailscale's server sends none). Never a reason to refuse.
    fingerprint_ok: bool | None = None

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)


def fingerprint(message: bytes) -> int:
    """The FINGERPRINT value for `message`, the bytes before the attribute.

    The header's length field must already count the FINGERPRINT attribute itself.
    """
    return (zlib.crc32(message) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


def binding_request(txid: bytes | None = None) -> tuple[bytes, bytes]:
    """(transaction id, datagram) of a binding request, as Tailscale's client sends it.

    SOFTWARE "tailnode" then FINGERPRINT: Tailscale's STUN server drops a request
    without them, and any other RFC 5389 server accepts them.
    """
    txid = new_txid() if txid is None else txid
    if len(txid) != TXID_LEN:
        raise StunParseError(f"a transaction id is {TXID_LEN} bytes, not {len(txid)}")
    software = _attribute(ATTR_SOFTWARE, TAILSCALE_SOFTWARE)
    head = _HEADER.pack(
        BINDING_REQUEST, len(software) + FINGERPRINT_LEN, MAGIC_COOKIE, txid
    )
    return txid, _with_fingerprint(head + software)


def bare_binding_request(txid: bytes | None = None) -> tuple[bytes, bytes]:
    """(transaction id, datagram) of a binding request with no attributes (20 bytes).

    What RFC 5389 allows and what deployhealth sent before: Tailscale's server drops it.
    Kept for tests that show the difference.
    """
    txid = new_txid() if txid is None else txid
    if len(txid) != TXID_LEN:
        raise StunParseError(f"a transaction id is {TXID_LEN} bytes, not {len(txid)}")
    return txid, _HEADER.pack(BINDING_REQUEST, 0, MAGIC_COOKIE, txid)


def parse_binding_request(data: bytes) -> bytes:
    """The transaction id of a binding request Tailscale's STUN server would answer.

    The server's side: a request that Tailscale's server drops raises StunParseError
    saying why (no SOFTWARE "tailnode", no FINGERPRINT at the end, a wrong one).
    """
    kind, _length, txid = _header(data)
    if kind != BINDING_REQUEST:
        raise StunParseError(f"message type 0x{kind:04x} is not a binding request (0x0001)")
    attributes = _attribute_list(data)
    softwares = [value for attr_type, value, _at in attributes if attr_type == ATTR_SOFTWARE]
    if not softwares:
        raise StunParseError(
            'the binding request carries no SOFTWARE attribute; Tailscale\'s STUN server '
            'answers only requests with SOFTWARE "tailnode"'
        )
    # Tailscale's server accepts the request when any SOFTWARE attribute says "tailnode".
    if TAILSCALE_SOFTWARE not in softwares:
        shown = softwares[0].decode("utf-8", errors="replace")
        raise StunParseError(
            f'SOFTWARE is {shown!r}, not "tailnode": Tailscale\'s STUN server answers only '
            "its own client"
        )
    last_type, last_value, last_at = attributes[-1]
    if last_type != ATTR_FINGERPRINT:
        raise StunParseError(
            f"the binding request does not end in FINGERPRINT (0x{ATTR_FINGERPRINT:04x}); its "
            f"last attribute is 0x{last_type:04x}"
        )
    if len(last_value) != 4:
        raise StunParseError(f"FINGERPRINT is {len(last_value)} bytes, not 4")
    got = struct.unpack(">I", last_value)[0]
    want = fingerprint(bytes(data[:last_at]))
    if got != want:
        raise StunParseError(
            f"FINGERPRINT 0x{got:08x} does not match the message's CRC (0x{want:08x})"
        )
    return txid


def binding_response(
    txid: bytes, ip: str, port: int, *, xor: bool = True, with_fingerprint: bool = False
) -> bytes:
    """A success response carrying `ip:port` as (XOR-)MAPPED-ADDRESS (the server's side).

    Tailscale's server sends the address alone; `with_fingerprint` adds a FINGERPRINT, as
    coturn and pion do.
    """
    if len(txid) != TXID_LEN:
        raise StunParseError(f"a transaction id is {TXID_LEN} bytes, not {len(txid)}")
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise StunParseError(f"{ip!r} is not an IP address") from None
    if not 0 <= port <= 0xFFFF:
        raise StunParseError(f"port {port} does not fit in 16 bits")
    family = _FAMILY_V4 if address.version == 4 else _FAMILY_V6
    raw = address.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, _COOKIE + txid, strict=False))
        attr_type = ATTR_XOR_MAPPED_ADDRESS
    else:
        attr_type = ATTR_MAPPED_ADDRESS
    value = struct.pack(">BBH", 0, family, port) + raw
    body = _attribute(attr_type, value)  # 8 or 20 bytes: already aligned
    if not with_fingerprint:
        return _HEADER.pack(BINDING_SUCCESS, len(body), MAGIC_COOKIE, txid) + body
    head = _HEADER.pack(BINDING_SUCCESS, len(body) + FINGERPRINT_LEN, MAGIC_COOKIE, txid)
    return _with_fingerprint(head + body)


def parse_binding_response(data: bytes, txid: bytes | None = None) -> BindingResponse:
    """The mapped address of a binding success response.

    With `txid`, a response to another transaction is refused. XOR-MAPPED-ADDRESS wins
    over MAPPED-ADDRESS when both are present.
    """
    kind, length, got = _header(data, trailing_ok=True)
    # Bytes past the announced body are not part of the message (some servers pad the
    # datagram); Tailscale's client ignores them too.
    data = data[: HEADER_LEN + length]
    if txid is not None and got != txid:
        raise StunParseError(
            f"transaction id {got.hex()} does not match the request's {txid.hex()}"
        )
    listed = _attribute_list(data)
    attributes: dict[int, bytes] = {}
    for attr_type, value, _at in listed:
        attributes.setdefault(attr_type, value)  # the first of a repeated type counts
    fingerprint_ok = _fingerprint_ok(data, listed)
    if kind == BINDING_ERROR:
        raise StunParseError(f"the server answered a binding error{_error_text(attributes)}")
    if kind != BINDING_SUCCESS:
        raise StunParseError(f"message type 0x{kind:04x} is not a binding success (0x0101)")
    for attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
        if attr_type in attributes:
            ip, port = _address(attributes[attr_type], got, xor=True)
            return BindingResponse(got, ip, port, xor=True, fingerprint_ok=fingerprint_ok)
    if ATTR_MAPPED_ADDRESS in attributes:
        ip, port = _address(attributes[ATTR_MAPPED_ADDRESS], got, xor=False)
        return BindingResponse(got, ip, port, xor=False, fingerprint_ok=fingerprint_ok)
    raise StunParseError("the binding response carries no (XOR-)MAPPED-ADDRESS")


def _attribute(attr_type: int, value: bytes) -> bytes:
    return struct.pack(">HH", attr_type, len(value)) + value + b"\0" * (-len(value) % 4)


def _with_fingerprint(message: bytes) -> bytes:
    """`message` (whose header already counts the fingerprint) with FINGERPRINT appended."""
    return message + struct.pack(">HHI", ATTR_FINGERPRINT, 4, fingerprint(message))


def _fingerprint_ok(data: bytes, listed: list[tuple[int, bytes, int]]) -> bool | None:
    """Whether a FINGERPRINT, if the message ends in one, is right; None without one."""
    if not listed or listed[-1][0] != ATTR_FINGERPRINT:
        return None
    _type, value, at = listed[-1]
    return len(value) == 4 and struct.unpack(">I", value)[0] == fingerprint(bytes(data[:at]))


def _header(data: bytes, *, trailing_ok: bool = False) -> tuple[int, int, bytes]:
    if len(data) < HEADER_LEN:
        raise StunParseError(f"{len(data)} bytes is shorter than the 20-byte STUN header")
    kind, length, cookie, txid = _HEADER.unpack_from(data, 0)
    if kind & 0xC000:
        raise StunParseError("the first two bits are not zero: not a STUN message")
    if cookie != MAGIC_COOKIE:
        raise StunParseError(
            f"magic cookie 0x{cookie:08x} is not 0x{MAGIC_COOKIE:08x}: not an RFC 5389 message"
        )
    if length % 4:
        raise StunParseError(f"body length {length} is not a multiple of 4")
    if HEADER_LEN + length > len(data) or (
        HEADER_LEN + length < len(data) and not trailing_ok
    ):
        raise StunParseError(
            f"the header announces a {length}-byte body, but {len(data) - HEADER_LEN} "
            "bytes follow it"
        )
    return kind, length, txid


def _attribute_list(data: bytes) -> list[tuple[int, bytes, int]]:
    """(type, value, offset of the attribute) for each attribute, in order."""
    found: list[tuple[int, bytes, int]] = []
    pos = HEADER_LEN
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunParseError(f"attribute header at offset {pos} is cut short")
        attr_type, length = struct.unpack_from(">HH", data, pos)
        start = pos + 4
        end = start + length
        if end > len(data):
            raise StunParseError(
                f"attribute 0x{attr_type:04x} announces {length} bytes, past the end of the "
                "message"
            )
        found.append((attr_type, bytes(data[start:end]), pos))
        pos = end + (-length % 4)  # values are padded to a multiple of 4
    return found


def _address(value: bytes, txid: bytes, *, xor: bool) -> tuple[str, int]:
    name = "XOR-MAPPED-ADDRESS" if xor else "MAPPED-ADDRESS"
    if len(value) < 4:
        raise StunParseError(f"{name} is {len(value)} bytes, too short for family and port")
    _reserved, family, port = struct.unpack_from(">BBH", value)
    raw = value[4:]
    if family == _FAMILY_V4:
        size = 4
    elif family == _FAMILY_V6:
        size = 16
    else:
        raise StunParseError(f"{name} has address family 0x{family:02x}, neither IPv4 nor IPv6")
    if len(raw) != size:
        raise StunParseError(
            f"{name} holds {len(raw)} address bytes; IPv{4 if size == 4 else 6} takes {size}"
        )
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, _COOKIE + txid, strict=False))
    return str(ipaddress.ip_address(raw)), port


def _error_text(attributes: dict[int, bytes]) -> str:
    value = attributes.get(ATTR_ERROR_CODE)
    if value is None or len(value) < 4:
        return ""
    code = (value[2] & 0x07) * 100 + value[3]
    reason = value[4:].decode("utf-8", errors="replace").strip()
    return f" {code} {reason}".rstrip()
