"""A simulated Coder deployment on loopback: the surfaces deployhealth probes, with faults.

It answers like a Coder server (`/healthz`, `/api/v2/buildinfo`, `X-Coder-Build-Version` on
every response) and takes fault switches on `POST /_sim/faults` so the demo and tests can
break it for real:

    curl -X POST 'http://127.0.0.1:PORT/_sim/faults?healthz=502'
    curl -X POST 'http://127.0.0.1:PORT/_sim/faults?database=down'
    curl -X POST 'http://127.0.0.1:PORT/_sim/faults?reset'

Later families add their surfaces here (WebSocket echo, DERP, proxies ...).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

CODER_VERSION = "v2.18.1+sim"
HEALTHZ_MODES = ("ok", "502", "503", "wrong-body", "hang")
DATABASE_MODES = ("ok", "down", "slow")


@dataclass
class Faults:
    healthz: str = "ok"
    database: str = "ok"

    def as_dict(self) -> dict[str, str]:
        return {"healthz": self.healthz, "database": self.database}


@dataclass
class SimulatedDeployment:
    """The HTTP side of the simulation. `on_database` applies a database mode (demo wiring)."""

    host: str = "127.0.0.1"
    port: int = 0
    on_database: Callable[[str], None] | None = None
    faults: Faults = field(default_factory=Faults)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> SimulatedDeployment:
        self._server = ThreadingHTTPServer((self.host, self.port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sim-deployment", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._release.set()  # let hanging requests go
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SimulatedDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_faults(self, changes: dict[str, str]) -> None:
        """Apply `name=mode` switches; raises ValueError naming a bad switch."""
        if "reset" in changes:
            changes = {"healthz": "ok", "database": "ok"}
        for name, mode in changes.items():
            allowed = {"healthz": HEALTHZ_MODES, "database": DATABASE_MODES}.get(name)
            if allowed is None:
                raise ValueError(f"unknown fault {name!r}; faults: healthz, database")
            if mode not in allowed:
                raise ValueError(f"fault {name} has no mode {mode!r}; modes: {', '.join(allowed)}")
        for name, mode in changes.items():
            setattr(self.faults, name, mode)
            if name == "database" and self.on_database is not None:
                self.on_database(mode)
        if self.faults.healthz != "hang":
            self._release.set()
            self._release = threading.Event()


def _handler_for(sim: SimulatedDeployment) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "coderd-sim"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the demo's terminal is for deployhealth's output

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/healthz":
                self._healthz()
            elif path == "/api/v2/buildinfo":
                self._json(200, {"version": CODER_VERSION, "provisioner_api_version": "1.1"})
            elif path == "/_sim/faults":
                self._json(200, sim.faults.as_dict())
            else:
                self._json(404, {"message": "Route not found.", "detail": path})

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/_sim/faults":
                self._json(404, {"message": "Route not found.", "detail": parts.path})
                return
            changes = dict(parse_qsl(parts.query, keep_blank_values=True))
            try:
                sim.set_faults(changes)
            except ValueError as exc:
                self._json(400, {"message": str(exc)})
                return
            self._json(200, sim.faults.as_dict())

        def _healthz(self) -> None:
            mode = sim.faults.healthz
            if mode == "hang":
                # Accept and never answer, like a wedged server behind a TCP load balancer.
                sim._release.wait()
                return
            if mode in ("502", "503"):
                self._text(int(mode), "<html><body>Bad Gateway</body></html>", "text/html")
            elif mode == "wrong-body":
                self._text(200, "<html>Welcome to nginx!</html>", "text/html")
            else:
                self._text(200, "OK", "text/plain; charset=utf-8")

        def _json(self, status: int, body: object) -> None:
            self._text(status, json.dumps(body), "application/json")

        def _text(self, status: int, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Coder-Build-Version", CODER_VERSION)
            self.end_headers()
            self.wfile.write(data)

    return Handler
