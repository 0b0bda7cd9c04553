"""STUN binding requests and responses (RFC 5389), the part netcheck and DERP nodes use.

A message is a 20-byte header (type, body length, the magic cookie 0x2112A442, a 12-byte
transaction id) and attributes, each padded to 4 bytes. The mapped address comes in
XOR-MAPPED-ADDRESS (0x0020, or 0x8020 from servers that predate the RFC number) or, from
old servers, MAPPED-ADDRESS (0x0001).

Pure: malformed input raises `StunParseError` with a message saying what was wrong, and
nothing else escapes (tests/test_wire_stun.py holds the module to that).
"""

from __future__ import annotations

import ipaddress
import os
import struct
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
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Servers written against the RFC 5389 drafts used this number; Tailscale accepts it too.
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020

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

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)


def binding_request(txid: bytes | None = None) -> tuple[bytes, bytes]:
    """(transaction id, datagram) of a binding request with no attributes."""
    txid = new_txid() if txid is None else txid
    if len(txid) != TXID_LEN:
        raise StunParseError(f"a transaction id is {TXID_LEN} bytes, not {len(txid)}")
    return txid, _HEADER.pack(BINDING_REQUEST, 0, MAGIC_COOKIE, txid)


def parse_binding_request(data: bytes) -> bytes:
    """The transaction id of a binding request (the server's side)."""
    kind, _length, txid = _header(data)
    if kind != BINDING_REQUEST:
        raise StunParseError(f"message type 0x{kind:04x} is not a binding request (0x0001)")
    # Attributes (a SOFTWARE, a FINGERPRINT) are allowed but must be well formed.
    _attributes(data)
    return txid


def binding_response(txid: bytes, ip: str, port: int, *, xor: bool = True) -> bytes:
    """A success response carrying `ip:port` as (XOR-)MAPPED-ADDRESS (the server's side)."""
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
    body = struct.pack(">HH", attr_type, len(value)) + value  # 8 or 20 bytes: already aligned
    return _HEADER.pack(BINDING_SUCCESS, len(body), MAGIC_COOKIE, txid) + body


def parse_binding_response(data: bytes, txid: bytes | None = None) -> BindingResponse:
    """The mapped address of a binding success response.

    With `txid`, a response to another transaction is refused. XOR-MAPPED-ADDRESS wins
    over MAPPED-ADDRESS when both are present.
    """
    kind, _length, got = _header(data)
    if txid is not None and got != txid:
        raise StunParseError(
            f"transaction id {got.hex()} does not match the request's {txid.hex()}"
        )
    attributes = _attributes(data)
    if kind == BINDING_ERROR:
        raise StunParseError(f"the server answered a binding error{_error_text(attributes)}")
    if kind != BINDING_SUCCESS:
        raise StunParseError(f"message type 0x{kind:04x} is not a binding success (0x0101)")
    for attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
        if attr_type in attributes:
            ip, port = _address(attributes[attr_type], got, xor=True)
            return BindingResponse(got, ip, port, xor=True)
    if ATTR_MAPPED_ADDRESS in attributes:
        ip, port = _address(attributes[ATTR_MAPPED_ADDRESS], got, xor=False)
        return BindingResponse(got, ip, port, xor=False)
    raise StunParseError("the binding response carries no (XOR-)MAPPED-ADDRESS")


def _header(data: bytes) -> tuple[int, int, bytes]:
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
    if HEADER_LEN + length != len(data):
        raise StunParseError(
            f"the header announces a {length}-byte body, but {len(data) - HEADER_LEN} "
            "bytes follow it"
        )
    return kind, length, txid


def _attributes(data: bytes) -> dict[int, bytes]:
    """Attribute type to value; the first of a repeated type counts, as RFC 5389 says."""
    found: dict[int, bytes] = {}
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
        found.setdefault(attr_type, bytes(data[start:end]))
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
