"""DERP frames, as Tailscale's relay speaks them (see shared/spec/protocols.md, "DERP").

A frame is 1 byte of type, a 4-byte big-endian payload length, then the payload. Only the
two handshake blobs (ClientInfo's and ServerInfo's JSON) are sealed with NaCl `crypto_box`;
every other frame is plain.

Everything here is pure: `parse_frame` and `FrameReader` take bytes that arrived so far
and hand back whole frames, `decode_frame` turns a frame into a message, and the `encode`
methods build bytes to send. Malformed input raises `DerpProtocolError` with a message
that says what was wrong, and nothing else escapes, whatever the bytes (the property tests
in tests/test_wire_derp.py hold the module to that).
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP" and the key emoji in UTF-8
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = 5
PROTOCOL_VERSION = 2
MAX_PACKET_SIZE = 64 * 1024
# Tailscale's client refuses frames above 1 MiB. Without a cap, a length field of 4 GiB
# would make a reader wait (and buffer) forever for a frame that never completes.
MAX_FRAME_LEN = 1 << 20

_HEADER = struct.Struct(">BI")
# Poly1305 tag that every sealed box carries after the nonce.
_BOX_OVERHEAD = 16


class DerpProtocolError(ValueError):
    """The bytes are not valid DERP: the message says which frame and what was wrong."""


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0
    NOT_HERE = 1


def frame_name(frame_type: int) -> str:
    try:
        return FrameType(frame_type).name
    except ValueError:
        return f"unknown type 0x{frame_type:02x}"


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_frame(self.type, self.payload)


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    if not 0 <= frame_type <= 0xFF:
        raise DerpProtocolError(f"frame type {frame_type} does not fit in a byte")
    if len(payload) > MAX_FRAME_LEN:
        raise DerpProtocolError(
            f"{frame_name(frame_type)} payload of {len(payload)} bytes exceeds the "
            f"{MAX_FRAME_LEN}-byte frame limit"
        )
    return _HEADER.pack(frame_type, len(payload)) + bytes(payload)


def parse_frame(
    buffer: bytes | bytearray | memoryview, max_frame_len: int = MAX_FRAME_LEN
) -> tuple[Frame | None, int]:
    """The first whole frame in `buffer` and the bytes it took, or (None, 0) if incomplete.

    Raises DerpProtocolError as soon as the header announces a frame above the limit,
    without waiting for its payload.
    """
    # Released on return: FrameReader resizes its bytearray, which an open view forbids.
    with memoryview(buffer) as view:
        if len(view) < HEADER_LEN:
            return None, 0
        frame_type, length = _HEADER.unpack_from(view, 0)
        if length > max_frame_len:
            raise DerpProtocolError(
                f"{frame_name(frame_type)} frame announces {length} bytes, above the "
                f"{max_frame_len}-byte limit: not a DERP stream, or a broken one"
            )
        end = HEADER_LEN + length
        if len(view) < end:
            return None, 0
        return Frame(frame_type, bytes(view[HEADER_LEN:end])), end


class FrameReader:
    """Collects stream bytes as they arrive and hands out whole frames, in order."""

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        self._buffer = bytearray()
        self._max = max_frame_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer)

    def next_frame(self) -> Frame | None:
        frame, used = parse_frame(self._buffer, self._max)
        if frame is not None:
            del self._buffer[:used]
        return frame

    def frames(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerKey:
    key: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.SERVER_KEY, MAGIC + _key(self.key, "server key"))


@dataclass(frozen=True)
class ClientInfo:
    """The client's public key and its sealed JSON (nonce + box), as sent."""

    key: bytes
    sealed: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.CLIENT_INFO, _key(self.key, "client key") + self.sealed)


@dataclass(frozen=True)
class ServerInfo:
    sealed: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.SERVER_INFO, self.sealed)


@dataclass(frozen=True)
class SendPacket:
    destination: bytes
    data: bytes

    def encode(self) -> bytes:
        _packet_size(len(self.data), "SendPacket")
        return encode_frame(
            FrameType.SEND_PACKET, _key(self.destination, "destination key") + self.data
        )


@dataclass(frozen=True)
class RecvPacket:
    source: bytes
    data: bytes

    def encode(self) -> bytes:
        _packet_size(len(self.data), "RecvPacket")
        return encode_frame(FrameType.RECV_PACKET, _key(self.source, "source key") + self.data)


@dataclass(frozen=True)
class KeepAlive:
    def encode(self) -> bytes:
        return encode_frame(FrameType.KEEP_ALIVE)


@dataclass(frozen=True)
class NotePreferred:
    preferred: bool

    def encode(self) -> bytes:
        return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if self.preferred else b"\x00")


@dataclass(frozen=True)
class PeerGone:
    key: bytes
    reason: int = PeerGoneReason.DISCONNECTED

    def encode(self) -> bytes:
        return encode_frame(FrameType.PEER_GONE, _key(self.key, "peer key") + bytes([self.reason]))


@dataclass(frozen=True)
class PeerPresent:
    key: bytes
    extra: bytes = b""  # address and flags, which deployhealth has no use for

    def encode(self) -> bytes:
        return encode_frame(FrameType.PEER_PRESENT, _key(self.key, "peer key") + self.extra)


@dataclass(frozen=True)
class Ping:
    data: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.PING, _ping_data(self.data))


@dataclass(frozen=True)
class Pong:
    data: bytes

    def encode(self) -> bytes:
        return encode_frame(FrameType.PONG, _ping_data(self.data))


@dataclass(frozen=True)
class Health:
    problem: str  # empty clears an earlier problem

    def encode(self) -> bytes:
        return encode_frame(FrameType.HEALTH, self.problem.encode("utf-8"))


@dataclass(frozen=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int

    def encode(self) -> bytes:
        try:
            payload = struct.pack(">II", self.reconnect_in_ms, self.try_for_ms)
        except struct.error:
            raise DerpProtocolError("Restarting times must fit in 32 bits") from None
        return encode_frame(FrameType.RESTARTING, payload)


Message = (
    ServerKey | ClientInfo | ServerInfo | SendPacket | RecvPacket | KeepAlive | NotePreferred
    | PeerGone | PeerPresent | Ping | Pong | Health | Restarting
)


def decode_frame(frame: Frame) -> Message | None:
    """The message a frame carries; None for a type this module does not know (skip it)."""
    payload = frame.payload
    size = len(payload)
    kind = frame.type
    if kind == FrameType.SERVER_KEY:
        return parse_server_key(payload)
    if kind == FrameType.CLIENT_INFO:
        _at_least(size, KEY_LEN + NONCE_LEN + _BOX_OVERHEAD, "ClientInfo")
        return ClientInfo(payload[:KEY_LEN], payload[KEY_LEN:])
    if kind == FrameType.SERVER_INFO:
        _at_least(size, NONCE_LEN + _BOX_OVERHEAD, "ServerInfo")
        return ServerInfo(payload)
    if kind in (FrameType.SEND_PACKET, FrameType.RECV_PACKET):
        name = "SendPacket" if kind == FrameType.SEND_PACKET else "RecvPacket"
        _at_least(size, KEY_LEN, name)
        _packet_size(size - KEY_LEN, name)
        key, data = payload[:KEY_LEN], payload[KEY_LEN:]
        return SendPacket(key, data) if kind == FrameType.SEND_PACKET else RecvPacket(key, data)
    if kind == FrameType.KEEP_ALIVE:
        return KeepAlive()
    if kind == FrameType.NOTE_PREFERRED:
        _at_least(size, 1, "NotePreferred")
        return NotePreferred(payload[0] != 0)
    if kind == FrameType.PEER_GONE:
        _at_least(size, KEY_LEN, "PeerGone")
        # Older servers send the key alone: that means "disconnected".
        reason = payload[KEY_LEN] if size > KEY_LEN else PeerGoneReason.DISCONNECTED
        return PeerGone(payload[:KEY_LEN], reason)
    if kind == FrameType.PEER_PRESENT:
        _at_least(size, KEY_LEN, "PeerPresent")
        return PeerPresent(payload[:KEY_LEN], payload[KEY_LEN:])
    if kind in (FrameType.PING, FrameType.PONG):
        name = "Ping" if kind == FrameType.PING else "Pong"
        _at_least(size, 8, name)
        # Like Tailscale's client: the first 8 bytes count, anything after is ignored.
        return Ping(payload[:8]) if kind == FrameType.PING else Pong(payload[:8])
    if kind == FrameType.HEALTH:
        return Health(payload.decode("utf-8", errors="replace"))
    if kind == FrameType.RESTARTING:
        _at_least(size, 8, "Restarting")
        reconnect, try_for = struct.unpack_from(">II", payload)
        return Restarting(reconnect, try_for)
    return None


def parse_server_key(payload: bytes) -> ServerKey:
    """ServerKey's payload: the magic, then the server's 32-byte public key."""
    if len(payload) < len(MAGIC) + KEY_LEN:
        raise DerpProtocolError(
            f"ServerKey frame is {len(payload)} bytes, shorter than the "
            f"{len(MAGIC) + KEY_LEN} of magic and key"
        )
    if payload[: len(MAGIC)] != MAGIC:
        raise DerpProtocolError(
            f"ServerKey frame does not start with the DERP magic (got "
            f"{payload[: len(MAGIC)].hex()}, expected {MAGIC.hex()}): not a DERP server"
        )
    return ServerKey(payload[len(MAGIC) : len(MAGIC) + KEY_LEN])


# --- the sealed handshake ---------------------------------------------------------------


def client_info_json(*, is_prober: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"version": PROTOCOL_VERSION, "CanAckPings": True}
    if is_prober:
        info["IsProber"] = True
    return info


def build_client_info(
    client_private: PrivateKey,
    server_key: bytes,
    info: dict[str, Any] | None = None,
    nonce: bytes | None = None,
) -> ClientInfo:
    """ClientInfo sealed from the client's private key to the server's public key."""
    body = json.dumps(info if info is not None else client_info_json()).encode()
    sealed = _box(client_private, server_key, "server key").encrypt(body, nonce)
    return ClientInfo(bytes(client_private.public_key), bytes(sealed))


def open_client_info(message: ClientInfo, server_private: PrivateKey) -> dict[str, Any]:
    """The server's side: the client's JSON, opened with the server's private key."""
    return _open(_box(server_private, message.key, "client key"), message.sealed, "ClientInfo")


def build_server_info(
    server_private: PrivateKey,
    client_key: bytes,
    info: dict[str, Any] | None = None,
    nonce: bytes | None = None,
) -> ServerInfo:
    body = json.dumps(info if info is not None else {"version": PROTOCOL_VERSION}).encode()
    return ServerInfo(bytes(_box(server_private, client_key, "client key").encrypt(body, nonce)))


def open_server_info(
    message: ServerInfo, client_private: PrivateKey, server_key: bytes
) -> dict[str, Any]:
    """The client's side: ServerInfo's JSON, opened with the client's private key."""
    return _open(_box(client_private, server_key, "server key"), message.sealed, "ServerInfo")


def _box(private: PrivateKey, peer_key: bytes, what: str) -> Box:
    if len(peer_key) != KEY_LEN:
        raise DerpProtocolError(f"the {what} is {len(peer_key)} bytes, not {KEY_LEN}")
    try:
        return Box(private, PublicKey(bytes(peer_key)))
    except CryptoError:
        # libsodium refuses low-order points (an all-zero key, say): no shared secret.
        raise DerpProtocolError(
            f"the {what} {peer_key.hex()} is not a usable Curve25519 key"
        ) from None


def _open(box: Box, sealed: bytes, name: str) -> dict[str, Any]:
    if len(sealed) < NONCE_LEN + _BOX_OVERHEAD:
        raise DerpProtocolError(f"{name} box is {len(sealed)} bytes, too short for a nonce and tag")
    try:
        body = box.decrypt(bytes(sealed))
    except CryptoError:
        raise DerpProtocolError(
            f"{name} box does not open with the handshake keys: corrupted, or sealed for "
            "another key"
        ) from None
    try:
        info = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DerpProtocolError(f"{name} JSON does not parse: {exc}") from None
    except RecursionError:
        raise DerpProtocolError(f"{name} JSON is nested too deeply") from None
    if not isinstance(info, dict):
        raise DerpProtocolError(f"{name} JSON is a {type(info).__name__}, not an object")
    return info


# --- checks -------------------------------------------------------------------------------


def _key(key: bytes, what: str) -> bytes:
    if len(key) != KEY_LEN:
        raise DerpProtocolError(f"the {what} is {len(key)} bytes, not {KEY_LEN}")
    return bytes(key)


def _ping_data(data: bytes) -> bytes:
    if len(data) != 8:
        raise DerpProtocolError(f"Ping and Pong carry 8 bytes, not {len(data)}")
    return bytes(data)


def _packet_size(size: int, name: str) -> None:
    if size > MAX_PACKET_SIZE:
        raise DerpProtocolError(
            f"{name} carries a {size}-byte packet, above the {MAX_PACKET_SIZE}-byte limit"
        )


def _at_least(size: int, minimum: int, name: str) -> None:
    if size < minimum:
        raise DerpProtocolError(f"{name} frame is {size} bytes, shorter than {minimum}")
