"""One contract for both result stores (SQLite and DynamoDB), then each backend's failures.

The DynamoDB store talks over HTTP to moto's server on loopback (the `dynamodb_endpoint`
fixture), exactly as it talks to AWS.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest

from deployhealth import readiness
from deployhealth.model import (
    HYSTERESIS_WINDOW,
    SECTION_NAMES,
    Finding,
    Section,
    Severity,
    summarize,
)
from deployhealth.settings import Settings, load_settings
from deployhealth.store import ResultStore, StoreUnavailable, open_store
from deployhealth.store.dynamodb import DynamoDBStore
from deployhealth.store.sqlite import SQLiteStore


def recent(seconds_ago: float = 0.0) -> datetime:
    """A moment inside any retention window the tests use, microseconds included."""
    return datetime.now(UTC) - timedelta(seconds=seconds_ago)


def section(checked_at: datetime, severity: Severity = Severity.OK, **details: object) -> Section:
    return Section(severity=severity, checked_at=checked_at, details=dict(details))


# --- the contract, run against both backends -------------------------------------------


def test_empty_store(store: ResultStore) -> None:
    assert store.latest() == {}
    assert store.history("database") == []
    assert store.dismissed() is None


def test_put_then_latest_keeps_every_field(store: ResultStore) -> None:
    checked = recent(1).replace(microsecond=654321)
    original = Section(
        severity=Severity.WARNING,
        warnings=[
            Finding("EDB02", "median latency 20ms >= 15ms"),
            Finding("ESTUN02", "mapping varies by destination", Severity.OK),
        ],
        errors=[Finding("EDB01", "authentication failed", Severity.ERROR)],
        healthy=False,
        details={
            "latency": "20.123ms",
            "latency_ms": 20,
            "threshold_ms": 15.5,
            "regions": {"999": {"node_reports": [{"round_trip_ping_ms": 0.1 + 0.2}]}},
            "timings": [1.5, 2.25, None, True],
            "unicode": "café ✓",
        },
        checked_at=checked,
        duration_ms=12.345,
    )
    store.put("database", original)

    got = store.latest()["database"]

    assert got == original
    assert got.checked_at == checked  # to the microsecond
    assert got.details["regions"]["999"]["node_reports"][0]["round_trip_ping_ms"] == 0.1 + 0.2
    assert got.warnings[1].severity is Severity.OK
    assert got.error == "EDB01: authentication failed"
    assert got.duration_ms == 12.345


def test_section_without_healthy_key_stays_without_it(store: ResultStore) -> None:
    original = Section(
        severity=Severity.OK, healthy=None, checked_at=recent(), details={"items": []}
    )
    store.put("provisioner_daemons", original)

    got = store.latest()["provisioner_daemons"]

    assert got.healthy is None
    assert "healthy" not in got.to_dict()
    assert got == original


def test_latest_returns_every_section_at_once(store: ResultStore) -> None:
    names = ["access_url", "database", "websocket", "derp", "entitlements"]
    for i, name in enumerate(names):
        store.put(name, section(recent(10 - i), Severity.OK, index=i))

    latest = store.latest()

    assert sorted(latest) == sorted(names)
    assert [latest[n].details["index"] for n in names] == list(range(len(names)))


def test_latest_moves_forward_only(store: ResultStore) -> None:
    newer = section(recent(10), Severity.ERROR, which="newer")
    older = section(recent(20), Severity.OK, which="older")
    newest = section(recent(1), Severity.WARNING, which="newest")

    store.put("database", newer)
    store.put("database", older)  # arrives late: joins history only
    assert store.latest()["database"].details["which"] == "newer"

    store.put("database", newest)
    assert store.latest()["database"].details["which"] == "newest"
    assert [s.details["which"] for s in store.history("database")] == [
        "newest",
        "newer",
        "older",
    ]


def test_history_newest_first_with_limit_and_since(store: ResultStore) -> None:
    times = [recent(100 - 10 * i) for i in range(6)]
    for i in (3, 0, 5, 1, 4, 2):  # out of order on purpose
        store.put("derp", section(times[i], index=i))
    store.put("database", section(recent(), index=99))

    assert [s.details["index"] for s in store.history("derp")] == [5, 4, 3, 2, 1, 0]
    assert [s.details["index"] for s in store.history("derp", limit=2)] == [5, 4]
    # `since` is inclusive: a result checked exactly then is included.
    assert [s.details["index"] for s in store.history("derp", since=times[3])] == [5, 4, 3]
    assert [s.details["index"] for s in store.history("derp", limit=2, since=times[1])] == [5, 4]
    assert store.history("derp", since=recent(-60)) == []
    assert store.history("websocket") == []


def test_history_forgets_results_older_than_the_retention(
    store_factory: Callable[..., ResultStore],
) -> None:
    # 0.001 days is 86.4 s: results from an hour ago are past it, one from now is not.
    store = store_factory(retention_days=0.001)
    for minutes in (90, 60, 45):
        store.put("database", section(recent(minutes * 60), age=minutes))
    store.put("database", section(recent(1), age=0))

    assert [s.details["age"] for s in store.history("database")] == [0]
    assert [s.details["age"] for s in store.history("database", since=recent(7200))] == [0]
    # Latest is not history: it stays whatever its age.
    assert store.latest()["database"].details["age"] == 0


def test_history_honours_the_writers_retention(
    store_factory: Callable[..., ResultStore],
) -> None:
    # A reader with a longer retention must not resurrect what a writer let expire
    # (DynamoDB's TTL deletes lazily, SQLite prunes at write time).
    writer = store_factory(retention_days=0.001)
    reader = store_factory(retention_days=7)
    writer.put("database", section(recent(3600), age=60))
    writer.put("database", section(recent(1), age=0))

    assert [s.details["age"] for s in reader.history("database")] == [0]


def test_dismissed_round_trip(store: ResultStore) -> None:
    assert store.dismissed() is None
    assert store.set_dismissed(["derp", "workspace_proxy"]) is True
    assert store.dismissed() == ("derp", "workspace_proxy")
    assert store.set_dismissed(["derp", "workspace_proxy"]) is False
    assert store.set_dismissed(["workspace_proxy"]) is True
    assert store.dismissed() == ("workspace_proxy",)
    assert store.set_dismissed([]) is True
    assert store.dismissed() == ()
    assert store.set_dismissed([]) is False


def test_snapshot_holds_latest_and_dismissed_and_settings_are_not_sections(
    store: ResultStore,
) -> None:
    empty = store.snapshot()
    assert empty.latest == {} and empty.dismissed is None

    store.put("database", section(recent(5), which="db"))
    store.set_dismissed(["derp"])
    snapshot = store.snapshot()
    assert list(snapshot.latest) == ["database"]  # the settings item is not a section
    assert snapshot.latest["database"].details["which"] == "db"
    assert snapshot.dismissed == ("derp",)
    assert store.latest().keys() == {"database"}


def test_deployments_sharing_storage_do_not_see_each_other(
    store_factory: Callable[..., ResultStore],
) -> None:
    prod = store_factory(deployment="prod")
    staging = store_factory(deployment="staging")

    prod.put("database", section(recent(5), which="prod"))
    staging.put("database", section(recent(10), which="staging"))
    staging.put("derp", section(recent(10), which="staging"))
    prod.set_dismissed(["derp"])

    assert sorted(prod.latest()) == ["database"]
    assert prod.latest()["database"].details["which"] == "prod"
    assert staging.latest()["database"].details["which"] == "staging"
    assert [s.details["which"] for s in prod.history("database")] == ["prod"]
    assert [s.details["which"] for s in staging.history("database")] == ["staging"]
    assert prod.history("derp") == []
    assert prod.dismissed() == ("derp",)
    assert staging.dismissed() is None


def test_concurrent_puts_all_land_and_latest_is_newest(store: ResultStore) -> None:
    threads_n, per_thread = 8, 5
    base = recent(600)
    # Thread t writes results t, t+8, t+16, ...: every thread races every other for latest.
    moments = {
        t: [base + timedelta(seconds=t + threads_n * k) for k in range(per_thread)]
        for t in range(threads_n)
    }
    start = threading.Barrier(threads_n)
    failures: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            start.wait(timeout=10)
            for moment in moments[t]:
                store.put("websocket", section(moment, writer=t))
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)

    assert not failures
    everything = sorted(m for ms in moments.values() for m in ms)
    history = store.history("websocket", limit=1000)
    assert [s.checked_at for s in history] == everything[::-1]
    assert store.latest()["websocket"].checked_at == everything[-1]


# --- the summaries readiness reads -----------------------------------------------------


def coded(
    checked_at: datetime, severity: Severity, *codes: str, message_only: str = ""
) -> Section:
    """A section whose findings carry `codes` at `severity` (repeats kept, as families do)."""
    findings = [Finding(code, f"{code} happened", severity) for code in codes]
    if message_only:
        findings.append(Finding(message_only, "for information", Severity.OK))
    result = Section.from_findings(findings, {"which": f"{severity.value} {codes}"})
    result.severity = severity
    result.checked_at = checked_at
    return result


def assert_summaries_agree(store: ResultStore, settings: Settings) -> None:
    """Every summary says what its stored body says, and readiness judges both alike."""
    full = store.snapshot()
    brief = store.readiness_snapshot()
    assert brief.dismissed == full.dismissed
    assert brief.problem == full.problem
    assert brief.summaries.keys() == full.latest.keys()
    for name, section in full.latest.items():
        summary = brief.summaries[name]
        derived = summarize(name, section)
        assert (summary.severity, summary.codes, summary.checked_at) == (
            derived.severity,
            derived.codes,
            derived.checked_at,
        ), name
    now = datetime.now(UTC)
    names = list(SECTION_NAMES)
    assert readiness.evaluate_summaries(
        settings, brief.summaries, names, now=now
    ) == readiness.evaluate(settings, full.latest, names, now=now)


def test_summaries_agree_with_the_stored_sections(store: ResultStore) -> None:
    settings = Settings()
    assert store.readiness_snapshot().summaries == {}
    assert_summaries_agree(store, settings)

    store.put("access_url", coded(recent(30), Severity.OK))
    store.put("access_url", coded(recent(20), Severity.WARNING, "EACS04"))
    store.put(
        "database", coded(recent(5), Severity.ERROR, "EDB01", "EDB02", "EDB01", message_only="X1")
    )
    store.put("websocket", coded(recent(5), Severity.WARNING, "EWS03", message_only="EWS99"))
    store.put("derp", coded(recent(5), Severity.ERROR))  # failing without a code
    store.put("entitlements", coded(recent(5), Severity.OK))
    store.set_dismissed(["provisioner_daemons"])
    assert_summaries_agree(store, settings)
    summary = store.readiness_snapshot().summaries["database"]
    assert summary.codes == ("EDB01", "EDB02", "X1")  # distinct, errors first

    # A late result joins history only: latest, its summary and the verdict stay.
    store.put("database", coded(recent(60), Severity.OK))
    assert store.readiness_snapshot().summaries["database"].severity is Severity.ERROR
    assert_summaries_agree(store, settings)

    # Dated an hour ahead: stored as latest, failed by readiness, then replaced by real ones.
    store.put("websocket", coded(recent(-3600), Severity.OK))
    assert_summaries_agree(store, settings)
    store.put("websocket", coded(recent(1), Severity.ERROR, "EWS01"))
    assert store.readiness_snapshot().summaries["websocket"].codes == ("EWS01",)
    assert_summaries_agree(store, settings)


def verdicts_both_ways(store: ResultStore, name: str, settings: Settings) -> tuple[str, str]:
    """The reason readiness gives from the summaries, and from replaying history."""
    now = datetime.now(UTC)
    from_summary = readiness.evaluate_summaries(
        settings, store.readiness_snapshot().summaries, [name], now=now
    )
    replayed = readiness.evaluate(
        settings,
        store.latest(),
        [name],
        history=lambda n: store.history(n, limit=HYSTERESIS_WINDOW),
        now=now,
    )
    return from_summary.checks[0].line(), replayed.checks[0].line()


@pytest.mark.parametrize("name", ["database", "access_url"])
def test_hysteresis_from_summaries_matches_replaying_history(
    store: ResultStore, name: str
) -> None:
    # A run of passes, failures that do and do not reach the thresholds, and recoveries;
    # access_url fails from warning on, the others at error only.
    pattern = "PPFPFFPFFFPPFPPPFFFFPPPP"
    bad = Severity.WARNING if name == "access_url" else Severity.ERROR
    choices = [Settings(ready_fail_after=f, ready_recover_after=r) for f, r in
               [(1, 1), (2, 1), (3, 1), (1, 2), (2, 3), (3, 3)]]
    for n, letter in enumerate(pattern):
        failing = letter == "F"
        store.put(name, coded(recent(len(pattern) - n), bad if failing else Severity.OK,
                              *(["ECODE"] if failing else [])))
        for settings in choices:
            ours, replayed = verdicts_both_ways(store, name, settings)
            assert ours == replayed, (pattern[: n + 1], settings.ready_fail_after,
                                      settings.ready_recover_after)


def test_hysteresis_looks_back_on_the_window_only(store: ResultStore) -> None:
    # Three failures, then passes up to a full window: with READY_FAIL_AFTER=3 and a
    # recovery that needs more passes than that, the section is held failed while the
    # failures are inside the window, and passes once the first one leaves it.
    settings = Settings(ready_fail_after=3, ready_recover_after=HYSTERESIS_WINDOW)
    total = HYSTERESIS_WINDOW + 1
    results = [Severity.ERROR] * 3 + [Severity.OK] * (HYSTERESIS_WINDOW - 3)
    for n, severity in enumerate(results):
        store.put("database", coded(recent(total - n), severity))
    ours, replayed = verdicts_both_ways(store, "database", settings)
    assert ours == replayed == "[-]database failed: recovering (100 passing needed)"
    store.put("database", coded(recent(1), Severity.OK))  # the first failure leaves the window
    ours, replayed = verdicts_both_ways(store, "database", settings)
    assert ours == replayed == "[+]database ok"
    summary = store.readiness_snapshot().summaries["database"]
    assert sum(count for _, count in summary.runs) == HYSTERESIS_WINDOW


def test_hysteresis_skips_a_latest_dated_in_the_future(store: ResultStore) -> None:
    # As replay skips results dated ahead, the summary drops them when a real one replaces
    # them; the real failures before and after still add up.
    settings = Settings(ready_fail_after=2)
    store.put("database", coded(recent(20), Severity.ERROR, "EDB01"))
    store.put("database", coded(recent(-3600), Severity.OK))
    store.put("database", coded(recent(-1800), Severity.OK))
    store.put("database", coded(recent(1), Severity.ERROR, "EDB01"))
    ours, replayed = verdicts_both_ways(store, "database", settings)
    assert ours == replayed == "[-]database failed: EDB01"


def test_results_count_for_hysteresis_in_the_order_they_became_latest(
    store: ResultStore,
) -> None:
    # A late result joins history but not the record hysteresis reads (docs/design.md).
    settings = Settings(ready_fail_after=2)
    store.put("database", coded(recent(30), Severity.OK))
    store.put("database", coded(recent(5), Severity.ERROR, "EDB01"))
    store.put("database", coded(recent(10), Severity.ERROR, "EDB01"))  # arrives late
    verdict = readiness.evaluate_summaries(
        settings, store.readiness_snapshot().summaries, ["database"]
    )
    assert verdict.ready
    assert store.readiness_snapshot().summaries["database"].runs == ((False, 1), (True, 1))
    store.put("database", coded(recent(1), Severity.ERROR, "EDB01"))
    verdict = readiness.evaluate_summaries(
        settings, store.readiness_snapshot().summaries, ["database"]
    )
    assert verdict.text(verbose=False).splitlines()[0] == "[-]database failed: EDB01"


# --- DynamoDB specifics -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def table_name() -> str:
    return f"health-{uuid.uuid4().hex[:12]}"


def store_operations(store: ResultStore) -> list[Callable[[], object]]:
    return [
        store.latest,
        lambda: store.put("database", section(recent())),
        lambda: store.history("database"),
        store.dismissed,
        lambda: store.set_dismissed(["derp"]),
    ]


def test_dynamodb_endpoint_down_is_store_unavailable_quickly(
    dynamodb_endpoint: str, table_name: str
) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    store = DynamoDBStore(table_name, "coder", 7, endpoint_url=f"http://127.0.0.1:{free_port()}")
    for operation in [*store_operations(store), store.create_table]:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            operation()
        assert time.monotonic() - started < 5
        text = str(caught.value)
        assert f"dynamodb://{table_name}" in text
        assert secret not in text
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_dynamodb_endpoint_that_never_answers_cannot_hang(
    dynamodb_endpoint: str, table_name: str
) -> None:
    # A listener that never accepts: the connection opens, the request is never answered.
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        port = silent.getsockname()[1]
        store = DynamoDBStore(table_name, "coder", 7, endpoint_url=f"http://127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"dynamodb://{table_name}"):
            store.latest()
        assert time.monotonic() - started < 15


def test_dynamodb_missing_table_names_it(dynamodb_endpoint: str, table_name: str) -> None:
    store = DynamoDBStore(table_name, "coder", 7, endpoint_url=dynamodb_endpoint)
    for operation in store_operations(store):
        with pytest.raises(StoreUnavailable, match=f"table '{table_name}' does not exist"):
            operation()


def test_dynamodb_without_credentials_is_store_unavailable(
    dynamodb_endpoint: str, table_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    store = DynamoDBStore(table_name, "coder", 7, endpoint_url=dynamodb_endpoint)
    with pytest.raises(StoreUnavailable, match="NoCredentialsError"):
        store.latest()


class CountingProxy:
    """A loopback HTTP proxy in front of the endpoint that counts the requests it forwards."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.requests: list[str] = []
        self.answer_bytes: list[int] = []  # the size of each answer, in order
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.requests.append(self.headers.get("X-Amz-Target", ""))
                upstream = http.client.HTTPConnection(host, int(port), timeout=10)
                try:
                    upstream.request("POST", self.path, body, dict(self.headers.items()))
                    answer = upstream.getresponse()
                    payload = answer.read()
                finally:
                    upstream.close()
                proxy.answer_bytes.append(len(payload))
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def counting_proxy(dynamodb_endpoint: str) -> Iterator[CountingProxy]:
    with CountingProxy(dynamodb_endpoint) as proxy:
        yield proxy


def test_dynamodb_latest_is_one_request(counting_proxy: CountingProxy, table_name: str) -> None:
    store = DynamoDBStore(table_name, "coder", 7, endpoint_url=counting_proxy.url)
    store.create_table()
    names = list(SECTION_NAMES)
    for name in names:
        # Random, so that it does not compress away: each body weighs over 1 KB stored.
        store.put(name, section(recent(), padding=os.urandom(1000).hex()))
    store.set_dismissed(["derp"])
    counting_proxy.requests.clear()

    latest = store.latest()
    assert sorted(latest) == sorted(names)
    assert counting_proxy.requests == ["DynamoDB_20120810.Query"]

    # What /readyz reads, latest sections and dismissed settings, is one request too.
    counting_proxy.requests.clear()
    snapshot = store.snapshot()
    assert sorted(snapshot.latest) == sorted(names)
    assert snapshot.dismissed == ("derp",)
    assert counting_proxy.requests == ["DynamoDB_20120810.Query"]

    # What /readyz reads now: one Query too, and without the bodies (over 1 KB each).
    assert counting_proxy.answer_bytes[-1] > 7 * 1000
    counting_proxy.requests.clear()
    counting_proxy.answer_bytes.clear()
    brief = store.readiness_snapshot()
    assert sorted(brief.summaries) == sorted(names)
    assert brief.dismissed == ("derp",)
    assert counting_proxy.requests == ["DynamoDB_20120810.Query"]
    assert counting_proxy.answer_bytes[0] < 2000


def test_dynamodb_items_carry_ttl_and_table_has_it_enabled(
    dynamodb_endpoint: str, table_name: str
) -> None:
    store = DynamoDBStore(table_name, "coder", 2, endpoint_url=dynamodb_endpoint)
    store.create_table()
    store.create_table()  # idempotent, for the demo and the bench
    checked = datetime.now(UTC).replace(microsecond=250000)
    store.put("database", section(checked))

    raw = boto3.client("dynamodb", endpoint_url=dynamodb_endpoint)
    ttl = raw.describe_time_to_live(TableName=table_name)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}
    described = raw.describe_table(TableName=table_name)["Table"]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert {k["AttributeName"]: k["KeyType"] for k in described["KeySchema"]} == {
        "pk": "HASH",
        "sk": "RANGE",
    }
    items = raw.scan(TableName=table_name)["Items"]
    by_pk = {item["pk"]["S"]: item for item in items}
    assert set(by_pk) == {"coder#latest", "coder#history#database"}
    history = by_pk["coder#history#database"]
    assert history["sk"]["S"].startswith("2") and "#" in history["sk"]["S"]
    expected_expiry = checked.timestamp() + 2 * 86400
    assert int(history["expires_at"]["N"]) == pytest.approx(expected_expiry, abs=1)
    assert "expires_at" not in by_pk["coder#latest"]  # latest never expires
    assert by_pk["coder#latest"]["sk"]["S"] == "database"


def test_open_store_reads_the_dynamodb_url(dynamodb_endpoint: str, table_name: str) -> None:
    settings = load_settings(
        {
            "DEPLOYHEALTH_NAME": "prod",
            "DEPLOYHEALTH_STORE": (
                f"dynamodb://{table_name}?region=eu-west-1&endpoint_url={dynamodb_endpoint}"
            ),
        },
        config_file=None,
    )
    store = open_store(settings.store, settings.name, settings.history_retention_days)
    assert isinstance(store, DynamoDBStore)
    assert store.description == f"dynamodb://{table_name}"
    store.create_table()
    store.put("access_url", section(recent()))
    assert list(store.latest()) == ["access_url"]


# --- SQLite specifics ---------------------------------------------------------------


def test_sqlite_unopenable_path_is_store_unavailable(tmp_path: Path) -> None:
    # A directory where the database file should be: unopenable even for root.
    path = tmp_path / "results.db"
    path.mkdir()
    with pytest.raises(StoreUnavailable, match=f"sqlite:///{path}"):
        SQLiteStore(str(path), "coder", 7)


def test_sqlite_unwritable_path_is_store_unavailable() -> None:
    # /proc accepts no new files, whoever we run as.
    with pytest.raises(StoreUnavailable, match="sqlite:///"):
        SQLiteStore("/proc/deployhealth-test.db", "coder", 7)


def test_sqlite_path_under_a_file_is_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="sqlite:///"):
        SQLiteStore(str(blocker / "results.db"), "coder", 7)


def test_dynamodb_reads_sections_stored_before_compression(dynamodb_endpoint: str) -> None:
    """Tables written by the previous release hold the JSON text in `body`: still readable."""
    table = f"legacy-{uuid.uuid4().hex[:8]}"
    store = DynamoDBStore(table, "coder", 7.0, region="us-east-1", endpoint_url=dynamodb_endpoint)
    store.create_table()
    section = Section.from_findings([], {"reachable": True})
    boto3.client("dynamodb", region_name="us-east-1", endpoint_url=dynamodb_endpoint).put_item(
        TableName=table,
        Item={
            "pk": {"S": "coder#latest"},
            "sk": {"S": "database"},
            "body": {"S": json.dumps(section.to_stored())},
            "checked_at": {"N": "1"},
        },
    )
    assert store.latest()["database"].details == {"reachable": True}
    store.close()


def test_dynamodb_latest_items_without_summary_still_read(dynamodb_endpoint: str) -> None:
    """Latest items written before summaries: readiness reads their body, a put carries on."""
    table = f"legacy-{uuid.uuid4().hex[:8]}"
    store = DynamoDBStore(table, "coder", 7.0, region="us-east-1", endpoint_url=dynamodb_endpoint)
    store.create_table()
    old = coded(recent(10), Severity.ERROR, "EDB01")
    raw = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=dynamodb_endpoint)
    raw.put_item(
        TableName=table,
        Item={
            "pk": {"S": "coder#latest"},
            "sk": {"S": "database"},
            "bodyz": {"B": zlib.compress(json.dumps(old.to_stored()).encode())},
            "checked_at": {"N": str(old.checked_at.timestamp())},
        },
    )
    summary = store.readiness_snapshot().summaries["database"]
    assert (summary.severity, summary.codes, summary.runs) == (
        Severity.ERROR, ("EDB01",), ((True, 1),)
    )
    store.put("database", coded(recent(1), Severity.ERROR, "EDB01"))
    assert store.readiness_snapshot().summaries["database"].runs == ((True, 2),)
    verdict = readiness.evaluate_summaries(
        Settings(ready_fail_after=2), store.readiness_snapshot().summaries, ["database"]
    )
    assert verdict.checks[0].reason == "EDB01"
    store.close()


def test_sqlite_file_from_before_summaries_is_migrated_and_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = coded(recent(10), Severity.WARNING, "EACS04")
    with sqlite3.connect(path) as raw:
        # The schema of the release before summaries.
        raw.executescript(
            """CREATE TABLE latest (deployment TEXT NOT NULL, section TEXT NOT NULL,
                   checked_at REAL NOT NULL, body TEXT NOT NULL,
                   PRIMARY KEY (deployment, section));
               CREATE TABLE history (deployment TEXT NOT NULL, section TEXT NOT NULL,
                   checked_at REAL NOT NULL, body TEXT NOT NULL);
               CREATE TABLE settings (deployment TEXT NOT NULL, key TEXT NOT NULL,
                   value TEXT NOT NULL, PRIMARY KEY (deployment, key));"""
        )
        raw.execute(
            "INSERT INTO latest VALUES ('coder', 'access_url', ?, ?)",
            (old.checked_at.timestamp(), json.dumps(old.to_stored())),
        )
    raw.close()

    store = SQLiteStore(str(path), "coder", 7)
    again = SQLiteStore(str(path), "coder", 7)  # a second process opening it: no error
    try:
        summary = store.readiness_snapshot().summaries["access_url"]
        assert (summary.severity, summary.codes, summary.checked_at) == (
            Severity.WARNING, ("EACS04",), old.checked_at
        )
        assert store.latest()["access_url"] == old
        store.put("access_url", coded(recent(1), Severity.WARNING, "EACS04"))
        assert again.readiness_snapshot().summaries["access_url"].runs == ((True, 2),)
        verdict = readiness.evaluate_summaries(
            Settings(ready_fail_after=2), again.readiness_snapshot().summaries, ["access_url"]
        )
        assert verdict.checks[0].reason == "EACS04"
    finally:
        store.close()
        again.close()
