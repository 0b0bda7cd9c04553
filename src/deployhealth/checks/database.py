"""database: connect with pg8000, then five `SELECT 1` round trips; the median is the latency.

Decisions:

- No database configured is EDB01 (error), not an `ok` section with a note: Coder cannot
  run without its PostgreSQL, so a watcher that is not told where it is cannot vouch for
  the deployment, and readiness must not pass by omission.
- The connection is deployhealth.pgconn's (sockets, sslmode, TLS and the wording of
  failures are described there); it hands over the socket, so every query here runs under
  what is left of the 5 s query budget, and every answer is capped in size
  (pgconn.DEFAULT_READ_LIMIT): a peer that streams bytes or declares a huge message is
  EDB01 "not PostgreSQL", not memory taken until the deadline.
- The password is only handed to pg8000; every message is also scrubbed of it, and the
  target is named with `DatabaseTarget.describe()`.
"""

from __future__ import annotations

import time
from typing import Any

import pg8000.native

from deployhealth import pgconn
from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.model import Finding, Section, Severity
from deployhealth.redact import Redactor
from deployhealth.settings import Settings, SettingsError

QUERIES_TIMEOUT_SECONDS = 5.0
PINGS = 5


class _ProbeFailure(Exception):
    """A query failed or answered wrong: EDB01; the message is already safe to show."""


def probe(settings: Settings, deadline: Deadline) -> Section:
    threshold = settings.db_latency_threshold_ms
    details: dict[str, Any] = {
        "reachable": False,
        "latency": "",
        "latency_ms": 0,
        "latency_ms_exact": None,
        "threshold_ms": int(threshold) if float(threshold).is_integer() else threshold,
        "connect_ms": None,
        "server_version": None,
    }
    try:
        target = settings.database()
    except SettingsError as exc:
        return _failed(f"the database setting is invalid: {exc}", details)
    if target is None:
        return _failed(
            "no database configured (set DEPLOYHEALTH_DATABASE_URL or "
            "DEPLOYHEALTH_DATABASE_SECRET)",
            details,
        )
    redactor = Redactor.for_settings(settings, extra=[target.password.reveal()])
    where = target.describe()

    started = time.monotonic()
    try:
        conn, sock = pgconn.connect(target, deadline.sooner(pgconn.CONNECT_TIMEOUT_SECONDS))
    except pgconn.ConnectError as exc:
        return _failed(redactor.scrub(f"cannot connect to {where}: {exc}"), details)
    details["connect_ms"] = round((time.monotonic() - started) * 1000.0, 3)
    details["server_version"] = conn.parameter_statuses.get("server_version")

    try:
        latencies = _ping(conn, sock, deadline.sooner(QUERIES_TIMEOUT_SECONDS))
    except _ProbeFailure as exc:
        return _failed(redactor.scrub(f"{where}: {exc}"), details)
    finally:
        pgconn.close(conn, sock)

    # The third of the five, sorted: one slow outlier (a cold plan cache, a GC pause) in
    # either direction does not move it.
    median = sorted(latencies)[len(latencies) // 2]
    details.update(
        reachable=True,
        latency=f"{median:.3f}ms",
        latency_ms=int(median),
        latency_ms_exact=round(median, 3),
    )
    findings: list[Finding] = []
    if median >= threshold:
        spread = f"min {min(latencies):.3f} ms, max {max(latencies):.3f} ms"
        findings.append(
            Finding(
                "EDB02",
                f"{where}: median SELECT 1 latency {median:.3f} ms is at or above the "
                f"threshold of {threshold:g} ms ({spread})",
                Severity.WARNING,
            )
        )
    return Section.from_findings(findings, details, healthy=True)


def _failed(message: str, details: dict[str, Any]) -> Section:
    return Section.from_findings(
        [Finding("EDB01", message, Severity.ERROR)], details, healthy=False
    )


# --- measuring -----------------------------------------------------------------------


def _remaining(budget: Deadline, cap: float, doing: str) -> float:
    try:
        return budget.timeout(cap)
    except DeadlineExceeded:
        raise _ProbeFailure(f"timeout: no time left for {doing}") from None


def _ping(
    conn: pg8000.native.Connection, sock: pgconn.GuardedSocket, budget: Deadline
) -> list[float]:
    latencies: list[float] = []
    for number in range(1, PINGS + 1):
        doing = f"query {number} of {PINGS} (SELECT 1)"
        sock.settimeout(_remaining(budget, QUERIES_TIMEOUT_SECONDS, doing))
        mark = time.perf_counter()
        try:
            rows = conn.run("SELECT 1")
        except Exception as exc:
            raise _ProbeFailure(pgconn.explain(exc, f"during {doing}")) from None
        latencies.append((time.perf_counter() - mark) * 1000.0)
        if rows != [[1]]:
            raise _ProbeFailure(f"{doing} returned {rows!r} instead of [[1]]")
    return latencies


def section_properties(section: Section) -> dict[str, Any]:
    """`db_latency_ms` (the exact median), when the database answered.

    A property of the section's EMF record, not a metric (see deployhealth.metrics).
    """
    if section.details.get("reachable"):
        latency = section.details.get("latency_ms_exact", section.details.get("latency_ms"))
        if isinstance(latency, int | float) and not isinstance(latency, bool):
            return {"db_latency_ms": float(latency)}
    return {}
