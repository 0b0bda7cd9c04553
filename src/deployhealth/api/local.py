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
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

logger = logging.getLogger(__name__)

App = Callable[[dict[str, Any], Any], dict[str, Any]]

# API Gateway caps payloads at 10 MB; nothing deployhealth accepts is more than a few hundred
# bytes (the settings body), so a small cap keeps a stray upload from tying up a thread.
MAX_BODY_BYTES = 64 * 1024
_TEXT_TYPES = ("text/", "application/json", "application/x-www-form-urlencoded")


def build_event(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    source_ip: str,
    protocol: str = "HTTP/1.1",
) -> dict[str, Any]:
    """An HTTP API payload-2.0 event for one request, as API Gateway would send it."""
    parts = urlsplit(target)
    path = parts.path or "/"
    raw_query = parts.query

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
    # An idle keep-alive connection holds a thread; drop it after a while.
    timeout = 60

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

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
        body = self.rfile.read(length) if length else b""
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Port reuse lets `deployhealth serve` restart at once on the same port.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (curl ^C, a load balancer's probe timing out) is not an
        # error of the server's: no traceback on the terminal for it.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


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


__all__ = ["MAX_BODY_BYTES", "LocalApiServer", "build_event"]
