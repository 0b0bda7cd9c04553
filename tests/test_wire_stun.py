"""STUN binding messages: RFC 5769's test vector, round trips, and hostile datagrams that must
only ever raise StunParseError."""

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

# RFC 5769 section 2.2, "Sample IPv4 Response": mapped address 192.0.2.1:32853.
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800145d6b90ff7727c3a2f4b7a6a8c4cd5ea63fc83f21"
    "80280004c07d4c96"
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


def test_rfc5769_ipv6_response():
    response = stun.parse_binding_response(RFC5769_IPV6_RESPONSE, RFC5769_TXID)
    assert (response.ip, response.port) == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert response.address == "[2001:db8:1234:5678:11:2233:4455:6677]:32853"


def test_binding_request_header():
    txid, request = stun.binding_request()
    assert len(txid) == 12 and len(request) == 20
    assert request[:8] == bytes.fromhex("000100002112a442")
    assert request[8:] == txid
    assert stun.parse_binding_request(request) == txid
    assert stun.binding_request()[0] != txid  # random per request


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
@given(st.binary(min_size=12, max_size=12), addresses, st.integers(0, 65535), st.booleans())
def test_any_response_round_trips(txid, ip, port, xor):
    response = stun.parse_binding_response(stun.binding_response(txid, ip, port, xor=xor), txid)
    assert (response.ip, response.port, response.xor) == (ip, port, xor)


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
def test_mutated_responses_only_ever_raise_stun_parse_error(txid, ip, port, hows, extra):
    data = bytearray(stun.binding_response(txid, ip, port))
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
