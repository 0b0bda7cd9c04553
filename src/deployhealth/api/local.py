"""The API on one machine: an HTTP server that speaks to the app in Lambda's terms.

Each request becomes an API Gateway HTTP API event (payload format 2.0), built the way API
Gateway builds it, and the app's proxy response is written back. So `deployhealth serve`
runs exactly the code the API function runs, and tests that go through this server test it.

Load balancers probe `/readyz` from several places, over keep-alive connections or a new
connection a probe. One asyncio event loop (one thread) accepts every connection, reads each
request whole and writes each answer; only a complete request reaches a thread, one of at
most MAX_WORKERS that run the app (which may wait on its store). A connection that is idle,
trickles its request or reads its answer slowly costs no thread. Why not a library: see
docs/design.md ("The local server").
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import json
import logging
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

try:
    # libuv's loop: reading, writing and waking the loop from a worker thread in C. The
    # pure-Python loop spends more per request than the app does (docs/design.md).
    from uvloop import new_event_loop
except ImportError:  # installed without the `local` extra: the standard loop also works
    from asyncio import new_event_loop

logger = logging.getLogger(__name__)

App = Callable[[dict[str, Any], Any], dict[str, Any]]

# API Gateway caps payloads at 10 MB; nothing deployhealth accepts is more than a few hundred
# bytes (the settings body), so a small cap keeps a stray upload from tying up memory.
MAX_BODY_BYTES = 64 * 1024
_TEXT_TYPES = ("text/", "application/json", "application/x-www-form-urlencoded")

# A load balancer opens a connection per health check, several balancers at once: the listen
# backlog holds a burst of this many (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 512
# Requests are answered by at most this many threads; more complete requests wait in turn.
MAX_WORKERS = 64
# A connection between requests (or before its first) waits without a thread this long.
IDLE_SECONDS = 30.0
# A request being read, or an answer being written, must progress within this many seconds,
# or the connection is closed: a client that stops half-way costs nothing for longer.
IO_TIMEOUT_SECONDS = 10.0
# Connections waiting for a request, at most; beyond that the longest waiting is closed.
MAX_WAITING = 4096
# http.server's limits, which clients have met so far: a request line of at most 64 KiB
# (else 414), at most 100 header lines (else 431); all header lines together at most 64 KiB.
MAX_REQUEST_LINE_BYTES = 65536
MAX_HEADER_BYTES = 65536
MAX_HEADERS = 100
# After refusing a request that was not read to its end, the rest is read and dropped for at
# most this long before closing: closing with unread input sends a RST, which can destroy
# the refusal on its way to the client.
LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20

@functools.lru_cache(maxsize=4)
def _request_time(second: int) -> str:
    # Formatted once a second rather than on every request.
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))


def build_event(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    source_ip: str,
    protocol: str = "HTTP/1.1",
) -> dict[str, Any]:
    """An HTTP API payload-2.0 event for one request, as API Gateway would send it."""
    if target.startswith("/"):
        # Origin form, as clients send it: urlsplit would read "//readyz" as a host name
        # and "///readyz" as "/readyz"; the path is everything before "?" as sent.
        path, _, raw_query = target.partition("?")
        raw_query = raw_query.partition("#")[0]
    else:
        parts = urlsplit(target)  # absolute form ("http://host/path"), as proxies send it
        path, raw_query = parts.path or "/", parts.query

    # API Gateway lower-cases header names and joins repeated headers with commas; cookies
    # move to their own list.
    joined: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "cookie":
            cookies += [c.strip() for c in value.split(";") if c.strip()]
            continue
        joined[key] = f"{joined[key]},{value}" if key in joined else value

    # Repeated query parameters are joined with commas, values decoded.
    params: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        params[key] = f"{params[key]},{value}" if key in params else value

    # Like API Gateway: text bodies as they are, anything else base64-encoded.
    body_text, encoded = "", False
    if body:
        body_text, encoded = base64.b64encode(body).decode(), True
        if joined.get("content-type", "").startswith(_TEXT_TYPES):
            with contextlib.suppress(UnicodeDecodeError):
                body_text, encoded = body.decode(), False

    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": raw_query,
        "headers": joined,
        "requestContext": {
            "accountId": "local",
            "apiId": "local",
            "domainName": joined.get("host", "localhost"),
            "domainPrefix": joined.get("host", "localhost").split(".")[0],
            "http": {
                "method": method.upper(),
                "path": path,
                "protocol": protocol,
                "sourceIp": source_ip,
                "userAgent": joined.get("user-agent", ""),
            },
            # Unique enough for a request id, and no system call (os.urandom) per request.
            "requestId": f"{random.getrandbits(128):032x}",
            "routeKey": "$default",
            "stage": "$default",
            "time": _request_time(int(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if cookies:
        event["cookies"] = cookies
    if params:
        event["queryStringParameters"] = params
    if body:
        event["body"] = body_text
    return event


def _decode_response(response: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of a proxy response (payload 2.0, or ALB-style headers)."""
    if not isinstance(response, dict):
        raise TypeError("the app returned no response object")
    status = response.get("statusCode")
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"the app returned an invalid status code: {status!r}")
    headers: list[tuple[str, str]] = []
    for name, value in (response.get("headers") or {}).items():
        headers.append((str(name), str(value)))
    for name, values in (response.get("multiValueHeaders") or {}).items():
        headers += [(str(name), str(v)) for v in values]
    headers += [("Set-Cookie", str(c)) for c in response.get("cookies") or []]
    body = response.get("body") or ""
    payload = base64.b64decode(body) if response.get("isBase64Encoded") else str(body).encode()
    return status, headers, payload


# RFC 9110 token: what a method and a header name are made of.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/(\d{1,10})\.(\d{1,10})")
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_HOP_BY_HOP = frozenset({"content-length", "connection", "transfer-encoding"})


@dataclass
class _Request:
    """One request, read whole: what the app is asked."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    source_ip: str
    keep_alive: bool


class _Refusal(Exception):
    """A request the HTTP layer answers itself, with the API's JSON error shape."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class _Head:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    length: int
    keep_alive: bool
    expects_continue: bool


def _parse_head(head: bytes) -> _Head:
    """The request line and headers (without the blank line); raises _Refusal."""
    lines = head.split(b"\n")
    words = lines[0].rstrip(b"\r").split()
    if len(words) != 3:
        raise _Refusal(400, "The request line is not METHOD TARGET HTTP/VERSION.")
    method_b, target_b, version_b = words
    version = version_b.decode("latin-1")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise _Refusal(400, "The request names no valid HTTP version.")
    major, minor = int(match[1]), int(match[2])
    if major >= 2:
        raise _Refusal(505, f"HTTP/{major}.{minor} is not served; HTTP/1.1 is.")
    if major < 1:
        raise _Refusal(400, "HTTP/0.x is not served; HTTP/1.1 is.")
    if _TOKEN.fullmatch(method_b) is None:
        raise _Refusal(400, "The request method is not a token.")
    if len(lines) - 1 > MAX_HEADERS:
        raise _Refusal(431, f"More than {MAX_HEADERS} header lines.")
    headers: list[tuple[str, str]] = []
    length: int | None = None
    connection: list[str] = []
    expects_continue = False
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        name_b, colon, value_b = line.partition(b":")
        # No folded lines and no space before the colon (RFC 9112 5.1, 5.2): a header that
        # two parsers would read differently is refused.
        if not colon or _TOKEN.fullmatch(name_b) is None:
            raise _Refusal(400, "A header line is not NAME: VALUE.")
        name = name_b.decode("latin-1")
        value = value_b.strip(b" \t").decode("latin-1")
        key = name.lower()
        if key == "content-length":
            # Digits only; repeated, the same. A conflict could let a request be smuggled.
            if not value.isdigit() or not value.isascii() or (
                length is not None and int(value[:12]) != length
            ):
                raise _Refusal(400, "The Content-Length header is not a valid length.")
            # More than 12 digits is more than MAX_BODY_BYTES, however many there are.
            length = int(value) if len(value) <= 12 else MAX_BODY_BYTES + 1
        elif key == "transfer-encoding":
            raise _Refusal(411, "A Content-Length header is required.")
        elif key == "connection":
            connection += [t.strip().lower() for t in value.split(",")]
        elif key == "expect" and value.lower() == "100-continue":
            expects_continue = True
        headers.append((name, value))
    length = length or 0
    if length > MAX_BODY_BYTES:
        raise _Refusal(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    if minor >= 1:
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection and "close" not in connection
    target = target_b.decode("latin-1")
    if target.startswith("//"):
        # As http.server does since CPython's fix for open redirects (gh-87389): "//readyz"
        # is /readyz.
        target = "/" + target.lstrip("/")
    return _Head(
        method=method_b.decode("latin-1"),
        target=target,
        version=f"HTTP/{major}.{minor}",
        headers=headers,
        length=length,
        keep_alive=keep_alive,
        expects_continue=expects_continue and minor >= 1,
    )


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _response_bytes(
    status: int, headers: list[tuple[str, str]], payload: bytes, *, head: bool, keep_alive: bool,
    http10_keep_alive: bool = False,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, '')}", f"Date: {_http_date()}"]
    lines += [f"{n}: {v}" for n, v in headers if n.lower() not in _HOP_BY_HOP]
    lines.append(f"Content-Length: {len(payload)}")
    if not keep_alive:
        lines.append("Connection: close")
    elif http10_keep_alive:
        lines.append("Connection: keep-alive")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data if head else data + payload


def _json_error(status: int, message: str, detail: str = "") -> bytes:
    return json.dumps({"message": message, "detail": detail}).encode()


def _answer(app: App, request: _Request) -> tuple[bytes, bool]:
    """Run the app for one request (on a worker thread): the answer's bytes, keep-alive."""
    head = request.method.upper() == "HEAD"
    keep_alive = request.keep_alive
    http10 = request.version == "HTTP/1.0"
    try:
        event = build_event(
            request.method, request.target, request.headers, request.body,
            request.source_ip, request.version,
        )
        status, headers, payload = _decode_response(app(event, None))
        return _response_bytes(
            status, headers, payload, head=head, keep_alive=keep_alive,
            http10_keep_alive=http10,
        ), keep_alive
    except Exception as exc:
        # The app never raises; this guards against a broken one, answering 500 (not a
        # dropped connection, which a proxy in front would turn into 502).
        logger.exception("the app failed")
        body = _json_error(500, "Internal error.", type(exc).__name__)
        json_type = [("Content-Type", "application/json")]
        return _response_bytes(
            500, json_type, body, head=head, keep_alive=keep_alive, http10_keep_alive=http10
        ), keep_alive


class _Connection(asyncio.Protocol):
    """One client connection: reads requests whole, one at a time, and writes their answers.

    Runs on the event loop; only `_answer` runs on a worker thread. While a request is with
    the app, reading pauses, so pipelined requests are answered in order and a client cannot
    pile up work. `deadline` is when the sweep closes the connection unless it progressed.
    """

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.peer = ""
        self.busy = False  # a request is with the app
        self.eof = False  # the client will send nothing more
        self.lingering = False  # refused: reading only to drop the rest, then closing
        self.dropped = 0
        self.write_paused = False
        self.read_paused = False
        self.continued = False  # "100 Continue" sent for the request being read
        self.deadline: float | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "127.0.0.1"
        self.deadline = time.monotonic() + IDLE_SECONDS
        self.server.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.lost(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.dropped += len(data)
            if self.dropped > _LINGER_BYTES:
                self._close()
            return
        self.buf += data
        if self.busy:
            # A client sending more while its request is with the app: past a bound, stop
            # reading until the answer is out (pipelined requests are answered in order).
            if len(self.buf) > MAX_REQUEST_LINE_BYTES + MAX_HEADER_BYTES + MAX_BODY_BYTES:
                self.read_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
        else:
            self.deadline = time.monotonic() + IO_TIMEOUT_SECONDS
            self._advance()

    def eof_received(self) -> bool:
        self.eof = True
        if self.lingering:
            self._close()
        elif not self.busy:
            self._advance()
        return True  # keep the transport open to write the answers still owed

    def pause_writing(self) -> None:
        self.write_paused = True
        self.deadline = time.monotonic() + IO_TIMEOUT_SECONDS

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.busy and not self.lingering:
            self.deadline = time.monotonic() + (IO_TIMEOUT_SECONDS if self.buf else IDLE_SECONDS)
            self._advance()

    # --- requests ---

    @property
    def waiting(self) -> bool:
        """Between requests: nothing of one read, none with the app."""
        return not self.busy and not self.buf and not self.lingering

    def _advance(self) -> None:
        """Take the next whole request from the buffer, if there is one, to a worker."""
        if self.transport is None or self.write_paused:
            return
        # Blank lines before a request line are allowed (RFC 9112 2.2).
        while self.buf[:2] == b"\r\n":
            del self.buf[:2]
        while self.buf[:1] == b"\n":
            del self.buf[:1]
        if not self.buf:
            if self.eof:
                self._close()
            else:
                self.deadline = time.monotonic() + IDLE_SECONDS
            return
        try:
            request = self._take_request()
        except _Refusal as refusal:
            self._refuse(refusal)
            return
        if request is None:
            if self.eof:
                # The client stopped sending half-way through a request: nothing to answer.
                self._close()
            return
        self.busy = True
        self.deadline = None
        self.server.workers.submit(self, request)

    def _take_request(self) -> _Request | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        lf_end = buf.find(b"\n\n", 0, end if end >= 0 else len(buf))
        if lf_end >= 0:
            head_end, body_start = lf_end, lf_end + 2
        elif end >= 0:
            head_end, body_start = end, end + 4
        else:
            line_end = buf.find(b"\n")
            if (line_end < 0 and len(buf) > MAX_REQUEST_LINE_BYTES) or (
                line_end > MAX_REQUEST_LINE_BYTES
            ):
                raise _Refusal(414, f"The request line is longer than {MAX_REQUEST_LINE_BYTES}"
                               " bytes.")
            if line_end >= 0 and len(buf) - line_end > MAX_HEADER_BYTES:
                raise _Refusal(431, f"The headers are longer than {MAX_HEADER_BYTES} bytes.")
            return None
        line_end = buf.find(b"\n", 0, head_end)
        line_end = head_end if line_end < 0 else line_end  # no headers: all is request line
        if line_end > MAX_REQUEST_LINE_BYTES:
            raise _Refusal(414, f"The request line is longer than {MAX_REQUEST_LINE_BYTES}"
                           " bytes.")
        if head_end - line_end > MAX_HEADER_BYTES:
            raise _Refusal(431, f"The headers are longer than {MAX_HEADER_BYTES} bytes.")
        head = _parse_head(bytes(buf[:head_end]))
        if len(buf) < body_start + head.length:
            if head.expects_continue and not self.continued and self.transport is not None:
                self.continued = True
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(buf[body_start : body_start + head.length])
        del buf[: body_start + head.length]
        self.continued = False
        return _Request(
            head.method, head.target, head.version, head.headers, body, self.peer,
            head.keep_alive and not self.eof,
        )

    def answered(self, data: bytes, keep_alive: bool) -> None:
        """On the loop: the app's answer to this connection's request."""
        self.busy = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if not keep_alive:
            self._finish()
            return
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        self.deadline = time.monotonic() + (IO_TIMEOUT_SECONDS if self.buf else IDLE_SECONDS)
        self._advance()

    def _refuse(self, refusal: _Refusal) -> None:
        phrase = _PHRASES.get(refusal.status, "Error")
        body = _json_error(refusal.status, f"{phrase}.", refusal.detail)
        if self.transport is not None:
            self.transport.write(_response_bytes(
                refusal.status, [("Content-Type", "application/json")], body,
                head=False, keep_alive=False,
            ))
        self.buf.clear()
        self._finish(unread=True)

    def _finish(self, *, unread: bool = False) -> None:
        """Close after the last answer; first drop what the client still sends, if any."""
        transport = self.transport
        if transport is None:
            return
        if not unread and not self.buf:
            transport.close()  # flushes the answer first
            return
        self.lingering = True
        self.buf.clear()
        self.deadline = time.monotonic() + LINGER_SECONDS
        if transport.can_write_eof():
            transport.write_eof()
        if self.eof:
            transport.close()
        else:
            transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def expire(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and self.transport is not None:
            # Nothing to flush that the client is reading: abort, not a polite close.
            self.transport.abort()


class _Workers:
    """At most MAX_WORKERS threads that run the app for whole requests, started as needed.

    Leaner than run_in_executor, whose futures and callbacks cost more Python per request
    than the HTTP layer itself: a request goes out through a queue, and answers come back
    in a list that the loop empties, woken once for all that finished meanwhile.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, app: App) -> None:
        self.loop = loop
        self.app = app
        self._jobs: queue.SimpleQueue[tuple[_Connection, _Request] | None] = queue.SimpleQueue()
        self._answers: collections.deque[tuple[_Connection, bytes, bool]] = collections.deque()
        self._wake_pending = False
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._unclaimed = 0

    def submit(self, conn: _Connection, request: _Request) -> None:
        with self._lock:
            # A new thread only when the requests not yet taken outnumber the idle threads.
            self._unclaimed += 1
            if self._unclaimed > self._idle and len(self._threads) < MAX_WORKERS:
                thread = threading.Thread(
                    target=self._work, name=f"api-worker-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put((conn, request))

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._unclaimed -= 1
            if job is None:
                return
            conn, request = job
            data, keep_alive = _answer(self.app, request)
            self._answers.append((conn, data, keep_alive))
            # One wake-up of the loop carries every answer that finished before it ran.
            with self._lock:
                wake, self._wake_pending = not self._wake_pending, True
            if wake:
                with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                    self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            self._wake_pending = False
        while self._answers:
            conn, data, keep_alive = self._answers.popleft()
            conn.answered(data, keep_alive)

    def close(self) -> None:
        """Let every thread end once it has finished its request (none is waited for)."""
        for _ in self._threads:
            self._jobs.put(None)


class _Server:
    """The event loop, its listening socket, the worker threads and the open connections."""

    def __init__(self, sock: socket.socket, app: App) -> None:
        self.app = app
        self.loop = new_event_loop()
        self.loop.set_exception_handler(_quiet_os_errors)
        self.workers = _Workers(self.loop, app)
        # Insertion order: the longest open first, for closing the oldest waiting one.
        self.connections: dict[_Connection, None] = {}
        self.listener = self.loop.run_until_complete(
            self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=LISTEN_BACKLOG)
        )
        self._sweeper: asyncio.TimerHandle | None = self.loop.call_soon(self._sweep)

    def opened(self, conn: _Connection) -> None:
        self.connections[conn] = None
        if len(self.connections) > MAX_WAITING:
            oldest = next((c for c in self.connections if c.waiting and c is not conn), None)
            if oldest is not None and oldest.transport is not None:
                oldest.transport.abort()

    def lost(self, conn: _Connection) -> None:
        self.connections.pop(conn, None)

    def _sweep(self) -> None:
        # One timer for all connections rather than one per read: deadlines move on every
        # request, and a timer each time would cost more than the reads themselves.
        now = time.monotonic()
        for conn in list(self.connections):
            conn.expire(now)
        self._sweeper = self.loop.call_later(0.5, self._sweep)

    def stop(self) -> None:
        """On the loop: stop accepting, close every connection, end run_forever."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.listener.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.loop.stop()


def _quiet_os_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A client that hangs up, or running out of file descriptors for a moment while
    # accepting, is not a fault of the server's: one line, no traceback on the terminal.
    exc = context.get("exception")
    if isinstance(exc, OSError):
        logger.warning("%s: %s", context.get("message", "socket error"), exc)
        return
    loop.default_exception_handler(context)


class LocalApiServer:
    """The app behind the HTTP server: `.start()` in the background or `.serve_forever()`."""

    def __init__(
        self,
        app: App,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        listening: socket.socket | None = None,
    ) -> None:
        """Serve on `host:port`, or on `listening`, a socket the caller already bound.

        Handing over a bound socket leaves no moment in which another process could take
        the port (the demo reserves its port before it starts anything else).
        """
        if listening is not None:
            sock = listening
            sock.listen(LISTEN_BACKLOG)
            host = sock.getsockname()[0]
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            # Bound here, so that a port in use is an OSError for the caller, at once.
            sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
        self._server = _Server(sock, app)
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._stopped = threading.Event()
        self._closed = False
        self.host = host
        self.port = int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> LocalApiServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name="deployhealth-api", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run the server in this thread until close() is called from another."""
        loop = self._server.loop
        asyncio.set_event_loop(loop)
        self._serving.set()
        try:
            loop.run_forever()
        finally:
            self._stopped.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._server.loop
        if self._thread is not None or self._serving.is_set():
            # The loop runs (or is about to) in another thread: stop it there.
            loop.call_soon_threadsafe(self._server.stop)
            self._stopped.wait()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
        else:
            self._server.stop()
            loop.run_forever()  # runs the stop: closes the listener and the connections
        with contextlib.suppress(Exception):
            loop.run_until_complete(
                asyncio.wait_for(self._server.listener.wait_closed(), timeout=5)
            )
        loop.close()
        # A request still with the app finishes on its thread; its answer has nowhere to go.
        self._server.workers.close()

    def __enter__(self) -> LocalApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "IDLE_SECONDS",
    "IO_TIMEOUT_SECONDS",
    "LISTEN_BACKLOG",
    "MAX_BODY_BYTES",
    "MAX_WORKERS",
    "LocalApiServer",
    "build_event",
]
