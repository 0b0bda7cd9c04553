"""The API on one machine: a threaded HTTP server that speaks to the app in Lambda's terms.

Each request becomes an API Gateway HTTP API event (payload format 2.0), built the way API
Gateway builds it, and the app's proxy response is written back. So `deployhealth serve`
runs exactly the code the API function runs, and tests that go through this server test it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import queue
import selectors
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

logger = logging.getLogger(__name__)

App = Callable[[dict[str, Any], Any], dict[str, Any]]

# API Gateway caps payloads at 10 MB; nothing deployhealth accepts is more than a few hundred
# bytes (the settings body), so a small cap keeps a stray upload from tying up a thread.
MAX_BODY_BYTES = 64 * 1024
_TEXT_TYPES = ("text/", "application/json", "application/x-www-form-urlencoded")

# A load balancer opens a connection per health check, several balancers at once: the listen
# backlog holds a burst of this many (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 512
# Requests are answered by at most this many threads; more requests wait for one in turn.
MAX_WORKERS = 64
# A connection that has sent nothing yet waits without a thread, for at most this long.
IDLE_SECONDS = 30.0
# Each read or write of a connection with a thread must progress within this many seconds:
# a client that stops half-way through its request gives its thread back by then.
IO_TIMEOUT_SECONDS = 10.0
# Connections waiting for their first byte, at most; beyond that the oldest is closed.
MAX_WAITING = 4096


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
    body_text, encoded = base64.b64encode(body).decode(), True
    if not body or joined.get("content-type", "").startswith(_TEXT_TYPES):
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
            "requestId": uuid.uuid4().hex,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
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


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    # Headers and body leave in two writes; with Nagle on, a keep-alive client's delayed ACK
    # would hold the body back ~40 ms on every request.
    disable_nagle_algorithm = True
    # Every socket operation (reading the request, waiting for the next one on a keep-alive
    # connection, writing the answer) must progress within this time, or the thread is freed.
    timeout = IO_TIMEOUT_SECONDS

    # Unbuffered: after an answer a keep-alive connection goes back to wait without a thread
    # (see _Server), and no byte of its next request may be left behind in a buffer here.
    rbufsize = 0

    def handle(self) -> None:
        # One request per turn; the server takes the connection back if it stays open.
        self.close_connection = True
        self.handle_one_request()

    def _read_body(self, length: int) -> bytes:
        chunks: list[bytes] = []
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(remaining)  # unbuffered: may return less than asked
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def __getattr__(self, name: str) -> Any:
        # http.server looks up `do_<METHOD>` and answers an HTML 501 when there is none: every
        # method goes to the app instead, which answers 405 with `Allow` or 404, as JSON.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # What http.server itself refuses (a bad request line, 414, 431, a bad version) gets
        # the API's JSON error shape rather than its HTML page. The request was not read in
        # full, so the connection cannot carry another one.
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        self._send_json(code, f"{phrase}.", message or explain or "")

    def _dispatch(self) -> None:
        # Refusals below leave the body unread: close the connection so that it is not
        # taken for the next request.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            self._send_json(411, "A Content-Length header is required.")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_json(400, "The Content-Length header is not a valid length.")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
            return
        body = self._read_body(length)
        if len(body) < length:  # the client hung up half-way through its body
            self.close_connection = True
            return
        event = build_event(
            self.command,
            self.path,
            list(self.headers.items()),
            body,
            self.client_address[0],
            self.request_version,
        )
        try:
            response = self.server.app(event, None)
            status, headers, payload = _decode_response(response)
        except Exception as exc:
            # The app never raises; this guards against a broken one, answering 500 (not a
            # dropped connection, which a proxy in front would turn into 502).
            logger.exception("the app failed")
            self._send_json(500, "Internal error.", f"{type(exc).__name__}")
            return
        self._send(status, headers, payload)

    def _send_json(self, status: int, message: str, detail: str = "") -> None:
        body = json.dumps({"message": message, "detail": detail}).encode()
        self._send(status, [("Content-Type", "application/json")], body)

    def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        if self.request_version == "HTTP/0.9":
            # http.server takes an unparsable request line for HTTP/0.9 and would answer with
            # a bare body; a status line and headers make the answer one any client reads.
            self.request_version = "HTTP/1.0"
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.client_address[0], format % args)


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


class _Server(HTTPServer):
    """An HTTP server whose threads are bounded and whose waiting costs no thread.

    The standard ThreadingHTTPServer starts a thread per connection the moment it is
    accepted: 300 clients that connect and send nothing hold 300 threads. Here an accepted
    connection waits in a selector, without a thread, until it sends its first byte (or is
    closed after IDLE_SECONDS); then one of at most MAX_WORKERS threads answers one request,
    each read bounded by IO_TIMEOUT_SECONDS, and a keep-alive connection goes back to the
    selector to wait for its next request. A client that trickles its request holds a worker
    until that timeout; when every worker is busy, the next readable connection waits its turn.
    """

    # Port reuse lets `deployhealth serve` restart at once on the same port.
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self._work: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle_workers = 0
        self._unclaimed = 0
        self._workers_lock = threading.Lock()
        # Accepted connections reach the waiter thread through this queue and a wake-up pipe.
        self._arrivals: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._closing = threading.Event()
        super().__init__(address, _Handler)
        self._waiter = threading.Thread(target=self._wait_loop, name="api-waiter", daemon=True)
        self._waiter.start()

    # --- accepted connections wait here for their first byte, without a thread ---

    def process_request(self, request: Any, client_address: Any) -> None:
        self._arrivals.put((request, client_address))
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def _wait_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ, None)
        waiting: dict[socket.socket, tuple[Any, float]] = {}  # insertion order: oldest first
        try:
            while not self._closing.is_set():
                for key, _ in selector.select(timeout=1.0):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_read.recv(4096)
                        continue
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    selector.unregister(sock)
                    address, _deadline = waiting.pop(sock)
                    self._submit(sock, address)
                while True:
                    try:
                        sock, address = self._arrivals.get_nowait()
                    except queue.Empty:
                        break
                    if len(waiting) >= MAX_WAITING:
                        oldest = next(iter(waiting))
                        selector.unregister(oldest)
                        del waiting[oldest]
                        self.shutdown_request(oldest)
                    try:
                        selector.register(sock, selectors.EVENT_READ, True)
                    except (OSError, ValueError):
                        self.shutdown_request(sock)
                        continue
                    waiting[sock] = (address, time.monotonic() + IDLE_SECONDS)
                now = time.monotonic()
                for sock in [s for s, (_, deadline) in waiting.items() if deadline <= now]:
                    selector.unregister(sock)
                    del waiting[sock]
                    self.shutdown_request(sock)
        finally:
            for sock in waiting:
                self.shutdown_request(sock)
            selector.close()

    # --- a bounded set of worker threads answers readable connections ---

    def _submit(self, request: socket.socket, client_address: Any) -> None:
        with self._workers_lock:
            # A new worker only when the connections not yet taken outnumber the idle workers
            # (an idle worker that has not yet taken its connection is not free).
            self._unclaimed += 1
            if self._unclaimed > self._idle_workers and len(self._workers) < MAX_WORKERS:
                worker = threading.Thread(
                    target=self._work_loop, name=f"api-worker-{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
                worker.start()
        self._work.put((request, client_address))

    def _work_loop(self) -> None:
        while True:
            with self._workers_lock:
                self._idle_workers += 1
            item = self._work.get()
            with self._workers_lock:
                self._idle_workers -= 1
                if item is not None:
                    self._unclaimed -= 1
            if item is None:
                return
            request, client_address = item
            keep_open = False
            try:
                keep_open = self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            if keep_open and not self._closing.is_set():
                # Keep-alive: the connection waits for its next request without a thread.
                self.process_request(request, client_address)
            else:
                self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> bool:  # type: ignore[override]
        """Answer one request; True when the connection stays open for another."""
        handler = self.RequestHandlerClass(request, client_address, self)
        assert isinstance(handler, _Handler)
        return not handler.close_connection

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
        # Closing a socket with unread input sends RST instead of FIN, and a RST can destroy
        # the answer still on its way (a refused request is seldom read to its end): drop
        # what has already arrived first, without waiting for more.
        with contextlib.suppress(OSError):
            request.setblocking(False)
            for _ in range(16):
                if not request.recv(65536):
                    break
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (curl ^C, a load balancer's probe timing out) is not an
        # error of the server's: no traceback on the terminal for it.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")
        self._waiter.join()
        for _ in self._workers:
            self._work.put(None)
        self._wake_read.close()
        self._wake_write.close()


class LocalApiServer:
    """The app behind a threaded HTTP server: `.start()` in the background or `.serve_forever()`."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 8080) -> None:
        self._server = _Server((host, port), app)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> LocalApiServer:
        # serve_forever notices shutdown() only between polls: a short poll makes close() quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="deployhealth-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()  # returns once serve_forever has stopped
            self._thread.join()
            self._thread = None
        self._server.server_close()

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
