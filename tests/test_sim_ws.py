"""The sim's server-side WebSocket (sim/ws.py), driven by websocket-client over loopback."""

from __future__ import annotations

import http.client
import queue
import threading
from collections.abc import Callable, Iterator

import pytest
import websocket
from websocket import ABNF

from deployhealth.sim.deployment import SimRequest, SimulatedDeployment
from deployhealth.sim.ws import Received, ServerWebSocket, accept_websocket

Session = Callable[[ServerWebSocket], None]


class Harness:
    """A sim with test routes whose handlers report what the server side saw."""

    def __init__(self, sim: SimulatedDeployment) -> None:
        self.sim = sim
        self.seen: queue.Queue[object] = queue.Queue()
        self.clients: list[websocket.WebSocket] = []

    def connect(self, url: str, **options: object) -> websocket.WebSocket:
        client = websocket.create_connection(url, timeout=5, **options)
        self.clients.append(client)
        return client

    def route(self, path: str, session: Session, subprotocols: tuple[str, ...] = ()) -> str:
        def handle(request: SimRequest, _sim: SimulatedDeployment) -> None:
            ws = accept_websocket(request, subprotocols)
            self.seen.put(ws)
            if ws is not None:
                with ws:
                    session(ws)

        self.sim.route("GET", path, handle)
        return self.sim.url.replace("http://", "ws://") + path

    def next(self) -> object:
        return self.seen.get(timeout=5)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatedDeployment]:
    # One sim for the module: its shutdown waits out http.server's half-second poll.
    with SimulatedDeployment() as running:
        yield running


@pytest.fixture
def harness(sim: SimulatedDeployment) -> Iterator[Harness]:
    harness = Harness(sim)
    yield harness
    for client in harness.clients:
        client.shutdown()


def record_until_close(harness: Harness) -> Session:
    def session(ws: ServerWebSocket) -> None:
        while True:
            received = ws.recv(timeout=5)
            harness.seen.put(received)
            if received.kind == "close":
                harness.seen.put(ws.close_code)
                return

    return session


def echo(ws: ServerWebSocket) -> None:
    while True:
        kind, data = ws.recv(timeout=5)
        if kind == "close":
            return
        if isinstance(data, str) and kind == "text":
            ws.send_text(data)
        elif isinstance(data, bytes) and kind == "binary":
            ws.send_binary(data)


def test_echo_keeps_text_and_binary_types(harness: Harness) -> None:
    url = harness.route("/t/echo", echo)
    client = harness.connect(url)
    client.send("héllo")
    assert client.recv_data() == (ABNF.OPCODE_TEXT, "héllo".encode())
    client.send_binary(b"\x00\xff")
    assert client.recv_data() == (ABNF.OPCODE_BINARY, b"\x00\xff")
    client.close()


def test_fragmented_message_comes_back_whole(harness: Harness) -> None:
    url = harness.route("/t/frag", record_until_close(harness))
    client = harness.connect(url)
    assert harness.next() is not None
    client.send_frame(ABNF.create_frame("part one, ", ABNF.OPCODE_TEXT, fin=0))
    client.send_frame(ABNF.create_frame("part two", ABNF.OPCODE_CONT, fin=1))
    assert harness.next() == Received("text", "part one, part two")
    client.close()


def test_client_ping_is_answered_and_reported(harness: Harness) -> None:
    url = harness.route("/t/ping", record_until_close(harness))
    client = harness.connect(url)
    harness.next()
    client.ping(b"are you there")
    opcode, frame = client.recv_data_frame(control_frame=True)
    assert (opcode, frame.data) == (ABNF.OPCODE_PONG, b"are you there")
    assert harness.next() == Received("ping", b"are you there")
    client.close()


def test_server_ping_reaches_the_client_and_its_pong_is_reported(harness: Harness) -> None:
    def session(ws: ServerWebSocket) -> None:
        ws.ping(b"hb")
        harness.seen.put(ws.recv(timeout=5))

    url = harness.route("/t/srvping", session)
    client = harness.connect(url)
    harness.next()
    opcode, frame = client.recv_data_frame(control_frame=True)  # websocket-client pongs
    assert (opcode, frame.data) == (ABNF.OPCODE_PING, b"hb")
    assert harness.next() == Received("pong", b"hb")
    client.close()


def test_client_close_code_and_reason_reach_the_server(harness: Harness) -> None:
    url = harness.route("/t/close", record_until_close(harness))
    client = harness.connect(url)
    harness.next()
    client.close(status=1001, reason=b"going away", timeout=5)
    assert harness.next() == Received("close", "going away")
    assert harness.next() == 1001
    # The server answered the close: websocket-client stored its close frame.
    assert client.close_frame is not None
    assert client.close_frame.data[:2] == (1001).to_bytes(2, "big")


def test_server_close_sends_code_and_reason(harness: Harness) -> None:
    url = harness.route("/t/srvclose", lambda ws: ws.close(4000, "done here"))
    client = harness.connect(url)
    opcode, frame = client.recv_data_frame(control_frame=True)
    assert opcode == ABNF.OPCODE_CLOSE
    assert frame.data == (4000).to_bytes(2, "big") + b"done here"


def test_vanished_client_is_close_1006(harness: Harness) -> None:
    url = harness.route("/t/vanish", record_until_close(harness))
    client = harness.connect(url)
    harness.next()
    client.shutdown()  # TCP goes away without a close frame
    assert harness.next() == Received("close", "")
    assert harness.next() == 1006


def test_recv_times_out_when_nothing_arrives(harness: Harness) -> None:
    def session(ws: ServerWebSocket) -> None:
        try:
            ws.recv(timeout=0.2)
        except TimeoutError as exc:
            harness.seen.put(exc)

    url = harness.route("/t/quiet", session)
    client = harness.connect(url)
    harness.next()
    assert isinstance(harness.next(), TimeoutError)
    client.close()


def test_abort_drops_the_connection_without_a_close_frame(harness: Harness) -> None:
    url = harness.route("/t/abort", lambda ws: ws.abort())
    client = harness.connect(url)
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        client.recv_data_frame(control_frame=True)


def test_sends_from_several_threads_never_interleave(harness: Harness) -> None:
    per_thread = 200

    def session(ws: ServerWebSocket) -> None:
        def send(tag: str) -> None:
            for i in range(per_thread):
                ws.send_text(f"{tag}-{i}-" + "x" * 500)

        threads = [threading.Thread(target=send, args=(t,)) for t in "ab"]
        threads.append(threading.Thread(target=lambda: [ws.ping(b"p") for _ in range(per_thread)]))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ws.send_text("end")
        while ws.recv(timeout=5).kind != "close":
            pass

    url = harness.route("/t/threads", session)
    client = harness.connect(url)
    texts: list[str] = []
    pings = 0
    while True:
        opcode, frame = client.recv_data_frame(control_frame=True)
        if opcode == ABNF.OPCODE_PING:
            pings += 1
            continue
        text = frame.data.decode()
        if text == "end":
            break
        texts.append(text)
    client.close()
    assert pings == per_thread
    for tag in "ab":
        mine = [t for t in texts if t.startswith(f"{tag}-")]
        assert mine == [f"{tag}-{i}-" + "x" * 500 for i in range(per_thread)]


def test_subprotocol_is_chosen_from_the_offer(harness: Harness) -> None:
    url = harness.route("/t/derp", lambda ws: harness.seen.put(ws.subprotocol), ("derp",))
    client = harness.connect(url, subprotocols=["other", "derp"])
    assert client.getsubprotocol() == "derp"
    assert isinstance(harness.next(), ServerWebSocket)
    assert harness.next() == "derp"
    client.close()


def test_required_subprotocol_not_offered_is_400(harness: Harness) -> None:
    url = harness.route("/t/derp2", echo, ("derp",))
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(url, timeout=5)
    assert caught.value.status_code == 400
    assert b"derp" in (caught.value.resp_body or b"")
    assert harness.next() is None


def _plain_get(harness: Harness, path: str, headers: dict[str, str]) -> tuple[int, str, str]:
    host, port = harness.sim.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Upgrade", ""), response.read().decode()
    finally:
        conn.close()


def test_plain_get_is_426_upgrade_required(harness: Harness) -> None:
    harness.route("/t/plain", echo)
    status, upgrade, body = _plain_get(harness, "/t/plain", {})
    assert (status, upgrade) == (426, "websocket")
    assert "WebSocket protocol violation" in body
    assert harness.next() is None


def test_unsupported_version_is_refused(harness: Harness) -> None:
    harness.route("/t/version", echo)
    status, _upgrade, body = _plain_get(
        harness,
        "/t/version",
        {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "8",
        },
    )
    assert status == 426
    assert "Sec-WebSocket-Version" in body
    assert harness.next() is None
