"""A WebSocket client whose every read is bounded, in bytes and in time.

Shared by the websocket check and the DERP client's WebSocket fallback. websocket-client
frames the messages, but two of its habits let a hostile peer take the process's memory:

- its opening handshake reads header lines without a limit on their length or number, and
  a refused answer's body whole, whatever its Content-Length;
- its frame reader believes a frame's declared length (up to 2**63) and gathers the bytes
  until they are all there, and it joins continuation frames without a limit either; each
  socket read has a timeout, but a peer that keeps sending never meets it.

So the opening handshake is done here (one GET, a capped head, a capped body), and
`BoundedWebSocket` refuses a frame that announces more than its cap before reading its
payload, gives up on a message whose continuation frames pass the cap, and stops reading at
a point in monotonic time (`until`) however fast the bytes come. A connection that broke a
limit is failed (RFC 6455, 7.1.7): closed at once with 1009, without waiting for an answer.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import websocket
from websocket import ABNF
from websocket._abnf import continuous_frame, frame_buffer

from deployhealth.deadline import Deadline
from deployhealth.net import PhaseError, error_text, phase_timeout

HEAD_CAP = 64 * 1024
BODY_CAP = 4 * 1024
# RFC 6455, 7.4.1: "the endpoint has received a message that is too big for it to process".
STATUS_MESSAGE_TOO_BIG = 1009

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3


class Refused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


class MessageTooLarge(websocket.WebSocketProtocolException):
    """A frame announced, or a message reached, more bytes than the reader's cap."""


class MessageTimeout(websocket.WebSocketTimeoutException):
    """The time given to `until` passed while bytes were still arriving."""


# --- the opening handshake ------------------------------------------------------------


def send_upgrade(
    sock: socket.socket,
    budget: Deadline,
    *,
    path: str,
    authority: str,
    user_agent: str,
    extra: Sequence[str] = (),
) -> str:
    """Write the WebSocket upgrade request for `path`, plus the `extra` header lines.

    Returns the Sec-WebSocket-Key sent, for `check_upgrade`.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {authority}",
        f"User-Agent: {user_agent}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        sock.settimeout(phase_timeout(budget, "sending the upgrade request"))
        sock.sendall(request)
    except TimeoutError:
        raise PhaseError("sending the upgrade request", "stalled", timed_out=True) from None
    except OSError as exc:
        raise PhaseError("sending the upgrade request", error_text(exc)) from None
    return key


def _recv_some(sock: socket.socket, budget: Deadline, phase: str, size: int) -> bytes:
    timeout = phase_timeout(budget, phase)
    try:
        sock.settimeout(timeout)
        return sock.recv(size)
    except TimeoutError:
        raise PhaseError(phase, f"nothing received for {timeout:.1f} s", timed_out=True) from None
    except OSError as exc:
        raise PhaseError(phase, error_text(exc)) from None


def read_head(sock: socket.socket, budget: Deadline) -> tuple[int, str, dict[str, str]]:
    """The status line and headers, read byte by byte up to the blank line, at most HEAD_CAP.

    Never further: the frames right behind a 101 belong to the frame reader.
    """
    phase = "waiting for the handshake response"
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        if len(head) >= HEAD_CAP:
            raise PhaseError(phase, f"the response head is longer than {HEAD_CAP} bytes")
        byte = _recv_some(sock, budget, phase, 1)
        if not byte:
            shown = "before answering" if not head else "in the middle of the response head"
            raise PhaseError(phase, f"the server closed the connection {shown}")
        head += byte
    text = head.decode("latin-1")
    status_line, *header_lines = text.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise PhaseError(phase, f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def read_body(sock: socket.socket, headers: dict[str, str], budget: Deadline) -> str:
    """Up to BODY_CAP bytes of a refused handshake's body; a failure keeps what came."""
    declared = headers.get("content-length", "")
    wanted = min(int(declared), BODY_CAP) if declared.isdigit() else BODY_CAP
    body = bytearray()
    try:
        while len(body) < wanted:
            chunk = _recv_some(sock, budget, "reading the response body", wanted - len(body))
            if not chunk:
                break
            body += chunk
    except PhaseError:
        pass  # the status is the finding; a partial body is still worth keeping
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(bytes(body))
    return body.decode("utf-8", errors="replace")


def _dechunk(data: bytes) -> bytearray:
    out = bytearray()
    while data:
        size_line, sep, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            break
        if not sep or size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def check_upgrade(headers: dict[str, str], key: str, subprotocol: str | None = None) -> None:
    """PhaseError unless a 101's headers accept `key` (and `subprotocol`, when asked for)."""
    phase = "handshake"
    if headers.get("upgrade", "").lower() != "websocket":
        raise PhaseError(phase, "101 without 'Upgrade: websocket'")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if "upgrade" not in tokens:
        raise PhaseError(phase, "101 without 'Connection: Upgrade'")
    expected = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
    if headers.get("sec-websocket-accept", "") != expected:
        raise PhaseError(phase, "101 with a wrong Sec-WebSocket-Accept")
    if subprotocol is not None:
        chosen = headers.get("sec-websocket-protocol", "")
        if chosen.lower() != subprotocol.lower():
            raise PhaseError(
                phase, f"101 with subprotocol {chosen!r} where {subprotocol!r} was asked for"
            )


# --- frames ---------------------------------------------------------------------------


class _CappedFrames(frame_buffer):
    """websocket-client's frame reader, refusing a frame whose declared length is above
    the cap before a byte of its payload is read."""

    def __init__(self, recv_fn: Callable[[int], bytes], max_bytes: int) -> None:
        super().__init__(recv_fn, skip_utf8_validation=False)
        self.max_bytes = max_bytes

    def recv_length(self) -> None:
        super().recv_length()
        declared = self.length
        if declared is not None and declared > self.max_bytes:
            raise MessageTooLarge(
                f"the server sent a frame announcing {declared} bytes, above the "
                f"{self.max_bytes}-byte limit of this client"
            )


class _CappedMessages(continuous_frame):
    """websocket-client's joiner of continuation frames, with a cap on the whole message."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(fire_cont_frame=False, skip_utf8_validation=False)
        self.max_bytes = max_bytes

    def add(self, frame: ABNF) -> None:
        super().add(frame)
        gathered = len(self.cont_data[1]) if self.cont_data else 0
        if gathered > self.max_bytes:
            self.cont_data = None
            self.recving_frames = None
            raise MessageTooLarge(
                f"the server sent a fragmented message of more than {self.max_bytes} bytes "
                "(continuation frames without end), above the limit of this client"
            )


class BoundedWebSocket(websocket.WebSocket):
    """websocket-client's WebSocket over a socket whose handshake is already done, with a
    cap on frames and messages and a hard stop in time for every read."""

    def __init__(self, sock: socket.socket, *, max_message: int) -> None:
        super().__init__(enable_multithread=False)
        self.frame_buffer = _CappedFrames(self._recv, max_message)
        self.cont_frame = _CappedMessages(max_message)
        self.sock = sock
        self.connected = True
        self.failed = False
        self._stop_at: float | None = None

    def until(self, at: float | None) -> None:
        """Stop every read at monotonic time `at` (None: only the socket timeout counts)."""
        self._stop_at = at

    def _recv(self, bufsize: int) -> bytes:
        if self._stop_at is not None and self.sock is not None:
            left = self._stop_at - time.monotonic()
            if left <= 0:
                raise self._timed_out()
            current = self.sock.gettimeout()
            self.sock.settimeout(left if current is None else min(current, left))
        try:
            data: bytes = super()._recv(bufsize)
        except websocket.WebSocketTimeoutException:
            raise self._timed_out() from None
        return data

    def _timed_out(self) -> websocket.WebSocketTimeoutException:
        # Half a frame, or frames of a message without its last: the peer kept sending.
        if (
            self.frame_buffer.header is not None
            or self.frame_buffer.recv_buffer
            or self.cont_frame.cont_data
        ):
            return MessageTimeout("the time ran out with a message still arriving")
        return websocket.WebSocketTimeoutException("timed out")

    def recv_data_frame(self, control_frame: bool = False) -> tuple[int, Any]:
        try:
            result: tuple[int, Any] = super().recv_data_frame(control_frame)
        except MessageTooLarge:
            self.failed = True
            raise
        return result

    def close(
        self,
        status: int = websocket.STATUS_NORMAL,
        reason: str | bytes = b"",
        timeout: float | None = 3,
    ) -> None:
        if not self.failed:
            # Waiting for the server's close frame is bounded like any read: a server that
            # streams instead of answering is not waited for past `timeout`.
            self.until(None if timeout is None else time.monotonic() + timeout)
            super().close(status=status, reason=reason, timeout=timeout)
            return
        # The stream stands in the middle of a frame we will not read: fail the connection.
        try:
            if self.sock is not None:
                self.sock.settimeout(0.2)
                self.send_close(STATUS_MESSAGE_TOO_BIG, b"message too big")
        except (websocket.WebSocketException, OSError):
            pass
        finally:
            self.shutdown()
