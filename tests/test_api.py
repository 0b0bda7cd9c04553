"""The HTTP API, through real HTTP on 127.0.0.1 and through real Lambda event JSON.

Every store is a real SQLite file (or a real unreachable one); every forced run probes a real
loopback server. Every response any test gets is checked: none is ever 502, and every proxy
response is one that API Gateway or an ALB would accept.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
from support.coder_schema import check_report

from deployhealth.api import ApiContext, create_app
from deployhealth.api.app import FORCE_MIN_INTERVAL_SECONDS, ApiApp, valid_proxy_response
from deployhealth.api.local import MAX_BODY_BYTES, MAX_WORKERS, LocalApiServer
from deployhealth.api.page import PAGE_HISTORY_LIMIT
from deployhealth.checks import FAMILIES
from deployhealth.metrics import MetricsSink
from deployhealth.model import SECTION_NAMES, Finding, Section, Severity, rfc3339
from deployhealth.settings import Secret, Settings, SettingsError, StoreLocation
from deployhealth.sim.deployment import SimulatedDeployment
from deployhealth.sim.tcp import free_port
from deployhealth.store import StoreUnavailable
from deployhealth.store.sqlite import SQLiteStore

EVENTS = Path(__file__).resolve().parent.parent / "events"
ROOT = Path(__file__).resolve().parent.parent

TOKEN = "api-token-PLANTED-7f3c9a1e"
DB_PASSWORD = "db-pass-PLANTED-b8e2d4"

# Every status and body any test saw, for the "never 502, never a secret" checks.
SEEN: list[tuple[int, str]] = []


@pytest.fixture(autouse=True)
def _no_502() -> Iterator[None]:
    start = len(SEEN)
    yield
    statuses = [status for status, _ in SEEN[start:]]
    assert 502 not in statuses, f"a response was 502: {statuses}"


# --- building blocks ------------------------------------------------------------------------


def ok_section(checked_at: datetime | None = None, **details: Any) -> Section:
    section = Section.from_findings([], details)
    section.checked_at = checked_at or datetime.now(UTC)
    section.duration_ms = 12.5
    return section


def failing_section(
    code: str = "EDB01",
    message: str = "connection refused by 127.0.0.1:5432",
    checked_at: datetime | None = None,
    severity: Severity = Severity.ERROR,
) -> Section:
    section = Section.from_findings([Finding(code, message, severity)], {"reachable": False})
    section.checked_at = checked_at or datetime.now(UTC)
    return section


# These tests seed results by hand; the two sections they seed are the gating ones.
GATING = ("access_url", "database")


def make_settings(db_path: Path, **changes: Any) -> Settings:
    changes.setdefault("gating_sections", GATING)
    return Settings(name="coder-test", store=StoreLocation("sqlite", path=str(db_path)), **changes)


@dataclass
class Api:
    """One app behind a real local server, and the SQLite file behind both."""

    app: ApiApp
    server: LocalApiServer
    store: SQLiteStore | None
    metrics: io.StringIO
    session: requests.Session

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = self.session.request(method, self.server.url + path, timeout=60, **kwargs)
        SEEN.append((response.status_code, response.text))
        if method != "HEAD":  # a HEAD answer has no body to check
            check_if_report(
                path, response.status_code, response.headers.get("content-type"), response.text
            )
        return response

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        response = self.app(copy.deepcopy(event), None)
        assert valid_proxy_response(response), response
        body = response["body"]
        if response.get("isBase64Encoded"):
            body = base64.b64decode(body).decode()
        SEEN.append((response["statusCode"], body))
        headers = response.get("headers") or {
            k: v[-1] for k, v in (response.get("multiValueHeaders") or {}).items()
        }
        content_type = {k.lower(): v for k, v in headers.items()}.get("content-type")
        path = event.get("rawPath") or event.get("path") or ""
        check_if_report(path, response["statusCode"], content_type, body)
        return response

    def seed(self, name: str, section: Section) -> None:
        assert self.store is not None
        self.store.put(name, section)

    def ready_records(self) -> list[int]:
        records = [json.loads(line) for line in self.metrics.getvalue().splitlines()]
        return [emf_value(r["Ready"]) for r in records if "Ready" in r]


ApiFactory = Callable[..., Api]


def check_if_report(path: str, status: int, content_type: str | None, body: str) -> None:
    """Every report any test gets must be Coder's HealthcheckReport (tests/support/coder_schema)."""
    is_report = path.split("?", 1)[0] == "/api/v2/debug/health" and status == 200
    if is_report and (content_type or "").startswith("application/json"):
        check_report(json.loads(body))


def emf_value(value: Any) -> int:
    """One metric value of an EMF record (Powertools writes a list of values)."""
    return int(value[0] if isinstance(value, list) else value)


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[ApiFactory]:
    """Start an API over a store file: `make_api(**settings_changes)`."""
    started: list[Api] = []

    def make(db_path: Path | None = None, **changes: Any) -> Api:
        path = db_path or tmp_path / "results.db"
        settings = make_settings(path, **changes)
        store = None
        if db_path is None:
            # A second handle on the same file: tests seed through it as a family would.
            store = SQLiteStore(str(path), settings.name, settings.history_retention_days)
        metrics = io.StringIO()
        sink = MetricsSink(settings.metrics_namespace, settings.name, metrics)
        app = create_app(ApiContext(settings, metrics=sink))
        server = LocalApiServer(app, "127.0.0.1", 0).start()
        api = Api(app, server, store, metrics, requests.Session())
        started.append(api)
        return api

    yield make
    for api in started:
        api.session.close()
        api.server.close()
        api.app.close()
        if api.store is not None:
            api.store.close()


@pytest.fixture
def api(make_api: ApiFactory) -> Api:
    return make_api()


@pytest.fixture
def unreadable_db(tmp_path: Path) -> Path:
    """A SQLite path that cannot be opened for real: its directory is a regular file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("in the way\n")
    return blocker / "results.db"


@pytest.fixture
def coder_url(sim: SimulatedDeployment) -> str:
    """A simulated Coder deployment whose GET /healthz answers OK."""
    return sim.url


def http_event(
    path: str,
    method: str = "GET",
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    body: str | None = None,
    base64_body: bool = False,
) -> dict[str, Any]:
    raw_query = "&".join(f"{k}={v}" for k, v in (query or {}).items())
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": raw_query,
        "headers": {"host": "api.example.com", **(headers or {})},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api",
            "domainName": "api.example.com",
            "domainPrefix": "api",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.1",
                "userAgent": "test",
            },
            "requestId": "req",
            "routeKey": "$default",
            "stage": "$default",
            "time": "15/Jan/2025:12:00:00 +0000",
            "timeEpoch": 1736942400000,
        },
        "isBase64Encoded": base64_body,
    }
    if query:
        event["queryStringParameters"] = query
    if body is not None:
        event["body"] = base64.b64encode(body.encode()).decode() if base64_body else body
    return event


def alb_event(
    path: str,
    method: str = "GET",
    query: dict[str, list[str]] | None = None,
    headers: dict[str, str] | None = None,
    multi_value: bool = True,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "requestContext": {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:::tg/x"}},
        "httpMethod": method,
        "path": path,
        "body": "",
        "isBase64Encoded": False,
    }
    all_headers = {"host": "alb.example.com", **(headers or {})}
    if multi_value:
        event["multiValueQueryStringParameters"] = query or {}
        event["multiValueHeaders"] = {k: [v] for k, v in all_headers.items()}
    else:
        event["queryStringParameters"] = {k: v[-1] for k, v in (query or {}).items()}
        event["headers"] = all_headers
    return event


def load_event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())


# --- /healthz --------------------------------------------------------------------------------


def test_healthz_answers_ok_even_when_the_store_is_unreadable(
    make_api: ApiFactory, unreadable_db: Path
) -> None:
    api = make_api(db_path=unreadable_db)
    response = api.get("/healthz")
    assert response.status_code == 200
    assert response.text == "OK"
    assert response.headers["Content-Type"].startswith("text/plain")


# --- /readyz -------------------------------------------------------------------------------


def test_readyz_is_ok_when_every_gating_section_passes(api: Api) -> None:
    api.seed("access_url", ok_section())
    api.seed("database", ok_section())
    response = api.get("/readyz")
    assert response.status_code == 200
    assert response.text == "ok"
    assert api.ready_records() == [1]


def test_readyz_fails_with_no_store_cache_when_the_database_section_errs(api: Api) -> None:
    api.seed("access_url", ok_section())
    api.seed("database", failing_section("EDB01"))
    response = api.get("/readyz")
    assert response.status_code == 503
    assert response.headers["Cache-Control"] == "no-store"
    assert "[-]database failed: EDB01" in response.text
    assert response.text.endswith("readyz check failed\n")
    assert api.ready_records() == [0]


def test_readyz_verbose_lists_every_check_and_exclusions(api: Api) -> None:
    api.seed("access_url", ok_section())
    api.seed("database", failing_section("EDB01"))

    verbose = api.get("/readyz?verbose")
    assert verbose.status_code == 503
    lines = verbose.text.splitlines()
    assert "[+]access_url ok" in lines
    assert "[-]database failed: EDB01" in lines

    excluded = api.get("/readyz?verbose&exclude=database")
    assert excluded.status_code == 200
    assert excluded.text.splitlines() == [
        "[+]access_url ok",
        "[+]database excluded: ok",
        "readyz check passed",
    ]
    # A caller's exclusions answer a different question than the deployment's readiness.
    assert api.ready_records() == [0]


@pytest.mark.parametrize(
    "query", ["exclude=database&exclude=access_url", "exclude=database,access_url"]
)
def test_readyz_exclude_accepts_repeats_and_comma_lists(api: Api, query: str) -> None:
    response = api.get(f"/readyz?verbose&{query}")
    assert response.status_code == 200
    assert "[+]database excluded: ok" in response.text
    assert "[+]access_url excluded: ok" in response.text


def test_readyz_without_results_is_not_ready(api: Api) -> None:
    response = api.get("/readyz?verbose")
    assert response.status_code == 503
    assert "[-]access_url failed: no result yet" in response.text
    assert "[-]database failed: no result yet" in response.text


def test_readyz_stale_result_is_not_ready(api: Api) -> None:
    old = datetime.now(UTC) - timedelta(hours=1)
    api.seed("access_url", ok_section(checked_at=old))
    api.seed("database", ok_section())
    response = api.get("/readyz?verbose")
    assert response.status_code == 503
    assert "[-]access_url failed: stale" in response.text
    assert "[+]database ok" in response.text


def test_readyz_json_by_accept_header_or_format(api: Api) -> None:
    api.seed("access_url", ok_section())
    api.seed("database", failing_section("EDB01"))
    for response in (
        api.get("/readyz", headers={"Accept": "application/json"}),
        api.get("/readyz?format=json"),
    ):
        assert response.status_code == 503
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        body = response.json()
        assert body["ready"] is False
        checks = {c["name"]: c for c in body["checks"]}
        assert checks["access_url"]["status"] == "ok"
        assert checks["database"] == {
            "name": "database",
            "status": "failed",
            "reason": "EDB01",
            "codes": ["EDB01"],
        }
    assert api.get("/readyz?format=yaml").status_code == 400


def test_readyz_single_section(api: Api) -> None:
    api.seed("database", ok_section())
    assert api.get("/readyz/database").status_code == 200
    assert api.get("/readyz/database").text == "ok"
    # Coder's CamelCase spelling names the same section.
    assert api.get("/readyz/Database").status_code == 200

    api.seed("database", failing_section("EDB01"))
    failed = api.get("/readyz/database?verbose")
    assert failed.status_code == 503
    assert failed.headers["Cache-Control"] == "no-store"
    assert failed.text.splitlines()[0] == "[-]database failed: EDB01"

    # Any known section, gating or not.
    proxy = api.get("/readyz/workspace_proxy?verbose")
    assert proxy.status_code == 503
    assert "[-]workspace_proxy failed: no result yet" in proxy.text
    # One section's probe is not the deployment's readiness: no Ready metric.
    assert api.ready_records() == []


def test_readyz_unknown_section_is_404_and_unknown_exclude_is_400(api: Api) -> None:
    missing = api.get("/readyz/nope")
    assert missing.status_code == 404
    assert "nope" in missing.json()["message"]

    bad = api.get("/readyz?exclude=database&exclude=nope")
    assert bad.status_code == 400
    assert set(bad.json()) == {"message", "detail"}
    assert "'nope'" in bad.json()["message"]


def test_readyz_applies_hysteresis_from_history(api: Api, make_api: ApiFactory) -> None:
    api.seed("access_url", ok_section())
    now = datetime.now(UTC)
    api.seed("database", ok_section(checked_at=now - timedelta(seconds=30)))
    api.seed("database", failing_section("EDB01", checked_at=now))
    held = make_api(ready_fail_after=2)
    # One failure out of the two needed: still ready.
    assert held.get("/readyz").status_code == 200
    assert api.get("/readyz").status_code == 503


def test_readyz_hysteresis_fails_after_n_and_recovers_after_m(
    api: Api, make_api: ApiFactory
) -> None:
    held = make_api(ready_fail_after=2, ready_recover_after=2)
    now = datetime.now(UTC)
    api.seed("access_url", ok_section())
    steps = [
        (failing_section("EDB01", checked_at=now - timedelta(seconds=40)), 200, "ok"),
        (failing_section("EDB01", checked_at=now - timedelta(seconds=30)), 503, "EDB01"),
        (ok_section(checked_at=now - timedelta(seconds=20)), 503, "recovering"),
        (ok_section(checked_at=now - timedelta(seconds=10)), 200, "ok"),
    ]
    for section, status, said in steps:
        api.seed("database", section)
        answer = held.get("/readyz/database?verbose")
        assert (answer.status_code, said in answer.text) == (status, True), answer.text
    # A late failing result joins history only: it counts for neither latest nor hysteresis.
    api.seed("database", failing_section("EDB01", checked_at=now - timedelta(seconds=15)))
    assert held.get("/readyz").status_code == 200


@pytest.mark.parametrize("store_kind", ["sqlite", "dynamodb"])
def test_unreadable_store_is_503_naming_the_store(
    tmp_path: Path, unreadable_db: Path, monkeypatch: pytest.MonkeyPatch, store_kind: str
) -> None:
    if store_kind == "sqlite":
        location = StoreLocation("sqlite", path=str(unreadable_db))
        named = str(unreadable_db)
    else:
        # A DynamoDB endpoint on loopback where nothing listens.
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            monkeypatch.setenv(name, value)
        endpoint = f"http://127.0.0.1:{free_port()}"
        location = StoreLocation("dynamodb", table="health", endpoint_url=endpoint)
        named = "dynamodb://health"
    settings = Settings(name="coder-test", store=location, gating_sections=GATING)
    metrics = io.StringIO()
    app = create_app(
        ApiContext(settings, metrics=MetricsSink("DeployHealth", settings.name, metrics))
    )
    with LocalApiServer(app, "127.0.0.1", 0).start() as server:
        api = Api(app, server, None, metrics, requests.Session())
        assert api.get("/healthz").status_code == 200

        text = api.get("/readyz")
        assert text.status_code == 503
        assert text.headers["Cache-Control"] == "no-store"
        assert named in text.text

        as_json = api.get("/readyz?format=json")
        assert as_json.status_code == 503
        assert named in as_json.json()["message"]
        assert as_json.json()["ready"] is False
        assert api.ready_records() == [0, 0]

        assert api.get("/readyz/database").status_code == 503

        for path in (
            "/api/v2/debug/health",
            "/api/v2/debug/health/settings",
            "/api/v2/debug/health/history?section=database",
            "/health",
        ):
            response = api.get(path)
            assert response.status_code == 503, path
            body = response.json()
            assert set(body) == {"message", "detail"}
            assert named in body["message"]
        api.session.close()


# --- the report ----------------------------------------------------------------------------


def seed_all_sections(api: Api) -> None:
    for name in SECTION_NAMES:
        if name == "database":
            api.seed(name, failing_section("EDB01"))
        elif name == "entitlements":
            api.seed(name, ok_section(coder_version="v2.99.0"))
        else:
            api.seed(name, ok_section())


def test_report_has_coder_shape_and_dismissed_after_settings_put(api: Api) -> None:
    seed_all_sections(api)
    report = api.get("/api/v2/debug/health").json()
    assert report["healthy"] is False
    assert report["severity"] == "error"
    assert report["deployment"] == "coder-test"
    assert report["coder_version"] == "v2.99.0"
    assert datetime.fromisoformat(report["time"].replace("Z", "+00:00"))
    for name in SECTION_NAMES:
        section = report[name]
        assert {"severity", "warnings", "dismissed", "checked_at", "duration_ms"} <= set(section)
        assert section["dismissed"] is False
        assert section["warnings"] == []
    assert report["database"]["error"].startswith("EDB01: ")

    put = api.put(
        "/api/v2/debug/health/settings", json={"dismissed_healthchecks": ["Database", "DERP"]}
    )
    assert put.status_code == 200
    assert put.json() == {"dismissed_healthchecks": ["Database", "DERP"]}

    after = api.get("/api/v2/debug/health").json()
    assert after["database"]["dismissed"] is True
    assert after["derp"]["dismissed"] is True
    assert after["access_url"]["dismissed"] is False
    # Dismissal only hides: the report is still unhealthy.
    assert after["healthy"] is False
    # ...but a dismissed section no longer gates readiness.
    assert api.get("/readyz").status_code == 200


def test_sections_without_a_result_are_enotchecked_and_coder_version_empty(api: Api) -> None:
    api.seed("access_url", ok_section())
    report = api.get("/api/v2/debug/health").json()
    assert report["access_url"]["severity"] == "ok"
    # Coder's report has all six sections: the ones without a result say so.
    for name in ("database", "websocket", "derp", "workspace_proxy", "provisioner_daemons"):
        assert [w["code"] for w in report[name]["warnings"]] == ["ENOTCHECKED"], name
    assert "entitlements" not in report  # ours, shown only with a result
    assert report["coder_version"] == ""  # required by Coder's type; nothing read buildinfo
    assert report["severity"] == "warning"  # nothing checked is never ok...
    assert report["healthy"] is True  # ...but what was checked is healthy


def test_report_text_form_and_bad_format(api: Api) -> None:
    seed_all_sections(api)
    text = api.get("/api/v2/debug/health?format=text")
    assert text.status_code == 200
    assert text.headers["Content-Type"].startswith("text/plain")
    lines = text.text.splitlines()
    assert lines[0].startswith("time: ")
    assert lines[1] == "healthy: false"
    assert "database: false" in lines
    assert "access_url: true" in lines

    assert api.get("/api/v2/debug/health?format=json").status_code == 200
    bogus = api.get("/api/v2/debug/health?format=bogus")
    assert bogus.status_code == 400
    assert bogus.json()["message"] == 'Invalid format option "bogus".'
    assert api.get("/api/v2/debug/health?force=maybe").status_code == 400


def test_report_force_runs_every_family_now_and_stores_it(
    api: Api, make_api: ApiFactory, coder_url: str
) -> None:
    forced = make_api(access_url=coder_url)
    before = datetime.now(UTC)
    response = forced.get("/api/v2/debug/health?force=true")
    assert response.status_code == 200
    report = response.json()
    assert report["access_url"]["severity"] == "ok"
    assert report["access_url"]["status_code"] == 200
    assert report["access_url"]["healthz_response"] == "OK"
    assert report["database"]["severity"] == "error"
    assert report["database"]["error"].startswith("EDB01")
    assert report["healthy"] is False

    # Stored: the family results are the latest and in the history.
    assert api.store is not None
    latest = api.store.latest()
    assert set(latest) == set(FAMILIES)
    assert all(s.checked_at >= before for s in latest.values())
    history = api.get("/api/v2/debug/health/history?section=access_url").json()
    assert len(history["results"]) == 1
    assert history["results"][0]["severity"] == "ok"
    # And readiness now judges them.
    assert "[-]database failed: EDB01" in forced.get("/readyz").text



def test_a_forced_run_leaves_the_families_it_cannot_reach_alone(
    api: Api, make_api: ApiFactory, coder_url: str
) -> None:
    """The API function runs outside a private database's VPC: a forced run there must not
    store a false EDB01 over the database function's good result."""
    assert api.store is not None
    good = ok_section(checked_at=datetime.now(UTC) - timedelta(seconds=30), reachable=True)
    api.store.put("database", good)
    forced = make_api(access_url=coder_url, force_skip_sections=("database",))
    report = forced.get("/api/v2/debug/health?force=true").json()
    assert report["access_url"]["severity"] == "ok"
    assert report["database"]["severity"] == "ok"  # the stored result, not a new probe
    assert api.store.latest()["database"].checked_at == good.checked_at
    assert len(api.store.history("database")) == 1
    assert "[+]database ok" in forced.get("/readyz?verbose").text


# --- history -------------------------------------------------------------------------------


def test_history_newest_first_with_limit_and_since(api: Api) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    for minutes in (30, 20, 10):
        api.seed("database", failing_section(checked_at=now - timedelta(minutes=minutes)))
    body = api.get("/api/v2/debug/health/history?section=Database&limit=2").json()
    assert body["section"] == "database"
    stamps = [r["checked_at"] for r in body["results"]]
    assert stamps == [rfc3339(now - timedelta(minutes=10)), rfc3339(now - timedelta(minutes=20))]

    since = now - timedelta(minutes=25)
    for query in (
        {"section": "database", "since": rfc3339(since)},
        {"section": "database", "since": since.isoformat()},  # +00:00, encoded by requests
    ):
        assert len(api.get("/api/v2/debug/health/history", params=query).json()["results"]) == 2
    # An unencoded `+` arrives as a space; it still means the offset.
    raw = since.isoformat()
    assert (
        len(api.get(f"/api/v2/debug/health/history?section=database&since={raw}").json()["results"])
        == 2
    )
    assert api.get("/api/v2/debug/health/history?section=derp").json() == {
        "section": "derp",
        "results": [],
    }


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("", "section"),
        ("section=nope", "nope"),
        ("section=database&limit=abc", "limit"),
        ("section=database&limit=0", "limit"),
        ("section=database&limit=5000", "limit"),
        ("section=database&limit=-1", "limit"),
        ("section=database&since=yesterday", "since"),
        ("section=database&since=2024-01-01", "since"),
        ("section=database&since=2024-13-45T99:00:00Z", "since"),
    ],
)
def test_history_rejects_bad_parameters(api: Api, query: str, needle: str) -> None:
    response = api.get(f"/api/v2/debug/health/history?{query}")
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"message", "detail"}
    assert needle in body["message"]


# --- settings ------------------------------------------------------------------------------


def test_settings_get_put_unchanged_and_errors(api: Api) -> None:
    url = "/api/v2/debug/health/settings"
    assert api.get(url).json() == {"dismissed_healthchecks": []}
    # Unchanged (nothing dismissed, nothing asked): 204, no body.
    unchanged = api.put(url, json={"dismissed_healthchecks": []})
    assert unchanged.status_code == 204
    assert unchanged.text == ""

    changed = api.put(url, json={"dismissed_healthchecks": ["workspace_proxy", "DERP"]})
    assert changed.status_code == 200
    assert changed.json() == {"dismissed_healthchecks": ["DERP", "WorkspaceProxy"]}
    assert api.get(url).json() == {"dismissed_healthchecks": ["DERP", "WorkspaceProxy"]}
    # The same set in another order and spelling is unchanged.
    again = api.put(url, json={"dismissed_healthchecks": ["WorkspaceProxy", "derp"]})
    assert again.status_code == 204

    for body, needle in (
        ("{not json", "JSON"),
        ("[]", "object"),
        ('{"dismissed_healthchecks": "DERP"}', "list"),
        ('{"dismissed_healthchecks": [1]}', "list"),
        ("{}", "required"),
        ('{"dismissed_healthchecks": [], "extra": 1}', "extra"),
        ('{"dismissed_healthchecks": ["DERP", "Nope"]}', "Nope"),
    ):
        response = api.put(url, data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, body
        assert needle in response.json()["message"], body
    binary = api.put(url, data=b"\xff\xfe{}", headers={"Content-Type": "application/json"})
    assert binary.status_code == 400
    assert api.get(url).json() == {"dismissed_healthchecks": ["DERP", "WorkspaceProxy"]}


def test_settings_fall_back_to_configured_dismissed_sections(make_api: ApiFactory) -> None:
    api = make_api(dismissed_sections=("database",))
    api.seed("access_url", ok_section())
    api.seed("database", failing_section())
    assert api.get("/api/v2/debug/health/settings").json() == {
        "dismissed_healthchecks": ["Database"]
    }
    assert api.get("/readyz").status_code == 200
    assert api.get("/api/v2/debug/health").json()["database"]["dismissed"] is True
    # Asking for the dismissed section by name still judges it.
    assert api.get("/readyz/database").status_code == 503


def test_request_body_is_capped(api: Api) -> None:
    response = api.put(
        "/api/v2/debug/health/settings",
        data=b"x" * (MAX_BODY_BYTES + 1),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413


# --- access --------------------------------------------------------------------------------


def test_bearer_token_guards_report_history_settings_and_page(make_api: ApiFactory) -> None:
    api = make_api(api_token=Secret(TOKEN))
    api.seed("access_url", ok_section())
    api.seed("database", ok_section())
    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in (
        "/api/v2/debug/health",
        "/api/v2/debug/health/history?section=database",
        "/api/v2/debug/health/settings",
        "/health",
        "/health/codes",
    ):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
        ):
            denied = api.get(path, headers=headers)
            assert denied.status_code == 401, (path, headers)
            assert set(denied.json()) == {"message", "detail"}
            assert denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert api.get(path, headers=good).status_code == 200, path
    denied_put = api.put("/api/v2/debug/health/settings", json={"dismissed_healthchecks": []})
    assert denied_put.status_code == 401
    # Probes carry no credentials.
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
    assert api.get("/readyz/database").status_code == 200


# --- errors --------------------------------------------------------------------------------


def test_unknown_routes_are_404_json_whatever_the_method(api: Api) -> None:
    for method, path in (
        ("GET", "/nope"),
        ("GET", "/api/v2/debug/health/nope"),
        ("HEAD", "/nope"),
        ("TRACE", "/nope"),
        ("FROB", "/api/v2/debug/health/nope"),
    ):
        response = api.request(method, path)
        assert response.status_code == 404, path
        assert response.headers["Content-Type"] == "application/json"
        if method != "HEAD":
            body = response.json()
            assert set(body) == {"message", "detail"}
            assert path in body["detail"]


GET_ROUTES = (
    "/healthz",
    "/readyz",
    "/readyz/database",
    "/api/v2/debug/health",
    "/api/v2/debug/health/history?section=database",
    "/api/v2/debug/health/settings",
    "/health",
    "/health/codes",
)


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_wherever_get_does_with_the_same_status_and_headers(
    api: Api, path: str
) -> None:
    seed_all_sections(api)
    get = api.get(path)
    head = api.request("HEAD", path)
    # seed_all_sections fails the database: readiness is 503, HEAD says so too.
    assert head.status_code == get.status_code == (503 if path.startswith("/readyz") else 200)
    assert head.content == b""
    skip = {"date"}
    assert {k.lower(): v for k, v in head.headers.items() if k.lower() not in skip} == {
        k.lower(): v for k, v in get.headers.items() if k.lower() not in skip
    }


def test_options_answers_with_allow_and_probes_answer_as_get(api: Api) -> None:
    seed_all_sections(api)
    settings = api.request("OPTIONS", "/api/v2/debug/health/settings")
    assert settings.status_code == 204 and settings.content == b""
    assert settings.headers["Allow"] == "GET, HEAD, OPTIONS, PUT"
    report = api.request("OPTIONS", "/api/v2/debug/health")
    assert (report.status_code, report.headers["Allow"]) == (204, "GET, HEAD, OPTIONS")
    # A load balancer's `option httpchk` sends OPTIONS: on the probes it is their answer.
    assert api.request("OPTIONS", "/healthz").status_code == 200
    for path in ("/readyz", "/readyz/database"):
        probe = api.request("OPTIONS", path)
        assert probe.status_code == api.get(path).status_code
        assert probe.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert api.request("OPTIONS", "/readyz").status_code == 503  # the database is failing
    api.seed("database", ok_section())
    assert api.request("OPTIONS", "/readyz").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/healthz", "GET, HEAD, OPTIONS"),
        ("DELETE", "/api/v2/debug/health/settings", "GET, HEAD, OPTIONS, PUT"),
        ("PUT", "/readyz/database", "GET, HEAD, OPTIONS"),
        ("TRACE", "/readyz", "GET, HEAD, OPTIONS"),
        ("PATCH", "/api/v2/debug/health", "GET, HEAD, OPTIONS"),
        ("FROB", "/health", "GET, HEAD, OPTIONS"),
    ],
)
def test_other_methods_on_a_known_route_are_405_json_with_allow(
    api: Api, method: str, path: str, allow: str
) -> None:
    response = api.request(method, path)
    assert response.status_code == 405
    assert response.headers["Allow"] == allow
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"message", "detail"} and method in body["detail"]


def test_head_and_405_in_lambda_events_too(api: Api) -> None:
    head = api.invoke(http_event("/healthz", method="HEAD"))
    assert head["statusCode"] == 200
    refused = api.invoke(http_event("/healthz", method="POST"))
    assert refused["statusCode"] == 405 and refused["headers"]["Allow"] == "GET, HEAD, OPTIONS"
    alb_refused = api.invoke(alb_event("/readyz", method="DELETE"))
    assert alb_refused["statusCode"] == 405
    assert alb_refused["multiValueHeaders"]["Allow"] == ["GET, HEAD, OPTIONS"]
    alb_options = api.invoke(alb_event("/api/v2/debug/health/settings", method="OPTIONS"))
    assert alb_options["statusCode"] == 204
    assert alb_options["statusDescription"] == "204 No Content"


class _BrokenStore(SQLiteStore):
    """A store whose settings hold a section name no version of deployhealth wrote."""

    def dismissed(self) -> tuple[str, ...] | None:
        return ("not_a_section",)


def test_unexpected_error_is_500_json_without_traceback(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "results.db")
    store = _BrokenStore(str(tmp_path / "results.db"), settings.name, 7.0)
    app = create_app(ApiContext(settings, store=store))
    with LocalApiServer(app, "127.0.0.1", 0).start() as server:
        api = Api(app, server, store, io.StringIO(), requests.Session())
        response = api.get("/api/v2/debug/health/settings")
        api.session.close()
    store.close()
    assert response.status_code == 500
    body = response.json()
    assert body == {"message": "Internal error.", "detail": "KeyError: 'not_a_section'"}
    assert "Traceback" not in response.text


def test_invalid_settings_still_answer(tmp_path: Path) -> None:
    error = SettingsError("DEPLOYHEALTH_STORE", "is neither sqlite:///path nor dynamodb://table")
    app = create_app(ApiContext(settings_error=error))
    with LocalApiServer(app, "127.0.0.1", 0).start() as server:
        api = Api(app, server, None, io.StringIO(), requests.Session())
        assert api.get("/healthz").text == "OK"
        ready = api.get("/readyz")
        assert ready.status_code == 503
        assert "DEPLOYHEALTH_STORE" in ready.text
        report = api.get("/api/v2/debug/health")
        assert report.status_code == 500
        assert "DEPLOYHEALTH_STORE" in report.json()["detail"]
        api.session.close()


def test_concurrent_requests_get_their_own_answers(api: Api) -> None:
    """The local server resolves requests on many threads; none may see another's event."""
    api.seed("access_url", ok_section())
    api.seed("database", failing_section("EDB01"))
    expected = {
        "/healthz": (200, "OK"),
        "/readyz/access_url": (200, "ok"),
        "/readyz/database": (503, "[-]database failed: EDB01\nreadyz check failed\n"),
        "/readyz/nope": (404, None),
        "/api/v2/debug/health?format=text": (200, None),
    }
    failures: list[str] = []

    def worker(offset: int) -> None:
        paths = list(expected)
        with requests.Session() as session:
            for i in range(60):
                path = paths[(offset + i) % len(paths)]
                response = session.get(api.server.url + path, timeout=30)
                SEEN.append((response.status_code, response.text))
                status, body = expected[path]
                if response.status_code != status or (body is not None and response.text != body):
                    failures.append(f"{path}: {response.status_code} {response.text!r}")

    run_interleaved([threading.Thread(target=worker, args=(n,)) for n in range(8)])
    assert failures == []


def test_first_requests_to_a_route_arriving_together_all_succeed(make_api: ApiFactory) -> None:
    """A fresh server whose first requests to each route come at the same instant, as
    probes from several load balancer nodes do right after a start."""
    paths = {
        "/readyz/database": 503,
        "/readyz/access_url": 200,
        "/api/v2/debug/health/history?section=database": 200,
    }
    failures: list[str] = []
    # The race is a few bytecodes wide: each round is one more chance to hit it.
    for _ in range(5):
        api = make_api()
        api.seed("access_url", ok_section())
        api.seed("database", failing_section("EDB01"))
        start = threading.Barrier(24)

        def first_request(
            path: str, url: str = api.server.url, start: threading.Barrier = start
        ) -> None:
            start.wait()
            response = requests.get(url + path, timeout=30)
            if response.status_code != paths[path]:
                failures.append(f"{path}: {response.status_code} {response.text!r}")

        run_interleaved(
            [threading.Thread(target=first_request, args=(path,)) for path in list(paths) * 8]
        )
    assert failures == []


def run_interleaved(threads: list[threading.Thread]) -> None:
    """Run the threads to the end, switching between them as often as possible, so that an
    unguarded shared request state (stock Powertools keeps the event in a class attribute,
    and builds route stacks lazily) shows up here instead of in production."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


# --- the HTML page -------------------------------------------------------------------------


def test_html_page_escapes_and_links_codes_to_the_servers_own_table(make_api: ApiFactory) -> None:
    api = make_api()
    api.seed("access_url", ok_section())
    api.seed("database", failing_section("EDB01", "refused <script>alert('x')</script> & more"))
    api.seed("database", failing_section("EDB01", checked_at=datetime.now(UTC) - timedelta(1)))
    page = api.get("/health")
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "script" not in csp
    text = page.text
    assert "<script" not in text and " style=" not in text  # the CSP would block both
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text
    assert "<h1>coder-test</h1>" in text
    # Both stored database results are marks on its bar, both failing.
    assert text.count('class="beat-error"') == 2
    # No external assets.
    assert "http://" not in text and "https://" not in text and "src=" not in text

    # The code links to a table the server itself serves, relative to the page.
    assert 'href="health/codes#edb01"' in text
    codes = api.get(urljoin("/health", "health/codes"))
    assert codes.status_code == 200 and codes.headers["Content-Type"].startswith("text/html")
    assert codes.headers["Content-Security-Policy"] == csp
    assert '<tr id="edb01">' in codes.text and '<tr id="eacs04">' in codes.text
    assert 'href="../health"' in codes.text


def test_html_page_leads_with_what_readyz_answers_and_why(make_api: ApiFactory) -> None:
    api = make_api()
    api.seed("access_url", ok_section())
    api.seed("database", failing_section("EDB01"))
    page = api.get("/health").text
    assert api.get("/readyz").status_code == 503
    assert "Not ready: /readyz answers 503" in page
    assert "1 of 2 gating sections fail." in page
    assert '<b>fails</b> <a href="#database">database</a>: EDB01' in page
    assert page.index("answers 503") < page.index('id="access_url"')  # the verdict comes first

    # A failing section that does not gate sits under a 200, and the page says why.
    api.seed("database", ok_section())
    api.seed("workspace_proxy", failing_section("EWP02", "inventory unreadable"))
    page = api.get("/health").text
    assert api.get("/readyz").status_code == 200
    assert "Ready: /readyz answers 200" in page and "All 2 gating sections pass." in page
    assert "Not gating: workspace_proxy (workspace_proxy failing, which does not change" in page


def test_html_page_shows_age_uptime_and_latency_over_the_stored_results(
    make_api: ApiFactory,
) -> None:
    api = make_api()
    now = datetime.now(UTC)
    api.seed("access_url", ok_section())
    for minutes, failing in ((40, False), (30, True), (20, False), (10, False)):
        section = failing_section() if failing else ok_section()
        section.checked_at = now - timedelta(minutes=minutes)
        section.duration_ms = 10.0 * minutes
        api.seed("database", section)
    page = api.get("/health").text
    card = page[page.index('id="database"') :]
    assert "10 min ago</time>" in card
    assert f'datetime="{rfc3339(now - timedelta(minutes=10))}"' in card
    assert "75 % <small class=meta>of 4 results, 40 min</small>" in card
    assert "Check duration: last 100 ms, median 250 ms, max 400 ms" in card
    assert (card.count('class="beat-ok"'), card.count('class="beat-error"')) == (3, 1)
    assert card.count('class="beat-none"') == PAGE_HISTORY_LIMIT - 4  # slots not yet filled
    assert "Last 4 results, newest right: 1 failed database" in card and "<polyline " in card
    assert f"last {PAGE_HISTORY_LIMIT} stored results" in page


def test_html_page_reloads_itself_at_the_interval_asked(make_api: ApiFactory) -> None:
    api = make_api()
    assert '<meta http-equiv="refresh" content="30">' in api.get("/health").text
    assert '<meta http-equiv="refresh" content="300">' in api.get("/health?refresh=300").text
    off = api.get("/health?refresh=0").text
    assert 'http-equiv="refresh"' not in off and "does not reload" in off
    for bad in ("1", "x", "99999"):
        answer = api.get(f"/health?refresh={bad}")
        assert answer.status_code == 400 and "refresh" in answer.json()["message"]


# --- secrets -------------------------------------------------------------------------------


def test_planted_secrets_appear_in_no_response(make_api: ApiFactory) -> None:
    database_url = f"postgresql://coder:{DB_PASSWORD}@127.0.0.1:{free_port()}/coder"
    api = make_api(api_token=Secret(TOKEN), database_url=Secret(database_url))
    # A family that leaked the password into its message must still not leak it here.
    api.seed("database", failing_section("EDB01", f"auth failed for {database_url}"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    responses = [
        api.get("/healthz"),
        api.get("/readyz?verbose"),
        api.get("/readyz?format=json"),
        api.get("/readyz/database?verbose"),
        api.get("/api/v2/debug/health", headers=auth),
        api.get("/api/v2/debug/health?format=text", headers=auth),
        api.get("/api/v2/debug/health?force=true", headers=auth),
        api.get("/api/v2/debug/health/history?section=database", headers=auth),
        api.get("/api/v2/debug/health/settings", headers=auth),
        api.put("/api/v2/debug/health/settings", headers=auth, data="{bad"),
        api.get("/health", headers=auth),
        api.get("/api/v2/debug/health"),
        api.get(f"/nope/{TOKEN}"),
    ]
    assert responses[6].status_code == 200
    for response in responses:
        assert TOKEN not in response.text, response.url
        assert DB_PASSWORD not in response.text, response.url
        for value in response.headers.values():
            assert TOKEN not in value and DB_PASSWORD not in value


# --- Lambda events ---------------------------------------------------------------------------


SAMPLE_EVENTS = [
    "http-healthz.json",
    "http-readyz-verbose.json",
    "http-readyz-section.json",
    "http-health-report.json",
    "http-settings-put.json",
    "http-unknown-route.json",
    "alb-healthz.json",
    "alb-readyz.json",
    "alb-readyz-exclude.json",
]


def test_sample_events_from_the_events_directory(api: Api) -> None:
    api.seed("access_url", ok_section())
    api.seed("database", failing_section("EDB01"))

    healthz = api.invoke(load_event("http-healthz.json"))
    assert (healthz["statusCode"], healthz["body"]) == (200, "OK")
    assert "statusDescription" not in healthz

    verbose = api.invoke(load_event("http-readyz-verbose.json"))
    assert verbose["statusCode"] == 503
    assert verbose["headers"]["Cache-Control"] == "no-store"
    assert "[+]access_url ok" in verbose["body"]
    assert "[-]database failed: EDB01" in verbose["body"]

    section = api.invoke(load_event("http-readyz-section.json"))
    assert section["statusCode"] == 503

    report = api.invoke(load_event("http-health-report.json"))
    assert report["statusCode"] == 200
    assert json.loads(report["body"])["database"]["severity"] == "error"

    put = api.invoke(load_event("http-settings-put.json"))
    assert put["statusCode"] == 200
    assert json.loads(put["body"]) == {"dismissed_healthchecks": ["Database"]}
    assert api.invoke(load_event("http-settings-put.json"))["statusCode"] == 204
    assert api.invoke(load_event("http-readyz-verbose.json"))["statusCode"] == 200

    unknown = api.invoke(load_event("http-unknown-route.json"))
    assert unknown["statusCode"] == 404
    assert set(json.loads(unknown["body"])) == {"message", "detail"}

    alb_healthz = api.invoke(load_event("alb-healthz.json"))
    assert alb_healthz["statusCode"] == 200
    assert alb_healthz["statusDescription"] == "200 OK"
    assert alb_healthz["body"] == "OK"
    assert "cookies" not in alb_healthz

    alb_ready = api.invoke(load_event("alb-readyz.json"))
    assert alb_ready["statusCode"] == 200  # database is dismissed now
    assert alb_ready["statusDescription"] == "200 OK"
    assert alb_ready["headers"]["Content-Type"].startswith("text/plain")

    # ALB with multi-value headers on answers with multi-value headers.
    alb_exclude = api.invoke(load_event("alb-readyz-exclude.json"))
    assert alb_exclude["statusCode"] == 200
    assert alb_exclude["multiValueHeaders"]["Cache-Control"] == ["no-store"]
    assert "headers" not in alb_exclude


def test_every_sample_event_gets_a_valid_answer(api: Api) -> None:
    names = sorted(p.name for p in EVENTS.glob("*.json") if p.name.startswith(("http-", "alb-")))
    if not names:
        pytest.skip("no sample events yet")
    for name in names:
        event = load_event(name)
        response = api.invoke(event)
        assert response["statusCode"] != 502, name
        if name.startswith("alb-"):
            assert response["statusDescription"].startswith(str(response["statusCode"]))


def test_alb_events_query_forms_and_encoding(api: Api) -> None:
    api.seed("access_url", ok_section())
    api.seed("database", failing_section())
    repeated = api.invoke(
        alb_event("/readyz", query={"exclude": ["database", "access_url"], "verbose": [""]})
    )
    assert repeated["statusCode"] == 200
    assert "[+]database excluded: ok" in repeated["body"]
    assert repeated["statusDescription"] == "200 OK"
    assert repeated["multiValueHeaders"]["Content-Type"] == ["text/plain; charset=utf-8"]

    single = api.invoke(alb_event("/readyz", query={"verbose": [""]}, multi_value=False))
    assert single["statusCode"] == 503
    assert single["statusDescription"] == "503 Service Unavailable"
    assert single["headers"]["Cache-Control"] == "no-store"

    # ALB does not decode the query: deployhealth does.
    since = "2020-01-01T00%3A00%3A00%2B00%3A00"
    history = api.invoke(
        alb_event("/api/v2/debug/health/history", query={"section": ["database"], "since": [since]})
    )
    assert history["statusCode"] == 200
    assert len(json.loads(history["body"])["results"]) == 1

    json_ready = api.invoke(alb_event("/readyz", headers={"accept": "application/json"}))
    assert json.loads(json_ready["body"])["ready"] is False

    missing = api.invoke(alb_event("/nope"))
    assert missing["statusCode"] == 404
    assert missing["statusDescription"] == "404 Not Found"


def test_http_api_events_comma_joined_query_and_base64_body(api: Api) -> None:
    joined = api.invoke(
        http_event("/readyz", query={"exclude": "database,access_url", "verbose": ""})
    )
    assert joined["statusCode"] == 200
    assert "[+]access_url excluded: ok" in joined["body"]

    put = api.invoke(
        http_event(
            "/api/v2/debug/health/settings",
            method="PUT",
            headers={"content-type": "application/json"},
            body='{"dismissed_healthchecks": ["DERP"]}',
            base64_body=True,
        )
    )
    assert put["statusCode"] == 200
    assert json.loads(put["body"]) == {"dismissed_healthchecks": ["DERP"]}


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"requestContext": {"elb": {}}},
        {"version": "2.0", "rawPath": "/healthz"},
        ["not", "an", "object"],
        None,
    ],
)
def test_malformed_events_get_a_500_not_a_crash(api: Api, event: Any) -> None:
    response = api.app(event, None)
    SEEN.append((response["statusCode"], response["body"]))
    assert valid_proxy_response(response)
    assert response["statusCode"] == 500
    assert set(json.loads(response["body"])) == {"message", "detail"}
    if isinstance(event, dict) and "elb" in event.get("requestContext", {}):
        assert response["statusDescription"] == "500 Internal Server Error"


# --- the Lambda entry points -----------------------------------------------------------------


@dataclass
class FakeLambdaContext:
    function_name: str = "deployhealth-access-url"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:x"
    aws_request_id: str = "req-1"


@pytest.fixture
def lambda_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean DEPLOYHEALTH_* environment, run from an empty directory (no TOML file)."""
    for name in list(os.environ):
        if name.startswith("DEPLOYHEALTH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "lambda.db"
    monkeypatch.setenv("DEPLOYHEALTH_NAME", "coder-lambda")
    monkeypatch.setenv("DEPLOYHEALTH_STORE", f"sqlite:///{db}")
    return db


def test_check_handler_runs_stores_and_summarises(
    lambda_env: Path,
    coder_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deployhealth.aws.check_function import check_handler

    monkeypatch.setenv("DEPLOYHEALTH_ACCESS_URL", coder_url)
    handler = check_handler("access_url")
    summary = handler(
        load_event("schedule.json"),
        FakeLambdaContext(),
    )
    assert summary == {"section": "access_url", "severity": "ok", "codes": []}
    store = SQLiteStore(str(lambda_env), "coder-lambda", 7.0)
    assert store.latest()["access_url"].details["status_code"] == 200
    store.close()
    out = capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("SectionSeverity" in r and r.get("Section") == "access_url" for r in records)
    assert any(
        r.get("message") == "check finished" and r.get("section") == "access_url" for r in records
    )


def test_check_handler_fails_loudly(
    lambda_env: Path, unreadable_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployhealth.aws.check_function import check_handler

    with pytest.raises(ValueError, match="no check family"):
        check_handler("nope")

    monkeypatch.setenv("DEPLOYHEALTH_STORE", f"sqlite:///{unreadable_db}")
    with pytest.raises(StoreUnavailable, match="not-a-directory"):
        check_handler("database")({}, FakeLambdaContext())

    monkeypatch.setenv("DEPLOYHEALTH_STORE", "ftp://nowhere")
    with pytest.raises(SettingsError, match="DEPLOYHEALTH_STORE"):
        check_handler("database")({}, FakeLambdaContext())


_COLD_START_SCRIPT = """
import json, sys
from deployhealth.aws.api_function import api_handler
for path in sys.argv[1:]:
    with open(path) as fh:
        response = api_handler(json.load(fh), None)
    sys.stderr.write(json.dumps(response) + "\\n")
"""


def cold_start(env: dict[str, str], cwd: Path, *events: str) -> tuple[list[dict[str, Any]], str]:
    """Run `api_handler` in a fresh interpreter: its responses, and its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", _COLD_START_SCRIPT, *(str(EVENTS / e) for e in events)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=True,
    )
    responses = [json.loads(line) for line in result.stderr.splitlines()[-len(events) :]]
    for response in responses:
        assert valid_proxy_response(response)
        SEEN.append((response["statusCode"], response["body"]))
    return responses, result.stdout


def test_api_handler_in_a_fresh_process(lambda_env: Path, tmp_path: Path) -> None:
    """The API handler as Lambda runs it: a cold process, events as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYHEALTH_")}
    env.update(DEPLOYHEALTH_NAME="coder-lambda", DEPLOYHEALTH_STORE=f"sqlite:///{lambda_env}")
    (healthz, ready), stdout = cold_start(env, tmp_path, "http-healthz.json", "alb-readyz.json")
    assert (healthz["statusCode"], healthz["body"]) == (200, "OK")
    assert ready["statusCode"] == 503
    assert ready["statusDescription"] == "503 Service Unavailable"
    # The Ready metric went to stdout as EMF.
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    ready_records = [r for r in records if "Ready" in r]
    assert [emf_value(r["Ready"]) for r in ready_records] == [0]
    assert ready_records[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "DeployHealth"

    # Invalid settings: still an answer, never a crash (which the ALB would turn into 502).
    env["DEPLOYHEALTH_STORE"] = "ftp://nowhere"
    (healthz, ready), _ = cold_start(env, tmp_path, "http-healthz.json", "alb-readyz.json")
    assert healthz["statusCode"] == 200
    assert ready["statusCode"] == 503
    assert "DEPLOYHEALTH_STORE" in ready["body"]


def test_no_response_in_this_module_was_502() -> None:
    assert SEEN, "the tests above made requests"
    assert all(status != 502 for status, _ in SEEN)


def test_a_warm_function_reuses_its_readiness_read_until_it_writes(tmp_path: Path) -> None:
    """With a readiness cache (the Lambda API function keeps 5 s), results stored by the
    check functions show after the cache ages out; this process's own writes show at once."""
    db = tmp_path / "results.db"
    settings = make_settings(db)
    checks = SQLiteStore(str(db), settings.name, 7.0)  # the check functions' writes
    for name in GATING:
        checks.put(name, failing_section())
    app = create_app(ApiContext(settings, readiness_cache_seconds=3600))
    with LocalApiServer(app, "127.0.0.1", 0).start() as server:
        api = Api(app, server, checks, io.StringIO(), requests.Session())
        assert api.get("/readyz").status_code == 503
        for name in GATING:
            checks.put(name, ok_section())
        assert api.get("/readyz").status_code == 503  # the cached read, not the store
        # A settings change made here is a write of this process: the next read is fresh.
        dismiss_derp = {"dismissed_healthchecks": ["DERP"]}
        changed = api.put("/api/v2/debug/health/settings", json=dismiss_derp)
        assert changed.status_code == 200
        assert api.get("/readyz").status_code == 200
        api.session.close()
    checks.close()


class WriteDuringRead:
    """The store, but its next snapshot is overtaken by a write of this process, as a probe
    reading while `serve`'s scheduler ends a round can be."""

    def __init__(self, store: SQLiteStore, write: Callable[[], None]) -> None:
        self.store = store
        self.write = write
        self.armed = True

    def readiness_snapshot(self) -> Any:
        snapshot = self.store.readiness_snapshot()
        if self.armed:
            self.armed = False
            self.write()
        return snapshot

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_read_overtaken_by_a_write_of_this_process_is_not_kept(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    settings = make_settings(db)
    store = SQLiteStore(str(db), settings.name, 7.0)
    for name in GATING:
        store.put(name, failing_section())
    contexts: list[ApiContext] = []

    def round_ends() -> None:
        for name in GATING:
            store.put(name, ok_section())
        contexts[0].forget_snapshot()  # what serve does after each round

    context = ApiContext(settings, store=WriteDuringRead(store, round_ends),  # type: ignore[arg-type]
                         readiness_cache_seconds=3600)
    contexts.append(context)
    app = create_app(context)
    # Read before the round ended: its answer is the old one, but it is not kept for an hour.
    assert app(http_event("/readyz"))["statusCode"] == 503
    assert app(http_event("/readyz"))["statusCode"] == 200
    store.close()


def test_an_http_1_0_client_asking_for_keep_alive_gets_it(api: Api) -> None:
    request = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    with socket.create_connection(("127.0.0.1", api.server.port), timeout=30) as conn:
        for _ in range(2):
            conn.sendall(request)
            answer = b""
            while not answer.endswith(b"OK"):
                answer += conn.recv(65536)
            assert b"\r\nConnection: keep-alive\r\n" in answer


def test_a_check_function_does_not_import_the_api() -> None:
    """A check function's cold start pays for its check, not for the API's router."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import app; "
        "print(sorted(m for m in sys.modules if m.startswith(('deployhealth.api', "
        "'aws_lambda_powertools.event_handler'))))"
    )
    for family in FAMILIES:
        code_dir = Path(__file__).resolve().parents[1] / "functions" / "checks" / family
        result = subprocess.run(
            [sys.executable, "-c", script, str(code_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stdout.strip() == "[]", (family, result.stdout, result.stderr)


# --- the HTTP layer under hostile and clumsy clients -----------------------------------------


def raw_exchange(server: LocalApiServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are on one connection; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/7.0\r\n\r\n", 505),
        (b"GET /healthz HTTP/1.x\r\n\r\n", 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (b"TRACE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 404),
        (b"BREW /readyz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        # What two parsers could read differently (request smuggling) is refused outright.
        (b"POST /healthz HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 411),
        (b"GET /healthz HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX-Space : a\r\n\r\n", 400),
        (b"POST /healthz HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    ],
)
def test_every_refusal_of_the_local_server_is_the_json_error_shape(
    api: Api, request_bytes: bytes, status: int
) -> None:
    got, headers, body = raw_exchange(api.server, request_bytes)
    SEEN.append((got, body.decode(errors="replace")))
    assert got == status
    assert headers["content-type"] == "application/json"
    assert set(json.loads(body)) == {"message", "detail"}
    assert b"<html" not in body.lower()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v2/debug/health/history?section=database&limit=" + "9" * 5000, None),
        ("GET", "/api/v2/debug/health/history?section=database&since=0001-01-01T00:00:00%2B05:00",
         None),
        ("GET", "/api/v2/debug/health/history?section=database&since=9999-12-31T23:59:59-05:00",
         None),
        ("GET", "/api/v2/debug/health?force=" + "t" * 5000, None),
        ("PUT", "/api/v2/debug/health/settings", "[" * 20_000),
        ("PUT", "/api/v2/debug/health/settings", '{"dismissed_healthchecks": ' + "[" * 20_000),
    ],
)
def test_hostile_parameters_are_400_and_log_no_traceback(
    api: Api, caplog: pytest.LogCaptureFixture, method: str, path: str, body: str | None
) -> None:
    with caplog.at_level(logging.DEBUG):
        response = api.request(method, path, data=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"message", "detail"}
    assert len(response.text) < 1000  # a 5,000-character value is not quoted back whole
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_history_at_the_ends_of_time_is_empty_not_an_error(api: Api) -> None:
    for since in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00-05:00"):
        response = api.get("/api/v2/debug/health/history", params={
            "section": "database", "since": since})
        assert response.status_code == 200, response.text
        assert response.json()["results"] == []


COMMA_TOKEN = "tok,en-with, commas-PLANTED"


def test_a_token_containing_a_comma_authenticates(make_api: ApiFactory) -> None:
    api = make_api(api_token=Secret(COMMA_TOKEN))
    good = {"Authorization": f"Bearer {COMMA_TOKEN}"}
    assert api.get("/api/v2/debug/health/settings", headers=good).status_code == 200
    # Only the whole token: any comma-separated piece of it is refused.
    for piece in COMMA_TOKEN.split(","):
        piece_auth = {"Authorization": f"Bearer {piece.strip()}"}
        assert api.get("/api/v2/debug/health/settings", headers=piece_auth).status_code == 401
    # The same through Lambda events: HTTP API 2.0 and ALB in both header forms.
    path = "/api/v2/debug/health/settings"
    assert api.invoke(http_event(path, headers={"authorization": good["Authorization"]}))[
        "statusCode"] == 200
    for multi_value in (True, False):
        event = alb_event(path, headers={"authorization": good["Authorization"]},
                          multi_value=multi_value)
        assert api.invoke(event)["statusCode"] == 200


def test_an_accept_list_with_json_anywhere_gets_json(api: Api) -> None:
    seed_all_sections(api)
    response = api.get("/readyz", headers={"Accept": "application/json, text/plain;q=0.5"})
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["ready"] is False


def test_concurrent_forced_runs_share_one_run_and_a_next_one_waits(
    make_api: ApiFactory, sim: SimulatedDeployment
) -> None:
    forced = make_api(access_url=sim.url)
    before = sim.served("/healthz")
    start = threading.Barrier(30)
    answers: list[requests.Response] = []

    def ask() -> None:
        start.wait()
        with requests.Session() as session:
            answers.append(session.get(f"{forced.server.url}/api/v2/debug/health?force=true",
                                       timeout=60))

    threads = [threading.Thread(target=ask) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    SEEN.extend((a.status_code, a.text) for a in answers)
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses
    # One run served them all: the access URL family probed /healthz once (not 30 times),
    # and every 200 is the same report.
    assert sim.served("/healthz") - before == 1
    assert len({a.text for a in answers if a.status_code == 200}) == 1
    # Right after, a new forced run is refused with Retry-After; the stored report is not.
    again = forced.get("/api/v2/debug/health?force=true")
    assert again.status_code == 429
    assert 1 <= int(again.headers["Retry-After"]) <= FORCE_MIN_INTERVAL_SECONDS
    assert set(again.json()) == {"message", "detail"}
    assert forced.get("/api/v2/debug/health").status_code == 200
    assert sim.served("/healthz") - before == 1


def test_idle_and_slow_clients_hold_no_unbounded_threads(api: Api) -> None:
    baseline = threading.active_count()
    idle: list[socket.socket] = []
    try:
        # 300 connections that send nothing: they wait without a thread.
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", api.server.port), timeout=30))
        # 20 that stop half-way through their request: each holds a worker until it times out.
        for _ in range(20):
            conn = socket.create_connection(("127.0.0.1", api.server.port), timeout=30)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            idle.append(conn)
        # Meanwhile the probes answer.
        with requests.Session() as session:
            for _ in range(10):
                assert session.get(f"{api.server.url}/healthz", timeout=30).status_code == 200
        assert threading.active_count() - baseline <= MAX_WORKERS + 1
    finally:
        for conn in idle:
            conn.close()


def test_pipelined_and_keep_alive_requests_all_get_their_answers(api: Api) -> None:
    # Three requests in one write, the last closing: each answered in order, none lost while
    # the connection goes back to wait between them.
    body = b'{"dismissed_healthchecks": ["DERP"]}'
    pipelined = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"PUT /api/v2/debug/health/settings HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
        b"\r\n\r\n" + body +
        b"GET /api/v2/debug/health/settings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", api.server.port), timeout=30) as conn:
        conn.sendall(pipelined)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3, answer
    assert answer.endswith(b'{"dismissed_healthchecks":["DERP"]}')
    with requests.Session() as session:
        for _ in range(20):
            assert session.get(f"{api.server.url}/healthz", timeout=30).text == "OK"
