"""One settings object, from environment variables, a TOML file and defaults (highest first).

Every key has one parser and one example, so an invalid value fails fast with a message
naming the key, what is wrong with the value, and what a good one looks like; every
invalid key is reported at once (`SettingsErrors`), not only the first. Secret
values are wrapped in `Secret` so that no repr, log line or error can show them.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from deployhealth.model import SECTION_NAMES, UnknownSectionError, canonical_section

ENV_PREFIX = "DEPLOYHEALTH_"
DEFAULT_CONFIG_FILE = Path("deployhealth.toml")
DEFAULT_GATING = ("access_url", "database", "websocket", "derp", "entitlements")
# Instance metadata and link-local ranges are never fetched for URLs the deployment hands us.
BLOCKED_NETWORKS = ("169.254.0.0/16", "fd00:ec2::/32", "fe80::/10")


class SettingsError(ValueError):
    """An invalid setting: names the key, the problem and an example. Never holds a secret."""

    def __init__(self, key: str, problem: str, example: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.example = example
        text = f"{key}: {problem}"
        if example:
            text += f" (example: {example})"
        super().__init__(text)

    @property
    def errors(self) -> list[SettingsError]:
        """Every error this one stands for: itself (`SettingsErrors` holds several)."""
        return [self]


class SettingsErrors(SettingsError):
    """Several invalid settings at once, so that one run names them all.

    `key`, `problem` and `example` are the first error's; `str()` has one line per error.
    """

    def __init__(self, errors: list[SettingsError]) -> None:
        first = errors[0]
        super().__init__(first.key, first.problem, first.example)
        self._errors = list(errors)
        self.args = ("\n".join(str(e) for e in errors),)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def errors(self) -> list[SettingsError]:
        return list(self._errors)


def raise_all(errors: list[SettingsError]) -> None:
    """Raise nothing, the one error, or all of them together."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise SettingsErrors(errors)


class Secret:
    """A secret string: shown as *** everywhere except through `reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class DatabaseTarget:
    host: str
    port: int
    user: str
    password: Secret
    database: str
    sslmode: str = "prefer"
    unix_socket: str | None = None

    def describe(self) -> str:
        """Where the database is, for messages: never the password."""
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"{self.user}@{where}/{self.database}"

    @classmethod
    def from_url(cls, url: str, key: str = "DEPLOYHEALTH_DATABASE_URL") -> DatabaseTarget:
        example = "postgresql://coder:PASSWORD@db.internal:5432/coder?sslmode=require"
        parts = urlsplit(url.strip())
        if parts.scheme not in ("postgres", "postgresql"):
            raise SettingsError(key, "is not a postgresql:// URL", example)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        sslmode = query.get("sslmode", "prefer")
        if sslmode not in _SSLMODES:
            raise SettingsError(
                key, f"sslmode {sslmode!r} is not one of {', '.join(_SSLMODES)}", example
            )
        try:
            port = parts.port or 5432
        except ValueError:
            raise SettingsError(
                key,
                "has a port that is not a number (characters such as @ : / # ? in the "
                "password must be percent-encoded)",
                example,
            ) from None
        socket_dir = query.get("host", "")
        if not parts.hostname and not socket_dir:
            raise SettingsError(key, "has no host", example)
        database = unquote(parts.path.lstrip("/")) or "postgres"
        unix_socket = None
        if socket_dir.startswith("/"):
            unix_socket = f"{socket_dir}/.s.PGSQL.{port}"
        return cls(
            host=parts.hostname or "localhost",
            port=port,
            user=unquote(parts.username or "postgres"),
            password=Secret(unquote(parts.password or "")),
            database=database,
            sslmode=sslmode,
            unix_socket=unix_socket,
        )

    @classmethod
    def from_rds_secret(cls, text: str, key: str) -> DatabaseTarget:
        """An RDS-style secret: JSON with host, port, username, password, dbname."""
        example = '{"host": "db.internal", "port": 5432, "username": "coder", ...}'
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # A secret may also hold a plain URL.
            if text.strip().startswith(("postgres://", "postgresql://")):
                return cls.from_url(text, key)
            raise SettingsError(
                key, "secret is neither JSON nor a postgresql:// URL", example
            ) from None
        if not isinstance(data, dict):
            raise SettingsError(key, "secret is not a JSON object", example)
        missing = [k for k in ("host", "username", "password") if not data.get(k)]
        if missing:
            raise SettingsError(key, f"secret lacks {', '.join(missing)}", example)
        try:
            port = int(data.get("port", 5432))
        except (TypeError, ValueError):
            raise SettingsError(key, "secret's port is not a number", example) from None
        sslmode = str(data.get("sslmode", "require"))
        return cls(
            host=str(data["host"]),
            port=port,
            user=str(data["username"]),
            password=Secret(str(data["password"])),
            database=str(data.get("dbname") or data.get("database") or "postgres"),
            sslmode=sslmode if sslmode in _SSLMODES else "require",
        )


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class StoreLocation:
    kind: str  # "sqlite" or "dynamodb"
    path: str = ""  # sqlite file
    table: str = ""
    region: str | None = None
    endpoint_url: str | None = None

    def describe(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"
        return f"dynamodb://{self.table}"


@dataclass(frozen=True)
class Settings:
    name: str = "coder"
    access_url: str | None = None
    coder_token: Secret | None = None
    coder_token_secret: str | None = None
    database_url: Secret | None = None
    database_secret: str | None = None
    db_latency_threshold_ms: float = 15.0
    derp_map: str | None = None
    stun_servers: tuple[str, ...] = ()
    inventory: str | None = None
    websocket_idle_seconds: float = 0.0
    tls_expiry_warning_days: float = 14.0
    deadlines: Mapping[str, float] = field(default_factory=dict)
    check_interval_seconds: float = 60.0
    gating_sections: tuple[str, ...] = DEFAULT_GATING
    stale_after_seconds: float | None = None
    ready_fail_after: int = 1
    ready_recover_after: int = 1
    dismissed_sections: tuple[str, ...] = ()
    # Families a forced run (`?force=true`) leaves alone because they cannot be reached from
    # where the API runs (a private database when the API is outside its VPC): their stored
    # results stay, instead of being overwritten by false errors.
    force_skip_sections: tuple[str, ...] = ()
    store: StoreLocation = field(
        default_factory=lambda: StoreLocation("sqlite", path="deployhealth.db")
    )
    history_retention_days: float = 7.0
    metrics_namespace: str = "DeployHealth"
    ssrf_allow: tuple[str, ...] = ()
    api_token: Secret | None = None
    # The `static` inventory source: lists shaped like the Coder API's answers.
    static_proxies: tuple[Mapping[str, Any], ...] = ()
    static_provisioner_daemons: tuple[Mapping[str, Any], ...] = ()
    static_replicas: tuple[Mapping[str, Any], ...] = ()
    proxy_concurrency: int = 512

    # --- derived values -------------------------------------------------------------

    def deadline_for(self, family: str) -> float:
        return float(self.deadlines.get(family, DEFAULT_DEADLINES.get(family, 10.0)))

    @property
    def stale_after(self) -> float:
        if self.stale_after_seconds is not None:
            return self.stale_after_seconds
        return 3 * self.check_interval_seconds

    @property
    def inventory_source(self) -> str:
        if self.inventory:
            return self.inventory
        if self.coder_token or self.coder_token_secret:
            return "api"
        if self.database_url or self.database_secret:
            return "database"
        return "static"

    def token(self) -> str | None:
        """The Coder API token, read from its secret reference when one is given."""
        if self.coder_token is not None:
            return self.coder_token.reveal()
        if self.coder_token_secret:
            return fetch_secret(self.coder_token_secret, "DEPLOYHEALTH_CODER_TOKEN_SECRET").strip()
        return None

    def database(self) -> DatabaseTarget | None:
        """Where the deployment's database is, read from its secret reference when given."""
        if self.database_url is not None:
            return DatabaseTarget.from_url(self.database_url.reveal())
        if self.database_secret:
            key = "DEPLOYHEALTH_DATABASE_SECRET"
            return DatabaseTarget.from_rds_secret(fetch_secret(self.database_secret, key), key)
        return None

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


DEFAULT_DEADLINES: dict[str, float] = {
    "access_url": 10.0,
    "database": 10.0,
    "websocket": 15.0,
    "derp": 20.0,
    "workspace_proxy": 20.0,
    "provisioner_daemons": 10.0,
    "entitlements": 10.0,
}


def is_ssm_reference(reference: str) -> bool:
    """True for an SSM parameter name (`/...`) or ARN in any partition.

    >>> is_ssm_reference("arn:aws-cn:ssm:cn-north-1:123456789012:parameter/coder/token")
    True
    """
    if reference.startswith("/"):
        return True
    parts = reference.split(":", 3)
    return len(parts) == 4 and parts[0] == "arn" and parts[2] == "ssm"


def fetch_secret(reference: str, key: str) -> str:
    """Read a secret through Powertools Parameters (cached for five minutes).

    An SSM parameter ARN (`arn:<partition>:ssm:...`, in any partition: aws, aws-cn,
    aws-us-gov, ...) or a name starting with `/` is an SSM parameter (decrypted); anything
    else is a Secrets Manager ARN or name.
    """
    from aws_lambda_powertools.utilities import parameters

    try:
        if is_ssm_reference(reference):
            value = parameters.get_parameter(reference, decrypt=True, max_age=300)
        else:
            value = parameters.get_secret(reference, max_age=300)
    except Exception as exc:
        # AWS's message says what went wrong (not found, access denied); it cannot hold the
        # secret's value, which was not read.
        reason = " ".join(str(exc).split())[:300]
        raise SettingsError(
            key, f"could not read secret {reference!r}: {type(exc).__name__}: {reason}"
        ) from None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value)


# --- parsers ------------------------------------------------------------------------

Parser = Callable[[str, Any], Any]


def _text(key: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise SettingsError(key, f"must be text, not {type(raw).__name__}")
    return raw.strip()


def _optional_text(key: str, raw: Any) -> str | None:
    return _text(key, raw) or None


def _secret(key: str, raw: Any) -> Secret | None:
    value = _text(key, raw)
    return Secret(value) if value else None


def _database_url(key: str, raw: Any) -> Secret | None:
    secret = _secret(key, raw)
    if secret is not None:
        # Parsed now only to fail fast; DatabaseTarget's messages never repeat the password.
        DatabaseTarget.from_url(secret.reveal(), key)
    return secret


def _number(minimum: float, maximum: float | None = None) -> Parser:
    def parse(key: str, raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SettingsError(key, "is not a number") from None
        if value != value or value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum:g}" + (f" and at most {maximum:g}" if maximum else "")
            raise SettingsError(key, f"{raw!r} is out of range: must be {bound}")
        return value

    return parse


def _integer(minimum: int) -> Parser:
    def parse(key: str, raw: Any) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise SettingsError(key, f"{raw!r} is not a whole number") from None
        if value < minimum:
            raise SettingsError(key, f"{value} is below the minimum of {minimum}")
        return value

    return parse


def _list(key: str, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, list | tuple):
        items = [str(x).strip() for x in raw]
    else:
        items = [x.strip() for x in _text(key, raw).split(",")]
    return tuple(x for x in items if x)


def _sections(key: str, raw: Any) -> tuple[str, ...]:
    out: list[str] = []
    for item in _list(key, raw):
        try:
            name = canonical_section(item)
        except UnknownSectionError as exc:
            raise SettingsError(key, str(exc)) from None
        if name not in out:
            out.append(name)
    return tuple(out)


def _access_url(key: str, raw: Any) -> str | None:
    # Kept as text: a malformed URL is the access_url section's EACS02, not a crash.
    return _optional_text(key, raw)


def _stun_servers(key: str, raw: Any) -> tuple[str, ...]:
    servers = _list(key, raw)
    for server in servers:
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(key, f"{server!r} is not host:port")
    return servers


def _inventory(key: str, raw: Any) -> str | None:
    value = _text(key, raw).lower()
    if value and value not in ("api", "database", "static"):
        raise SettingsError(key, f"{value!r} is not one of api, database, static")
    return value or None


def _store(key: str, raw: Any) -> StoreLocation:
    text = _text(key, raw)
    parts = urlsplit(text)
    if parts.scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path, as SQLAlchemy spells it.
        path = text[len("sqlite:///") :] if text.startswith("sqlite:///") else ""
        if not path:
            raise SettingsError(key, "sqlite store needs a path", "sqlite:///deployhealth.db")
        return StoreLocation("sqlite", path=unquote(path))
    if parts.scheme == "dynamodb":
        if not parts.netloc:
            raise SettingsError(key, "dynamodb store needs a table name", "dynamodb://health")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"region", "endpoint_url"}
        if unknown:
            raise SettingsError(key, f"unknown store option(s): {', '.join(sorted(unknown))}")
        return StoreLocation(
            "dynamodb",
            table=parts.netloc,
            region=query.get("region"),
            endpoint_url=query.get("endpoint_url"),
        )
    raise SettingsError(
        key, "is neither sqlite:///path nor dynamodb://table", "dynamodb://health?region=us-east-1"
    )


def _objects(key: str, raw: Any) -> tuple[Mapping[str, Any], ...]:
    """A list of objects: JSON text (environment) or a TOML array of tables."""
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError as exc:
            raise SettingsError(key, f"is not valid JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SettingsError(key, "must be a list of objects")
    return tuple(value)


def _networks(key: str, raw: Any) -> tuple[str, ...]:
    nets = _list(key, raw)
    for net in nets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise SettingsError(key, f"{net!r} is not an IP network") from None
    return nets


@dataclass(frozen=True)
class _Spec:
    attribute: str
    parse: Parser
    example: str
    secret: bool = False


_SPECS: dict[str, _Spec] = {
    "NAME": _Spec("name", _text, "coder-prod"),
    "ACCESS_URL": _Spec("access_url", _access_url, "https://coder.example.com"),
    "CODER_TOKEN": _Spec("coder_token", _secret, "<a Coder session token>", secret=True),
    "CODER_TOKEN_SECRET": _Spec("coder_token_secret", _optional_text, "coder/health-token"),
    "DATABASE_URL": _Spec(
        "database_url", _database_url, "postgresql://coder:PASSWORD@db:5432/coder", secret=True
    ),
    "DATABASE_SECRET": _Spec("database_secret", _optional_text, "arn:aws:secretsmanager:..."),
    "DB_LATENCY_THRESHOLD_MS": _Spec("db_latency_threshold_ms", _number(0.001), "15"),
    "DERP_MAP": _Spec("derp_map", _optional_text, "https://coder.example.com/derpmap.json"),
    "STUN_SERVERS": _Spec("stun_servers", _stun_servers, "stun.l.google.com:19302"),
    "INVENTORY": _Spec("inventory", _inventory, "api"),
    "WEBSOCKET_IDLE_SECONDS": _Spec("websocket_idle_seconds", _number(0, 3600), "90"),
    "TLS_EXPIRY_WARNING_DAYS": _Spec("tls_expiry_warning_days", _number(0), "14"),
    "CHECK_INTERVAL_SECONDS": _Spec("check_interval_seconds", _number(1), "60"),
    "GATING_SECTIONS": _Spec("gating_sections", _sections, "access_url,database"),
    "STALE_AFTER_SECONDS": _Spec("stale_after_seconds", _number(1), "180"),
    "READY_FAIL_AFTER": _Spec("ready_fail_after", _integer(1), "2"),
    "READY_RECOVER_AFTER": _Spec("ready_recover_after", _integer(1), "2"),
    "DISMISSED_SECTIONS": _Spec("dismissed_sections", _sections, "workspace_proxy"),
    "FORCE_SKIP_SECTIONS": _Spec("force_skip_sections", _sections, "database"),
    "STORE": _Spec("store", _store, "sqlite:///deployhealth.db"),
    "HISTORY_RETENTION_DAYS": _Spec("history_retention_days", _number(0.001), "7"),
    "METRICS_NAMESPACE": _Spec("metrics_namespace", _text, "DeployHealth"),
    "SSRF_ALLOW": _Spec("ssrf_allow", _networks, "169.254.170.2/32"),
    "API_TOKEN": _Spec("api_token", _secret, "<a long random string>", secret=True),
    "STATIC_PROXIES": _Spec(
        "static_proxies", _objects, '[{"name": "eu", "path_app_url": "https://eu.example.com"}]'
    ),
    "STATIC_PROVISIONER_DAEMONS": _Spec(
        "static_provisioner_daemons", _objects,
        '[{"name": "p1", "version": "v2.18.1", "api_version": "1.1", "last_seen_at": "..."}]',
    ),
    "STATIC_REPLICAS": _Spec(
        "static_replicas", _objects, '[{"hostname": "coder-0", "primary": true, ...}]'
    ),
    "PROXY_CONCURRENCY": _Spec("proxy_concurrency", _integer(1), "512"),
}
# Per-family deadlines: DEPLOYHEALTH_<FAMILY>_DEADLINE_SECONDS.
_DEADLINE_KEYS = {f"{f.upper()}_DEADLINE_SECONDS": f for f in SECTION_NAMES}
_DEADLINE_PARSER = _number(0.1, 880)  # Lambda stops a function at 900 s


def known_keys() -> list[str]:
    return sorted([*_SPECS, *_DEADLINE_KEYS])


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | str | None = None,
) -> Settings:
    """Build settings: environment first, then the TOML file, then defaults.

    `config_file` None means `./deployhealth.toml` when it exists; a named file must exist.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, tuple[str, Any]] = {}  # suffix -> (where it came from, value)
    # Every problem is collected, then all are reported together: fixing one setting per
    # run, only to meet the next, is what a user of a long list of variables must not do.
    errors: list[SettingsError] = []

    path = Path(config_file) if config_file is not None else None
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            entries = _read_toml(path, errors)
        except SettingsError as exc:  # missing or unreadable: none of its keys count
            errors.append(exc)
            entries = {}
        for suffix, value in entries.items():
            raw[suffix] = (f"{path}: {suffix.lower()}", value)

    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            suffix = name[len(ENV_PREFIX) :]
            try:
                _require_known(suffix, name)
            except SettingsError as exc:
                errors.append(exc)
                continue
            raw[suffix] = (name, value)

    values: dict[str, Any] = {}
    deadlines: dict[str, float] = {}
    for suffix, (where, value) in raw.items():
        if suffix in _DEADLINE_KEYS:
            try:
                deadlines[_DEADLINE_KEYS[suffix]] = _DEADLINE_PARSER(where, value)
            except SettingsError as exc:
                errors.append(SettingsError(where, exc.problem, f"{_example_key(where)}=10"))
            continue
        spec = _SPECS[suffix]
        try:
            values[spec.attribute] = spec.parse(where, value)
        except SettingsError as exc:
            # The example is added here so that every parser stays one line of logic.
            # Parsers of secret settings never repeat the value in their problem text.
            # A parser's own example fits its problem better (dynamodb://health for a
            # table-less dynamodb URL, not the generic sqlite one).
            example = exc.example if exc.example and not spec.secret else spec.example
            errors.append(SettingsError(where, exc.problem, f"{_example_key(where)}={example}"))
    raise_all(errors)
    if deadlines:
        values["deadlines"] = deadlines
    settings = Settings(**values)
    # Judged on valid values only, hence after the others.
    _check_consistency(settings)
    return settings


def _example_key(where: str) -> str:
    return where.split(": ")[-1] if ": " in where else where


def _require_known(suffix: str, where: str) -> None:
    if suffix in _SPECS or suffix in _DEADLINE_KEYS:
        return
    close = difflib.get_close_matches(suffix, known_keys(), n=1)
    hint = f"did you mean {ENV_PREFIX}{close[0]}?" if close else "see docs/configuration.md"
    raise SettingsError(where, f"is not a deployhealth setting; {hint}")


def _read_toml(path: Path, errors: list[SettingsError]) -> dict[str, Any]:
    """The file's settings by suffix; unknown keys go to `errors`, the known ones still count.

    A file that cannot be read or parsed raises: none of its keys can be trusted.
    """
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError("--config", f"file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(str(path), f"is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        suffix = key.upper()
        if suffix not in _SPECS and suffix not in _DEADLINE_KEYS:
            close = difflib.get_close_matches(suffix, known_keys(), n=1)
            hint = f"; did you mean {close[0].lower()}?" if close else ""
            errors.append(SettingsError(f"{path}: {key}", f"is not a deployhealth setting{hint}"))
            continue
        out[suffix] = value
    return out


def _check_consistency(settings: Settings) -> None:
    if settings.stale_after_seconds is not None and (
        settings.stale_after_seconds < settings.check_interval_seconds
    ):
        raise SettingsError(
            "DEPLOYHEALTH_STALE_AFTER_SECONDS",
            f"{settings.stale_after_seconds:g} is shorter than the check interval "
            f"({settings.check_interval_seconds:g} s): every result would be stale",
            f"DEPLOYHEALTH_STALE_AFTER_SECONDS={3 * settings.check_interval_seconds:g}",
        )
