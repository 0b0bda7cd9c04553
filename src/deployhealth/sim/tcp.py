"""Loopback TCP fault injectors: a latency-adding proxy, a server that never answers, and
one that plays a script (a foreign protocol's banner, a stream without end).

Both bind 127.0.0.1 only, and :class:`DelayProxy` refuses to forward anywhere but
loopback, so a misconfigured test can never push traffic off the machine.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import ipaddress
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Self

from deployhealth.sim._service import Service

__all__ = ["LOOPBACK", "BlackHoleServer", "DelayProxy", "ScriptedServer", "free_port"]

LOOPBACK = "127.0.0.1"

_log = logging.getLogger(__name__)

_RECV_SIZE = 64 * 1024
# Per-direction cap on bytes held in the proxy. Past it we stop reading from the
# sender, so TCP flow control pushes back instead of the proxy buffering without bound.
_MAX_BUFFERED = 1024 * 1024
_JOIN_TIMEOUT = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was unused a moment ago.

    Someone else can take the port between this probe closing and the caller
    binding it, so callers that can retry on "address in use" should.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _loopback_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        if ipaddress.ip_address(sockaddr[0]).is_loopback:
            return family, sockaddr
    raise ValueError(
        f"{host!r} does not resolve to a loopback address; the simulators only talk to this host"
    )


def _listen_loopback() -> socket.socket:
    listener = socket.create_server((LOOPBACK, 0), backlog=128)
    # Non-blocking so that a connection which vanishes between select() and accept()
    # cannot wedge the serving thread.
    listener.setblocking(False)
    return listener


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class _Direction:
    """One half of a proxied connection: bytes read from ``src`` are written to ``dst`` late."""

    __slots__ = (
        "dst",
        "eof_due",
        "last_due",
        "outbuf",
        "read_open",
        "scheduled",
        "scheduled_bytes",
        "src",
        "write_open",
    )

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        # (release time, chunk); an empty chunk stands for the sender's EOF so that
        # the half-close is delayed exactly like the data in front of it.
        self.scheduled: deque[tuple[float, bytes]] = deque()
        self.scheduled_bytes = 0
        self.outbuf = bytearray()
        self.eof_due = False
        self.read_open = True
        self.write_open = True
        self.last_due = 0.0

    def buffered(self) -> int:
        return self.scheduled_bytes + len(self.outbuf)

    def schedule(self, chunk: bytes, now: float, delay: float) -> None:
        # max() keeps chunks in order if the delay is lowered mid-stream.
        due = max(now + delay, self.last_due)
        self.last_due = due
        self.scheduled.append((due, chunk))
        self.scheduled_bytes += len(chunk)
        if not chunk:
            self.read_open = False

    def release_due(self, now: float) -> float | None:
        """Move chunks whose hold time is over to the send buffer; return the next release time."""
        while self.scheduled and self.scheduled[0][0] <= now:
            _due, chunk = self.scheduled.popleft()
            self.scheduled_bytes -= len(chunk)
            if chunk:
                self.outbuf += chunk
            else:
                self.eof_due = True
        return self.scheduled[0][0] if self.scheduled else None

    def flush(self) -> None:
        """Write what ``dst`` accepts without blocking; OSError means the peer is gone."""
        while self.outbuf:
            try:
                sent = self.dst.send(self.outbuf)
            except BlockingIOError:
                return
            del self.outbuf[:sent]
        if self.eof_due and self.write_open:
            self.dst.shutdown(socket.SHUT_WR)
            self.write_open = False


class _Conn:
    __slots__ = ("client", "connecting", "down", "up", "upstream")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connecting = True
        self.up = _Direction(client, upstream)
        self.down = _Direction(upstream, client)

    @property
    def finished(self) -> bool:
        # Both EOFs have been passed on, so neither side can send anything more.
        return not (self.up.write_open or self.down.write_open)

    def reading(self, sock: socket.socket) -> _Direction:
        return self.up if sock is self.client else self.down

    def writing(self, sock: socket.socket) -> _Direction:
        return self.up if sock is self.upstream else self.down


class _LoopbackService(Service):
    """A listener on 127.0.0.1 that one daemon thread serves until `close()` joins it.

    Subclasses provide `_serve`, which runs until `_closing` is set (`_wake()` interrupts
    its select) and then calls `_teardown()`, and `_release`, which lets go of what they
    hold. Without a thread, `close()` tears down itself.
    """

    def __init__(self) -> None:
        self._listener = _listen_loopback()
        self.port: int = int(self._listener.getsockname()[1])
        self.host = LOOPBACK
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closing = threading.Event()
        self._lifecycle = threading.Lock()
        self._thread: threading.Thread | None = None
        self._torn_down = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> Self:
        name = type(self).__name__
        with self._lifecycle:
            if self._closing.is_set():
                raise RuntimeError(f"{name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name=f"{name}:{self.port}", daemon=True
                )
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, let go of every connection and join the serving thread."""
        with self._lifecycle:
            self._closing.set()
            thread = self._thread
        if thread is None:
            self._teardown()
            return
        self._wake()
        thread.join(_JOIN_TIMEOUT)
        if thread.is_alive():
            name = type(self).__name__
            raise RuntimeError(f"{name} thread did not stop within {_JOIN_TIMEOUT}s")

    def _wake(self) -> None:
        # A full wake buffer already guarantees a wake-up; a closed one means we are done.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    @abc.abstractmethod
    def _serve(self) -> None: ...

    @abc.abstractmethod
    def _release(self) -> None: ...

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self._release()
        for sock in (self._listener, self._wake_r, self._wake_w):
            _close_quietly(sock)


class DelayProxy(_LoopbackService):
    """Forward 127.0.0.1:``port`` to a loopback target, holding every chunk ``delay_seconds``.

    Both directions are delayed, so a request/response round trip through the proxy
    takes at least ``2 * delay_seconds`` longer than a direct one. Chunks are held
    concurrently (pipelined), not one after another, and their order is preserved.
    ``delay_seconds`` may be changed while running; it applies to chunks read afterwards.

    All connections are served by one background thread multiplexing with
    ``selectors``, so the thread count stays constant however many clients connect,
    and :meth:`close` has exactly one thread to join.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay_seconds: float = 0.0,
        *,
        max_connections: int = 64,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._family, self._target = _loopback_address(target_host, target_port)
        self.delay_seconds = delay_seconds
        self._max_connections = max_connections
        super().__init__()
        self._selector = selectors.DefaultSelector()
        self._interest: dict[socket.socket, int] = {}
        self._conns: set[_Conn] = set()
        self.error: BaseException | None = None

    @property
    def delay_seconds(self) -> float:
        return self._delay

    @delay_seconds.setter
    def delay_seconds(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay_seconds must be >= 0")
        # A plain float store is atomic, and the serving thread reads it once per chunk.
        self._delay = float(value)

    def _want(self, sock: socket.socket, events: int, data: _Conn | None) -> None:
        current = self._interest.get(sock, 0)
        if events == current:
            return
        if current == 0:
            self._selector.register(sock, events, data)
        elif events == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, events, data)
        if events:
            self._interest[sock] = events
        else:
            self._interest.pop(sock, None)

    def _drop(self, conn: _Conn) -> None:
        for sock in (conn.client, conn.upstream):
            self._want(sock, 0, None)
            _close_quietly(sock)
        self._conns.discard(conn)

    def _serve(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._closing.is_set():
                timeout = self._advance(time.monotonic())
                for key, events in self._selector.select(timeout):
                    conn = key.data
                    if conn is None:
                        if key.fileobj is self._listener:
                            self._accept()
                        else:
                            self._drain_wake()
                    elif conn in self._conns:
                        # Skips sockets of a connection dropped earlier in this same batch.
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        self._on_event(conn, sock, events)
        except BaseException as exc:
            self.error = exc
            _log.exception("DelayProxy on port %d crashed", self.port)
        finally:
            self._teardown()

    def _advance(self, now: float) -> float | None:
        """Release due chunks, refresh selector interest, and return the select() timeout."""
        next_due: float | None = None
        for conn in list(self._conns):
            try:
                for direction in (conn.up, conn.down):
                    due = direction.release_due(now)
                    if due is not None and (next_due is None or due < next_due):
                        next_due = due
                    if not conn.connecting:
                        direction.flush()
            except OSError:
                self._drop(conn)
                continue
            if conn.finished:
                self._drop(conn)
                continue
            self._refresh(conn)
        accepting = len(self._conns) < self._max_connections
        self._want(self._listener, selectors.EVENT_READ if accepting else 0, None)
        if next_due is None:
            return None
        return max(0.0, next_due - time.monotonic())

    def _refresh(self, conn: _Conn) -> None:
        if conn.connecting:
            self._want(conn.client, self._read_mask(conn.up), conn)
            # Writability is how a non-blocking connect reports completion.
            self._want(conn.upstream, selectors.EVENT_WRITE, conn)
            return
        for sock in (conn.client, conn.upstream):
            events = self._read_mask(conn.reading(sock))
            if conn.writing(sock).outbuf:
                events |= selectors.EVENT_WRITE
            self._want(sock, events, conn)

    @staticmethod
    def _read_mask(direction: _Direction) -> int:
        if direction.read_open and direction.buffered() < _MAX_BUFFERED:
            return selectors.EVENT_READ
        return 0

    def _accept(self) -> None:
        while len(self._conns) < self._max_connections:
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            upstream = socket.socket(self._family, socket.SOCK_STREAM)
            for sock in (client, upstream):
                sock.setblocking(False)
                # Without NODELAY, Nagle plus delayed ACKs would add their own ~40 ms
                # on top of the configured delay and make measurements noisy.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex(self._target)
            if err not in (0, errno.EINPROGRESS):
                # Mirror the refusal to the client the only way TCP allows: hang up.
                _close_quietly(upstream)
                _close_quietly(client)
                continue
            conn = _Conn(client, upstream)
            self._conns.add(conn)
            self._refresh(conn)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _on_event(self, conn: _Conn, sock: socket.socket, events: int) -> None:
        try:
            if events & selectors.EVENT_WRITE:
                if conn.connecting:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect to {self._target}: {errno.errorcode.get(err)}")
                    conn.connecting = False
                conn.writing(sock).flush()
            if events & selectors.EVENT_READ:
                direction = conn.reading(sock)
                try:
                    chunk = sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    return
                direction.schedule(chunk, time.monotonic(), self._delay)
        except OSError:
            self._drop(conn)

    def _release(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)
        self._selector.close()


class BlackHoleServer(_LoopbackService):
    """Accept TCP connections on 127.0.0.1 and never send a byte back.

    Models a target whose port is open but whose process is wedged: connects
    succeed, then every read times out. Connections are held open until
    :meth:`close`. At most ``max_connections`` are accepted; later clients wait in
    the listen backlog, which looks the same to them.
    """

    def __init__(self, *, max_connections: int = 256) -> None:
        super().__init__()
        self._max_connections = max_connections
        self._held: list[socket.socket] = []
        self._accepted = 0
        self._changed = threading.Condition()

    @property
    def accepted(self) -> int:
        with self._changed:
            return self._accepted

    def wait_for_accepted(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` connections were accepted; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._accepted >= count, timeout)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            listening = False
            try:
                while not self._closing.is_set():
                    want = len(self._held) < self._max_connections
                    if want and not listening:
                        selector.register(self._listener, selectors.EVENT_READ)
                    elif listening and not want:
                        selector.unregister(self._listener)
                    listening = want
                    for key, _events in selector.select():
                        if key.fileobj is self._listener:
                            self._accept()
            except BaseException:
                _log.exception("BlackHoleServer on port %d crashed", self.port)
            finally:
                self._teardown()

    def _accept(self) -> None:
        while len(self._held) < self._max_connections:
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            # Never read or write: the client must see silence, not EOF or RST.
            self._held.append(conn)
            with self._changed:
                self._accepted += 1
                self._changed.notify_all()

    def _release(self) -> None:
        for sock in self._held:
            _close_quietly(sock)
        self._held.clear()


class ScriptedServer(_LoopbackService):
    """Accept TCP connections on 127.0.0.1 and play the same script to each: a hostile or
    foreign peer where a client expects its own protocol.

    - ``banner`` is sent as soon as the connection is accepted (an SSH server's greeting);
    - ``reply`` once the client has sent its first bytes (an answer to any request), or,
      when it is a function, its answer to the request's head (the bytes up to the blank
      line, at most 64 KiB): a peer that must echo something back, such as a WebSocket key;
    - ``stream`` then over and over, every ``interval`` seconds (0: as fast as the client
      reads), until the client goes away or the server closes: a peer that never stops.

    After the script the connection is held open until :meth:`close`. Each connection is
    played on its own daemon thread; `close()` shuts the sockets down, which wakes them.
    """

    def __init__(
        self,
        *,
        banner: bytes = b"",
        reply: bytes | Callable[[bytes], bytes] = b"",
        stream: bytes = b"",
        interval: float = 0.0,
    ) -> None:
        super().__init__()
        self._banner = banner
        self._reply = reply
        self._stream = stream
        self._interval = interval
        self._conns: list[socket.socket] = []
        self._players: list[threading.Thread] = []
        self._sent = 0
        self._changed = threading.Condition()

    @property
    def sent(self) -> int:
        """Bytes of ``stream`` sent so far, over every connection."""
        with self._changed:
            return self._sent

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            selector.register(self._listener, selectors.EVENT_READ)
            try:
                while not self._closing.is_set():
                    for key, _events in selector.select():
                        if key.fileobj is self._listener:
                            self._accept()
            except BaseException:
                _log.exception("ScriptedServer on port %d crashed", self.port)
            finally:
                self._teardown()

    def _accept(self) -> None:
        while True:
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            conn.setblocking(True)
            player = threading.Thread(
                target=self._play, args=(conn,), name=f"ScriptedServer:{self.port}", daemon=True
            )
            with self._changed:
                self._conns.append(conn)
                self._players.append(player)
            player.start()

    def _play(self, conn: socket.socket) -> None:
        try:
            if self._banner:
                conn.sendall(self._banner)
            if callable(self._reply):
                head = bytearray()
                while b"\r\n\r\n" not in head and len(head) < _RECV_SIZE:
                    data = conn.recv(_RECV_SIZE)
                    if not data:
                        return
                    head += data
                conn.sendall(self._reply(bytes(head)))
            elif self._reply:
                if not conn.recv(_RECV_SIZE):
                    return
                conn.sendall(self._reply)
            while self._stream and not self._closing.is_set():
                conn.sendall(self._stream)
                with self._changed:
                    self._sent += len(self._stream)
                if self._interval and self._closing.wait(self._interval):
                    return
        except OSError:
            return  # the client went away, or close() shut the socket down

    def _release(self) -> None:
        with self._changed:
            conns, players = list(self._conns), list(self._players)
            self._conns.clear()
            self._players.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            _close_quietly(conn)
        for player in players:
            player.join(_JOIN_TIMEOUT)
