"""The HTTP API under generated requests: methods, paths, parameters, headers and bodies.

A real local server over a real SQLite store; hypothesis sends what a fuzzer would (bounded:
a fixed number of examples, no deadline, since a loaded CI machine is slow). Whatever comes
in, the answer keeps the status-code rules, and the stored settings change only on a valid,
authorized PUT.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from deployhealth.api import ApiContext, create_app
from deployhealth.api.app import ApiApp
from deployhealth.api.local import LocalApiServer
from deployhealth.model import (
    CODER_SECTION_NAMES,
    SECTION_NAMES,
    UnknownSectionError,
    canonical_section,
)
from deployhealth.settings import Secret, Settings, StoreLocation
from deployhealth.store.sqlite import SQLiteStore

TOKEN = "fuzz,token-PLANTED 42"
SETTINGS_PATH = "/api/v2/debug/health/settings"
PATHS = [
    "/healthz", "/readyz", "/readyz/database", "/readyz/DERP", "/readyz/nope",
    "/api/v2/debug/health", "/api/v2/debug/health/history", SETTINGS_PATH, "/health",
    "/health/codes", "/", "/api", "/api/v2/debug/health/", "/readyz/", "/nope",
]


@dataclass
class Served:
    app: ApiApp
    server: LocalApiServer
    store: SQLiteStore


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "results.db"
    config = Settings(
        name="fuzz", store=StoreLocation("sqlite", path=str(path)), api_token=Secret(TOKEN)
    )
    store = SQLiteStore(str(path), config.name, config.history_retention_days)
    app = create_app(ApiContext(config))
    server = LocalApiServer(app, "127.0.0.1", 0).start()
    yield Served(app, server, store)
    server.close()
    app.close()
    store.close()


# Text a URL, a header or a query can carry as sent.
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
section_names = st.sampled_from([*SECTION_NAMES, *CODER_SECTION_NAMES.values(), "nope", ""])
query_values = st.one_of(
    printable,
    section_names,
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "9" * 5000,
                     "2024-05-01T12:00:00Z", "true", "false", "json", "text", ""]),
)
queries = st.dictionaries(
    st.sampled_from(["section", "limit", "since", "format", "verbose", "exclude", "x"]),
    query_values,
    max_size=4,
)
paths = st.one_of(
    st.sampled_from(PATHS),
    printable.map(lambda text: "/" + "".join(c for c in text if c.isalnum() or c in "/-._~%")),
)
bodies = st.one_of(
    st.none(),
    printable,
    st.sampled_from(["[" * 20_000, "{}", "null", '{"dismissed_healthchecks": null}',
                     '{"dismissed_healthchecks": "DERP"}', '{"other": []}']),
    st.lists(section_names, max_size=4).map(
        lambda names: json.dumps({"dismissed_healthchecks": names})
    ),
)
authorizations = st.one_of(
    st.none(), st.just(f"Bearer {TOKEN}"), printable, st.just(f"Basic {TOKEN}"),
    st.just("Bearer fuzz"),
)
methods = st.sampled_from(
    ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE", "FROB"]
)


def send(server: LocalApiServer, method: str, target: str, headers: dict[str, str],
         body: str | None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, target, body=body.encode() if body is not None else None,
                     headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def expected_dismissed(body: str | None) -> set[str] | None:
    """The sections a PUT body asks for, or None when the API must refuse it."""
    try:
        data: Any = json.loads(body or "")
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or set(data) != {"dismissed_healthchecks"}:
        return None
    names = data["dismissed_healthchecks"] or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    try:
        return {canonical_section(n) for n in names}
    except UnknownSectionError:
        return None


good_auth = f"Bearer {TOKEN}"
# Anything at all, and (as often) a settings PUT that is likely authorized and well formed,
# so that both halves of "settings change only on a valid PUT" are exercised.
anything = st.tuples(methods, paths, queries, authorizations, bodies)
settings_puts = st.tuples(
    st.just("PUT"),
    st.sampled_from([SETTINGS_PATH, SETTINGS_PATH + "/", "/api/v2/debug/health"]),
    queries,
    st.one_of(st.just(good_auth), authorizations),
    st.one_of(
        st.lists(st.sampled_from([*SECTION_NAMES, *CODER_SECTION_NAMES.values()]), max_size=4)
        .map(lambda names: json.dumps({"dismissed_healthchecks": names})),
        bodies,
    ),
)


# The same 400 examples on every run, so that CI's verdict is the one seen here. To explore
# new ones, run it with derandomize=False and a larger max_examples, and keep what it finds
# as an @example.
@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Once found by the fuzzer: http.server serves "//readyz" as /readyz.
@example(request=("GET", "//readyz", {}, None, None), accept=None)
@example(request=("PUT", "//" + SETTINGS_PATH, {}, f"Bearer {TOKEN}",
                  '{"dismissed_healthchecks": ["DERP"]}'), accept=None)
@given(request=st.one_of(anything, settings_puts),
       accept=st.sampled_from([None, "application/json", "text/plain, application/json", "*/*"]))
def test_fuzzed_requests_keep_the_status_rules_and_settings_change_only_on_a_valid_put(
    served: Served, request: tuple[str, str, dict[str, str], str | None, str | None],
    accept: str | None,
) -> None:
    method, path, query, auth, body = request
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    if accept is not None:
        headers["Accept"] = accept
    target = path + (f"?{urlencode(query)}" if query else "")
    before = served.store.dismissed()

    status, response_headers, payload = send(served.server, method, target, headers, body)
    # http.server reduces leading slashes to one (CPython's fix for open redirects,
    # gh-87389): "//readyz" is /readyz. The rules below judge the path as served.
    path = "/" + path.lstrip("/")

    readiness = path.startswith("/readyz")
    assert status != 502
    assert status < 500 or (status == 503 and readiness), (status, payload[:300])
    content_type = response_headers.get("content-type", "")
    assert "html" not in content_type or (
        status == 200 and path in ("/health", "/health/codes")
    ), content_type
    if status >= 400 and not readiness and method != "HEAD":
        assert content_type == "application/json", (status, content_type)
        assert set(json.loads(payload)) == {"message", "detail"}
    if status == 405:
        assert "GET" in response_headers["allow"]
    if method == "HEAD":
        assert payload == b""
    assert TOKEN.encode() not in payload

    after = served.store.dismissed()
    valid_put = (
        method == "PUT" and path == SETTINGS_PATH and auth == good_auth
        and expected_dismissed(body) is not None
    )
    event(f"{'valid PUT' if valid_put else method} -> {status // 100}xx")
    if valid_put:
        assert status in (200, 204), (status, payload)
        assert set(after or ()) == expected_dismissed(body)
    else:
        assert after == before, (method, path, status)
        assert status not in (200, 204) or method != "PUT"
