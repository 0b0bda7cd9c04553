"""database: every code comes from a real fault in front of a real PostgreSQL on 127.0.0.1."""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from support.coder_schema import check_section
from support.hostile import measured
from support.peers import running_nginx

from deployhealth.checks.database import probe
from deployhealth.deadline import Deadline
from deployhealth.metrics import MetricsSink
from deployhealth.model import Section, Severity
from deployhealth.runner import run_family
from deployhealth.settings import Secret, Settings
from deployhealth.sim.postgres import LocalPostgres
from deployhealth.sim.tcp import BlackHoleServer, DelayProxy, ScriptedServer, free_port


def url(
    pg: LocalPostgres,
    *,
    port: int | None = None,
    password: str | None = None,
    database: str | None = None,
    sslmode: str = "disable",
) -> str:
    secret = pg.password if password is None else password
    return (
        f"postgresql://{quote(pg.user, safe='')}:{quote(secret, safe='')}@127.0.0.1:"
        f"{pg.port if port is None else port}/{database or pg.database}?sslmode={sslmode}"
    )


def run(database_url: str | None, deadline_seconds: float = 10.0, **overrides: object) -> Section:
    settings = Settings(
        database_url=Secret(database_url) if database_url is not None else None
    ).with_overrides(**overrides)
    return check_section("database", probe(settings, Deadline.after(deadline_seconds)))


def only_error(section: Section) -> str:
    assert section.codes == ["EDB01"]
    assert section.severity is Severity.ERROR
    data = section.to_dict()
    assert data["healthy"] is False and data["reachable"] is False
    assert data["error"].startswith("EDB01: ")
    return str(data["error"])


def everything(section: Section) -> str:
    return json.dumps(section.to_dict()) + json.dumps(section.to_stored())


# --- healthy ------------------------------------------------------------------------


def test_healthy_database(pg: LocalPostgres) -> None:
    section = run(url(pg))
    assert section.severity is Severity.OK and section.codes == []
    data = section.to_dict()
    assert data["healthy"] is True and data["reachable"] is True
    exact = data["latency_ms_exact"]
    assert isinstance(exact, float) and exact > 0
    assert data["latency_ms"] == int(exact)
    assert data["latency"] == f"{exact:.3f}ms"
    assert data["threshold_ms"] == 15
    assert isinstance(data["connect_ms"], float)
    assert data["server_version"].split(".")[0].isdigit()
    assert pg.password not in everything(section)
    # The EMF record's db_latency_ms property (what Logs Insights reads) is the exact median.
    record = MetricsSink("DeployHealth", "coder", None).section("database", section)
    assert record["db_latency_ms"] == exact


def test_prefer_falls_back_to_plain_when_the_server_has_no_tls(pg: LocalPostgres) -> None:
    assert run(url(pg, sslmode="prefer")).codes == []


def test_unix_socket(pg: LocalPostgres) -> None:
    # libpq's spelling: an empty host, the socket directory in ?host=, the port as usual.
    section = run(
        f"postgresql://{pg.user}:{quote(pg.password, safe='')}@:{pg.port}/{pg.database}"
        f"?host={pg.socket_dir}&sslmode=prefer"
    )
    assert section.codes == [], section.error
    assert section.to_dict()["reachable"] is True


# --- EDB01 --------------------------------------------------------------------------


def test_stopped_database_is_refused() -> None:
    with LocalPostgres() as stopped:
        stopped.stop()
        text = only_error(run(url(stopped)))
    assert "connection refused" in text
    assert f"127.0.0.1:{stopped.port}" in text


def test_wrong_password_is_an_authentication_failure(pg: LocalPostgres) -> None:
    wrong = "not-the-Password-7f3a9c"
    section = run(url(pg, password=wrong))
    text = only_error(section)
    assert "authentication failed" in text
    assert f"{pg.user}@127.0.0.1:{pg.port}/{pg.database}" in text
    assert wrong not in everything(section)
    assert quote(wrong, safe="") not in everything(section)
    assert pg.password not in everything(section)


def test_unknown_database(pg: LocalPostgres) -> None:
    text = only_error(run(url(pg, database="no_such_db")))
    assert "database does not exist" in text and "no_such_db" in text


def test_tls_required_but_not_offered(pg: LocalPostgres) -> None:
    text = only_error(run(url(pg, sslmode="require")))
    assert "TLS" in text and "sslmode=require" in text


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
def test_black_hole_times_out_within_the_deadline(sslmode: str) -> None:
    with BlackHoleServer() as hole:
        started = time.monotonic()
        section = run(
            f"postgresql://coder:pw-123@127.0.0.1:{hole.port}/coder?sslmode={sslmode}",
            deadline_seconds=1.0,
        )
        elapsed = time.monotonic() - started
        assert hole.wait_for_accepted(1, timeout=5)
    assert elapsed < 2.0
    assert "timeout" in only_error(section)


def test_no_database_configured_is_an_error() -> None:
    text = only_error(run(None))
    assert "no database configured" in text and "DEPLOYHEALTH_DATABASE_URL" in text


# --- EDB02 --------------------------------------------------------------------------


def test_slow_network_is_edb02(pg: LocalPostgres) -> None:
    # Each direction is held 20 ms, so every round trip takes at least 40 ms.
    with DelayProxy(pg.host, pg.port, 0.02) as proxy:
        section = run(url(pg, port=proxy.port), db_latency_threshold_ms=10)
    assert section.codes == ["EDB02"]
    assert section.severity is Severity.WARNING
    data = section.to_dict()
    assert data["healthy"] is True and data["reachable"] is True
    assert data["latency_ms"] >= 40
    assert data["threshold_ms"] == 10
    message = section.warnings[0].message
    assert "threshold of 10 ms" in message and data["latency"].removesuffix("ms") in message


# --- peers that are not PostgreSQL (EDB01, never EUNKNOWN, memory bounded) ----------


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _notices(count: int) -> bytes:
    # Well-formed NoticeResponse messages, each valid on its own: only their number is wrong.
    one = _message(b"N", b"SNOTICE\0Mhello\0\0")
    return one * count


ZEROS = b"\0" * 65536


def run_guarded(database_url: str, deadline_seconds: float) -> tuple[Section, float, int]:
    """The family run as the runner runs it, with its time and its traced memory peak."""
    settings = Settings(database_url=Secret(database_url))
    section, cost = measured(
        lambda: run_family("database", settings, Deadline.after(deadline_seconds))
    )
    return check_section("database", section), cost.elapsed, cost.peak


STREAMING_PEERS = {
    # Bytes from the first moment, whatever the client says.
    "zeros-from-accept": ({"stream": ZEROS}, "disable", "not PostgreSQL"),
    "zeros-from-accept-tls": ({"stream": ZEROS}, "prefer", "not PostgreSQL"),
    # A valid message type with a length of almost 2 GB, then bytes without end: the
    # shape that took 2.7 GB.
    "huge-declared-length": (
        {"reply": b"R" + struct.pack("!i", 0x7FFFFFF0), "stream": ZEROS},
        "disable",
        "announced a message of 2147483632 bytes",
    ),
    # Small, well-formed messages that never end: only the total can stop them.
    "endless-notices": (
        {"reply": _notices(1), "stream": _notices(4096)},
        "disable",
        "sent more than 256 KiB in answer to one request",
    ),
}


@pytest.mark.parametrize("peer", STREAMING_PEERS)
def test_streaming_peer_is_edb01_in_bounded_memory_and_time(peer: str) -> None:
    script, sslmode, said = STREAMING_PEERS[peer]
    with ScriptedServer(**script) as server:  # type: ignore[arg-type]
        section, elapsed, peak = run_guarded(
            f"postgresql://coder:pw-123@127.0.0.1:{server.port}/coder?sslmode={sslmode}", 10.0
        )
    text = only_error(section)
    assert said in text, text
    assert f"127.0.0.1:{server.port}" in text and "pw-123" not in text
    assert elapsed < 10.0
    assert peak < 50 * 1024 * 1024, f"traced peak {peak / 2**20:.1f} MiB"


def test_dripping_peer_is_cut_at_the_deadline() -> None:
    # A message whose body comes one byte every 50 ms: each read gets a byte well inside
    # any per-read timeout, so only an absolute deadline ends it.
    script = {"reply": b"E" + struct.pack("!i", 100_000), "stream": b"S", "interval": 0.05}
    with ScriptedServer(**script) as server:  # type: ignore[arg-type]
        section, elapsed, _peak = run_guarded(
            f"postgresql://coder:pw@127.0.0.1:{server.port}/coder?sslmode=disable", 2.0
        )
        assert server.sent > 0
    assert "timeout" in only_error(section)
    assert elapsed < 2.5


FOREIGN_PEERS = {
    "ssh-banner": ({"banner": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"}, "it sent an SSH banner"),
    "http-answer": (
        {"reply": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"},
        "it answered in HTTP ('HTTP/1.1 400 Bad Request')",
    ),
    "redis-answer": ({"reply": b"-ERR unknown command\r\n"}, "like a text protocol"),
    "random-bytes": ({"stream": random.Random(9).randbytes(4096)}, "not PostgreSQL"),
}


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
@pytest.mark.parametrize("peer", FOREIGN_PEERS)
def test_a_peer_that_is_not_postgresql_is_edb01_with_what_it_said(peer: str, sslmode: str) -> None:
    script, said = FOREIGN_PEERS[peer]
    with ScriptedServer(**script) as server:  # type: ignore[arg-type]
        started = time.monotonic()
        section = run_family(
            "database",
            Settings(
                database_url=Secret(
                    f"postgresql://coder:pw@127.0.0.1:{server.port}/coder?sslmode={sslmode}"
                )
            ),
            Deadline.after(10.0),
        )
        elapsed = time.monotonic() - started
    text = only_error(check_section("database", section))
    assert "the server is not PostgreSQL" in text and said in text, text
    # It knows at the first answer: no waiting for a timeout.
    assert elapsed < 2.0


def test_nginx_on_the_database_port_is_edb01_not_postgresql(tmp_path: Path) -> None:
    port = free_port()
    conf = (
        f"pid {tmp_path}/nginx.pid; events {{}} http {{ access_log off; "
        f"client_body_temp_path {tmp_path}; server {{ listen 127.0.0.1:{port}; "
        f"location / {{ return 204; }} }} }}\n"
    )
    with running_nginx(tmp_path, conf, port):
        text = only_error(run(f"postgresql://coder:pw@127.0.0.1:{port}/coder?sslmode=disable"))
    assert "the server is not PostgreSQL: it answered in HTTP ('HTTP/1.1 400" in text, text
