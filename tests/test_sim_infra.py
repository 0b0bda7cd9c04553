"""The loopback simulators behave like the real failures they stand in for."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pg8000.exceptions
import pg8000.native
import pytest

from deployhealth.sim.postgres import LocalPostgres
from deployhealth.sim.tcp import BlackHoleServer, DelayProxy, free_port

DELAY = 0.05


@pytest.fixture(scope="module")
def own_pg() -> Iterator[LocalPostgres]:
    """A server of this module's own: its tests stop and restart it, which the session's
    shared `pg` must never be."""
    server = LocalPostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


def _connect(own_pg: LocalPostgres, port: int, timeout: float = 10.0) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        user=own_pg.user,
        password=own_pg.password,
        host="127.0.0.1",
        port=port,
        database=own_pg.database,
        timeout=timeout,
    )


def _median_round_trip(conn: pg8000.native.Connection, samples: int = 7) -> float:
    times = []
    for _ in range(samples):
        started = time.monotonic()
        assert conn.run("SELECT 1") == [[1]]
        times.append(time.monotonic() - started)
    return statistics.median(times)


def _threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


# -- LocalPostgres -------------------------------------------------------------------


def test_url_points_at_loopback_with_credentials(own_pg: LocalPostgres) -> None:
    parts = urlsplit(own_pg.url)
    assert parts.scheme == "postgresql"
    assert parts.hostname == "127.0.0.1"
    assert parts.port == own_pg.port
    assert unquote(parts.username or "") == own_pg.user
    assert unquote(parts.password or "") == own_pg.password
    assert parts.path == f"/{own_pg.database}"
    assert parts.query == "sslmode=disable"
    assert "wrong" in own_pg.url_with_password("wrong")


def test_accepts_correct_password_over_tcp(own_pg: LocalPostgres) -> None:
    parts = urlsplit(own_pg.url)
    conn = pg8000.native.Connection(
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        host=parts.hostname or "",
        port=parts.port or 0,
        database=parts.path.lstrip("/"),
        timeout=10,
    )
    try:
        assert conn.run("SELECT current_user") == [[own_pg.user]]
        # Proves the TCP path really uses SCRAM rather than falling back to trust.
        rules = conn.run("SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host'")
        assert {rule[0] for rule in rules} == {"scram-sha-256"}
        assert conn.run("SHOW listen_addresses") == [["127.0.0.1"]]
    finally:
        conn.close()


def test_rejects_wrong_password(own_pg: LocalPostgres) -> None:
    wrong = urlsplit(own_pg.url_with_password("not-the-password"))
    with pytest.raises(pg8000.exceptions.DatabaseError) as excinfo:
        pg8000.native.Connection(
            user=own_pg.user,
            password=unquote(wrong.password or ""),
            host="127.0.0.1",
            port=own_pg.port,
            database=own_pg.database,
            timeout=10,
        )
    assert "password authentication failed" in str(excinfo.value)


def test_execute_seeds_and_reads_tables(own_pg: LocalPostgres) -> None:
    own_pg.execute(
        "DROP TABLE IF EXISTS seeded; "
        "CREATE TABLE seeded (id int PRIMARY KEY, name text); "
        "INSERT INTO seeded VALUES (1, 'one'), (2, 'two')"
    )
    assert own_pg.execute("SELECT name FROM seeded WHERE id = :id", id=2) == [["two"]]
    assert own_pg.execute("SELECT count(*) FROM seeded") == [[2]]


def test_stop_refuses_connections_and_start_returns_on_same_port(own_pg: LocalPostgres) -> None:
    port = own_pg.port
    own_pg.stop()
    try:
        assert not own_pg.is_running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(pg8000.exceptions.InterfaceError):
            own_pg.connect(timeout=5)
    finally:
        own_pg.start()
    assert own_pg.is_running
    assert own_pg.port == port
    assert own_pg.execute("SELECT 1") == [[1]]


def test_restart_keeps_port_and_drops_sessions(own_pg: LocalPostgres) -> None:
    port = own_pg.port
    before = own_pg.connect()
    try:
        own_pg.restart()
        assert own_pg.port == port
        assert own_pg.is_running
        # A fast shutdown terminates existing sessions, as a real failover would.
        with pytest.raises((pg8000.exceptions.InterfaceError, pg8000.exceptions.DatabaseError)):
            before.run("SELECT 1")
    finally:
        # The server already hung up; sending Terminate may or may not notice.
        with contextlib.suppress(pg8000.exceptions.InterfaceError, OSError):
            before.close()
    assert own_pg.execute("SELECT 1") == [[1]]


def test_close_removes_temporary_cluster() -> None:
    with LocalPostgres() as server:
        data_dir = server.data_dir
        assert (data_dir / "PG_VERSION").exists()
        assert server.execute("SELECT 1") == [[1]]
    assert not server.is_running
    assert not data_dir.exists()


# -- DelayProxy ----------------------------------------------------------------------


def test_delay_proxy_slows_each_round_trip(own_pg: LocalPostgres) -> None:
    direct = own_pg.connect()
    try:
        direct_median = _median_round_trip(direct)
    finally:
        direct.close()

    with DelayProxy(own_pg.host, own_pg.port, DELAY) as proxy:
        conn = _connect(own_pg, proxy.port)
        try:
            proxied_median = _median_round_trip(conn)
        finally:
            conn.close()

    # Request and response are each held >= DELAY, so this is a hard lower bound.
    assert proxied_median >= 2 * DELAY
    assert proxied_median > direct_median


def test_delay_proxy_delay_can_change_while_running(own_pg: LocalPostgres) -> None:
    with DelayProxy(own_pg.host, own_pg.port, 0.0) as proxy:
        conn = _connect(own_pg, proxy.port)
        try:
            assert conn.run("SELECT 1") == [[1]]
            proxy.delay_seconds = DELAY
            assert _median_round_trip(conn, samples=3) >= 2 * DELAY
        finally:
            conn.close()


def test_delay_proxy_moves_bulk_data_intact_and_in_order() -> None:
    # More than the proxy's per-direction buffer cap, so back-pressure is exercised.
    payload = bytes(range(256)) * (3 * 4096 + 17)
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def echo_once() -> None:
            conn, _ = listener.accept()
            with conn:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

        echo = threading.Thread(target=echo_once, daemon=True)
        echo.start()
        with DelayProxy("127.0.0.1", listener.getsockname()[1], 0.01) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
            with client:

                def send_all() -> None:
                    client.sendall(payload)
                    client.shutdown(socket.SHUT_WR)

                # Sending from another thread: the echo comes back while we still send.
                sender = threading.Thread(target=send_all, daemon=True)
                sender.start()
                received = bytearray()
                while chunk := client.recv(65536):
                    received += chunk
                sender.join(30)
        echo.join(30)
    assert bytes(received) == payload


def test_delay_proxy_hangs_up_when_target_refuses() -> None:
    with DelayProxy("127.0.0.1", free_port(), 0.0) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        with client, contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""


def test_delay_proxy_refuses_non_loopback_target() -> None:
    with pytest.raises(ValueError, match="loopback"):
        DelayProxy("192.0.2.1", 5432, 0.1)


def test_delay_proxy_close_leaves_no_threads_or_connections(own_pg: LocalPostgres) -> None:
    proxy = DelayProxy(own_pg.host, own_pg.port, 0.0).start()
    conn = _connect(own_pg, proxy.port)
    assert conn.run("SELECT 1") == [[1]]
    assert _threads_named("DelayProxy")
    proxy.close()
    assert not _threads_named("DelayProxy")
    with pytest.raises((pg8000.exceptions.InterfaceError, pg8000.exceptions.DatabaseError)):
        conn.run("SELECT 1")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()


# -- BlackHoleServer -----------------------------------------------------------------


def test_black_hole_makes_reads_time_out() -> None:
    with BlackHoleServer() as hole:
        client = socket.create_connection(("127.0.0.1", hole.port), timeout=0.5)
        with client:
            client.sendall(b"hello?")
            with pytest.raises(TimeoutError):
                client.recv(1)
            assert hole.wait_for_accepted(1, timeout=5)
            assert hole.accepted == 1


@pytest.mark.parametrize("ssl_context", [None, False], ids=["ssl-probe", "no-ssl"])
def test_black_hole_times_out_a_postgres_client(ssl_context: bool | None) -> None:
    with BlackHoleServer() as hole:
        started = time.monotonic()
        # pg8000 1.31 lets the raw TimeoutError escape during the startup exchange; a
        # version that wraps it in InterfaceError is fine too, if a timeout is the cause.
        with pytest.raises((TimeoutError, pg8000.exceptions.InterfaceError)) as excinfo:
            pg8000.native.Connection(
                user="postgres",
                password="x",
                host="127.0.0.1",
                port=hole.port,
                timeout=0.5,
                ssl_context=ssl_context,
            )
        assert time.monotonic() - started >= 0.5
        error = excinfo.value
        assert isinstance(error, TimeoutError) or isinstance(error.__cause__, TimeoutError)
        assert hole.accepted == 1


def test_black_hole_close_hangs_up_and_stops_thread() -> None:
    hole = BlackHoleServer().start()
    client = socket.create_connection(("127.0.0.1", hole.port), timeout=5)
    with client:
        assert hole.wait_for_accepted(1, timeout=5)
        hole.close()
        assert not _threads_named("BlackHoleServer")
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as sock:
        assert sock.getsockname()[1] == port
