"""`deployhealth serve`'s HTTP server as load balancers meet it: a real process on loopback.

A burst of connections while it cannot accept, and Debian's haproxy following `/readyz` with
each of its health-check methods through a gating fault and its repair.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import selectors
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from support.peers import require_program
from support.serve import EVENT_TIMEOUT, ServeProcess, clean_env

from deployhealth.api.local import LISTEN_BACKLOG
from deployhealth.sim.deployment import SimulatedDeployment
from deployhealth.sim.tcp import free_port


def serve(sim: SimulatedDeployment, tmp_path: Path, port: int, interval: str) -> ServeProcess:
    env = clean_env(
        DEPLOYHEALTH_NAME="lb-test",
        DEPLOYHEALTH_ACCESS_URL=sim.url,
        DEPLOYHEALTH_CODER_TOKEN=sim.token,
        # access_url gates; the sections without a peer here are not under test.
        DEPLOYHEALTH_GATING_SECTIONS="access_url",
        DEPLOYHEALTH_STORE=f"sqlite:///{tmp_path / 'results.db'}",
    )
    # --verbose: a round: line after every round, which next_round_started_after_now counts.
    args = ["serve", "--port", str(port), "--interval", interval, "--verbose"]
    return ServeProcess(args, env, tmp_path)


def rest_of_log(server: ServeProcess) -> str:
    """Everything serve wrote to stderr, once it has stopped."""
    lines = list(server.seen)
    while (line := server.lines.get(timeout=EVENT_TIMEOUT)) != "":
        lines.append(line)
    return "".join(lines)


def test_a_burst_of_512_connections_waits_in_the_backlog_and_is_answered(sim, tmp_path):
    port = free_port()
    server = serve(sim, tmp_path, port, "60")
    conns: list[socket.socket] = []
    try:
        server.wait_for("deployhealth serving")
        # Stopped, serve accepts nothing: a connect completes only if the listen backlog
        # has room for it (a full backlog drops the SYN and the connect hangs).
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with selectors.DefaultSelector() as selector:
                for _ in range(LISTEN_BACKLOG):
                    conn = socket.socket()
                    conn.setblocking(False)
                    conn.connect_ex(("127.0.0.1", port))
                    selector.register(conn, selectors.EVENT_WRITE)
                    conns.append(conn)
                pending = set(conns)
                while pending and (ready := selector.select(timeout=EVENT_TIMEOUT)):
                    for key, _ in ready:
                        selector.unregister(key.fileobj)
                        pending.discard(key.fileobj)  # type: ignore[arg-type]
                        assert key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            assert not pending, f"{len(pending)} of {len(conns)} connects did not complete"
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        for conn in conns:
            conn.setblocking(True)
            conn.settimeout(EVENT_TIMEOUT)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for conn in conns:
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nOK")
    finally:
        for conn in conns:
            conn.close()
        assert server.stop() == 0
    assert "Traceback" not in rest_of_log(server)


# --- haproxy ---------------------------------------------------------------------------------

# Each backend checks the same serve with one of the ways haproxy's docs show: the default
# method (OPTIONS), HEAD and GET. fall/rise 2: DOWN after two failed checks, UP after two good.
HAPROXY_CONF = """\
global
    log 127.0.0.1:{log_port} format raw local0 info
    stats socket {stats} mode 600 level admin
defaults
    mode http
    log global
    option log-health-checks
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout check 2s
    default-server check inter 200ms fall 2 rise 2
backend by_options
    option httpchk /readyz
    server serve 127.0.0.1:{port}
backend by_head
    option httpchk HEAD /readyz
    server serve 127.0.0.1:{port}
backend by_get
    option httpchk GET /readyz
    server serve 127.0.0.1:{port}
"""
BACKENDS = ("by_options", "by_head", "by_get")
STATE_CHANGE = re.compile(r"Server (\w+)/serve is (UP|DOWN)")


class HAProxy:
    """haproxy in the foreground; its log arrives as syslog datagrams, one event each."""

    def __init__(self, workdir: Path, port: int) -> None:
        binary = require_program("haproxy", "haproxy")
        self.log = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.log.bind(("127.0.0.1", 0))
        self.log.settimeout(EVENT_TIMEOUT)
        self.stats_path = workdir / "stats.sock"
        conf = workdir / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(
            log_port=self.log.getsockname()[1], stats=self.stats_path, port=port))
        self.stderr = (workdir / "haproxy.stderr").open("w+")
        self.proc = subprocess.Popen([binary, "-f", str(conf), "-db"],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.lines: list[str] = []

    def next_line(self) -> str:
        try:
            line = self.log.recv(65536).decode(errors="replace").strip()
        except TimeoutError:
            pytest.fail(f"haproxy logged nothing for {EVENT_TIMEOUT} s; so far: {self.lines}")
        self.lines.append(line)
        return line

    def await_states(self, state: str) -> list[str]:
        """Wait for every backend's server to become `state`; the lines logged meanwhile."""
        waiting, seen = set(BACKENDS), []
        while waiting:
            line = self.next_line()
            seen.append(line)
            if (change := STATE_CHANGE.search(line)) is not None:
                backend, new_state = change.groups()
                assert new_state == state, f"{backend} went {new_state}: {line}"
                waiting.discard(backend)
        return seen

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` over the stats socket: each backend's server row."""
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(self.stats_path))
            conn.sendall(b"show stat\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["pxname"]: row for row in rows if row["svname"] == "serve"}

    def await_checked(self) -> None:
        """Wait until every backend's last check passed at layer 7 (a check ran and said UP).

        Between looks at the stats, it waits for haproxy's next log line, at most one check
        interval: startup lines, then nothing while the checks pass.
        """
        rows: dict[str, dict[str, str]] = {}
        self.log.settimeout(0.2)
        try:
            for _ in range(int(EVENT_TIMEOUT / 0.2)):
                if self.proc.poll() is not None:
                    pytest.fail(f"haproxy exited with {self.proc.returncode}: {self.lines}")
                with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                    rows = self.stats()  # the socket exists once haproxy is up
                if rows and all(rows[b]["check_status"] == "L7OK" for b in BACKENDS):
                    return
                with contextlib.suppress(TimeoutError):
                    self.lines.append(self.log.recv(65536).decode(errors="replace").strip())
        finally:
            self.log.settimeout(EVENT_TIMEOUT)
        states = {b: (r["status"], r["check_status"], r["check_code"]) for b, r in rows.items()}
        pytest.fail(f"haproxy's checks never all passed: {states}; log: {self.lines}")

    def close(self) -> str:
        """Stop haproxy (again is a no-op); what it wrote to stderr."""
        if self.stderr.closed:
            return ""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.stderr.seek(0)
        output = self.stderr.read()
        self.stderr.close()
        return output


@pytest.fixture
def haproxy_for(tmp_path: Path) -> Iterator[Callable[[int], HAProxy]]:
    started: list[HAProxy] = []

    def start(port: int) -> HAProxy:
        proxy = HAProxy(tmp_path, port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


def test_haproxy_follows_readyz_with_options_head_and_get(sim, tmp_path, haproxy_for):
    port = free_port()
    server = serve(sim, tmp_path, port, "1")
    try:
        server.wait_for("round:")
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        haproxy = haproxy_for(port)
        haproxy.await_checked()

        sim.set_faults({"healthz": "502"})
        server.next_round_started_after_now()
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 503
        failing = haproxy.await_states("DOWN")
        # Why they went down: /readyz's 503, not a dropped or reset connection.
        checks = [line for line in failing if line.startswith("Health check for server")]
        for backend in BACKENDS:
            assert any(f"server {backend}/serve failed" in line for line in checks), failing
        for line in checks:
            assert "failed, reason: Layer7 wrong status, code: 503" in line, line

        sim.set_faults({"healthz": "ok"})
        server.next_round_started_after_now()
        haproxy.await_states("UP")
        rows = haproxy.stats()
        for backend in BACKENDS:
            row = rows[backend]
            # Never flapping: one UP->DOWN transition, and the only failed checks while UP
            # were the two that took it down (fall 2); then two good ones brought it back.
            assert (row["status"], row["chkdown"], row["chkfail"]) == ("UP", "1", "2"), row
        haproxy_output = haproxy.close()
    finally:
        assert server.stop() == 0
    assert "Traceback" not in rest_of_log(server)
    assert "Connection reset" not in haproxy_output
