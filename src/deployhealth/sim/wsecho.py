"""The sim's `GET /api/v2/debug/ws`: Coder's WebSocket echo, with faults.

As on Coder, the route needs the header `Coder-Session-Token` equal to the sim's token
(`sim.token`, "sim-token" by default); a missing or wrong token gets Coder's 401 JSON
(`{"message", "detail"}`) and no upgrade. Every message comes back with the same type.

Switches, on `POST /_sim/faults` (`?websocket=MODE`, `?websocket-ping=INTERVAL`). They
apply to connections made after the switch; a connection keeps the behaviour it began with.

`websocket`:

- `ok`: echo; the server pings every `websocket-ping` interval.
- `refuse`: answer 503 with a load balancer's HTML page instead of upgrading.
- `close-after-handshake`: upgrade, then close at once (1001 "goodbye").
- `wrong-echo`: answer a text message with other text.
- `binary-echo`: answer a text message with the same bytes as a binary message.
- `no-pings`: echo, never ping.
- `cut-idle`: no pings, and once the client has been silent for `CUT_IDLE_AFTER_SECONDS`
  (1 s) the TCP connection is dropped without a close frame: what a proxy's idle timeout
  does, much sooner.

`websocket-ping`: `15s` (default), `5s`, `1s`, `0.5s`.

Why the default pings: an idle WebSocket survives a proxy's idle timeout (60 s on an AWS
ALB) only if something crosses it, and Coder's long-lived WebSockets send a heartbeat ping
every 15 s for that reason, so the sim's healthy default does too and deployhealth's idle
probe has pings to count. Coder's own `/api/v2/debug/ws` handler does not ping, and it
stops waiting for a message after 10 s (each echo has a 10 s timeout), so against a real
Coder an idle probe longer than 10 s ends early whatever the proxies do; `no-pings`
models the first half of that.
"""

from __future__ import annotations

import hmac
import threading
from typing import TYPE_CHECKING

from deployhealth.sim.ws import ServerWebSocket, accept_websocket

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimRequest, SimulatedDeployment

PATH = "/api/v2/debug/ws"
FAULT = "websocket"
PING_FAULT = "websocket-ping"
MODES = (
    "ok",
    "refuse",
    "close-after-handshake",
    "wrong-echo",
    "binary-echo",
    "no-pings",
    "cut-idle",
)
PING_MODES = ("15s", "5s", "1s", "0.5s")
CUT_IDLE_AFTER_SECONDS = 1.0
DEFAULT_TOKEN = "sim-token"

_SIGNED_OUT = "You are signed out or your session has expired. Please sign in again to continue."
_UNAVAILABLE_PAGE = (
    "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
    "<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
    "</body>\r\n</html>\r\n"
)


def register(sim: SimulatedDeployment) -> None:
    """Add this surface's routes and fault switches to `sim`."""
    surface = _EchoSurface(sim)
    sim.route("GET", PATH, surface.serve)
    sim.fault(FAULT, MODES)
    sim.fault(PING_FAULT, PING_MODES)
    sim.on_close(surface.close)


def ping_interval(mode: str) -> float:
    """`15s` -> 15.0."""
    return float(mode.removesuffix("s"))


class _EchoSurface:
    def __init__(self, sim: SimulatedDeployment) -> None:
        self.sim = sim
        self._lock = threading.Lock()
        self._live: set[ServerWebSocket] = set()

    def close(self) -> None:
        # Handler threads are blocked in recv; dropping their sockets lets them finish.
        with self._lock:
            live = list(self._live)
        for ws in live:
            ws.abort()

    def serve(self, request: SimRequest, sim: SimulatedDeployment) -> None:
        mode = sim.mode(FAULT)
        if mode == "refuse":
            request.send_text(503, _UNAVAILABLE_PAGE, "text/html")
            return
        if not self._authorized(request, sim):
            return
        ws = accept_websocket(request)
        if ws is None:
            return
        with self._lock:
            self._live.add(ws)
        stop = threading.Event()
        try:
            with ws:
                if mode == "close-after-handshake":
                    ws.close(1001, "goodbye")
                    return
                if mode not in ("no-pings", "cut-idle"):
                    interval = ping_interval(sim.mode(PING_FAULT))
                    threading.Thread(
                        target=_ping_every,
                        args=(ws, interval, stop),
                        name="sim-ws-ping",
                        daemon=True,
                    ).start()
                _echo(ws, mode)
        except OSError:
            pass  # the client went away mid-send
        finally:
            stop.set()
            with self._lock:
                self._live.discard(ws)

    @staticmethod
    def _authorized(request: SimRequest, sim: SimulatedDeployment) -> bool:
        expected = getattr(sim, "token", DEFAULT_TOKEN)
        given = request.headers.get("Coder-Session-Token")
        if not given:
            detail = 'Cookie "coder_session_token" or query parameter must be provided.'
        elif not hmac.compare_digest(given.encode(), expected.encode()):
            detail = "API key is invalid."
        else:
            return True
        request.close_connection = True
        request.send_json(401, {"message": _SIGNED_OUT, "detail": detail})
        return False


def _echo(ws: ServerWebSocket, mode: str) -> None:
    idle_limit = CUT_IDLE_AFTER_SECONDS if mode == "cut-idle" else None
    while True:
        try:
            kind, data = ws.recv(idle_limit)
        except TimeoutError:
            ws.abort()
            return
        if kind == "close":
            return
        if kind == "text":
            assert isinstance(data, str)
            if mode == "wrong-echo":
                ws.send_text(f"not {data}")
            elif mode == "binary-echo":
                ws.send_binary(data.encode())
            else:
                ws.send_text(data)
        elif kind == "binary":
            assert isinstance(data, bytes)
            ws.send_binary(data)


def _ping_every(ws: ServerWebSocket, interval: float, stop: threading.Event) -> None:
    sent = 0
    while not stop.wait(interval):
        sent += 1
        try:
            ws.ping(str(sent).encode())
        except OSError:
            return
