"""The API function's routes, on one Powertools `Router` shared by two resolvers.

API Gateway's HTTP API (payload format 2.0) and an ALB target group send differently shaped
events and expect differently shaped answers; Powertools' `APIGatewayHttpResolver` and
`ALBResolver` each speak one of them, so both include the same `Router` and `ApiApp.handle`
picks one per event (ALB events carry `requestContext.elb`).

Every answer is a valid proxy response: API Gateway and ALB turn a raised exception or a
malformed response into `502`, which a load balancer reads as "the server behind me is
down". So errors become `{"message", "detail"}` JSON through Powertools exception handlers,
and `handle` has a last-resort `500` of its own.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from http import HTTPStatus
from typing import IO, Any, TypeVar
from urllib.parse import unquote, unquote_plus

from aws_lambda_powertools.event_handler import ALBResolver, APIGatewayHttpResolver, Response
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver, Router
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware

from deployhealth.api.page import (
    CODES_ROUTE,
    CONTENT_SECURITY_POLICY,
    PAGE_HISTORY_LIMIT,
    REFRESH_DEFAULT_SECONDS,
    REFRESH_MAX_SECONDS,
    REFRESH_MIN_SECONDS,
    PageOptions,
    page_verdict,
    render_codes_page,
    render_page,
)
from deployhealth.metrics import MetricsSink
from deployhealth.model import (
    CODER_SECTION_NAMES,
    SECTION_NAMES,
    Report,
    Section,
    UnknownSectionError,
    canonical_section,
    parse_rfc3339,
    utcnow,
)
from deployhealth.readiness import Readiness, evaluate_summaries, gating_sections
from deployhealth.redact import Redactor
from deployhealth.settings import Settings, SettingsError, load_settings
from deployhealth.store import (
    LazyStore,
    ReadinessSnapshot,
    ResultStore,
    Snapshot,
    StoreUnavailable,
    open_store_lazily,
)

logger = logging.getLogger(__name__)

# API Gateway gives a Lambda integration 30 s; a forced run must answer well inside that.
FORCE_MAX_SECONDS = 25.0
# A forced run probes the whole deployment: after one ends, the next may start this many
# seconds later (429 with Retry-After before that). Callers arriving while one is in flight
# share it instead. Per process: each warm Lambda instance, or one `deployhealth serve`.
FORCE_MIN_INTERVAL_SECONDS = 10.0
# Routes a load balancer probes. OPTIONS there answers as GET does (status and body, plus
# `Allow`): haproxy's `option httpchk` sends OPTIONS unless told otherwise, and a probe
# that always got 204 would keep a failing server in rotation.
PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/readyz/<section>"})
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 1000

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
HTML = "text/html; charset=utf-8"
NO_STORE = {"Cache-Control": "no-store"}


class ApiError(Exception):
    """An answer other than 2xx that the route decided on: status, message and detail."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})


class ApiContext:
    """What the routes need: settings, a result store opened on first use, a metrics sink.

    Built once per process (a Lambda cold start, or `deployhealth serve`) and shared by
    every request. The store is opened lazily so that `/healthz` never touches it and a
    store that is down at start-up does not stop the function from answering; a failed
    open is retried on the next request. Settings that failed to load are kept as the
    error, so that `/healthz` still answers and every other route can say what is wrong.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        metrics: MetricsSink | None = None,
        store: ResultStore | None = None,
        settings_error: SettingsError | None = None,
        docs_base_url: str = "",
        readiness_cache_seconds: float = 0.0,
    ) -> None:
        if settings is None and settings_error is None:
            raise ValueError("ApiContext needs settings or the error that loading them raised")
        self._settings = settings
        self._settings_error = settings_error
        # A store handed in belongs to the caller (the local server shares it with the
        # scheduler); one opened here, on first use (LazyStore), is closed here.
        self._own_store: LazyStore | None = None
        if store is None and settings is not None:
            self._own_store = open_store_lazily(
                settings.store, settings.name, settings.history_retention_days, self.describe
            )
            store = self._own_store
        self._store = _GuardedStore(store, self.describe) if store is not None else None
        self.docs_base_url = docs_base_url
        # Probes call /readyz every few seconds from several places; in a warm Lambda the
        # stored results are read again only after this many seconds (0: every request).
        # Results change once per check interval, so a few seconds hide nothing.
        self.readiness_cache_seconds = readiness_cache_seconds
        self._snapshot_cache: tuple[float, ReadinessSnapshot] | None = None
        # Bumped by forget_snapshot: a read that a write of this process overtook is not
        # cached (it may predate the write); the lock makes check-and-keep one step.
        self._snapshot_generation = 0
        self._snapshot_lock = threading.Lock()
        if metrics is None and settings is not None:
            metrics = MetricsSink(settings.metrics_namespace, settings.name, None)
        self.metrics = metrics
        self.redactor = Redactor.for_settings(settings) if settings is not None else Redactor(())

    @classmethod
    def from_environment(cls, metrics_stream: IO[str] | None = None, **kwargs: Any) -> ApiContext:
        """Settings from `load_settings()`; an invalid setting is kept, not raised."""
        try:
            settings = load_settings()
        except SettingsError as exc:
            return cls(settings_error=exc, **kwargs)
        metrics = MetricsSink(settings.metrics_namespace, settings.name, metrics_stream)
        return cls(settings, metrics=metrics, **kwargs)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            assert self._settings_error is not None
            raise self._settings_error
        return self._settings

    @property
    def settings_error(self) -> SettingsError | None:
        return self._settings_error

    def store(self) -> ResultStore:
        """The store, opened now if it is ours: raises StoreUnavailable while it cannot open."""
        _ = self.settings  # an invalid setting is the answer, before any store
        assert self._store is not None
        if self._own_store is not None:
            self._own_store.open()
        return self._store

    def readiness_snapshot(self, store: ResultStore) -> ReadinessSnapshot:
        """The latest results' summaries and dismissals, at most `readiness_cache_seconds` old."""
        if self.readiness_cache_seconds <= 0:
            return store.readiness_snapshot()
        now = time.monotonic()
        cached = self._snapshot_cache
        if cached is not None and now - cached[0] < self.readiness_cache_seconds:
            return cached[1]
        generation = self._snapshot_generation
        snapshot = store.readiness_snapshot()
        with self._snapshot_lock:
            if generation == self._snapshot_generation:
                self._snapshot_cache = (now, snapshot)
        return snapshot

    def forget_snapshot(self) -> None:
        """Called after this process wrote results or settings: the next read is fresh."""
        with self._snapshot_lock:
            self._snapshot_generation += 1
            self._snapshot_cache = None

    def dismissed(self, stored: tuple[str, ...] | None) -> tuple[str, ...]:
        """The dismissed sections: as set through the API, else as configured."""
        return stored if stored is not None else self.settings.dismissed_sections

    def describe(self, exc: BaseException) -> str:
        return self.redactor.scrub(f"{type(exc).__name__}: {exc}")

    def scrub(self, text: str) -> str:
        return self.redactor.scrub(text)

    def close(self) -> None:
        if self._own_store is not None:
            self._own_store.close()


_T = TypeVar("_T")


class _GuardedStore:
    """A store whose every failure is `StoreUnavailable`.

    Each backend promises that already; this keeps the promise when a backend fails in a
    way its module did not foresee, because to a caller that is still "the store cannot be
    read" (503 naming the store), never a crash (500) of deployhealth itself.
    """

    def __init__(self, store: ResultStore, describe: Callable[[BaseException], str]) -> None:
        self._store = store
        self._describe = describe
        self.description = store.description

    def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return fn(*args, **kwargs)
        except StoreUnavailable:
            raise
        except Exception as exc:
            logger.exception("the result store failed unexpectedly")
            raise StoreUnavailable(self.description, self._describe(exc)) from None

    def put(self, name: str, section: Section) -> None:
        self._call(self._store.put, name, section)

    def snapshot(self) -> Snapshot:
        return self._call(self._store.snapshot)

    def readiness_snapshot(self) -> ReadinessSnapshot:
        return self._call(self._store.readiness_snapshot)

    def latest(self) -> dict[str, Section]:
        return self._call(self._store.latest)

    def history(
        self, name: str, *, limit: int = 50, since: datetime | None = None
    ) -> list[Section]:
        return self._call(self._store.history, name, limit=limit, since=since)

    def dismissed(self) -> tuple[str, ...] | None:
        return self._call(self._store.dismissed)

    def set_dismissed(self, sections: Sequence[str]) -> bool:
        return self._call(self._store.set_dismissed, sections)

    def close(self) -> None:
        self._store.close()


# --- per-thread request state -----------------------------------------------------------

# Powertools keeps the event being resolved in a class attribute (`BaseRouter.current_event`)
# and the routing context in one dict per resolver. In Lambda one process serves one request
# at a time, but the local server resolves requests on many threads at once, and they must
# not see each other's events. The resolvers below keep both per thread instead; the state is
# module-wide because the shared Router asks whichever resolver included it last.
_request = threading.local()


class _PerThreadState(ApiGatewayResolver):
    @property  # type: ignore[override]
    def current_event(self) -> Any:
        return _request.event

    @current_event.setter
    def current_event(self, value: Any) -> None:
        _request.event = value

    @property  # type: ignore[override]
    def context(self) -> dict[str, Any]:
        try:
            return _request.context  # type: ignore[no-any-return]
        except AttributeError:
            _request.context = {}
            return _request.context  # type: ignore[no-any-return]

    @context.setter
    def context(self, value: dict[str, Any]) -> None:
        _request.context = value

    def resolve(self, event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        self.current_event = self._to_proxy_event(dict(event))
        try:
            return super().resolve(event, context)
        finally:
            _request.event = None


class _HttpApiResolver(_PerThreadState, APIGatewayHttpResolver):
    pass


class _AlbResolver(_PerThreadState, ALBResolver):
    pass


def _build_middleware_stacks(resolver: ApiGatewayResolver) -> None:
    """Build every route's middleware stack now, on one thread.

    Powertools builds a route's stack lazily on its first request, guarded by a plain flag:
    two threads of the local server hitting a route for the first time at once both wrap
    it, and one of them calls a half-built stack (seen as "MiddlewareFrame.__call__() got an
    unexpected keyword argument"). Built up front, the stacks are only ever read.
    """
    for route in [*resolver._static_routes, *resolver._dynamic_routes]:
        if not route._middleware_stack_built:
            route._build_middleware_stack(
                router_middlewares=resolver._router_middlewares, app=resolver
            )


# --- the application ----------------------------------------------------------------------


class ApiApp:
    """A Lambda handler for HTTP API v2 and ALB events: `app(event, context) -> response`."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context
        self.router = build_router(context)
        self.http_api = _HttpApiResolver()
        self.http_api.include_router(self.router)
        self.alb = _AlbResolver()
        self.alb.include_router(self.router)
        for resolver in (self.http_api, self.alb):
            _build_middleware_stacks(resolver)

    def __call__(self, event: Any, lambda_context: Any = None) -> dict[str, Any]:
        return self.handle(event, lambda_context)

    def handle(self, event: Any, lambda_context: Any = None) -> dict[str, Any]:
        alb = is_alb_event(event)
        try:
            if not isinstance(event, dict):
                raise TypeError(f"the event is a {type(event).__name__}, not an object")
            resolver = self.alb if alb else self.http_api
            response = self._resolve(resolver, event, lambda_context)
            response = self._finish(response, alb)
        except Exception as exc:
            logger.exception("request failed outside the routes")
            response = error_response(
                event if isinstance(event, dict) else {},
                500,
                {"message": "Internal error.", "detail": self.context.describe(exc)},
            )
        if not valid_proxy_response(response):
            logger.error("a route built an invalid proxy response; answering 500 instead")
            response = error_response(
                event if isinstance(event, dict) else {},
                500,
                {"message": "Internal error.", "detail": "the response was malformed"},
            )
        return response

    def _resolve(
        self, resolver: ApiGatewayResolver, event: dict[str, Any], lambda_context: Any
    ) -> dict[str, Any]:
        """Resolve, answering for HTTP's methods where Powertools matches only exact ones.

        Powertools finds a route by path and method together, so any other method on a known
        path would be 404. Here: HEAD is GET (the HTTP layer in front drops the body: the
        local server, API Gateway and ALB alike), OPTIONS is 204 with `Allow` (on a probe
        route it answers as GET does, see PROBE_ROUTES), and anything else is 405 with
        `Allow`. Unknown paths stay 404 whatever the method.
        """
        routes = _routes_for(resolver, event)
        if not routes:
            return resolver.resolve(event, lambda_context)
        method = _event_method(event)
        methods = {route.method for route in routes}
        if method in methods:
            return resolver.resolve(event, lambda_context)
        allow = ", ".join(sorted(methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())))
        if method == "HEAD" and "GET" in methods:
            return resolver.resolve(_with_method(event, "GET"), lambda_context)
        if method == "OPTIONS":
            if "GET" in methods and any(route.path in PROBE_ROUTES for route in routes):
                response = resolver.resolve(_with_method(event, "GET"), lambda_context)
                _add_header(response, "Allow", allow)
                return response
            return proxy_response(event, 204, "", {"Allow": allow})
        return error_response(
            event,
            405,
            {
                "message": "Method not allowed.",
                "detail": f"{method} is not allowed here; allowed: {allow}.",
            },
            {"Allow": allow},
        )

    def _finish(self, response: dict[str, Any], alb: bool) -> dict[str, Any]:
        if response.get("body") is None:
            response["body"] = ""
        if not response.get("isBase64Encoded") and response["body"]:
            # Defence in depth: whatever a stored section or an exception carried, a
            # configured secret never leaves in a response.
            response["body"] = self.context.scrub(response["body"])
        if alb:
            response["statusDescription"] = status_description(response["statusCode"])
        return response

    def close(self) -> None:
        self.context.close()


def create_app(context: ApiContext) -> ApiApp:
    """The handler for one context; call it as `app(event, lambda_context)`."""
    return ApiApp(context)


def is_alb_event(event: Any) -> bool:
    if not isinstance(event, dict):
        return False
    request_context = event.get("requestContext")
    return isinstance(request_context, dict) and "elb" in request_context


def status_description(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _routes_for(resolver: ApiGatewayResolver, event: dict[str, Any]) -> list[Any]:
    """The routes whose path matches the event's, whatever their method (as Powertools
    matches them); none for an event too malformed to have a path."""
    try:
        path = resolver._remove_prefix(resolver._to_proxy_event(event).path)
        return [
            route
            for route in [*resolver._static_routes, *resolver._dynamic_routes]
            if route.rule.match(path)
        ]
    except Exception:  # the resolver itself answers for a malformed event
        return []


def _event_method(event: Mapping[str, Any]) -> str:
    if is_alb_event(event):
        return str(event.get("httpMethod", "")).upper()
    return str(event["requestContext"]["http"]["method"]).upper()


def _with_method(event: dict[str, Any], method: str) -> dict[str, Any]:
    """A copy of the event asking with another method."""
    if is_alb_event(event):
        return {**event, "httpMethod": method}
    request_context = event["requestContext"]
    http = {**request_context["http"], "method": method}
    return {**event, "requestContext": {**request_context, "http": http}}


def _add_header(response: dict[str, Any], name: str, value: str) -> None:
    if isinstance(response.get("multiValueHeaders"), dict):
        response["multiValueHeaders"][name] = [value]
    else:
        response.setdefault("headers", {})[name] = value


def error_response(
    event: Mapping[str, Any],
    status: int,
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A JSON answer built without Powertools, in the shape the event's sender expects."""
    body = json.dumps(payload, separators=(",", ":"))
    return proxy_response(event, status, body, {"Content-Type": JSON, **(headers or {})})


def proxy_response(
    event: Mapping[str, Any], status: int, body: str, headers: Mapping[str, str]
) -> dict[str, Any]:
    """An answer built without Powertools, in the shape the event's sender expects."""
    headers = dict(headers)
    if is_alb_event(event):
        response: dict[str, Any] = {
            "statusCode": status,
            "statusDescription": status_description(status),
            "isBase64Encoded": False,
            "body": body,
        }
        if event.get("multiValueHeaders"):
            response["multiValueHeaders"] = {k: [v] for k, v in headers.items()}
        else:
            response["headers"] = headers
        return response
    return {
        "statusCode": status,
        "headers": headers,
        "cookies": [],
        "body": body,
        "isBase64Encoded": False,
    }


def valid_proxy_response(response: Any) -> bool:
    """What API Gateway and ALB need to not answer 502 themselves."""
    if not isinstance(response, dict):
        return False
    status = response.get("statusCode")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        return False
    if not isinstance(response.get("body"), str):
        return False
    headers = response.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        return False
    multi = response.get("multiValueHeaders", {})
    return isinstance(multi, dict) and all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in multi.values()
    )


# --- request helpers ---------------------------------------------------------------------


def _json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> Response[Any]:
    return Response(status_code=status, content_type=JSON, body=dict(body), headers=headers)


def _text_response(
    status: int, body: str, headers: Mapping[str, str] | None = None
) -> Response[str]:
    return Response(status_code=status, content_type=TEXT, body=body, headers=dict(headers or {}))


def _html_response(body: str) -> Response[str]:
    headers = {
        # Self-contained: no script, no fetch; only the page's own style block, by its hash.
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        **NO_STORE,
    }
    return Response(status_code=200, content_type=HTML, body=body, headers=headers)


def _bad_request(message: str, detail: str = "") -> ApiError:
    return ApiError(400, message, detail)


def _bool_param(query: Mapping[str, str], name: str) -> bool:
    """`?name`, `?name=true` and `?name=1` are true; absent, `false` and `0` are false."""
    if name not in query:
        return False
    value = query[name].strip().lower()
    if value in ("", "true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise _bad_request(
        f"Query parameter {name!r} must be true or false, not {_clip(query[name])!r}.",
        f"Example: ?{name}=true",
    )


def _list_param(query: Mapping[str, str], name: str) -> list[str]:
    # HTTP API v2 joins repeated parameters with commas, and the router's `query()` joins
    # ALB's multi-value form the same way, so one split serves `?a=x&a=y` and `?a=x,y` alike.
    raw = query.get(name, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _unknown_section_detail() -> str:
    return (
        f"Known sections: {', '.join(SECTION_NAMES)}; "
        f"Coder's names are accepted too: {', '.join(CODER_SECTION_NAMES.values())}."
    )


def _known_section(name: str, param: str) -> str:
    try:
        return canonical_section(name)
    except UnknownSectionError:
        raise _bad_request(
            f"Query parameter {param!r} names an unknown section: {name!r}.",
            _unknown_section_detail(),
        ) from None


def _wants_json(query: Mapping[str, str], accept: str) -> bool:
    fmt = query.get("format", "").strip().lower()
    if fmt == "json":
        return True
    if fmt == "text":
        return False
    if fmt:
        raise _bad_request(
            f"Invalid format option {json.dumps(query['format'])}.",
            'Allowed values are: "json", "text".',
        )
    media = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return JSON in media


def _parse_limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    if raw is None or raw.strip() == "":
        return HISTORY_DEFAULT_LIMIT
    limit = _whole_number(raw)
    if limit is None:
        raise _bad_request(
            f"Query parameter 'limit' must be a whole number from 1 to {HISTORY_MAX_LIMIT}, "
            f"not {_clip(raw)!r}.",
            f"Between 1 and {HISTORY_MAX_LIMIT}; the default is {HISTORY_DEFAULT_LIMIT}.",
        )
    if not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise _bad_request(
            f"Query parameter 'limit' must be between 1 and {HISTORY_MAX_LIMIT}, not {limit}.",
        )
    return limit


def _whole_number(raw: str) -> int | None:
    """`raw` (stripped) as a whole number of at most nine ASCII digits; None otherwise.

    The length is checked before int(): int() of a few thousand digits raises (and costs)
    before a range check could say "too large".
    """
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        return None
    return int(text)


def _parse_refresh(query: Mapping[str, str]) -> int:
    """The page's `?refresh=` seconds: absent is the default, 0 turns reloading off."""
    raw = query.get("refresh")
    if raw is None or raw.strip() == "":
        return REFRESH_DEFAULT_SECONDS
    allowed = (
        f"0 (off) or a whole number of seconds from {REFRESH_MIN_SECONDS} to "
        f"{REFRESH_MAX_SECONDS}; the default is {REFRESH_DEFAULT_SECONDS}."
    )
    seconds = _whole_number(raw)
    if seconds is None:
        raise _bad_request(
            f"Query parameter 'refresh' must be a number, not {_clip(raw)!r}.", allowed
        )
    if seconds != 0 and not REFRESH_MIN_SECONDS <= seconds <= REFRESH_MAX_SECONDS:
        raise _bad_request(f"Query parameter 'refresh' is out of range: {seconds}.", allowed)
    return seconds


def _parse_since(query: Mapping[str, str]) -> datetime | None:
    raw = query.get("since")
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    # An unencoded `+` in a query string decodes to a space: `...T10:00:00 02:00`.
    if len(text) > 6 and text[-6] == " " and text[-3] == ":":
        text = text[:-6] + "+" + text[-5:]
    if not _looks_rfc3339(text):
        raise _bad_request(
            f"Query parameter 'since' must be an RFC 3339 time, not {_clip(raw)!r}.",
            "Example: since=2024-05-01T12:00:00Z",
        )
    try:
        return parse_rfc3339(text.upper())
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved past by its offset
        raise _bad_request(
            f"Query parameter 'since' is not a valid time: {_clip(raw)!r}.",
            "Example: since=2024-05-01T12:00:00Z",
        ) from None


# fromisoformat alone also takes dates without a time or an offset, which RFC 3339 does not.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _clip(text: str, limit: int = 40) -> str:
    """A caller's value quoted back in an error, cut short: a 5,000-digit value is not news."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _looks_rfc3339(text: str) -> bool:
    return _RFC3339.fullmatch(text) is not None


def _coder_version(sections: Mapping[str, Section]) -> str | None:
    for name in SECTION_NAMES:
        section = sections.get(name)
        if section is not None:
            version = section.details.get("coder_version")
            if isinstance(version, str) and version:
                return version
    return None


def _with_dismissed(
    sections: Mapping[str, Section], dismissed: Iterable[str]
) -> dict[str, Section]:
    gone = set(dismissed)
    out: dict[str, Section] = {}
    for name in SECTION_NAMES:
        section = sections.get(name)
        if section is not None:
            section.dismissed = name in gone
            out[name] = section
    return out


def build_report(
    settings: Settings,
    sections: Mapping[str, Section],
    dismissed: Iterable[str],
    time: datetime | None = None,
) -> Report:
    shown = _with_dismissed(sections, dismissed)
    if time is None:
        # Like Coder's cached report, the time is when the results were gathered.
        time = max((s.checked_at for s in shown.values()), default=None) or utcnow()
    return Report(
        deployment=settings.name,
        sections=shown,
        time=time,
        coder_version=_coder_version(shown),
    )


# --- routes --------------------------------------------------------------------------------


def build_router(ctx: ApiContext) -> Router:
    """The routes of product.md's table, closed over one ApiContext."""
    router = Router()

    def query() -> dict[str, str]:
        """Query parameters as HTTP API v2 gives them: decoded, repeats joined by commas."""
        raw = router.current_event.raw_event
        if is_alb_event(raw):
            # ALB passes the query exactly as sent, still percent-encoded.
            multi = raw.get("multiValueQueryStringParameters")
            if multi:
                return {
                    unquote_plus(k): ",".join(unquote_plus(v) for v in values)
                    for k, values in multi.items()
                }
            single = raw.get("queryStringParameters") or {}
            return {unquote_plus(k): unquote_plus(v) for k, v in single.items()}
        return {k: v for k, v in (raw.get("queryStringParameters") or {}).items() if v is not None}

    def header(name: str) -> str:
        """A request header's value as sent.

        Not Powertools' `resolved_headers_field`: for HTTP API (payload 2.0) events it
        splits every value on commas (`APIGatewayProxyEventV2.resolved_headers_field`), and
        a comma inside a token or an Accept list is part of the value. ALB's multi-value form
        has no `headers`; there each repeat of a header is one list item, commas untouched.
        """
        event = router.current_event
        value: Any
        if event.get("headers"):
            value = event.headers.get(name)
        else:
            value = event.resolved_headers_field.get(name)
            if isinstance(value, list):
                value = value[-1] if value else None
        return value if isinstance(value, str) else ""

    def require_token(app: Any, next_middleware: NextMiddleware) -> Response[Any]:
        token = ctx.settings.api_token
        if token is not None:
            scheme, _, given = header("authorization").strip().partition(" ")
            expected = token.reveal().encode()
            # compare_digest even for a wrong scheme, so timing says nothing about the token.
            matches = hmac.compare_digest(given.strip().encode(), expected)
            if scheme.lower() != "bearer" or not matches:
                raise ApiError(
                    401,
                    "Unauthorized.",
                    "This route needs an Authorization: Bearer <DEPLOYHEALTH_API_TOKEN> header.",
                    {"WWW-Authenticate": 'Bearer realm="deployhealth"'},
                )
        return next_middleware(app)

    protected = [require_token]
    forced_runs = _ForcedRuns(FORCE_MIN_INTERVAL_SECONDS)

    # -- liveness and readiness (public) --

    @router.get("/healthz")
    def healthz() -> Response[str]:
        return _text_response(200, "OK")

    @router.get("/readyz")
    def readyz() -> Response[Any]:
        return readiness_answer(None)

    @router.get("/readyz/<section>")
    def readyz_section(section: str) -> Response[Any]:
        return readiness_answer(section)

    def readiness_answer(path_section: str | None) -> Response[Any]:
        only: str | None = None
        if path_section is not None:
            try:
                only = canonical_section(unquote(path_section))
            except UnknownSectionError:
                raise ApiError(
                    404, f"Unknown section {unquote(path_section)!r}.", _unknown_section_detail()
                ) from None
        params = query()
        as_json = _wants_json(params, header("accept"))
        verbose = _bool_param(params, "verbose")
        excluded = [_known_section(name, "exclude") for name in _list_param(params, "exclude")]
        # The Ready metric is the deployment's readiness as configured; a one-section probe or a
        # caller's exclusions answer a different question.
        record = only is None and not excluded

        try:
            settings = ctx.settings
            store = ctx.store()
            # One read of small summaries: latest sections' verdict inputs (hysteresis state
            # included, so no history is read) and dismissed settings come together.
            snapshot = ctx.readiness_snapshot(store)
            if snapshot.problem:
                # Results that can be read but no longer written: name the store's fault
                # rather than let each section go stale one by one.
                raise StoreUnavailable(store.description, snapshot.problem)
            dismissed = ctx.dismissed(snapshot.dismissed)
            sections = [only] if only else gating_sections(settings, dismissed)
            readiness = evaluate_summaries(
                settings, snapshot.summaries, sections, excluded=excluded
            )
        except (StoreUnavailable, SettingsError) as exc:
            # Unknown is not ready: a store that cannot be read says nothing about health.
            if record and ctx.metrics is not None:
                ctx.metrics.ready(False)
            return not_ready_unknown(exc, as_json)

        if record and ctx.metrics is not None:
            ctx.metrics.ready(readiness.ready)
        return readiness_response(readiness, as_json, verbose)

    def readiness_response(readiness: Readiness, as_json: bool, verbose: bool) -> Response[Any]:
        status = 200 if readiness.ready else 503
        if as_json:
            return _json_response(status, readiness.to_dict(), NO_STORE)
        return _text_response(status, readiness.text(verbose), NO_STORE)

    def not_ready_unknown(exc: Exception, as_json: bool) -> Response[Any]:
        message = ctx.scrub(str(exc))
        if as_json:
            return _json_response(503, {"ready": False, "checks": [], "message": message}, NO_STORE)
        return _text_response(503, f"{message}\nreadyz check failed\n", NO_STORE)

    # -- the report (authorized) --

    @router.get("/api/v2/debug/health", middlewares=protected)
    def health_report() -> Response[Any]:
        params = query()
        fmt = params.get("format", "")
        if fmt not in ("", "json", "text"):
            raise _bad_request(
                f"Invalid format option {json.dumps(fmt)}.", 'Allowed values are: "json", "text".'
            )
        force = _bool_param(params, "force")
        settings = ctx.settings
        store = ctx.store()
        if force:
            report = forced_runs.run(lambda: forced_report(settings, store))
        else:
            snapshot = store.snapshot()
            report = build_report(settings, snapshot.latest, ctx.dismissed(snapshot.dismissed))
        if fmt == "text":
            return _text_response(200, report.to_text())
        return _json_response(200, report.to_dict())

    def forced_report(settings: Settings, store: ResultStore) -> Report:
        # Imported here: the families' runner is only needed when someone forces a run.
        from deployhealth.checks import FAMILIES
        from deployhealth.runner import run_and_record

        dismissed = ctx.dismissed(store.dismissed())
        reachable = [f for f in FAMILIES if f not in settings.force_skip_sections]
        fresh, store_errors = run_and_record(
            settings, reachable, store, ctx.metrics, max_seconds=FORCE_MAX_SECONDS
        )
        ctx.forget_snapshot()
        if store_errors:
            raise StoreUnavailable(
                store.description,
                "the forced run finished but its results could not be stored: "
                + "; ".join(store_errors),
            )
        sections = store.latest()
        sections.update(fresh)
        return build_report(settings, sections, dismissed, time=utcnow())

    @router.get("/api/v2/debug/health/history", middlewares=protected)
    def health_history() -> Response[Any]:
        params = query()
        raw_section = params.get("section", "").strip()
        if not raw_section:
            raise _bad_request(
                "Query parameter 'section' is required.",
                f"One of: {', '.join(SECTION_NAMES)}.",
            )
        name = _known_section(raw_section, "section")
        limit = _parse_limit(params)
        since = _parse_since(params)
        store = ctx.store()
        dismissed = name in ctx.dismissed(store.dismissed())
        results = store.history(name, limit=limit, since=since)
        for section in results:
            section.dismissed = dismissed
        return _json_response(200, {"section": name, "results": [s.to_dict() for s in results]})

    @router.get("/api/v2/debug/health/settings", middlewares=protected)
    def get_health_settings() -> Response[Any]:
        store = ctx.store()
        return _json_response(200, settings_body(ctx.dismissed(store.dismissed())))

    @router.put("/api/v2/debug/health/settings", middlewares=protected)
    def put_health_settings() -> Response[Any]:
        try:
            body = router.current_event.decoded_body
        except ValueError:  # bad base64 or not UTF-8 (UnicodeDecodeError is a ValueError)
            raise _bad_request("The request body is not UTF-8 text.") from None
        wanted = parse_settings_body(body)
        store = ctx.store()
        if set(wanted) == set(ctx.dismissed(store.dismissed())):
            # product.md: unchanged is 204 (Coder itself answers 304 Not Modified).
            return Response(status_code=204, body="")
        store.set_dismissed(wanted)
        ctx.forget_snapshot()
        return _json_response(200, settings_body(wanted))

    # -- the HTML pages (authorized, like the report they show) --

    @router.get("/health", middlewares=protected)
    def health_page() -> Response[str]:
        refresh = _parse_refresh(query())
        settings = ctx.settings
        store = ctx.store()
        snapshot = store.snapshot()
        dismissed = ctx.dismissed(snapshot.dismissed)
        report = build_report(settings, snapshot.latest, dismissed)
        expected = list(dict.fromkeys([*settings.gating_sections, *report.sections]))
        # One bounded read per section serves the uptime figure and the trend.
        history = {
            name: store.history(name, limit=PAGE_HISTORY_LIMIT)
            for name in SECTION_NAMES
            if name in expected
        }
        # The verdict from what /readyz reads (hysteresis state lives in the summaries).
        verdict = page_verdict(settings, store.readiness_snapshot(), dismissed, store)
        options = PageOptions(docs_base_url=ctx.docs_base_url, refresh_seconds=refresh)
        body = render_page(report, expected, history, verdict=verdict, options=options)
        return _html_response(body)

    @router.get(CODES_ROUTE, middlewares=protected)
    def codes_page() -> Response[str]:
        return _html_response(render_codes_page(ctx.settings.name))

    # -- errors --

    @router.exception_handler(ApiError)
    def api_error(exc: ApiError) -> Response[Any]:
        headers = {**exc.headers, **(NO_STORE if exc.status >= 500 else {})}
        return _json_response(
            exc.status,
            {"message": ctx.scrub(exc.message), "detail": ctx.scrub(exc.detail)},
            headers,
        )

    @router.exception_handler(StoreUnavailable)
    def store_unavailable(exc: StoreUnavailable) -> Response[Any]:
        return _json_response(
            503,
            {
                "message": ctx.scrub(str(exc)),
                "detail": f"The result store {exc.store} could not be read or written.",
            },
            NO_STORE,
        )

    @router.exception_handler(SettingsError)
    def settings_error(exc: SettingsError) -> Response[Any]:
        # SettingsError never holds a secret: it names the key and the problem.
        return _json_response(
            500, {"message": "deployhealth's settings are invalid.", "detail": str(exc)}, NO_STORE
        )

    @router.exception_handler(NotFoundError)
    def not_found(_exc: NotFoundError) -> Response[Any]:
        event = router.current_event
        return _json_response(
            404,
            {
                "message": "Route not found.",
                "detail": f"No route for {event.http_method} {event.path}.",
            },
        )

    @router.exception_handler(Exception)
    def unexpected(exc: Exception) -> Response[Any]:
        logger.exception("unexpected error in a route")
        return _json_response(
            500, {"message": "Internal error.", "detail": ctx.describe(exc)}, NO_STORE
        )

    return router


class _ForcedRuns:
    """Forced runs, one at a time and at most one per `min_interval` seconds.

    A caller arriving while a forced run is in flight waits for it and gets its report (or
    its error): 30 concurrent `?force=true` requests probe the deployment once. A new run
    may start `min_interval` seconds after the last one ended; before that the answer is 429
    with Retry-After, and the stored results (without ?force) are as fresh as that run.
    """

    def __init__(self, min_interval: float) -> None:
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._in_flight: Future[Report] | None = None
        self._last_end: float | None = None

    def run(self, forced_report: Callable[[], Report]) -> Report:
        with self._lock:
            flight = self._in_flight
            leader = flight is None
            if flight is None:
                self._refuse_if_too_soon()
                flight = self._in_flight = Future()
        if not leader:
            return flight.result()  # raises the run's error, as the run's own caller gets it
        try:
            report = forced_report()
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(report)
            return report
        finally:
            with self._lock:
                self._in_flight = None
                self._last_end = time.monotonic()

    def _refuse_if_too_soon(self) -> None:
        if self._last_end is None:
            return
        wait = self.min_interval - (time.monotonic() - self._last_end)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "A forced run ended moments ago.",
                f"Forced runs start at most once every {self.min_interval:g} s; "
                f"try again in {seconds} s, or leave out ?force for the stored results.",
                {"Retry-After": str(seconds)},
            )


def settings_body(dismissed: Iterable[str]) -> dict[str, list[str]]:
    return {"dismissed_healthchecks": [CODER_SECTION_NAMES[name] for name in dismissed]}


def parse_settings_body(body: str | None) -> list[str]:
    """The sections of a PUT body, canonical and in report order; 400 for anything else."""
    example = 'Example: {"dismissed_healthchecks": ["DERP", "WorkspaceProxy"]}'
    try:
        data = json.loads(body or "")
    except (ValueError, RecursionError):  # RecursionError: thousands of nested `[`
        raise _bad_request("The request body is not valid JSON.", example) from None
    if not isinstance(data, dict):
        raise _bad_request("The request body must be a JSON object.", example)
    unknown_keys = sorted(set(data) - {"dismissed_healthchecks"})
    if unknown_keys:
        raise _bad_request(f"Unknown field(s): {', '.join(unknown_keys)}.", example)
    if "dismissed_healthchecks" not in data:
        raise _bad_request("The field 'dismissed_healthchecks' is required.", example)
    items = data["dismissed_healthchecks"]
    if items is None:
        items = []
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _bad_request("'dismissed_healthchecks' must be a list of section names.", example)
    names: set[str] = set()
    for item in items:
        try:
            names.add(canonical_section(item))
        except UnknownSectionError:
            raise _bad_request(
                f"'dismissed_healthchecks' names an unknown section: {item!r}.",
                _unknown_section_detail(),
            ) from None
    return [name for name in SECTION_NAMES if name in names]
