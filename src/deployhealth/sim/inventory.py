"""The simulation's inventory surfaces: Coder's API for proxies, provisioner daemons, replicas
and entitlements, and the workspace proxies themselves.

Routes on the sim's HTTP server, behind the header `Coder-Session-Token: <sim.token>`
(401 with a Coder error otherwise): `GET /api/v2/workspaceproxies`,
`/api/v2/organizations`, `/api/v2/organizations/{id}/provisionerdaemons`,
`/api/v2/replicas`, `/api/v2/entitlements`.

The workspace proxies are real HTTP servers, each on its own 127.0.0.1 port, all served by one
asyncio thread (`ProxyFarm`, started on first use and stopped with the sim). The deployment
has two proxies, `eu` and `us`, plus a deleted one that every source must skip.

Fault switches (`POST /_sim/faults?name=mode`, the first mode is the healthy default):

    proxy         ok | warnings | errors | not-proxy | primary | wrong-content-type |
                  http-error | slow | huge | unreachable | unregistered | all-down
                  (`us` takes the fault: a report with warnings or errors, a JSON body that
                  is not a report, a Coder primary's HTML page with X-Coder-Build-Version,
                  a report sent as text/plain, a 500 with a Coder error body, an answer
                  after 10 s, a 50 MB body, a freed port, no URL; all-down: both unreachable)
    provisioners  ok | none | stale | old-version | old-api | bad-version
    replicas      one | two-no-ha | two-ha | replica-error
    entitlements  ok | expiring | silent | no-features
                  (silent: the deployment reports no errors or warnings itself, as an older
                  Coder would not; no-features: a 200 whose JSON has no `features` object,
                  an answer deployhealth cannot judge)
    licence       enterprise | none | none-old
                  (none: no licence, as Coder answers then: `/api/v2/workspaceproxies` is
                  403 "Workspace Proxy is an Enterprise feature. Contact sales!" (before any
                  token check, as Coder's gate runs first), the entitlements say
                  has_license false and every feature not_entitled, only the default
                  organization exists and its daemons are the built-in ones; none-old: the
                  same, and the provisioner daemon list is 403 "External provisioner daemons
                  is an Enterprise feature. Contact sales!" too, as older releases gated it)

    waf           off | block
                  (block: a web application firewall in front of the deployment, as AWS WAF
                  on an ALB, answers every request to these API routes with its own 403
                  page: a 403 that is not Coder's licence answer)

The answers carry every field of Coder's codersdk types (WorkspaceProxy, ProvisionerDaemon
with key_name, status and jobs, Replica, Entitlements with every feature, BuildInfoResponse),
so that parsers meet what a real Coder sends.

`seed_database(sim, execute)` writes the same deployment, in its current modes, into
`workspace_proxies`, `provisioner_daemons`, `provisioner_keys` and `replicas` (created if
missing), plus the replicas only the database shows (a stopped one, a crashed one, a
proxy's), so the `database` inventory source reads what the `api` source reads.
`FAULT_MODES` lists the switches, for a banner.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from deployhealth.sim._service import Service
from deployhealth.sim.tcp import LOOPBACK, free_port

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimRequest, SimulatedDeployment

TOKEN_HEADER = "Coder-Session-Token"
REPORT_PATH = "/healthz-report"
PROVISIONER_API_VERSION = "1.1"
HEARTBEAT_SECONDS = 30.0  # how stale the daemons' last_seen_at may get before a refresh

PROXY_MODES = (
    "ok", "warnings", "errors", "not-proxy", "primary", "wrong-content-type", "http-error",
    "slow", "huge", "unreachable", "unregistered", "all-down",
)
PROVISIONER_MODES = ("ok", "none", "stale", "old-version", "old-api", "bad-version")
REPLICA_MODES = ("one", "two-no-ha", "two-ha", "replica-error")
ENTITLEMENT_MODES = ("ok", "expiring", "silent", "no-features")
LICENCE_MODES = ("enterprise", "none", "none-old")
WAF_MODES = ("off", "block")
# codersdk.FeatureNames (typesGenerated.ts FeatureName).
FEATURE_NAMES = (
    "access_control", "advanced_template_scheduling", "appearance", "audit_log",
    "browser_only", "control_shared_ports", "custom_roles", "external_provisioner_daemons",
    "external_token_encryption", "high_availability", "multiple_external_auth",
    "multiple_organizations", "scim", "template_rbac", "user_limit", "user_role_management",
    "workspace_batch_actions", "workspace_proxy",
)

# Every switch this module adds, for the demo banner: name -> modes, the default first.
FAULT_MODES: dict[str, tuple[str, ...]] = {
    "proxy": PROXY_MODES,
    "provisioners": PROVISIONER_MODES,
    "replicas": REPLICA_MODES,
    "entitlements": ENTITLEMENT_MODES,
    "licence": LICENCE_MODES,
    "waf": WAF_MODES,
}

HA_ERROR = (
    "You have multiple replicas but high availability is an Enterprise feature. "
    "You will be unable to connect to workspaces."
)
LICENSE_WARNING = "Your license expires in 2 days."
REPLICA_ERROR = "Failed to dial peers: dial http://127.0.0.1:9/derp: connection refused"

# Coder's feature gate, word for word (enterprise/coderd RequireFeatureMW with
# FeatureWorkspaceProxy.Humanize(); provisionerDaemonsEnabledMW of older releases).
PROXY_NOT_LICENSED = "Workspace Proxy is an Enterprise feature. Contact sales!"
DAEMONS_NOT_LICENSED = "External provisioner daemons is an Enterprise feature. Contact sales!"
# codersdk.ProvisionerKeyIDBuiltIn: the key of the daemons coderd runs itself.
BUILTIN_KEY_ID = "00000000-0000-0000-0000-000000000001"
# The page an ALB's AWS WAF block action sends (403, text/html).
WAF_PAGE = (
    "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
    "<center><h1>403 Forbidden</h1></center>\r\n</body>\r\n</html>\r\n"
)


# --- simulated workspace proxies ------------------------------------------------------


@dataclass(frozen=True)
class ProxyReply:
    """What a simulated proxy answers to `GET /healthz-report`."""

    status: int = 200
    body: bytes = b'{"errors":[],"warnings":[]}'
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before the answer
    size: int | None = None  # send this many filler bytes instead of `body`


def _report(errors: list[str], warnings: list[str]) -> bytes:
    return json.dumps({"errors": errors, "warnings": warnings}).encode()


def proxy_replies(coder_version: str) -> dict[str, ProxyReply]:
    """One reply per proxy behaviour the fault switch (and the tests) can pick."""
    return {
        "ok": ProxyReply(),
        "warnings": ProxyReply(body=_report([], ["derp: 1 of 2 mesh peers unreachable"])),
        "errors": ProxyReply(
            body=_report(["cannot reach the primary: 503 Service Unavailable"], [])
        ),
        "not-proxy": ProxyReply(body=b'{"status": "ok", "uptime": 1234}'),
        "primary": ProxyReply(
            body=b"<!doctype html><html><title>Coder</title></html>",
            content_type="text/html; charset=utf-8",
            headers=(("X-Coder-Build-Version", coder_version),),
        ),
        "wrong-content-type": ProxyReply(content_type="text/plain; charset=utf-8"),
        "http-error": ProxyReply(
            status=500,
            body=json.dumps(
                {
                    "message": "Failed to compute the proxy health report.",
                    "detail": "primary access URL unreachable: context deadline exceeded",
                    "validations": [{"field": "primary_access_url", "detail": "timed out"}],
                }
            ).encode(),
        ),
        "slow": ProxyReply(delay=10.0),
        "huge": ProxyReply(size=50 * 1024 * 1024),
    }


@dataclass
class SimProxy:
    port: int = 0
    hits: int = 0  # requests received, of any path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


Responder = Callable[[], ProxyReply]
_FILLER = b"x" * 65536


class ProxyFarm(Service):
    """Many simulated workspace proxies on one asyncio thread, each on its own port."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sim-proxies", daemon=True
        )
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> Self:
        self._thread.start()
        return self

    def add(self, reply: ProxyReply | Responder) -> SimProxy:
        return self.add_many(1, reply)[0]

    def add_many(self, count: int, reply: ProxyReply | Responder) -> list[SimProxy]:
        responder: Responder = (lambda: reply) if isinstance(reply, ProxyReply) else reply
        proxies = [SimProxy() for _ in range(count)]
        future = asyncio.run_coroutine_threadsafe(self._listen(proxies, responder), self._loop)
        future.result(timeout=30)
        return proxies

    async def _listen(self, proxies: list[SimProxy], responder: Responder) -> None:
        for proxy in proxies:
            server = await asyncio.start_server(
                self._handler(proxy, responder), LOOPBACK, 0, backlog=512
            )
            self._servers.append(server)
            proxy.port = int(server.sockets[0].getsockname()[1])

    def _handler(
        self, proxy: SimProxy, responder: Responder
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(reader, writer, proxy, responder)

        return serve

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proxy: SimProxy,
        responder: Responder,
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # type: ignore[arg-type]
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            target = head.split(b" ", 2)[1].decode("latin-1")
            proxy.hits += 1
            if urlsplit(target).path != REPORT_PATH:
                reply = ProxyReply(404, b'{"message": "Route not found."}')
            else:
                reply = responder()
            if reply.delay:
                await asyncio.sleep(reply.delay)
            length = len(reply.body) if reply.size is None else reply.size
            lines = [
                f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}",
                f"Content-Type: {reply.content_type}",
                f"Content-Length: {length}",
                "Connection: close",
                *(f"{name}: {value}" for name, value in reply.headers),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if reply.size is None:
                writer.write(reply.body)
            else:
                sent = 0
                while sent < reply.size:
                    chunk = _FILLER[: reply.size - sent]
                    writer.write(chunk)
                    sent += len(chunk)
                    await writer.drain()
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away: what a real server would shrug off too
        except asyncio.CancelledError:
            # The farm is closing. Ending normally keeps asyncio's stream callback from
            # logging the cancellation as an error.
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- the simulated deployment's inventory ----------------------------------------------

_BASE_TIME = datetime(2024, 6, 3, 9, 0, 0, 123456, tzinfo=UTC)
_ORGS = (
    ("6c2d3b0e-0d4f-4a39-9f0c-7d2d1e0a0001", "coder"),
    ("6c2d3b0e-0d4f-4a39-9f0c-7d2d1e0a0002", "research"),
)


def _id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"deployhealth-sim/{name}"))


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class SimInventory:
    """The inventory of one simulated deployment, shaped by its fault modes."""

    sim: SimulatedDeployment
    _farm: ProxyFarm | None = None
    _proxies: dict[str, SimProxy] = field(default_factory=dict)
    _unreachable_port: int = 0
    _heartbeat: datetime = field(default_factory=lambda: datetime.now(UTC))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _coder_version(self) -> str:
        from deployhealth.sim.deployment import CODER_VERSION

        return CODER_VERSION

    def farm(self) -> dict[str, SimProxy]:
        """The proxies' servers, started on first use."""
        with self._lock:
            if self._farm is None:
                replies = proxy_replies(self._coder_version())
                self._farm = ProxyFarm().start()
                self._proxies["eu"] = self._farm.add(lambda: self._reply("eu", replies))
                self._proxies["us"] = self._farm.add(lambda: self._reply("us", replies))
                self._unreachable_port = free_port()
            return self._proxies

    def _reply(self, name: str, replies: Mapping[str, ProxyReply]) -> ProxyReply:
        mode = self.sim.mode("proxy")
        if name == "us" and mode in replies:
            return replies[mode]
        return replies["ok"]

    def close(self) -> None:
        with self._lock:
            if self._farm is not None:
                self._farm.close()
                self._farm = None

    def touch(self) -> None:
        """A fresh heartbeat for the provisioner daemons (they stay fresh for 30 s anyway)."""
        self._heartbeat = datetime.now(UTC)

    def heartbeat(self) -> datetime:
        now = datetime.now(UTC)
        if (now - self._heartbeat).total_seconds() > HEARTBEAT_SECONDS:
            self._heartbeat = now
        return self._heartbeat

    # --- the records, in the API's shapes ---

    def proxies(self) -> list[dict[str, Any]]:
        servers = self.farm()
        mode = self.sim.mode("proxy")
        gone = f"http://{LOOPBACK}:{self._unreachable_port}"
        urls = {name: proxy.url for name, proxy in servers.items()}
        if mode in ("unreachable", "all-down"):
            urls["us"] = gone
        if mode == "all-down":
            urls["eu"] = gone
        if mode == "unregistered":
            urls["us"] = ""
        entries = [
            ("eu", "Europe", "/emojis/1f1ea-1f1fa.png", urls["eu"], False, 1),
            ("us", "United States", "/emojis/1f1fa-1f1f8.png", urls["us"], False, 2),
            ("old", "Decommissioned", "", "", True, 3),
        ]
        out = []
        for name, display, icon, url, deleted, n in entries:
            host = urlsplit(url).netloc
            out.append(
                {
                    "id": _id(f"proxy/{name}"),
                    "name": name,
                    "display_name": display,
                    "icon_url": icon,
                    "healthy": True,
                    "path_app_url": url,
                    "wildcard_hostname": f"*.{name}.{host}" if host else "",
                    "derp_enabled": True,
                    "derp_only": False,
                    "status": {"status": "ok", "report": {"errors": [], "warnings": []},
                               "checked_at": _time(self.heartbeat())},
                    "created_at": _time(_BASE_TIME + timedelta(days=n)),
                    "updated_at": _time(_BASE_TIME + timedelta(days=n, hours=1)),
                    "deleted": deleted,
                    "version": self._coder_version(),
                }
            )
        return out

    def daemons(self) -> list[dict[str, Any]]:
        mode = self.sim.mode("provisioners")
        if mode == "none":
            return []
        seen = self.heartbeat()
        if mode == "stale":
            seen -= timedelta(minutes=5)
        version = self._coder_version()
        out = []
        for n, (org_id, org) in enumerate(_ORGS):
            name = f"provisioner-{org}"
            # Every field of codersdk.ProvisionerDaemon as the organization route returns it:
            # the `coder` daemon idles after a build, the `research` one is busy with one.
            previous = _job(f"{org}/previous", "succeeded", "docker", "Docker")
            current = _job(f"{org}/current", "running", "kubernetes", "Kubernetes")
            busy = org == "research"
            daemon = {
                "id": _id(f"daemon/{org}"),
                "organization_id": org_id,
                "key_id": _id(f"key/{org}"),
                "created_at": _time(_BASE_TIME + timedelta(days=10 + n)),
                "last_seen_at": _time(seen),
                "name": name,
                "version": version,
                "api_version": PROVISIONER_API_VERSION,
                "provisioners": ["echo", "terraform"],
                "tags": {"scope": "organization", "owner": ""},
                "key_name": _key_name(org),
                # Coder's API: offline once last seen more than 90 s ago.
                "status": "offline" if mode == "stale" else ("busy" if busy else "idle"),
                "current_job": current if busy and mode != "stale" else None,
                "previous_job": previous,
            }
            if org == "research":
                if mode == "old-version":
                    daemon["version"] = "v2.16.4"
                elif mode == "old-api":
                    daemon["api_version"] = "0.9"
                elif mode == "bad-version":
                    daemon["version"] = "latest"
            out.append(daemon)
        return out

    def replicas(self) -> list[dict[str, Any]]:
        """The live primaries, as Coder's API lists them (the database has more rows)."""
        mode = self.sim.mode("replicas")
        names = ["coder-0"] if mode == "one" else ["coder-0", "coder-1"]
        out = []
        for n, hostname in enumerate(names):
            out.append(
                {
                    "id": _id(f"replica/{hostname}"),
                    "hostname": hostname,
                    "created_at": _time(_BASE_TIME + timedelta(days=20 + n)),
                    "relay_address": f"http://10.0.1.{10 + n}:8080",
                    "region_id": 999,
                    "error": REPLICA_ERROR if mode == "replica-error" and n == 1 else "",
                    "database_latency": 1500 + 250 * n,
                }
            )
        return out

    def entitlements(self) -> dict[str, Any]:
        replicas = self.sim.mode("replicas")
        mode = self.sim.mode("entitlements")
        ha = replicas in ("two-ha", "replica-error")
        errors = [HA_ERROR] if replicas == "two-no-ha" else []
        warnings = [LICENSE_WARNING] if mode == "expiring" else []
        if mode == "silent":
            errors, warnings = [], []
        # Coder lists every feature it knows (codersdk.FeatureNames); a licence entitles some.
        features: dict[str, dict[str, Any]] = {
            name: {"entitlement": "entitled", "enabled": True} for name in FEATURE_NAMES
        }
        features["high_availability"] = {
            "entitlement": "entitled" if ha else "not_entitled", "enabled": ha,
        }
        features["user_limit"] = {
            "entitlement": "entitled", "enabled": True, "limit": 100, "actual": 12,
        }
        return {
            "features": features,
            "warnings": warnings,
            "errors": errors,
            "has_license": True,
            "trial": False,
            "require_telemetry": False,
            "refreshed_at": _time(datetime.now(UTC)),
        }

    # --- the licence switch: what Coder shows without one ---
    # Kept apart from the record shapes above: it filters and rewrites them.

    @property
    def licensed(self) -> bool:
        return self.sim.mode("licence") == "enterprise"

    def organizations(self) -> tuple[tuple[str, str], ...]:
        # Multiple organizations is a Premium feature: without a licence only the default.
        return _ORGS if self.licensed else _ORGS[:1]

    def listed_proxies(self) -> list[dict[str, Any]]:
        # Creating a proxy is gated too, so an unlicensed deployment has none.
        return self.proxies() if self.licensed else []

    def listed_daemons(self) -> list[dict[str, Any]]:
        """The daemons of the existing organizations; without a licence, built-in ones only.

        External daemons cannot connect without the licence (Coder gates
        `/provisionerdaemons/serve`), so what remains is what coderd runs itself.
        """
        orgs = {org_id for org_id, _name in self.organizations()}
        daemons = [d for d in self.daemons() if d["organization_id"] in orgs]
        if self.licensed:
            return daemons
        return [{**d, "key_id": BUILTIN_KEY_ID, "key_name": "built-in"} for d in daemons]

    def listed_entitlements(self) -> dict[str, Any]:
        """`entitlements()`, or Coder's answer without a licence (license.LicensesEntitlements).

        No licence: has_license and trial false, every feature not_entitled and disabled
        (user_limit keeps its `actual`, loses its `limit`), no warnings, and the one error
        Coder still computes, several replicas without high availability.
        """
        licensed = self.entitlements()
        if self.sim.mode("entitlements") == "no-features":
            return {k: v for k, v in licensed.items() if k != "features"}
        if self.licensed:
            return licensed
        features: dict[str, Any] = {}
        for name, feature in (licensed.get("features") or {}).items():
            plain = {k: v for k, v in feature.items() if k not in ("limit", "usage_period")}
            plain.update(entitlement="not_entitled", enabled=False)
            if name != "user_limit":
                plain.pop("actual", None)
            features[name] = plain
        several = self.sim.mode("replicas") != "one"
        silent = self.sim.mode("entitlements") == "silent"
        return {
            **licensed,
            "features": features,
            "warnings": [],
            "errors": [HA_ERROR] if several and not silent else [],
            "has_license": False,
            "trial": False,
            "require_telemetry": False,
        }


def _job(key: str, status: str, template: str, display: str) -> dict[str, Any]:
    """A codersdk.ProvisionerDaemonJob."""
    return {
        "id": _id(f"job/{key}"),
        "status": status,
        "template_name": template,
        "template_icon": f"/icon/{template}.svg",
        "template_display_name": display,
    }


def _key_name(org: str) -> str:
    return f"{org}-daemons"


_STATES: dict[int, SimInventory] = {}
_STATES_LOCK = threading.Lock()


def inventory_of(sim: SimulatedDeployment) -> SimInventory:
    with _STATES_LOCK:
        state = _STATES.get(id(sim))
        if state is None or state.sim is not sim:
            state = _STATES[id(sim)] = SimInventory(sim)
        return state


def register(sim: SimulatedDeployment) -> None:
    """Add this module's routes and fault switches to `sim`."""
    for name, modes in FAULT_MODES.items():
        sim.fault(name, modes)
    state = inventory_of(sim)

    def close() -> None:
        state.close()
        with _STATES_LOCK:
            if _STATES.get(id(sim)) is state:
                del _STATES[id(sim)]

    sim.on_close(close)
    proxies = _authorized(lambda: {"regions": [_primary_region(sim), *state.proxies()]})
    routes: dict[str, Callable[[SimRequest, SimulatedDeployment], None]] = {
        "/api/v2/workspaceproxies": _gated(state, PROXY_NOT_LICENSED, proxies),
        "/api/v2/organizations": _authorized(lambda: [
            {"id": org_id, "name": name, "display_name": name.title(), "is_default": n == 0}
            for n, (org_id, name) in enumerate(state.organizations())]),
        "/api/v2/organizations/*": _organization_route(state),
        "/api/v2/replicas": _authorized(state.replicas),
        "/api/v2/entitlements": _authorized(state.listed_entitlements),
    }
    for path, handler in routes.items():
        sim.route("GET", path, _behind_waf(handler))


def _primary_region(sim: SimulatedDeployment) -> dict[str, Any]:
    # Coder lists the primary first; every inventory consumer must skip it.
    return {
        "id": _id("proxy/primary"), "name": "primary", "display_name": "Default",
        "icon_url": "/emojis/1f3e1.png", "healthy": True, "path_app_url": sim.url,
        "wildcard_hostname": "", "derp_enabled": True, "derp_only": False,
        "status": {"status": "ok", "report": {"errors": [], "warnings": []},
                   "checked_at": _time(datetime.now(UTC))},
        "created_at": _time(_BASE_TIME), "updated_at": _time(_BASE_TIME),
        "deleted": False, "version": "",
    }


def _denied(request: SimRequest, sim: SimulatedDeployment) -> bool:
    expected = getattr(sim, "token", "sim-token")
    given = request.headers.get(TOKEN_HEADER)
    if given == expected:
        return False
    if not given:
        body = {
            "message": "Authorization required. Please sign in to continue.",
            "detail": f"Cookie \"coder_session_token\" or header \"{TOKEN_HEADER}\" must be "
            "provided.",
        }
    else:
        body = {
            "message": "You are signed out or your session has expired. Please sign in "
            "again to continue.",
            "detail": "API key is invalid.",
        }
    request.send_json(401, body)
    return True


def _authorized(
    answer: Callable[[], object],
) -> Callable[[SimRequest, SimulatedDeployment], None]:
    def handle(request: SimRequest, sim: SimulatedDeployment) -> None:
        if not _denied(request, sim):
            request.send_json(200, answer())

    return handle


def _behind_waf(
    handler: Callable[[SimRequest, SimulatedDeployment], None],
) -> Callable[[SimRequest, SimulatedDeployment], None]:
    def handle(request: SimRequest, sim: SimulatedDeployment) -> None:
        if sim.mode("waf") == "block":
            request.send_text(403, WAF_PAGE, "text/html")
        else:
            handler(request, sim)

    return handle


def _gated(
    state: SimInventory, message: str, handler: Callable[[SimRequest, SimulatedDeployment], None]
) -> Callable[[SimRequest, SimulatedDeployment], None]:
    """Coder's RequireFeatureMW in front of `handler`: 403 with only a message, no token read."""

    def handle(request: SimRequest, sim: SimulatedDeployment) -> None:
        if state.licensed:
            handler(request, sim)
        else:
            request.send_json(403, {"message": message})

    return handle


def _organization_route(
    state: SimInventory,
) -> Callable[[SimRequest, SimulatedDeployment], None]:
    def handle(request: SimRequest, sim: SimulatedDeployment) -> None:
        parts = request.path_only.strip("/").split("/")
        # api / v2 / organizations / {id} / provisionerdaemons
        if len(parts) != 5 or parts[4] != "provisionerdaemons":
            request.send_json(404, {"message": "Route not found.", "detail": request.path_only})
            return
        # Older releases gated the list before reading the token, as for proxies.
        if sim.mode("licence") == "none-old":
            request.send_json(403, {"message": DAEMONS_NOT_LICENSED})
            return
        if _denied(request, sim):
            return
        known = {org_id for org_id, _name in state.organizations()}
        if parts[3] not in known:
            request.send_json(
                404, {"message": "Resource not found or you do not have access to this resource"}
            )
            return
        daemons = state.listed_daemons()
        request.send_json(200, [d for d in daemons if d["organization_id"] == parts[3]])

    return handle


# --- the same deployment in PostgreSQL --------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workspace_proxies (
    id uuid PRIMARY KEY, name text NOT NULL, display_name text NOT NULL,
    icon text NOT NULL, url text NOT NULL, wildcard_hostname text NOT NULL,
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    deleted boolean NOT NULL, region_id integer NOT NULL, derp_enabled boolean NOT NULL,
    derp_only boolean NOT NULL, version text NOT NULL
);
CREATE TABLE IF NOT EXISTS provisioner_daemons (
    id uuid PRIMARY KEY, created_at timestamptz NOT NULL, name text NOT NULL,
    provisioners text[] NOT NULL, replica_id uuid, tags jsonb NOT NULL,
    last_seen_at timestamptz, version text NOT NULL, api_version text NOT NULL,
    organization_id uuid NOT NULL, key_id uuid NOT NULL
);
CREATE TABLE IF NOT EXISTS provisioner_keys (
    id uuid PRIMARY KEY, created_at timestamptz NOT NULL, organization_id uuid NOT NULL,
    name varchar(64) NOT NULL, hashed_secret bytea NOT NULL, tags jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    id uuid PRIMARY KEY, created_at timestamptz NOT NULL, started_at timestamptz NOT NULL,
    stopped_at timestamptz, updated_at timestamptz NOT NULL, hostname text NOT NULL,
    region_id integer NOT NULL, relay_address text NOT NULL, database_latency integer NOT NULL,
    version text NOT NULL, error text NOT NULL, "primary" boolean NOT NULL
);
DELETE FROM workspace_proxies; DELETE FROM provisioner_daemons; DELETE FROM replicas;
DELETE FROM provisioner_keys;
"""


def _literal(value: Any) -> str:
    """A SQL literal for the sim's own, well-typed values."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + "]::text[]"
    if isinstance(value, dict):
        return _literal(json.dumps(value)) + "::jsonb"
    return "'" + str(value).replace("'", "''") + "'"


def _insert(table: str, row: Mapping[str, Any]) -> str:
    columns = ", ".join(f'"{c}"' for c in row)
    values = ", ".join(_literal(v) for v in row.values())
    return f"INSERT INTO {table} ({columns}) VALUES ({values});"


def seed_database(sim: SimulatedDeployment, execute: Callable[[str], object]) -> None:
    """Write the sim's deployment, in its current modes, into Coder's tables via `execute`.

    The heartbeat is renewed first: the tables and the API then show the same last-seen
    times for the next HEARTBEAT_SECONDS, so a test can compare the two sources.
    """
    state = inventory_of(sim)
    state.touch()
    statements = [_SCHEMA]
    for n, proxy in enumerate(state.listed_proxies(), start=1):
        statements.append(
            _insert(
                "workspace_proxies",
                {
                    "id": proxy["id"], "name": proxy["name"],
                    "display_name": proxy["display_name"], "icon": proxy["icon_url"],
                    "url": proxy["path_app_url"], "wildcard_hostname": proxy["wildcard_hostname"],
                    "created_at": proxy["created_at"], "updated_at": proxy["updated_at"],
                    "deleted": proxy["deleted"], "region_id": n,
                    "derp_enabled": proxy["derp_enabled"], "derp_only": proxy["derp_only"],
                    "version": proxy["version"],
                },
            )
        )
    # Coder's built-in key (the daemons coderd runs itself) and one key per organization.
    keys = [(BUILTIN_KEY_ID, _ORGS[0][0], "built-in")] + [
        (_id(f"key/{org}"), org_id, _key_name(org)) for org_id, org in state.organizations()
    ]
    for key_id, org_id, name in keys:
        statements.append(
            _insert(
                "provisioner_keys",
                {
                    "id": key_id, "created_at": _time(_BASE_TIME), "organization_id": org_id,
                    "name": name, "hashed_secret": "\\x00", "tags": {},
                },
            )
        )
    for daemon in state.listed_daemons():
        statements.append(
            _insert(
                "provisioner_daemons",
                {
                    "id": daemon["id"], "created_at": daemon["created_at"],
                    "name": daemon["name"], "provisioners": daemon["provisioners"],
                    "replica_id": None, "tags": daemon["tags"],
                    "last_seen_at": daemon["last_seen_at"], "version": daemon["version"],
                    "api_version": daemon["api_version"],
                    "organization_id": daemon["organization_id"], "key_id": daemon["key_id"],
                },
            )
        )
    now = datetime.now(UTC)
    version = state._coder_version()
    rows: list[tuple[dict[str, Any], bool, datetime | None, datetime]] = [
        (r, True, None, now) for r in state.replicas()
    ]
    # Rows Coder's API would not list: a replica stopped in a rollout, one that stopped
    # heartbeating a minute ago (crashed), and a workspace proxy's replica (not primary).
    base = {"created_at": _time(_BASE_TIME), "relay_address": "http://10.0.1.99:8080",
            "region_id": 999, "error": "", "database_latency": 900}
    rows += [
        ({**base, "id": _id("replica/old"), "hostname": "coder-old"}, True,
         now - timedelta(hours=1), now - timedelta(hours=1)),
        ({**base, "id": _id("replica/crashed"), "hostname": "coder-crashed"}, True,
         None, now - timedelta(minutes=1)),
        ({**base, "id": _id("replica/proxy"), "hostname": "proxy-eu-0", "region_id": 1}, False,
         None, now),
    ]
    for replica, primary, stopped_at, updated_at in rows:
        statements.append(
            _insert(
                "replicas",
                {
                    "id": replica["id"], "created_at": replica["created_at"],
                    "started_at": replica["created_at"],
                    "stopped_at": None if stopped_at is None else _time(stopped_at),
                    "updated_at": _time(updated_at), "hostname": replica["hostname"],
                    "region_id": replica["region_id"],
                    "relay_address": replica["relay_address"],
                    "database_latency": replica["database_latency"], "version": version,
                    "error": replica["error"], "primary": primary,
                },
            )
        )
    execute("\n".join(statements))
