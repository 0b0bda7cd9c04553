"""A simulated Coder deployment on loopback: the surfaces deployhealth probes, with faults.

It answers like a Coder server (`/healthz`, `/api/v2/buildinfo`, `X-Coder-Build-Version` on
every response) and takes fault switches on `POST /_sim/faults` so the demo and tests can
break it for real:

    curl -X POST 'http://127.0.0.1:PORT/_sim/faults?healthz=502'
    curl -X POST 'http://127.0.0.1:PORT/_sim/faults?database=down'
    curl -X POST 'http://127.0.0.1:PORT/_sim/faults?reset'

A switch takes effect at once, even while a check round is in flight, and that round then
reports what it read before the switch. The demo sets `switch_guard` to its scheduler's
`between_rounds` (and a `fault:` line on its terminal), so that a switch waits for the
round in flight and the next round starts right after it: the first round to end after
the POST is the first to see the fault.

Surfaces plug in: a module adds its routes with `sim.route(path, handler)` and its switches
with `sim.fault(name, modes, on_change)`. `sim/network.py` (WebSocket, DERP, STUN) and
`sim/inventory.py` (Coder API, proxies, provisioners, replicas) register theirs here.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from deployhealth.sim._service import Service

CODER_VERSION = "v2.18.1+sim"
DEPLOYMENT_ID = "5f0c3a86-3c4e-4d1b-9a53-0d7f6b2e9c41"

# A route handler gets the request handler (for the socket, headers, writing) and the sim.
RouteHandler = Callable[["SimRequest", "SimulatedDeployment"], None]


@dataclass(frozen=True)
class Fault:
    name: str
    modes: tuple[str, ...]  # the first is the healthy default
    on_change: Callable[[str], None] | None = None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (a probe's timeout, a reset keep-alive connection) are what a
        # deployment sees all day; only anything else is worth a traceback on the terminal.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


@dataclass
class SimulatedDeployment(Service):
    """The HTTP side of the simulation. `on_database` applies a database mode (demo wiring)."""

    host: str = "127.0.0.1"
    port: int = 0
    on_database: Callable[[str], None] | None = None
    # The session token the sim's authenticated Coder routes expect (Coder-Session-Token).
    token: str = "sim-token"
    # Called with the changes and entered around every fault switch (see the module
    # docstring); None switches at once.
    switch_guard: Callable[[dict[str, str]], contextlib.AbstractContextManager[None]] | None = (
        None
    )
    _routes: dict[tuple[str, str], RouteHandler] = field(default_factory=dict)
    _faults: dict[str, Fault] = field(default_factory=dict)
    _modes: dict[str, str] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closers: list[Callable[[], None]] = field(default_factory=list)
    # Answered requests per path, for tests that wait on "the check has read X".
    _served: Counter[str] = field(default_factory=Counter)
    _served_changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        from deployhealth.sim import inventory, network

        self.route("GET", "/healthz", _healthz)
        self.route("GET", "/api/v2/buildinfo", _buildinfo)
        self.fault("healthz", ("ok", "502", "503", "wrong-body", "hang"))
        self.fault("database", ("ok", "down", "slow"), lambda mode: self._database(mode))
        network.register(self)
        inventory.register(self)

    # --- plumbing for surfaces ----------------------------------------------------------

    def route(self, method: str, path: str, handler: RouteHandler) -> None:
        self._routes[(method, path)] = handler

    def fault(
        self, name: str, modes: tuple[str, ...], on_change: Callable[[str], None] | None = None
    ) -> None:
        self._faults[name] = Fault(name, modes, on_change)
        self._modes[name] = modes[0]

    def on_close(self, closer: Callable[[], None]) -> None:
        """Something a surface started (a UDP server, a thread) to stop with the sim."""
        self._closers.append(closer)

    def mode(self, name: str) -> str:
        return self._modes[name]

    def served(self, path: str) -> int:
        """How many requests to `path` the sim has answered (handler returned)."""
        with self._served_changed:
            return self._served[path]

    def wait_for_served(self, path: str, count: int, timeout: float = 30.0) -> bool:
        with self._served_changed:
            return self._served_changed.wait_for(lambda: self._served[path] >= count, timeout)

    def _count_served(self, path: str) -> None:
        with self._served_changed:
            self._served[path] += 1
            self._served_changed.notify_all()

    @property
    def released(self) -> threading.Event:
        """Set when a "hang" fault is lifted or the sim closes: hanging handlers wait on it."""
        return self._release

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> Self:
        self._server = _QuietServer((self.host, self.port), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, name="sim-deployment", daemon=True
        ).start()
        return self

    def close(self) -> None:
        self._release.set()  # let hanging requests go
        for closer in reversed(self._closers):
            closer()
        self._closers.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- faults -------------------------------------------------------------------------

    def faults(self) -> dict[str, str]:
        return dict(self._modes)

    def fault_modes(self) -> dict[str, tuple[str, ...]]:
        """Every switch and its modes, the healthy default first."""
        return {name: fault.modes for name, fault in self._faults.items()}

    def set_faults(self, changes: dict[str, str]) -> None:
        """Apply `name=mode` switches; raises ValueError naming a bad switch, changing nothing."""
        if "reset" in changes:
            changes = {name: fault.modes[0] for name, fault in self._faults.items()}
        for name, mode in changes.items():
            fault = self._faults.get(name)
            if fault is None:
                raise ValueError(f"unknown fault {name!r}; faults: {', '.join(self._faults)}")
            if mode not in fault.modes:
                raise ValueError(
                    f"fault {name} has no mode {mode!r}; modes: {', '.join(fault.modes)}"
                )
        if "hang" not in {**self._modes, **changes}.values():
            # Requests hanging in a round in flight go first: the guard waits for that round.
            self._release.set()
        guard = (
            contextlib.nullcontext() if self.switch_guard is None
            else self.switch_guard(dict(changes))
        )
        with guard, self._lock:
            for name, mode in changes.items():
                self._modes[name] = mode
                callback = self._faults[name].on_change
                if callback is not None:
                    callback(mode)
            if "hang" not in self._modes.values():
                self._release.set()
                self._release = threading.Event()

    def _database(self, mode: str) -> None:
        if self.on_database is not None:
            self.on_database(mode)


class SimRequest(BaseHTTPRequestHandler):
    """One request to the sim; route handlers use these helpers to answer like Coder."""

    protocol_version = "HTTP/1.1"
    server_version = "coderd-sim"
    sim: SimulatedDeployment

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the demo's terminal is for deployhealth's output

    @property
    def path_only(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path_only
        if path == "/_sim/faults":
            self._faults(method)
            return
        handler = self.sim._routes.get((method, path))
        if handler is None:
            # Prefix routes ("/api/v2/organizations/*") are registered with a trailing "*".
            for (m, route), candidate in self.sim._routes.items():
                if m == method and route.endswith("*") and path.startswith(route[:-1]):
                    handler = candidate
                    break
        if handler is None:
            self.send_json(404, {"message": "Route not found.", "detail": path})
            return
        try:
            handler(self, self.sim)
        finally:
            self.sim._count_served(path)

    def _faults(self, method: str) -> None:
        if method == "POST":
            try:
                self.sim.set_faults(self.query)
            except ValueError as exc:
                self.send_json(400, {"message": str(exc)})
                return
        self.send_json(200, self.sim.faults())

    def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        self.send_text(status, json.dumps(body), "application/json", headers)

    def send_text(
        self, status: int, body: str | bytes, content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Coder-Build-Version", CODER_VERSION)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _handler_for(sim: SimulatedDeployment) -> type[SimRequest]:
    return type("BoundSimRequest", (SimRequest,), {"sim": sim})


def _healthz(request: SimRequest, sim: SimulatedDeployment) -> None:
    mode = sim.mode("healthz")
    if mode == "hang":
        # Accept and never answer, like a wedged server behind a TCP load balancer.
        sim.released.wait()
        return
    if mode in ("502", "503"):
        request.send_text(int(mode), "<html><body>Bad Gateway</body></html>", "text/html")
    elif mode == "wrong-body":
        request.send_text(200, "<html>Welcome to nginx!</html>", "text/html")
    else:
        request.send_text(200, "OK", "text/plain; charset=utf-8")


def _buildinfo(request: SimRequest, sim: SimulatedDeployment) -> None:
    # Every field of codersdk.BuildInfoResponse (typesGenerated.ts BuildInfoResponse).
    request.send_json(
        200,
        {
            "external_url": "https://github.com/coder/coder/releases/tag/v2.18.1",
            "version": CODER_VERSION,
            "dashboard_url": sim.url,
            "telemetry": False,
            "workspace_proxy": False,
            "agent_api_version": "2.3",
            "provisioner_api_version": "1.1",
            "upgrade_message": "",
            "deployment_id": DEPLOYMENT_ID,
        },
    )
