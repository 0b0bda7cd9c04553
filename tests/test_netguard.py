"""netguard: blocked addresses are refused before any connection; connections go where vetted.

"No connection" is observed with an audit hook on `socket.connect` (the `connects` fixture):
the interpreter reports every connect it makes, whoever makes it, and nothing of
deployhealth is patched. No test
sends a packet to a link-local or metadata address: the refusals happen before any socket.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.tls import CertAuthority

from deployhealth.deadline import Deadline
from deployhealth.net import blocking_network, networks
from deployhealth.netguard import (
    BlockedAddressError,
    FetchError,
    GuardedSession,
    HostVetting,
    UnvettedConnectionError,
    fetch,
    read_capped,
)
from deployhealth.settings import BLOCKED_NETWORKS
from deployhealth.sim.inventory import ProxyFarm, ProxyReply


def get(url: str, seconds: float = 5.0, **options: Any) -> Any:
    return asyncio.run(fetch(url, Deadline.after(seconds), **options))


LOOPBACK_BLOCKED = networks(["127.0.0.0/8", "::1/128"])


# --- the policy -----------------------------------------------------------------------

# 169.254.169.254 spelled in IPv6: every embedding a stack or a translator may route to it.
METADATA_IN_IPV6 = [
    "::a9fe:a9fe",  # IPv4-compatible
    "::169.254.169.254",
    "::ffff:0:a9fe:a9fe",  # SIIT's IPv4-translated
    "64:ff9b::a9fe:a9fe",  # NAT64, well-known prefix
    "64:ff9b::169.254.169.254",
    "64:ff9b:1:a9fe:a9:fe00::",  # NAT64, local-use prefix at /48 (RFC 6052 layout)
    "64:ff9b:1::a9fe:a9fe",  # the same at /96
    "2002:a9fe:a9fe::1",  # 6to4
    "2001:0:a9fe:a9fe::1",  # Teredo, the metadata address as its server
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, as its (obfuscated) client
    "2001:db8::200:5efe:a9fe:a9fe",  # ISATAP interface id
]


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("169.254.169.254", True),
        ("169.254.170.2", True),
        ("fd00:ec2::254", True),
        ("fe80::1", True),
        ("fe80::1%lo", True),
        ("::ffff:169.254.169.254", True),
        *((spelling, True) for spelling in METADATA_IN_IPV6),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::a00:5", False),  # NAT64 of 10.0.0.5
        ("2002:a00:5::1", False),  # 6to4 of 10.0.0.5
        ("::1", False),
        ("127.0.0.1", False),
        ("10.0.0.5", False),
        ("fd00:ec3::1", False),
        ("2600:1f18::1", False),
    ],
)
def test_blocked_networks(address: str, blocked: bool) -> None:
    found = blocking_network(address, networks(BLOCKED_NETWORKS))
    assert (found is not None) is blocked


def test_allow_list_wins_over_the_block_list() -> None:
    allowed = networks(["169.254.170.2/32"])  # ECS task metadata, allowed on purpose
    assert blocking_network("169.254.170.2", networks(BLOCKED_NETWORKS), allowed) is None
    assert blocking_network("169.254.169.254", networks(BLOCKED_NETWORKS), allowed) is not None


# --- fetch (asyncio) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "https://[fd00:ec2::254]/"],
)
def test_fetch_refuses_blocked_literals_without_connecting(
    url: str, connects: list[str]
) -> None:
    with pytest.raises(BlockedAddressError) as caught:
        get(url)
    text = str(caught.value)
    assert text.startswith(f"refusing to fetch {url}: ")
    assert "link-local or instance-metadata address" in text
    assert connects == []


@pytest.mark.parametrize("spelling", METADATA_IN_IPV6)
def test_metadata_in_ipv6_clothes_is_refused_without_connecting(
    spelling: str, connects: list[str]
) -> None:
    url = f"http://[{spelling}]/latest/meta-data/"
    with pytest.raises(BlockedAddressError, match=re.escape("(in 169.254.0.0/16)")):
        get(url)
    with GuardedSession() as guard, pytest.raises(BlockedAddressError, match="refusing"):
        guard.get(url, Deadline.after(5))
    assert connects == []


def test_fetch_refuses_a_name_that_resolves_to_a_blocked_address(
    farm: ProxyFarm, connects: list[str]
) -> None:
    # The name is resolved and its address judged before any socket: here loopback plays the
    # blocked network, so the name can be one every machine resolves.
    proxy = farm.add(ProxyReply())
    url = f"http://localhost:{proxy.port}/healthz-report"
    with pytest.raises(BlockedAddressError) as caught:
        get(url, blocked=LOOPBACK_BLOCKED)
    assert "localhost resolves to " in str(caught.value)
    assert connects == [] and proxy.hits == 0


def test_a_fan_out_vets_a_host_once_and_every_url_keeps_its_own_port(
    farm: ProxyFarm, connects: list[str]
) -> None:
    # Proxies behind one name share one HostVetting, as the workspace_proxy family's fetches
    # do: each still reaches its own port, and a refusal names each URL, not the first one.
    proxies = [farm.add(ProxyReply()), farm.add(ProxyReply())]
    urls = [f"http://localhost:{p.port}/healthz-report" for p in proxies]

    async def fetch_all(vetting: HostVetting) -> list[Any]:
        return await asyncio.gather(
            *(fetch(url, Deadline.after(5), vetting=vetting) for url in urls),
            return_exceptions=True,
        )

    answers = asyncio.run(fetch_all(HostVetting()))
    assert [a.status for a in answers] == [200, 200]
    assert [p.hits for p in proxies] == [1, 1]

    connects.clear()
    refused = asyncio.run(fetch_all(HostVetting(blocked=LOOPBACK_BLOCKED)))
    assert all(isinstance(r, BlockedAddressError) for r in refused)
    assert [str(r).split(": ", 1)[0] for r in refused] == [f"refusing to fetch {u}" for u in urls]
    assert connects == [] and [p.hits for p in proxies] == [1, 1]


def test_fetch_follows_the_allow_list(farm: ProxyFarm, connects: list[str]) -> None:
    proxy = farm.add(ProxyReply())
    answer = get(
        f"http://127.0.0.1:{proxy.port}/healthz-report",
        blocked=LOOPBACK_BLOCKED,
        allowed=networks(["127.0.0.1/32"]),
    )
    assert answer.status == 200 and json.loads(answer.body) == {"errors": [], "warnings": []}
    assert connects == ["127.0.0.1"] and proxy.hits == 1


def test_fetch_connects_to_the_vetted_address(farm: ProxyFarm, connects: list[str]) -> None:
    proxy = farm.add(ProxyReply())
    answer = get(f"http://localhost:{proxy.port}/healthz-report")
    assert answer.status == 200
    vetted = {info[4][0] for info in socket.getaddrinfo("localhost", proxy.port)}
    assert connects and set(connects) <= vetted


def test_fetch_caps_the_body_and_the_time(farm: ProxyFarm) -> None:
    huge = farm.add(ProxyReply(size=50 * 1024 * 1024))
    tracemalloc.start()
    try:
        answer = get(f"{huge.url}/healthz-report", cap=1000)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.truncated and answer.body == b"x" * 1000
    assert peak < 4 * 1024 * 1024

    slow = farm.add(ProxyReply(delay=10.0))
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        get(f"{slow.url}/healthz-report", seconds=0.5)
    assert time.monotonic() - started < 1.0
    assert caught.value.timed_out and caught.value.phase == "waiting for the response"


class OneAnswer:
    """A listener that answers one GET and keeps every byte its client sent until it closed.

    With `queue_full`, a connection already waits in its accept queue (backlog 0), so the
    kernel drops the next client's SYN: that client's connect stays in progress until
    `release` is set, the waiting connection is taken off the queue and the SYN is sent
    again (Linux retries after a second).
    """

    def __init__(self, *, queue_full: bool) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.listener.settimeout(10)  # a broken test fails, it does not hang
        self.port = self.listener.getsockname()[1]
        self.release = threading.Event()
        self.received = b""
        self._filler = socket.create_connection(("127.0.0.1", self.port)) if queue_full else None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        if self._filler is not None:
            self.release.wait(10)
            self.listener.accept()[0].close()
        connection, _peer = self.listener.accept()
        with connection:
            while b"\r\n\r\n" not in self.received:
                self.received += connection.recv(4096)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
            while data := connection.recv(4096):
                self.received += data

    def close(self) -> None:
        self.release.set()
        self._thread.join(timeout=10)
        if self._filler is not None:
            self._filler.close()
        self.listener.close()


@pytest.mark.parametrize("queue_full", [False, True], ids=["up-at-once", "up-later"])
def test_fetch_sends_its_request_once_whenever_the_connection_comes_up(
    queue_full: bool, connects: list[str]
) -> None:
    # The request is sent as soon as the connection is up: at once on loopback, after
    # waiting when the server's queue drops the first SYN. Either way exactly once.
    server = OneAnswer(queue_full=queue_full)
    connects.clear()
    url = f"http://127.0.0.1:{server.port}/healthz-report"

    async def scenario() -> Any:
        task = asyncio.create_task(fetch(url, Deadline.after(10)))
        while not connects:  # the fetch has connected (or tried to): let the server go
            await asyncio.sleep(0)
        server.release.set()
        return await task

    try:
        answer = asyncio.run(scenario())
    finally:
        server.close()
    assert answer.status == 200 and answer.body == b"{}"
    assert server.received.count(b"GET /healthz-report HTTP/1.1\r\n") == 1
    assert server.received.endswith(b"\r\n\r\n")


def test_a_connection_that_never_comes_up_times_out_in_the_connect_phase() -> None:
    # The server's accept queue is full and never drained: it drops every SYN of the fetch.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)), pytest.raises(FetchError) as caught:
            get(f"http://127.0.0.1:{port}/healthz-report", seconds=0.5)
    assert caught.value.timed_out and caught.value.phase == "connect"


# --- GuardedSession (requests) ----------------------------------------------------------


def test_session_refuses_blocked_addresses_without_connecting(connects: list[str]) -> None:
    with GuardedSession() as guard:
        for url in ("http://169.254.169.254/", "http://[fe80::1]:8080/x"):
            with pytest.raises(BlockedAddressError, match="refusing to fetch"):
                guard.get(url, Deadline.after(5))
    assert connects == []


def test_session_refuses_a_connection_it_did_not_vet(
    farm: ProxyFarm, connects: list[str]
) -> None:
    proxy = farm.add(ProxyReply())
    with GuardedSession() as guard:
        # Straight through the adapter, as a followed redirect would go: no vetting, no pin.
        with pytest.raises(UnvettedConnectionError, match="was not vetted"):
            guard._session.get(f"{proxy.url}/healthz-report", timeout=5)
        answer = guard.get(f"{proxy.url}/healthz-report", Deadline.after(5))
        body, more = read_capped(answer, 1024, Deadline.after(5))
    assert answer.status_code == 200 and not more and json.loads(body)["errors"] == []
    assert connects == ["127.0.0.1"] and proxy.hits == 1


def test_session_does_not_follow_redirects(farm: ProxyFarm) -> None:
    moved = farm.add(
        ProxyReply(status=302, body=b"", headers=(("Location", "http://169.254.169.254/"),))
    )
    with GuardedSession() as guard:
        answer = guard.get(f"{moved.url}/healthz-report", Deadline.after(5))
        answer.close()
    assert answer.status_code == 302


def test_session_budget_cuts_a_trickling_answer() -> None:
    # A byte every 0.2 s: every read is quick, the whole answer never ends. Socket timeouts
    # alone would wait for ever; the budget's watchdog hangs up.
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with GuardedSession() as guard, pytest.raises(requests.ConnectionError):
            guard.get(
                f"http://127.0.0.1:{listener.getsockname()[1]}/", Deadline.after(1.0)
            )
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert elapsed < 1.5


def test_session_caps_a_fifty_megabyte_body(farm: ProxyFarm) -> None:
    huge = farm.add(ProxyReply(size=50 * 1024 * 1024))
    tracemalloc.start()
    try:
        with GuardedSession() as guard:
            budget = Deadline.after(5)
            body, more = read_capped(guard.get(f"{huge.url}/healthz-report", budget), 4096, budget)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert more and len(body) == 4096
    assert peak < 4 * 1024 * 1024


# --- TLS keeps the name while connecting to the vetted address ------------------------------


class _Report(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"errors": [], "warnings": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_server(ca: CertAuthority) -> Iterator[tuple[str, Path]]:
    issued = ca.issue("localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Report)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}/healthz-report", ca.bundle
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_tls_verifies_the_name_on_the_pinned_connection(
    tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, connects: list[str]
) -> None:
    url, ca = tls_server
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    answer = get(url)
    assert answer.status == 200
    assert connects and all(ipaddress.ip_address(a).is_loopback for a in connects)
    with GuardedSession() as guard:
        response = guard.get(url, Deadline.after(5), timeout_cap=5)
        response.close()
    assert response.status_code == 200


def test_tls_with_an_unknown_authority_fails_in_the_tls_phase(
    tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ca = tls_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    with pytest.raises(FetchError) as caught:
        get(url)
    assert caught.value.phase == "tls"
    assert "certificate verify failed" in str(caught.value)


# --- a real name that resolves to the metadata address --------------------------------------

_PROBE = """
import json, sys
connects = []
def audit(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):
        connects.append(str(args[1][0]))
sys.addaudithook(audit)
from deployhealth.checks.workspace_proxy import probe
from deployhealth.deadline import Deadline
from deployhealth.settings import Settings
proxies = ({"id": "m", "name": "meta", "path_app_url": "http://metadata.dh-test"},)
section = probe(Settings(static_proxies=proxies), Deadline.after(5))
print(json.dumps({"section": section.to_dict(), "connects": connects}))
"""


def _private_hosts_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    trial = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return trial.returncode == 0


@pytest.mark.skipif(
    not _private_hosts_works(),
    reason="needs root and unshare to give one process its own /etc/hosts",
)
def test_a_name_resolving_to_metadata_is_refused_before_connecting(tmp_path: Path) -> None:
    # The probe runs in a private mount namespace whose /etc/hosts maps a name to the
    # metadata address; the machine's own /etc/hosts is untouched.
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n169.254.169.254 metadata.dh-test\n")
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    result = subprocess.run(
        [
            "unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" /etc/hosts && exec "$2" "$3"', "sh",
            str(hosts), sys.executable, str(script),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    (region,) = out["section"]["workspace_proxies"]["regions"]
    assert region["status"]["status"] == "unhealthy"
    (error,) = region["status"]["report"]["errors"]
    assert error.startswith(
        "refusing to fetch http://metadata.dh-test/healthz-report: metadata.dh-test resolves "
        "to 169.254.169.254, which is a link-local or instance-metadata address"
    )
    assert out["connects"] == []
