"""Hostile peers' bytes: WebSocket frames and upgrade answers for sim.tcp.ScriptedServer,
and a way to measure what a family run costs in memory and time.

A peer here offers far more than any cap (an endless stream, a length of 2**62); the tests
then show the client's traced memory peak stays far below what it was offered.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3

OPCODE_CONT = 0x0
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2

T = TypeVar("T")


def ws_frame_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """A server's (unmasked) frame header announcing `length` bytes of payload."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes([first, length])
    if length < 1 << 16:
        return bytes([first, 126]) + struct.pack("!H", length)
    return bytes([first, 127]) + struct.pack("!Q", length)


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return ws_frame_header(opcode, len(payload), fin=fin) + payload


def ws_accept(extra: bytes = b"", *, subprotocol: str | None = None) -> Callable[[bytes], bytes]:
    """A `ScriptedServer` reply: a correct 101 for the client's key, then `extra`."""

    def reply(head: bytes) -> bytes:
        match = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)\s*$", head)
        key = match.group(1) if match else b""
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        lines = [
            b"HTTP/1.1 101 Switching Protocols",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Accept: " + accept,
        ]
        if subprotocol:
            lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + extra

    return reply


@dataclass(frozen=True)
class Cost:
    elapsed: float  # seconds
    peak: int  # bytes, tracemalloc's peak during the run


def measured(run: Callable[[], T]) -> tuple[T, Cost]:
    """`run()`'s result, with its wall time and the peak of memory traced while it ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        started = time.monotonic()
        result = run()
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, Cost(elapsed, peak)
