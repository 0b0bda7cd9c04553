"""STUN binding messages: RFC 5769's and Tailscale's test vectors, requests as Tailscale's
server wants them, round trips, and hostile datagrams that must only ever raise
StunParseError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployhealth.wire import stun
from deployhealth.wire.stun import StunParseError

FUZZ = settings(
    max_examples=500, deadline=1000, suppress_health_check=[HealthCheck.too_slow]
)

# RFC 5769 section 2.2, "Sample IPv4 Response": mapped address 192.0.2.1:32853, then
# MESSAGE-INTEGRITY and a FINGERPRINT over all of it.
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
# RFC 5769 section 2.1, "Sample Request": SOFTWARE "STUN test client", PRIORITY,
# ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY and a right FINGERPRINT. A valid RFC 5389
# request that Tailscale's STUN server drops: its SOFTWARE is not "tailnode".
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
# Tailscale's net/stun/stun_test.go, "in-process pion server": SOFTWARE "endpointer",
# XOR-MAPPED-ADDRESS 127.0.0.1:61300, FINGERPRINT, and 8 bytes past the announced body.
PION_TXID = bytes.fromhex("ebc2d36ef471217c4f3e308e")
PION_RESPONSE = bytes.fromhex(
    "010100242112a442ebc2d36ef471217c4f3e308e"
    "8022000a656e64706f696e7465720000"
    "002000080001ce665e12a443"
    "80280004b699bb02"
    "010100242112a442"
)
# A binding request as Tailscale's client (net/stun.Request) builds it for the transaction
# id 00 01 .. 0b: a header announcing 20 bytes, SOFTWARE "tailnode", FINGERPRINT.
TAILSCALE_TXID = bytes(range(12))
TAILSCALE_REQUEST = bytes.fromhex(
    "000100142112a442000102030405060708090a0b"
    "802200087461696c6e6f6465"
    "802800048aabad90"
)
# RFC 5769 section 2.3, "Sample IPv6 Response": [2001:db8:1234:5678:11:2233:4455:6677]:32853.
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a147"
    "0113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014bd03f60d27d3dd8c0a2b6e0d0fa9ba14b3b43d6e"
    "80280004c8fb0b4c"
)


def test_rfc5769_ipv4_response():
    response = stun.parse_binding_response(RFC5769_IPV4_RESPONSE, RFC5769_TXID)
    assert (response.ip, response.port) == ("192.0.2.1", 32853)
    assert response.xor and response.address == "192.0.2.1:32853"
    assert response.fingerprint_ok is True


def test_rfc5769_ipv6_response():
    response = stun.parse_binding_response(RFC5769_IPV6_RESPONSE, RFC5769_TXID)
    assert (response.ip, response.port) == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert response.address == "[2001:db8:1234:5678:11:2233:4455:6677]:32853"


def test_pion_response_with_fingerprint_and_trailing_bytes():
    response = stun.parse_binding_response(PION_RESPONSE, PION_TXID)
    assert response.address == "127.0.0.1:61300" and response.fingerprint_ok is True


def test_binding_request_is_byte_for_byte_tailscales():
    assert stun.binding_request(TAILSCALE_TXID) == (TAILSCALE_TXID, TAILSCALE_REQUEST)
    txid, request = stun.binding_request()
    assert len(txid) == 12 and len(request) == 40
    # Header: binding request, a 20-byte body (SOFTWARE 12 + FINGERPRINT 8), the cookie.
    assert request[:8] == bytes.fromhex("000100142112a442")
    assert request[8:20] == txid
    assert request[20:32] == b"\x80\x22\x00\x08tailnode"
    assert request[32:36] == bytes.fromhex("80280004")
    assert stun.parse_binding_request(request) == txid
    assert stun.binding_request()[0] != txid  # random per request


def test_bare_request_is_what_tailscale_drops():
    _txid, bare = stun.bare_binding_request(TAILSCALE_TXID)
    assert bare == TAILSCALE_REQUEST[:2] + b"\0\0" + TAILSCALE_REQUEST[4:20]
    with pytest.raises(StunParseError, match=r'no SOFTWARE attribute.*"tailnode"'):
        stun.parse_binding_request(bare)


def _request(*attributes: tuple[int, bytes], fingerprint: bool = True) -> bytes:
    """A binding request with these attributes, then (by default) a right FINGERPRINT."""
    body = b"".join(
        struct.pack(">HH", t, len(v)) + v + b"\0" * (-len(v) % 4) for t, v in attributes
    )
    length = len(body) + (8 if fingerprint else 0)
    message = struct.pack(">HHI12s", 0x0001, length, stun.MAGIC_COOKIE, TAILSCALE_TXID) + body
    if fingerprint:
        message += struct.pack(">HHI", stun.ATTR_FINGERPRINT, 4, stun.fingerprint(message))
    return message


def test_requests_tailscale_drops_say_why():
    software = (stun.ATTR_SOFTWARE, b"tailnode")
    # A right FINGERPRINT, but not Tailscale's client.
    with pytest.raises(StunParseError, match="'STUN test client', not \"tailnode\""):
        stun.parse_binding_request(RFC5769_REQUEST)
    with pytest.raises(StunParseError, match="does not end in FINGERPRINT"):
        stun.parse_binding_request(_request(software, fingerprint=False))
    # FINGERPRINT present but not last.
    fingerprinted = _request(software)
    moved = _request((stun.ATTR_FINGERPRINT, fingerprinted[-4:]), software, fingerprint=False)
    with pytest.raises(StunParseError, match="last attribute is 0x8022"):
        stun.parse_binding_request(moved)
    wrong = bytearray(TAILSCALE_REQUEST)
    wrong[-1] ^= 0x01
    with pytest.raises(StunParseError, match="FINGERPRINT 0x8aabad91 does not match"):
        stun.parse_binding_request(bytes(wrong))
    # A CRC without the XOR is not a STUN fingerprint.
    raw_crc = TAILSCALE_REQUEST[:-4] + struct.pack(
        ">I", stun.fingerprint(TAILSCALE_REQUEST[:-8]) ^ stun.FINGERPRINT_XOR
    )
    with pytest.raises(StunParseError, match="does not match"):
        stun.parse_binding_request(raw_crc)
    short = _request(software, (stun.ATTR_FINGERPRINT, b"\0\0"), fingerprint=False)
    with pytest.raises(StunParseError, match="FINGERPRINT is 2 bytes"):
        stun.parse_binding_request(short)


def test_requests_tailscale_accepts():
    # Other attributes before SOFTWARE are fine, and so is a second SOFTWARE.
    busy = _request(
        (0x8023, b"x"), (stun.ATTR_SOFTWARE, b"other"), (stun.ATTR_SOFTWARE, b"tailnode")
    )
    assert stun.parse_binding_request(busy) == TAILSCALE_TXID
    assert stun.parse_binding_request(TAILSCALE_REQUEST) == TAILSCALE_TXID


def test_response_fingerprint_is_read_never_refused():
    txid = bytes(range(12))
    plain = stun.binding_response(txid, "198.51.100.7", 1234)
    assert stun.parse_binding_response(plain, txid).fingerprint_ok is None
    signed = stun.binding_response(txid, "198.51.100.7", 1234, with_fingerprint=True)
    assert len(signed) == len(plain) + 8 and signed[2:4] == b"\x00\x14"
    assert stun.parse_binding_response(signed, txid).fingerprint_ok is True
    bent = signed[:-1] + bytes([signed[-1] ^ 0xFF])
    response = stun.parse_binding_response(bent, txid)
    assert response.address == "198.51.100.7:1234" and response.fingerprint_ok is False


def test_response_to_another_transaction_is_refused():
    with pytest.raises(StunParseError, match="does not match"):
        stun.parse_binding_response(RFC5769_IPV4_RESPONSE, bytes(12))


def test_legacy_mapped_address_is_a_fallback():
    txid = bytes(range(12))
    legacy = stun.binding_response(txid, "10.1.2.3", 4000, xor=False)
    response = stun.parse_binding_response(legacy, txid)
    assert (response.ip, response.port, response.xor) == ("10.1.2.3", 4000, False)


def test_xor_mapped_address_wins_over_mapped_address():
    txid = bytes(range(12))
    xored = stun.binding_response(txid, "203.0.113.9", 7000)
    legacy = stun.binding_response(txid, "10.0.0.1", 1, xor=False)
    # Legacy attribute first, then the XOR one: the XOR one still wins.
    body = legacy[20:] + xored[20:]
    message = struct.pack(">HHI12s", 0x0101, len(body), stun.MAGIC_COOKIE, txid) + body
    response = stun.parse_binding_response(message, txid)
    assert (response.ip, response.port) == ("203.0.113.9", 7000)


def test_attributes_are_padded_to_four_bytes():
    txid = bytes(12)
    software = struct.pack(">HH", stun.ATTR_SOFTWARE, 5) + b"hello" + b"\0\0\0"
    mapped = stun.binding_response(txid, "198.51.100.7", 1234)[20:]
    body = software + mapped
    message = struct.pack(">HHI12s", 0x0101, len(body), stun.MAGIC_COOKIE, txid) + body
    assert stun.parse_binding_response(message, txid).address == "198.51.100.7:1234"


def test_malformed_responses_say_what_is_wrong():
    txid = bytes(12)
    good = stun.binding_response(txid, "192.0.2.1", 80)
    with pytest.raises(StunParseError, match="shorter"):
        stun.parse_binding_response(good[:10])
    with pytest.raises(StunParseError, match="cookie"):
        stun.parse_binding_response(good[:4] + b"\0\0\0\0" + good[8:])
    with pytest.raises(StunParseError, match="not a binding success"):
        stun.parse_binding_response(stun.binding_request(txid)[1])
    overlong = bytearray(good)
    struct.pack_into(">H", overlong, 22, 12)  # the attribute claims more than the body holds
    with pytest.raises(StunParseError, match="past the end"):
        stun.parse_binding_response(bytes(overlong))
    empty = struct.pack(">HHI12s", 0x0101, 0, stun.MAGIC_COOKIE, txid)
    with pytest.raises(StunParseError, match="no \\(XOR-\\)MAPPED-ADDRESS"):
        stun.parse_binding_response(empty)


def test_error_responses_carry_their_code():
    txid = bytes(12)
    value = b"\0\0\x04\x00" + b"Bad Request"  # class 4, number 0: 400
    padded = value + b"\0" * (-len(value) % 4)
    body = struct.pack(">HH", stun.ATTR_ERROR_CODE, len(value)) + padded
    message = struct.pack(">HHI12s", 0x0111, len(body), stun.MAGIC_COOKIE, txid) + body
    with pytest.raises(StunParseError, match="400 Bad Request"):
        stun.parse_binding_response(message, txid)


# --- properties ----------------------------------------------------------------------------

addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)
)


@FUZZ
@given(
    st.binary(min_size=12, max_size=12), addresses, st.integers(0, 65535), st.booleans(),
    st.booleans(),
)
def test_any_response_round_trips(txid, ip, port, xor, signed):
    data = stun.binding_response(txid, ip, port, xor=xor, with_fingerprint=signed)
    response = stun.parse_binding_response(data, txid)
    assert (response.ip, response.port, response.xor) == (ip, port, xor)
    assert response.fingerprint_ok is (True if signed else None)


@FUZZ
@given(st.binary(min_size=12, max_size=12))
def test_any_request_round_trips(txid):
    assert stun.parse_binding_request(stun.binding_request(txid)[1]) == txid


@FUZZ
@given(st.binary(min_size=12, max_size=12), st.integers(0, 40 * 8 - 1))
def test_every_single_bit_flip_of_a_request_is_refused(txid, bit):
    # CRC-32 catches every one-bit error, and the header's own checks catch the rest.
    data = bytearray(stun.binding_request(txid)[1])
    data[bit // 8] ^= 0x80 >> (bit % 8)
    with pytest.raises(StunParseError):
        stun.parse_binding_request(bytes(data))


def _parse_both(data: bytes) -> None:
    for parse in (stun.parse_binding_response, stun.parse_binding_request):
        try:
            parse(data)
        except StunParseError as exc:
            assert str(exc)


@FUZZ
@given(st.binary(max_size=300))
def test_random_datagrams_only_ever_raise_stun_parse_error(data):
    _parse_both(data)


@FUZZ
@given(
    st.binary(min_size=12, max_size=12),
    addresses,
    st.integers(0, 65535),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "truncate", "extend", "length", "attr-length"]),
            st.integers(0, 1000),
            st.integers(0, 65535),
        ),
        min_size=1,
        max_size=4,
    ),
    st.binary(max_size=40),
)
def test_mutated_messages_only_ever_raise_stun_parse_error(txid, ip, port, hows, extra):
    # Requests and responses, each with and without a FINGERPRINT, mutated the same way.
    for start in (
        stun.binding_response(txid, ip, port),
        stun.binding_response(txid, ip, port, with_fingerprint=True),
        stun.binding_request(txid)[1],
    ):
        _mutate_and_parse(bytearray(start), txid, hows, extra)


def _mutate_and_parse(
    data: bytearray, txid: bytes, hows: list[tuple[str, int, int]], extra: bytes
) -> None:
    for kind, where, value in hows:
        at = where % max(1, len(data))
        if kind == "flip" and data:
            data[at] ^= (value % 255) + 1
        elif kind == "truncate":
            del data[at:]
        elif kind == "extend":
            data[at:at] = extra
        elif kind == "length" and len(data) >= 4:
            struct.pack_into(">H", data, 2, value)
        elif kind == "attr-length" and len(data) >= 24:
            struct.pack_into(">H", data, 22, value)
    _parse_both(bytes(data))
    with contextlib.suppress(StunParseError):
        stun.parse_binding_response(bytes(data), txid)
