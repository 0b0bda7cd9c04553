"""The deployment's workspace proxies, provisioner daemons and replicas, from one of three sources.

`open_inventory(settings)` picks the source named by `Settings.inventory_source` (`api` when
a token is set, else `database` when a database is set, else `static`) and every source
answers the same three questions with the same dataclasses:

- `api`: Coder's REST API with the session token (`/api/v2/workspaceproxies`,
  `/api/v2/organizations` then each organization's `provisionerdaemons`, `/api/v2/replicas`).
- `database`: read-only SQL on Coder's own tables (`workspace_proxies`,
  `provisioner_daemons`, `replicas`), connected as the database family connects
  (deployhealth.pgconn: TLS per sslmode, timeouts on the socket).
- `static`: the lists in the settings, shaped like the API's answers.

What the sources cannot all say, and how it is read:

- The primary appears in the API's proxy list (name `primary`); it is dropped everywhere,
  with deleted proxies: the access_url section covers the primary.
- Coder's `/api/v2/replicas` lists only live primaries and does not expose `primary`,
  `stopped_at`, `updated_at` or `version`. A replica is therefore live unless a source *says*
  it is not primary, stopped, or last updated more than 15 s ago (`Replica.is_live`), and its
  version and update time are None when the API is the source.
- Timestamps are datetimes in UTC whatever the source (Go's nanoseconds are cut to
  microseconds), so the API and the database give equal answers for one deployment.

`CoderAPI` is also how the families read `buildinfo` and `entitlements`. Every failure is an
`InventoryError` whose message names what was asked and what came back (Coder's `message`,
`detail` and `validations` when the answer is a Coder error); it never holds a secret.

One refusal is not a failure: without a licence for a feature, Coder's feature gate answers
the feature's routes with `403` and only the message "<Feature> is an Enterprise feature.
Contact sales!" (enterprise/coderd `RequireFeatureMW`; for the provisioner daemon list of
older releases, `provisionerDaemonsEnabledMW`), or "... is a Premium feature. Contact
sales!" in newer releases. That answer is `FeatureNotLicensed` (a subclass, so code that
only knows `InventoryError` still stops): the deployment has nothing of that kind to list,
or will not list it. It is recognised by the status *and* the message; any other 403 (a
member's token, `Forbidden.`) stays a plain `InventoryError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import requests

from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.model import ZERO_TIME, coder_uuid, parse_rfc3339, rfc3339, utcnow
from deployhealth.netguard import GuardedSession, GuardError, read_capped
from deployhealth.redact import Redactor, safe_url
from deployhealth.settings import Settings, SettingsError

REQUEST_TIMEOUT_SECONDS = 5.0
QUERY_TIMEOUT_SECONDS = 5.0
# What one inventory query may read from the database: 5,000 proxies are about 2 MB of
# rows. The cap keeps a peer that is not PostgreSQL from taking memory without end.
INVENTORY_READ_LIMIT = 16 * 1024 * 1024
# Hundreds of proxies or daemons fit well within this; more is not an inventory.
API_BODY_CAP = 8 * 1024 * 1024
# Parsed JSON takes far more memory than its text: 8 MiB of `[{},{},...]` becomes 2.8
# million dicts, 210 MB. Counting commas and brackets (an upper bound on the values) before
# parsing keeps the worst case near 40 MB; 5,000 workspace proxies hold about 110,000.
API_VALUE_CAP = 500_000
# Coder's error answers are a message, a detail and a few validations: a larger body is
# quoted, not parsed.
ERROR_JSON_CAP = 64 * 1024
REPLICA_LIVE_WINDOW = timedelta(seconds=15)
TOKEN_HEADER = "Coder-Session-Token"
PRIMARY_PROXY_NAME = "primary"


class InventoryError(Exception):
    """The inventory could not be read; the message is safe to show."""


class NothingConfigured(InventoryError):
    """No source was configured: no token, no database, and no static list of this kind.

    The `static` source is then only the fallback, and its empty list means "nobody said",
    not "there are none": the families report ENOTCHECKED, never "found none".
    """


class FeatureNotLicensed(InventoryError):
    """Coder refused a route because its licence lacks the feature (403 from its feature gate).

    `feature` is Coder's name for it ("Workspace Proxy", "External provisioner daemons"),
    `said` Coder's whole message; the exception's text names the request too.
    """

    def __init__(self, url: str, said: str, feature: str) -> None:
        super().__init__(f"GET {url} answered 403 Forbidden: {said}")
        self.url = url
        self.said = said
        self.feature = feature


# Coder's wording: fmt.Sprintf("%s is %s feature. Contact sales!", feat.Humanize(),
# "an Enterprise" | "a Premium"), and the fixed provisionerDaemonsEnabledMW message.
_NOT_LICENSED = re.compile(
    r"^(?P<feature>\S.*?) is (?:an Enterprise|a Premium) feature\. Contact sales!$"
)


def not_licensed_feature(status: int, body: bytes) -> tuple[str, str] | None:
    """(feature, Coder's message) when `body` is Coder's feature-gate refusal, else None.

    Only a 403 whose Coder error `message` is the gate's sentence counts: a bare 403
    ("Forbidden.", a token without the rights) or a 403 from something in front of Coder
    (a WAF page) is not a licence answer.
    """
    if status != 403:
        return None
    data = _error_json(body)
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, str):
        return None
    match = _NOT_LICENSED.match(message.strip())
    if match is None:
        return None
    return match["feature"], message.strip()


# --- the three kinds of things ---------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    id: str
    name: str
    display_name: str = ""
    icon_url: str = ""
    url: str = ""  # Coder's path_app_url: empty until the proxy registers
    wildcard_hostname: str = ""
    derp_enabled: bool = False
    derp_only: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted: bool = False
    version: str = ""


@dataclass(frozen=True)
class DaemonJob:
    """codersdk.ProvisionerDaemonJob: a daemon's current or previous job."""

    id: str
    status: str
    template_name: str = ""
    template_icon: str = ""
    template_display_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": coder_uuid(self.id),
            "status": self.status,
            "template_name": self.template_name,
            "template_icon": self.template_icon,
            "template_display_name": self.template_display_name,
        }


@dataclass(frozen=True)
class ProvisionerDaemon:
    """codersdk.ProvisionerDaemon. `key_name`, `status`, `current_job` and `previous_job` are
    None where the source does not say (the database source knows only `key_name`, from
    `provisioner_keys`), as they are null in Coder's own health report."""

    id: str
    name: str
    organization_id: str = ""
    key_id: str = ""
    created_at: datetime | None = None
    last_seen_at: datetime | None = None
    version: str = ""
    api_version: str = ""
    provisioners: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    key_name: str | None = None
    status: str | None = None
    current_job: DaemonJob | None = None
    previous_job: DaemonJob | None = None

    def to_dict(self) -> dict[str, Any]:
        """Coder's JSON of the daemon: every key, Go's zero value where the source is silent.

        A UUID or time nobody knows is Go's zero (the all-zero UUID, 0001-01-01T00:00:00Z):
        Coder's Go client cannot decode "", null or a non-UUID id (a static list's) there.
        `last_seen_at` is null when never seen, as Coder's NullTime writes it.
        """
        return {
            "id": coder_uuid(self.id),
            "organization_id": coder_uuid(self.organization_id),
            "key_id": coder_uuid(self.key_id),
            "created_at": _time(self.created_at) or ZERO_TIME,
            "last_seen_at": _time(self.last_seen_at),
            "name": self.name,
            "version": self.version,
            "api_version": self.api_version,
            "provisioners": list(self.provisioners),
            "tags": dict(self.tags),
            "key_name": self.key_name,
            "status": self.status,
            "current_job": None if self.current_job is None else self.current_job.to_dict(),
            "previous_job": None if self.previous_job is None else self.previous_job.to_dict(),
        }


@dataclass(frozen=True)
class Replica:
    id: str
    hostname: str
    created_at: datetime | None = None
    relay_address: str = ""
    region_id: int = 0
    error: str = ""
    database_latency_us: int | None = None
    # None when the source does not say (Coder's API lists live primaries only).
    primary: bool | None = None
    stopped_at: datetime | None = None
    updated_at: datetime | None = None
    version: str | None = None

    def is_live(self, now: datetime | None = None) -> bool:
        """Primary, not stopped, and updated within the last 15 s, as far as the source says."""
        if self.primary is False or self.stopped_at is not None:
            return False
        if self.updated_at is not None:
            return (now or utcnow()) - self.updated_at <= REPLICA_LIVE_WINDOW
        return True


def _time(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


# --- the interface ---------------------------------------------------------------------


class Inventory(Protocol):
    source: str

    def proxies(self, deadline: Deadline) -> list[Proxy]:
        """Registered and unregistered proxies, without the primary and deleted ones."""
        ...

    def provisioner_daemons(self, deadline: Deadline) -> list[ProvisionerDaemon]: ...

    def replicas(self, deadline: Deadline) -> list[Replica]:
        """Every replica the source knows; `Replica.is_live` says which count."""
        ...

    def close(self) -> None: ...


def open_inventory(settings: Settings) -> Inventory:
    """The inventory of the configured source; raises InventoryError when it is not usable."""
    source = settings.inventory_source
    if source == "api":
        return ApiInventory(CoderAPI.for_settings(settings))
    if source == "database":
        return DatabaseInventory(settings)
    return StaticInventory(settings)


# --- parsing the API's shapes (also the static lists' shapes) --------------------------


def _parse_time(value: Any, what: str) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value
    try:
        parsed = parse_rfc3339(str(value))
    except ValueError:
        raise InventoryError(f"{what} is not an RFC 3339 time: {value!r}") from None
    # Go's zero time stands for "never".
    return None if parsed.year <= 1 else parsed


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return "" if value is None else str(value)


def _object(item: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise InventoryError(f"{what} is not a JSON object: {str(item)[:80]!r}")
    return item


def proxy_from_api(item: Any) -> Proxy:
    data = _object(item, "a workspace proxy")
    name = _text(data, "name")
    what = f"workspace proxy {name!r}"
    return Proxy(
        id=_text(data, "id"),
        name=name,
        display_name=_text(data, "display_name"),
        icon_url=_text(data, "icon_url"),
        url=_text(data, "path_app_url"),
        wildcard_hostname=_text(data, "wildcard_hostname"),
        derp_enabled=bool(data.get("derp_enabled", False)),
        derp_only=bool(data.get("derp_only", False)),
        created_at=_parse_time(data.get("created_at"), f"{what} created_at"),
        updated_at=_parse_time(data.get("updated_at"), f"{what} updated_at"),
        deleted=bool(data.get("deleted", False)),
        version=_text(data, "version"),
    )


def daemon_from_api(item: Any) -> ProvisionerDaemon:
    data = _object(item, "a provisioner daemon")
    name = _text(data, "name")
    what = f"provisioner daemon {name!r}"
    tags = data.get("tags") or {}
    provisioners = data.get("provisioners") or []
    if not isinstance(tags, Mapping) or not isinstance(provisioners, list):
        raise InventoryError(f"{what} has tags or provisioners of the wrong shape")
    key_name = data.get("key_name")
    status = data.get("status")
    if not isinstance(key_name, str | None) or not isinstance(status, str | None):
        raise InventoryError(f"{what} has a key_name or status that is not text")
    return ProvisionerDaemon(
        id=_text(data, "id"),
        name=name,
        organization_id=_text(data, "organization_id"),
        key_id=_text(data, "key_id"),
        created_at=_parse_time(data.get("created_at"), f"{what} created_at"),
        last_seen_at=_parse_time(data.get("last_seen_at"), f"{what} last_seen_at"),
        version=_text(data, "version"),
        api_version=_text(data, "api_version"),
        provisioners=tuple(str(p) for p in provisioners),
        tags={str(k): str(v) for k, v in tags.items()},
        key_name=key_name,
        status=status,
        current_job=_daemon_job(data.get("current_job"), f"{what} current_job"),
        previous_job=_daemon_job(data.get("previous_job"), f"{what} previous_job"),
    )


def _daemon_job(item: Any, what: str) -> DaemonJob | None:
    if item is None:
        return None
    data = _object(item, what)
    return DaemonJob(
        id=_text(data, "id"),
        status=_text(data, "status"),
        template_name=_text(data, "template_name"),
        template_icon=_text(data, "template_icon"),
        template_display_name=_text(data, "template_display_name"),
    )


def replica_from_api(item: Any) -> Replica:
    data = _object(item, "a replica")
    hostname = _text(data, "hostname")
    what = f"replica {hostname!r}"
    latency = data.get("database_latency")
    primary = data.get("primary")
    version = data.get("version")
    try:
        region_id = int(data.get("region_id") or 0)
        latency_us = None if latency is None else int(latency)
    except (TypeError, ValueError):
        raise InventoryError(
            f"{what} has a region_id or database_latency that is not a number"
        ) from None
    return Replica(
        id=_text(data, "id"),
        hostname=hostname,
        created_at=_parse_time(data.get("created_at"), f"{what} created_at"),
        relay_address=_text(data, "relay_address"),
        region_id=region_id,
        error=_text(data, "error"),
        database_latency_us=latency_us,
        primary=None if primary is None else bool(primary),
        stopped_at=_parse_time(data.get("stopped_at"), f"{what} stopped_at"),
        updated_at=_parse_time(data.get("updated_at"), f"{what} updated_at"),
        version=None if version is None else str(version),
    )


def _keep_proxy(proxy: Proxy) -> bool:
    return not proxy.deleted and proxy.name != PRIMARY_PROXY_NAME


# --- Coder's API -----------------------------------------------------------------------


def coder_error_text(body: bytes) -> str | None:
    """`message: detail (field: detail; ...)` when `body` is a Coder error, else None."""
    data = _error_json(body)
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return None
    text = data["message"].strip()
    detail = data.get("detail")
    if isinstance(detail, str) and detail.strip():
        # Coder's messages are sentences ("Resource not found."): no "found.: detail".
        text = f"{text.rstrip('.')}: {detail.strip()}"
    validations = data.get("validations")
    if isinstance(validations, list) and validations:
        shown = [
            f"{v.get('field', '?')}: {v.get('detail', '')}".strip()
            for v in validations
            if isinstance(v, dict)
        ]
        if shown:
            text += f" (validations: {'; '.join(shown)})"
    return text


def _error_json(body: bytes) -> Any:
    """`body` parsed when it can be a Coder error answer; None otherwise (too big, not JSON,
    or nested too deeply for the parser)."""
    if len(body) > ERROR_JSON_CAP:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


class CoderAPI:
    """GETs on Coder's REST API, under the caller's deadline, with capped answers."""

    def __init__(
        self,
        access_url: str | None,
        token: str | None,
        *,
        redactor: Redactor | None = None,
    ) -> None:
        self.access_url = (access_url or "").strip()
        self.token = token
        # As Redactor.for_settings does: masking a very short value would mangle messages.
        self._redactor = redactor or Redactor(tuple(t for t in (token,) if t and len(t) >= 4))
        # The access URL is the operator's, not the deployment's: no address policy, but
        # the same DNS timeout and whole-request budget as every other fetch.
        self._session = GuardedSession(blocked=())

    @classmethod
    def for_settings(cls, settings: Settings) -> CoderAPI:
        try:
            token = settings.token()
        except SettingsError as exc:
            raise InventoryError(f"the Coder API token cannot be read: {exc}") from None
        return cls(settings.access_url, token, redactor=Redactor.for_settings(settings))

    def _base(self) -> str:
        if not self.access_url:
            raise InventoryError("no access URL configured (set DEPLOYHEALTH_ACCESS_URL)")
        parts = urlsplit(self.access_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InventoryError(
                f"the access URL {safe_url(self.access_url)!r} is not an http(s) URL"
            )
        return f"{parts.scheme}://{parts.netloc}"

    def get_json(self, path: str, deadline: Deadline, *, auth: bool = True) -> Any:
        address = self._base() + path
        url = safe_url(address)  # what messages show: never user:password@
        headers: dict[str, str] = {"Accept": "application/json"}
        if auth:
            if not self.token:
                raise InventoryError(
                    f"GET {url} needs a Coder API token (set DEPLOYHEALTH_CODER_TOKEN)"
                )
            headers[TOKEN_HEADER] = self.token
        budget = deadline.sooner(REQUEST_TIMEOUT_SECONDS)
        try:
            response = self._session.get(address, budget, headers=headers)
            status, reason = response.status_code, response.reason
            body, more = read_capped(response, API_BODY_CAP, budget)
        except GuardError as exc:
            raise InventoryError(self._redactor.scrub(str(exc))) from None
        except (requests.RequestException, OSError, DeadlineExceeded) as exc:
            # The budget's watchdog hangs up on a slow answer: that is a timeout, whatever
            # error the interrupted read raised.
            why = "timeout: no complete answer in time" if budget.expired else _why(exc)
            raise InventoryError(self._redactor.scrub(f"GET {url} failed: {why}")) from None
        refusal = not_licensed_feature(status, body)
        if refusal is not None:
            raise FeatureNotLicensed(url, refusal[1], refusal[0])
        if status != 200:
            said = coder_error_text(body) or body[:200].decode("utf-8", "replace").strip()
            text = f"GET {url} answered {status} {reason or ''}".rstrip()
            raise InventoryError(self._redactor.scrub(f"{text}: {said}" if said else text))
        if more:
            raise InventoryError(f"GET {url}: the answer is larger than {API_BODY_CAP} bytes")
        values = body.count(b",") + body.count(b"[") + body.count(b"{")
        if values > API_VALUE_CAP:
            raise InventoryError(
                f"GET {url}: the answer holds more than {API_VALUE_CAP} JSON values (commas "
                "and brackets counted); not parsed, it would take too much memory"
            )
        try:
            return json.loads(body)
        except ValueError:
            raise InventoryError(f"GET {url} answered 200 with a body that is not JSON") from None
        except RecursionError:
            raise InventoryError(
                f"GET {url} answered 200 with JSON nested too deeply to parse"
            ) from None

    def buildinfo(self, deadline: Deadline) -> Mapping[str, Any]:
        return _object(self.get_json("/api/v2/buildinfo", deadline, auth=False), "buildinfo")

    def entitlements(self, deadline: Deadline) -> Mapping[str, Any]:
        return _object(self.get_json("/api/v2/entitlements", deadline), "the entitlements")

    def close(self) -> None:
        self._session.close()


def _why(exc: BaseException) -> str:
    """The innermost reason of a requests failure, without urllib3's object reprs."""
    if isinstance(exc, requests.Timeout | TimeoutError | DeadlineExceeded):
        return "timeout: no complete answer in time"
    seen: set[int] = set()
    current: BaseException | None = exc
    reason = str(exc)
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, OSError) and current.strerror:
            reason = current.strerror
        nested = current.__cause__ or current.__context__
        if nested is None and current.args and isinstance(current.args[-1], BaseException):
            nested = current.args[-1]
        current = nested
    if "refused" in reason.lower():
        return "connection refused"
    return reason.split(": ", 1)[-1] if "object at 0x" in reason else reason


class ApiInventory:
    source = "api"

    def __init__(self, api: CoderAPI) -> None:
        self.api = api

    def proxies(self, deadline: Deadline) -> list[Proxy]:
        data = self.api.get_json("/api/v2/workspaceproxies", deadline)
        regions = data.get("regions") if isinstance(data, Mapping) else None
        if not isinstance(regions, list):
            raise InventoryError("GET /api/v2/workspaceproxies: the answer has no regions list")
        return [p for p in map(proxy_from_api, regions) if _keep_proxy(p)]

    def provisioner_daemons(self, deadline: Deadline) -> list[ProvisionerDaemon]:
        organizations = _list(self.api.get_json("/api/v2/organizations", deadline), "organizations")
        daemons: dict[str, ProvisionerDaemon] = {}
        for org in organizations:
            org_id = _text(_object(org, "an organization"), "id")
            path = f"/api/v2/organizations/{quote(org_id, safe='')}/provisionerdaemons"
            for item in _list(self.api.get_json(path, deadline), "daemons"):
                daemon = daemon_from_api(item)
                daemons.setdefault(daemon.id or f"{org_id}/{daemon.name}", daemon)
        return list(daemons.values())

    def replicas(self, deadline: Deadline) -> list[Replica]:
        items = _list(self.api.get_json("/api/v2/replicas", deadline), "replicas")
        return [replica_from_api(item) for item in items]

    def close(self) -> None:
        self.api.close()


def _list(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise InventoryError(f"the {what} answer is not a JSON list")
    return data


# --- the deployment's database ---------------------------------------------------------

_PROXIES_SQL = """
SELECT id::text, name, display_name, icon, url, wildcard_hostname, created_at, updated_at,
       deleted, derp_enabled, derp_only, version
FROM workspace_proxies WHERE NOT deleted
"""
_DAEMONS_SQL = """
SELECT id::text, name, organization_id::text, key_id::text, created_at, last_seen_at,
       version, api_version, provisioners::text[], tags, NULL::text
FROM provisioner_daemons
"""
# Coder >= 2.14 names each daemon's key in provisioner_keys (its API joins the two for
# `key_name`); older schemas have no such table.
_HAS_KEYS_SQL = """
SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = 'provisioner_keys'
               AND table_schema = ANY (current_schemas(false)))
"""
_DAEMONS_WITH_KEYS_SQL = """
SELECT d.id::text, d.name, d.organization_id::text, d.key_id::text, d.created_at,
       d.last_seen_at, d.version, d.api_version, d.provisioners::text[], d.tags, k.name
FROM provisioner_daemons AS d LEFT JOIN provisioner_keys AS k ON k.id = d.key_id
"""
_REPLICAS_SQL = """
SELECT id::text, hostname, created_at, relay_address, region_id, error, database_latency,
       "primary", stopped_at, updated_at, version
FROM replicas
"""


class DatabaseInventory:
    """Read-only SQL on Coder's tables, over one connection opened on first use."""

    source = "database"

    def __init__(self, settings: Settings) -> None:
        try:
            target = settings.database()
        except SettingsError as exc:
            raise InventoryError(f"the database setting is invalid: {exc}") from None
        if target is None:
            raise InventoryError(
                "the database inventory needs a database (set DEPLOYHEALTH_DATABASE_URL)"
            )
        self._target = target
        self._redactor = Redactor.for_settings(settings, extra=[target.password.reveal()])
        self._conn: Any = None
        self._sock: Any = None

    def _run(self, sql: str, deadline: Deadline) -> list[list[Any]]:
        # Imported here: pg8000 loads only when the database source is used.
        from deployhealth import pgconn

        where = self._target.describe()
        try:
            if self._conn is None:
                self._conn, self._sock = pgconn.connect(
                    self._target,
                    deadline.sooner(QUERY_TIMEOUT_SECONDS),
                    read_limit=INVENTORY_READ_LIMIT,
                )
                self._conn.run("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            timeout = deadline.timeout(QUERY_TIMEOUT_SECONDS)
            self._sock.settimeout(timeout)
            # The server gives up too, so a slow query does not outlive the family.
            self._conn.run(f"SET statement_timeout = {max(1, int(timeout * 1000))}")
            rows = self._conn.run(sql)
        except pgconn.ConnectError as exc:
            self._drop()
            said = f"cannot connect to {where}: {exc}"
            raise InventoryError(self._redactor.scrub(said)) from None
        except DeadlineExceeded:
            self._drop()
            raise InventoryError(f"{where}: no time left for the inventory query") from None
        except Exception as exc:
            self._drop()
            table = sql.split("FROM", 1)[1].split()[0]
            said = pgconn.explain(exc, f"reading {table}")
            raise InventoryError(self._redactor.scrub(f"{where}: {said}")) from None
        return [list(row) for row in rows or []]

    def _drop(self) -> None:
        if self._conn is not None:
            from deployhealth import pgconn

            pgconn.close(self._conn, self._sock)
        self._conn = self._sock = None

    def proxies(self, deadline: Deadline) -> list[Proxy]:
        proxies = [
            Proxy(
                id=r[0], name=r[1], display_name=r[2] or "", icon_url=r[3] or "",
                url=r[4] or "", wildcard_hostname=r[5] or "", created_at=r[6],
                updated_at=r[7], deleted=bool(r[8]), derp_enabled=bool(r[9]),
                derp_only=bool(r[10]), version=r[11] or "",
            )
            for r in self._run(_PROXIES_SQL, deadline)
        ]
        return [p for p in proxies if _keep_proxy(p)]

    def provisioner_daemons(self, deadline: Deadline) -> list[ProvisionerDaemon]:
        # status and the jobs stay None: computing them needs Coder's job tables, and
        # Coder's own health report leaves them null too.
        has_keys = bool(self._run(_HAS_KEYS_SQL, deadline)[0][0])
        sql = _DAEMONS_WITH_KEYS_SQL if has_keys else _DAEMONS_SQL
        return [
            ProvisionerDaemon(
                id=r[0], name=r[1], organization_id=r[2] or "", key_id=r[3] or "",
                created_at=r[4], last_seen_at=r[5], version=r[6] or "",
                api_version=r[7] or "", provisioners=tuple(r[8] or ()),
                tags={str(k): str(v) for k, v in _json_object(r[9]).items()},
                key_name=r[10],
            )
            for r in self._run(sql, deadline)
        ]

    def replicas(self, deadline: Deadline) -> list[Replica]:
        return [
            Replica(
                id=r[0], hostname=r[1] or "", created_at=r[2], relay_address=r[3] or "",
                region_id=int(r[4] or 0), error=r[5] or "",
                database_latency_us=None if r[6] is None else int(r[6]),
                primary=bool(r[7]), stopped_at=r[8], updated_at=r[9], version=r[10] or "",
            )
            for r in self._run(_REPLICAS_SQL, deadline)
        ]

    def close(self) -> None:
        self._drop()


def _json_object(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):
        value = json.loads(value or "{}")
    return value if isinstance(value, Mapping) else {}


# --- the settings' lists ---------------------------------------------------------------


class StaticInventory:
    source = "static"

    def __init__(self, settings: Settings) -> None:
        self._proxies = settings.static_proxies
        self._daemons = settings.static_provisioner_daemons
        self._replicas = settings.static_replicas
        # Chosen by DEPLOYHEALTH_INVENTORY=static, an empty list is the operator saying
        # "none"; as the fallback for want of a token or a database, it says nothing.
        self._chosen = bool(settings.inventory)

    def _listed(self, items: tuple[Mapping[str, Any], ...], what: str, setting: str) -> None:
        if not items and not self._chosen:
            raise NothingConfigured(
                f"no inventory source is configured: set "
                "DEPLOYHEALTH_CODER_TOKEN (or _SECRET) to read them from the Coder API, "
                f"DEPLOYHEALTH_DATABASE_URL (or _SECRET) to read Coder's tables, or list the "
                f"{what} in {setting}"
            )

    def proxies(self, deadline: Deadline) -> list[Proxy]:
        self._listed(self._proxies, "workspace proxies", "DEPLOYHEALTH_STATIC_PROXIES")
        return [p for p in map(proxy_from_api, self._proxies) if _keep_proxy(p)]

    def provisioner_daemons(self, deadline: Deadline) -> list[ProvisionerDaemon]:
        self._listed(
            self._daemons, "provisioner daemons", "DEPLOYHEALTH_STATIC_PROVISIONER_DAEMONS"
        )
        return [daemon_from_api(item) for item in self._daemons]

    def replicas(self, deadline: Deadline) -> list[Replica]:
        self._listed(self._replicas, "replicas", "DEPLOYHEALTH_STATIC_REPLICAS")
        return [replica_from_api(item) for item in self._replicas]

    def close(self) -> None:
        pass


def live_replicas(replicas: Iterable[Replica], now: datetime | None = None) -> list[Replica]:
    moment = now or utcnow()
    return [r for r in replicas if r.is_live(moment)]
