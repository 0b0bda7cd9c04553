"""DERP frames: round trips, the handshake boxes, and hostile bytes that must only ever raise
DerpProtocolError."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_box_open
from nacl.public import Box, PrivateKey, PublicKey

from deployhealth.wire import derp
from deployhealth.wire.derp import (
    MAGIC,
    MAX_FRAME_LEN,
    MAX_PACKET_SIZE,
    DerpProtocolError,
    Frame,
    FrameReader,
    FrameType,
    decode_frame,
    encode_frame,
    parse_frame,
)

# Every decoder is fed hostile input; none may take long over one example.
FUZZ = settings(
    max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow]
)

CLIENT = PrivateKey(bytes(range(1, 33)))
SERVER = PrivateKey(bytes(range(101, 133)))
SERVER_KEY = bytes(SERVER.public_key)
CLIENT_KEY = bytes(CLIENT.public_key)


# --- known bytes -------------------------------------------------------------------------


def test_frame_header_is_type_then_big_endian_length():
    assert encode_frame(0x04, b"abc") == b"\x04\x00\x00\x00\x03abc"
    assert encode_frame(FrameType.KEEP_ALIVE) == b"\x06\x00\x00\x00\x00"


def test_server_key_magic_is_derp_and_the_key_emoji():
    assert b"DERP" + "🔑".encode() == MAGIC
    assert MAGIC.hex() == "44455250f09f9491"
    frame = derp.ServerKey(SERVER_KEY).encode()
    assert frame[:5] == b"\x01\x00\x00\x00\x28"  # 40 bytes: magic and key
    assert frame[5:13] == MAGIC and frame[13:] == SERVER_KEY


def test_server_key_with_wrong_magic_is_refused_with_a_clear_message():
    payload = b"HTTP/1.1" + SERVER_KEY
    with pytest.raises(DerpProtocolError, match="magic"):
        derp.parse_server_key(payload)
    with pytest.raises(DerpProtocolError, match="shorter"):
        derp.parse_server_key(MAGIC + SERVER_KEY[:10])


def test_server_key_may_carry_extra_bytes_after_the_key():
    assert derp.parse_server_key(MAGIC + SERVER_KEY + b"later").key == SERVER_KEY


def test_client_info_is_key_nonce_and_a_box_libsodium_opens_for_the_server():
    nonce = bytes(range(24))
    frame = derp.build_client_info(CLIENT, SERVER_KEY, nonce=nonce).encode()
    (message, used) = parse_frame(frame)
    assert used == len(frame) and message is not None
    assert message.type == FrameType.CLIENT_INFO
    payload = message.payload
    assert payload[:32] == CLIENT_KEY
    assert payload[32:56] == nonce
    # Opened here with libsodium directly, not with the module under test.
    body = crypto_box_open(payload[56:], nonce, CLIENT_KEY, bytes(SERVER))
    assert json.loads(body) == {"version": 2, "CanAckPings": True}


def test_server_info_opens_with_the_client_key_and_refuses_others():
    sealed = derp.build_server_info(SERVER, CLIENT_KEY, {"version": 2, "TokenBucketBytesBurst": 9})
    decoded = decode_frame(parse_frame(sealed.encode())[0])
    assert isinstance(decoded, derp.ServerInfo)
    assert derp.open_server_info(decoded, CLIENT, SERVER_KEY) == {
        "version": 2, "TokenBucketBytesBurst": 9
    }
    stranger = PrivateKey.generate()
    with pytest.raises(DerpProtocolError, match="does not open"):
        derp.open_server_info(decoded, stranger, SERVER_KEY)


def test_client_info_round_trip_through_the_server_side():
    info = derp.build_client_info(CLIENT, SERVER_KEY, derp.client_info_json(is_prober=True))
    decoded = decode_frame(parse_frame(info.encode())[0])
    assert isinstance(decoded, derp.ClientInfo) and decoded.key == CLIENT_KEY
    assert derp.open_client_info(decoded, SERVER) == {
        "version": 2, "CanAckPings": True, "IsProber": True
    }


def test_sealed_json_that_is_not_an_object_is_refused():
    sealed = derp.build_server_info(SERVER, CLIENT_KEY, info=None)
    box = Box(SERVER, PublicKey(CLIENT_KEY))
    not_object = derp.ServerInfo(bytes(box.encrypt(b"[1, 2]")))
    with pytest.raises(DerpProtocolError, match="not an object"):
        derp.open_server_info(not_object, CLIENT, SERVER_KEY)
    broken = derp.ServerInfo(bytes(box.encrypt(b"{not json")))
    with pytest.raises(DerpProtocolError, match="does not parse"):
        derp.open_server_info(broken, CLIENT, SERVER_KEY)
    assert derp.open_server_info(sealed, CLIENT, SERVER_KEY) == {"version": 2}


def test_an_all_zero_peer_key_is_a_protocol_error_not_a_library_error():
    with pytest.raises(DerpProtocolError, match="not a usable"):
        derp.build_client_info(CLIENT, bytes(32))


def test_messages_round_trip():
    key = bytes(range(32))
    messages = [
        derp.SendPacket(key, b"\x00"),
        derp.RecvPacket(key, b"hello"),
        derp.KeepAlive(),
        derp.NotePreferred(True),
        derp.PeerGone(key, derp.PeerGoneReason.NOT_HERE),
        derp.PeerPresent(key, b"\x01\x02"),
        derp.Ping(b"12345678"),
        derp.Pong(b"87654321"),
        derp.Health("region is degraded"),
        derp.Restarting(1500, 30000),
        derp.ServerKey(SERVER_KEY),
    ]
    for message in messages:
        frame, used = parse_frame(message.encode())
        assert frame is not None and used == len(message.encode())
        assert decode_frame(frame) == message


def test_peer_gone_without_a_reason_byte_means_disconnected():
    frame = Frame(FrameType.PEER_GONE, bytes(32))
    assert decode_frame(frame) == derp.PeerGone(bytes(32), derp.PeerGoneReason.DISCONNECTED)


def test_packets_are_limited_to_64_kib():
    key = bytes(32)
    assert decode_frame(Frame(FrameType.RECV_PACKET, key + bytes(MAX_PACKET_SIZE))) is not None
    with pytest.raises(DerpProtocolError, match="limit"):
        decode_frame(Frame(FrameType.RECV_PACKET, key + bytes(MAX_PACKET_SIZE + 1)))
    with pytest.raises(DerpProtocolError, match="limit"):
        derp.SendPacket(key, bytes(MAX_PACKET_SIZE + 1)).encode()


def test_short_frames_name_the_frame():
    with pytest.raises(DerpProtocolError, match="RecvPacket"):
        decode_frame(Frame(FrameType.RECV_PACKET, bytes(31)))
    with pytest.raises(DerpProtocolError, match="Ping"):
        decode_frame(Frame(FrameType.PING, bytes(7)))
    with pytest.raises(DerpProtocolError, match="Restarting"):
        decode_frame(Frame(FrameType.RESTARTING, bytes(4)))


def test_unknown_frame_types_are_skipped_by_length():
    stream = (
        derp.KeepAlive().encode()
        + encode_frame(0x7E, b"from a newer server")
        + derp.Ping(b"abcdefgh").encode()
    )
    reader = FrameReader()
    reader.feed(stream)
    decoded = [decode_frame(f) for f in reader.frames()]
    assert decoded == [derp.KeepAlive(), None, derp.Ping(b"abcdefgh")]
    assert reader.pending == 0


def test_reader_waits_for_the_rest_of_a_frame():
    frame = derp.RecvPacket(bytes(32), b"xyz").encode()
    reader = FrameReader()
    for byte in frame[:-1]:
        reader.feed(bytes([byte]))
        assert reader.next_frame() is None
    reader.feed(frame[-1:])
    got = reader.next_frame()
    assert got is not None and decode_frame(got) == derp.RecvPacket(bytes(32), b"xyz")


def test_an_oversized_length_fails_at_once_instead_of_waiting():
    header = struct.pack(">BI", FrameType.RECV_PACKET, MAX_FRAME_LEN + 1)
    with pytest.raises(DerpProtocolError, match="limit"):
        parse_frame(header)
    # HTTP text read as frames announces an absurd length: caught from the header alone.
    with pytest.raises(DerpProtocolError):
        parse_frame(b"HTTP/1.1 200 OK\r\n")


# --- properties ----------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
valid_messages = st.one_of(
    st.builds(derp.SendPacket, keys, st.binary(max_size=300)),
    st.builds(derp.RecvPacket, keys, st.binary(max_size=300)),
    st.just(derp.KeepAlive()),
    st.builds(derp.NotePreferred, st.booleans()),
    st.builds(derp.PeerGone, keys, st.integers(0, 255)),
    st.builds(derp.PeerPresent, keys, st.binary(max_size=20)),
    st.builds(derp.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(derp.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(derp.Health, st.text(max_size=50)),
    st.builds(derp.Restarting, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(derp.ServerKey, keys),
)


@FUZZ
@given(valid_messages, st.data())
def test_any_valid_message_round_trips_however_the_stream_is_split(message, data):
    wire = message.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    reader = FrameReader()
    frames = []
    last = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[last:cut])
        last = cut
        frames.extend(reader.frames())
    assert [decode_frame(f) for f in frames] == [message]


def _decode_everything(stream: bytes, chunk: int) -> None:
    """What a client does with bytes off the wire: frames, then messages, then boxes."""
    reader = FrameReader()
    for start in range(0, len(stream), chunk):
        reader.feed(stream[start : start + chunk])
        for frame in reader.frames():
            message = decode_frame(frame)
            if isinstance(message, derp.ServerInfo):
                derp.open_server_info(message, CLIENT, SERVER_KEY)
            if isinstance(message, derp.ClientInfo):
                derp.open_client_info(message, SERVER)


@FUZZ
@given(st.binary(max_size=2048), st.integers(1, 64))
def test_random_bytes_only_ever_raise_derp_protocol_error(stream, chunk):
    try:
        _decode_everything(stream, chunk)
    except DerpProtocolError as exc:
        assert str(exc)


def _valid_stream(messages: list[derp.Message]) -> bytes:
    return b"".join(
        [
            derp.ServerKey(SERVER_KEY).encode(),
            derp.build_server_info(SERVER, CLIENT_KEY).encode(),
            derp.build_client_info(CLIENT, SERVER_KEY).encode(),
            *(m.encode() for m in messages),
        ]
    )


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("extend"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 10_000), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("type"), st.integers(0, 10_000), st.integers(0, 255)),
)


def _mutate(stream: bytes, how: tuple[str, int, int], extra: bytes) -> bytes:
    kind, where, value = how
    data = bytearray(stream)
    at = where % max(1, len(data))
    if kind == "flip" and data:
        data[at] ^= value
    elif kind == "truncate":
        del data[at:]
    elif kind == "flip":
        pass
    elif kind == "extend":
        data[at:at] = extra
    else:
        # Find the frame header at or before `at` and rewrite its type or length field.
        if len(data) < 5:
            return bytes(data)
        pos = 0
        while True:
            length = struct.unpack_from(">I", data, pos + 1)[0]
            following = pos + 5 + length
            if following + 5 > len(data) or following > at:
                break
            pos = following
        if kind == "length":
            struct.pack_into(">I", data, pos + 1, value)
        else:
            data[pos] = value
    return bytes(data)


@FUZZ
@given(
    st.lists(valid_messages, max_size=5),
    st.lists(mutation, min_size=1, max_size=4),
    st.binary(max_size=64),
    st.integers(1, 97),
)
def test_mutated_valid_streams_only_ever_raise_derp_protocol_error(messages, hows, extra, chunk):
    stream = _valid_stream(messages)
    for how in hows:
        stream = _mutate(stream, how, extra)
    try:
        _decode_everything(stream, chunk)
    except DerpProtocolError as exc:
        assert str(exc)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=600))
def test_decoding_any_frame_gives_a_message_none_or_a_protocol_error(frame_type, payload):
    try:
        decoded = decode_frame(Frame(frame_type, payload))
    except DerpProtocolError:
        return
    known = frame_type in {t.value for t in FrameType}
    assert (decoded is None) == (not known)


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=40))
def test_opening_random_boxes_only_raises_protocol_error(sealed, key):
    for attempt in (
        lambda: derp.open_server_info(derp.ServerInfo(sealed), CLIENT, key),
        lambda: derp.open_client_info(derp.ClientInfo(key, sealed), SERVER),
        lambda: derp.parse_server_key(sealed),
    ):
        with contextlib.suppress(DerpProtocolError):
            attempt()
