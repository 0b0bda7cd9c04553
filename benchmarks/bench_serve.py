"""`deployhealth serve` under load-balancer probes: `/readyz` against a bare `http.server`.

Two figures, each a ratio against a bare Python `http.server` measured in the same run:

- throughput over keep-alive connections from 10 clients: serve's requests a second over
  the bare server's (target >= 0.5);
- the 99th percentile latency with 50 clients at once: serve's over the bare server's
  (target <= 2).

The bare server is `ThreadingHTTPServer` speaking HTTP/1.1, answering `ok` with a
Content-Length and Nagle off (with Nagle on, its two writes an answer wait for the client's
delayed ACK, 40 ms, and the baseline would measure that instead of Python). serve runs
against the simulated deployment (`deployhealth.sim`) with access_url as the only gating
section and an interval of an hour: its first round stores the results that make `/readyz`
answer 200, then no check runs while it is measured. Each runs in a process of its own, and
the load comes from wrk in another (Debian's package; `make bench` installs it, this module
installs nothing). Rounds alternate between the two servers, medians of MIN_ROUNDS.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from figures import MIN_ROUNDS, Figure, record

THROUGHPUT_CLIENTS = 10
THROUGHPUT_TARGET = 0.5
LATENCY_CLIENTS = 50
LATENCY_TARGET = 2.0
WRK_SECONDS = 3
START_TIMEOUT = 60.0

BARE_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # wrk resets its connections when a run ends

server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
"""


@dataclass(frozen=True)
class Load:
    """What one wrk run measured."""

    requests_per_second: float
    p99_ms: float


# serve's log lines may start with a time stamp.
_ROUND = re.compile(r"(\S+ )?round: ")
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(url: str, clients: int) -> Load:
    command = ["wrk", "-t2", f"-c{clients}", f"-d{WRK_SECONDS}s", "--latency", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    # Every answer must have been a 200: a refusal or a reset is not throughput.
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests on {url}:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    if rate is None or p99 is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return Load(float(rate[1]), float(p99[1]) * _UNITS_MS[p99[2]])


def _lines(stream: object) -> queue.Queue[str]:
    """The lines a child writes, as they come ("" at its end)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def bare_server() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        port = _lines(proc.stdout).get(timeout=START_TIMEOUT).strip()
        if not port:
            raise RuntimeError("the bare http.server did not start")
        yield f"http://127.0.0.1:{port}/readyz"
    finally:
        _stop(proc)


@contextmanager
def serve(workdir: Path) -> Iterator[str]:
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.tcp import free_port

    with SimulatedDeployment() as sim:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYHEALTH_")}
        env.update(
            DEPLOYHEALTH_NAME="bench",
            DEPLOYHEALTH_ACCESS_URL=sim.url,
            DEPLOYHEALTH_CODER_TOKEN=sim.token,
            DEPLOYHEALTH_GATING_SECTIONS="access_url",
            DEPLOYHEALTH_STORE=f"sqlite:///{workdir / 'results.db'}",
        )
        command = str(Path(sys.executable).parent / "deployhealth")
        proc = subprocess.Popen(
            # --verbose: a `round:` line for the first round too, which says it has stored.
            [command, "serve", "--port", str(port), "--interval", "3600", "--verbose"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        )
        try:
            lines = _lines(proc.stderr)
            seen: list[str] = []
            # The first round's results make /readyz 200; none follows within the hour.
            while not _ROUND.match(line := lines.get(timeout=START_TIMEOUT)):
                if line == "":
                    raise RuntimeError(f"serve ended before its first round: {''.join(seen)}")
                seen.append(line)
            yield f"http://127.0.0.1:{port}/readyz"
        finally:
            _stop(proc)


def bench() -> None:
    print("serve: `deployhealth serve` /readyz vs a bare http.server, loaded by wrk")
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (`make bench` installs Debian's)")
    with tempfile.TemporaryDirectory() as tmp, bare_server() as bare_url, serve(
        Path(tmp)
    ) as serve_url:
        for url in (bare_url, serve_url):  # warm: imports, caches, first threads
            wrk(url, LATENCY_CLIENTS)
        loads: dict[tuple[str, int], list[Load]] = {}
        for _ in range(MIN_ROUNDS):
            for clients in (THROUGHPUT_CLIENTS, LATENCY_CLIENTS):
                for name, url in (("bare", bare_url), ("serve", serve_url)):
                    loads.setdefault((name, clients), []).append(wrk(url, clients))

    def median(name: str, clients: int, field: str) -> float:
        return statistics.median(getattr(load, field) for load in loads[(name, clients)])

    ours = median("serve", THROUGHPUT_CLIENTS, "requests_per_second")
    theirs = median("bare", THROUGHPUT_CLIENTS, "requests_per_second")
    record(Figure(
        f"serve /readyz throughput vs bare http.server, keep-alive, {THROUGHPUT_CLIENTS} clients",
        ours / theirs, THROUGHPUT_TARGET, better="higher",
        detail=f"serve {ours:,.0f} req/s, bare {theirs:,.0f} req/s "
               f"(medians of {MIN_ROUNDS} wrk runs of {WRK_SECONDS} s)",
    ))
    ours = median("serve", LATENCY_CLIENTS, "p99_ms")
    theirs = median("bare", LATENCY_CLIENTS, "p99_ms")
    record(Figure(
        f"serve /readyz p99 vs bare http.server's, {LATENCY_CLIENTS} concurrent clients",
        ours / theirs, LATENCY_TARGET,
        detail=f"serve {ours:,.1f} ms, bare {theirs:,.1f} ms "
               f"(medians of {MIN_ROUNDS} wrk runs of {WRK_SECONDS} s)",
    ))


if __name__ == "__main__":
    bench()
