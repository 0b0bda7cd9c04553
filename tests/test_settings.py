"""Settings: environment over TOML over defaults, fail-fast errors, and no secret shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployhealth.checks import FAMILIES
from deployhealth.settings import (
    DatabaseTarget,
    Secret,
    Settings,
    SettingsError,
    StoreLocation,
    known_keys,
    load_settings,
)

# Planted secrets: every test below proves they never show.
PASSWORD = "pw-Zq8#hunter2"
ENCODED = "pw-Zq8%23hunter2"  # as it sits in a URL
DB_URL = f"postgresql://coder:{ENCODED}@db.internal:5432/coder?sslmode=require"
TOKEN = "tok-7fK2mQ9-secret-session"
API_TOKEN = "api-Vb31-local-bearer"
SECRETS = (PASSWORD, ENCODED, "hunter2", TOKEN, API_TOKEN)


@pytest.fixture(autouse=True)
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so no ./deployhealth.toml is picked up by accident."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_of(environ: dict[str, str], config_file: Path | None = None) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ, config_file)
    return caught.value


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# --- sources and precedence ---------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.name == "coder"
    assert settings.db_latency_threshold_ms == 15.0
    assert settings.store == StoreLocation("sqlite", path="deployhealth.db")
    assert settings.stale_after == 3 * settings.check_interval_seconds
    assert settings.inventory_source == "static"
    assert set(settings.gating_sections) <= set(FAMILIES)
    assert settings.deadline_for("derp") == 20.0


def test_toml_beats_defaults_and_env_beats_toml(elsewhere: Path) -> None:
    config = toml(
        elsewhere / "health.toml",
        'name = "from-toml"\ndb_latency_threshold_ms = 40\nstun_servers = ["a.example:3478"]\n',
    )
    from_toml = load_settings({}, config)
    assert from_toml.name == "from-toml"
    assert from_toml.db_latency_threshold_ms == 40.0
    assert from_toml.stun_servers == ("a.example:3478",)

    both = load_settings({"DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS": "25"}, config)
    assert both.db_latency_threshold_ms == 25.0
    assert both.name == "from-toml"


def test_default_config_file_is_read_when_present(elsewhere: Path) -> None:
    toml(elsewhere / "deployhealth.toml", 'name = "local"\n')
    assert load_settings({}).name == "local"


def test_named_config_file_must_exist(elsewhere: Path) -> None:
    error = error_of({}, elsewhere / "missing.toml")
    assert error.key == "--config"
    assert "does not exist" in str(error)


def test_lists_sections_and_stores_parse() -> None:
    settings = load_settings(
        {
            "DEPLOYHEALTH_STUN_SERVERS": "stun.l.google.com:19302, [::1]:3478",
            "DEPLOYHEALTH_GATING_SECTIONS": "AccessURL,Database,access_url",
            "DEPLOYHEALTH_DISMISSED_SECTIONS": "WorkspaceProxy,DERP",
            "DEPLOYHEALTH_STORE": "dynamodb://health?region=eu-west-1&endpoint_url=http://127.0.0.1:8000",
            "DEPLOYHEALTH_DATABASE_DEADLINE_SECONDS": "4.5",
            "DEPLOYHEALTH_READY_FAIL_AFTER": "3",
        }
    )
    assert settings.stun_servers == ("stun.l.google.com:19302", "[::1]:3478")
    assert settings.gating_sections == ("access_url", "database")
    assert settings.dismissed_sections == ("workspace_proxy", "derp")
    assert settings.store == StoreLocation(
        "dynamodb", table="health", region="eu-west-1", endpoint_url="http://127.0.0.1:8000"
    )
    assert settings.store.describe() == "dynamodb://health"
    assert settings.deadline_for("database") == 4.5
    assert settings.ready_fail_after == 3


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///deployhealth.db", "deployhealth.db"),
        ("sqlite:///var/results.db", "var/results.db"),
        ("sqlite:////var/lib/deployhealth/results.db", "/var/lib/deployhealth/results.db"),
    ],
)
def test_sqlite_store_paths(url: str, path: str) -> None:
    store = load_settings({"DEPLOYHEALTH_STORE": url}).store
    assert store == StoreLocation("sqlite", path=path)
    assert store.describe() == f"sqlite:///{path}"


def test_inventory_source_defaults() -> None:
    assert load_settings({"DEPLOYHEALTH_CODER_TOKEN": TOKEN}).inventory_source == "api"
    assert load_settings({"DEPLOYHEALTH_DATABASE_URL": DB_URL}).inventory_source == "database"
    chosen = load_settings({"DEPLOYHEALTH_CODER_TOKEN": TOKEN, "DEPLOYHEALTH_INVENTORY": "Static"})
    assert chosen.inventory_source == "static"


def test_stale_after_explicit() -> None:
    settings = load_settings(
        {"DEPLOYHEALTH_CHECK_INTERVAL_SECONDS": "30", "DEPLOYHEALTH_STALE_AFTER_SECONDS": "45"}
    )
    assert settings.stale_after == 45.0


# --- invalid values: key, problem, example ---------------------------------------------


@pytest.mark.parametrize(
    ("environ", "key", "problem", "example"),
    [
        (
            {"DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS": "fast"},
            "DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS",
            "is not a number",
            "DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS=15",
        ),
        (
            {"DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS": "-3"},
            "DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS",
            "out of range",
            "DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS=15",
        ),
        (
            {"DEPLOYHEALTH_STORE": "postgres://db/results"},
            "DEPLOYHEALTH_STORE",
            "is neither sqlite:///path nor dynamodb://table",
            "DEPLOYHEALTH_STORE=",
        ),
        (
            {"DEPLOYHEALTH_STORE": "dynamodb://"},
            "DEPLOYHEALTH_STORE",
            "needs a table name",
            "DEPLOYHEALTH_STORE=dynamodb://health",
        ),
        (
            {"DEPLOYHEALTH_STORE": "dynamodb://health?regoin=eu-west-1"},
            "DEPLOYHEALTH_STORE",
            "unknown store option(s): regoin",
            "DEPLOYHEALTH_STORE=",
        ),
        (
            {"DEPLOYHEALTH_STORE": "sqlite://"},
            "DEPLOYHEALTH_STORE",
            "sqlite store needs a path",
            "DEPLOYHEALTH_STORE=sqlite:///deployhealth.db",
        ),
        (
            {"DEPLOYHEALTH_STUN_SERVERS": "stun.example.com"},
            "DEPLOYHEALTH_STUN_SERVERS",
            "'stun.example.com' is not host:port",
            "DEPLOYHEALTH_STUN_SERVERS=stun.l.google.com:19302",
        ),
        (
            {"DEPLOYHEALTH_STUN_SERVERS": "stun.example.com:99999"},
            "DEPLOYHEALTH_STUN_SERVERS",
            "is not host:port",
            "DEPLOYHEALTH_STUN_SERVERS=stun.l.google.com:19302",
        ),
        (
            {"DEPLOYHEALTH_INVENTORY": "ldap"},
            "DEPLOYHEALTH_INVENTORY",
            "'ldap' is not one of api, database, static",
            "DEPLOYHEALTH_INVENTORY=api",
        ),
        (
            {"DEPLOYHEALTH_READY_FAIL_AFTER": "0"},
            "DEPLOYHEALTH_READY_FAIL_AFTER",
            "below the minimum of 1",
            "DEPLOYHEALTH_READY_FAIL_AFTER=2",
        ),
        (
            {"DEPLOYHEALTH_READY_RECOVER_AFTER": "two"},
            "DEPLOYHEALTH_READY_RECOVER_AFTER",
            "is not a whole number",
            "DEPLOYHEALTH_READY_RECOVER_AFTER=2",
        ),
        (
            {"DEPLOYHEALTH_SSRF_ALLOW": "metadata"},
            "DEPLOYHEALTH_SSRF_ALLOW",
            "'metadata' is not an IP network",
            "DEPLOYHEALTH_SSRF_ALLOW=169.254.170.2/32",
        ),
        (
            {"DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS": "7200"},
            "DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS",
            "at most 3600",
            "DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS=90",
        ),
        (
            {"DEPLOYHEALTH_GATING_SECTIONS": "database,health"},
            "DEPLOYHEALTH_GATING_SECTIONS",
            "unknown section 'health'; known sections: access_url, database",
            "DEPLOYHEALTH_GATING_SECTIONS=access_url,database",
        ),
        (
            {"DEPLOYHEALTH_DATABASE_DEADLINE_SECONDS": "soon"},
            "DEPLOYHEALTH_DATABASE_DEADLINE_SECONDS",
            "is not a number",
            "DEPLOYHEALTH_DATABASE_DEADLINE_SECONDS=",
        ),
        (
            {"DEPLOYHEALTH_DERP_DEADLINE_SECONDS": "900"},
            "DEPLOYHEALTH_DERP_DEADLINE_SECONDS",
            "at most 880",
            "DEPLOYHEALTH_DERP_DEADLINE_SECONDS=",
        ),
        (
            {"DEPLOYHEALTH_CHECK_INTERVAL_SECONDS": "60", "DEPLOYHEALTH_STALE_AFTER_SECONDS": "30"},
            "DEPLOYHEALTH_STALE_AFTER_SECONDS",
            "shorter than the check interval",
            "DEPLOYHEALTH_STALE_AFTER_SECONDS=180",
        ),
    ],
)
def test_invalid_value_names_key_problem_and_example(
    environ: dict[str, str], key: str, problem: str, example: str
) -> None:
    error = error_of(environ)
    text = str(error)
    assert error.key == key
    assert text.startswith(f"{key}: ")
    assert problem in text
    assert f"(example: {example}" in text


def test_unknown_env_var_suggests_the_close_one() -> None:
    error = error_of({"DEPLOYHEALTH_ACESS_URL": "https://coder.example.com"})
    assert error.key == "DEPLOYHEALTH_ACESS_URL"
    assert "is not a deployhealth setting" in str(error)
    assert "did you mean DEPLOYHEALTH_ACCESS_URL?" in str(error)


def test_env_vars_without_the_prefix_are_ignored() -> None:
    assert load_settings({"ACESS_URL": "x", "HOME": "/root"}).access_url is None


def test_unknown_toml_key_suggests_the_close_one(elsewhere: Path) -> None:
    config = toml(elsewhere / "health.toml", 'acess_url = "https://coder.example.com"\n')
    error = error_of({}, config)
    assert error.key == f"{config}: acess_url"
    assert "did you mean access_url?" in str(error)


def test_invalid_toml_value_names_the_file_and_key(elsewhere: Path) -> None:
    config = toml(elsewhere / "health.toml", 'db_latency_threshold_ms = "fast"\n')
    error = error_of({}, config)
    assert error.key == f"{config}: db_latency_threshold_ms"
    assert "is not a number" in str(error)
    assert "example: db_latency_threshold_ms=15" in str(error)


def test_wrong_toml_type_is_an_error(elsewhere: Path) -> None:
    config = toml(elsewhere / "health.toml", "name = 5\n")
    assert "must be text, not int" in str(error_of({}, config))


def test_toml_syntax_error_names_the_file(elsewhere: Path) -> None:
    config = toml(elsewhere / "health.toml", "name = \n")
    error = error_of({}, config)
    assert error.key == str(config)
    assert "is not valid TOML" in str(error)


def test_every_key_is_known_in_both_spellings() -> None:
    keys = known_keys()
    assert "ACCESS_URL" in keys and "DATABASE_DEADLINE_SECONDS" in keys
    assert keys == sorted(keys)


# --- secrets -------------------------------------------------------------------------


def secret_environ() -> dict[str, str]:
    return {
        "DEPLOYHEALTH_DATABASE_URL": DB_URL,
        "DEPLOYHEALTH_CODER_TOKEN": TOKEN,
        "DEPLOYHEALTH_API_TOKEN": API_TOKEN,
    }


def test_secrets_never_in_repr_or_str() -> None:
    settings = load_settings(secret_environ())
    assert_no_secret(repr(settings))
    assert_no_secret(str(settings))
    assert "Secret('***')" in repr(settings)
    target = settings.database()
    assert target is not None
    assert_no_secret(repr(target))
    assert target.describe() == "coder@db.internal:5432/coder"
    # The values themselves are still there for whoever needs them.
    assert settings.token() == TOKEN
    assert target.password.reveal() == PASSWORD


@pytest.mark.parametrize(
    "bad",
    [
        {"DEPLOYHEALTH_STORE": "nonsense"},
        {"DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS": "fast"},
        {"DEPLOYHEALTH_ACESS_URL": "https://coder.example.com"},
        {"DEPLOYHEALTH_STALE_AFTER_SECONDS": "2"},
        # A secret under a mistyped name: the name is reported, the value is not.
        {"DEPLOYHEALTH_DATABSE_URL": DB_URL},
        {"DEPLOYHEALTH_CODER_TOKN": TOKEN},
    ],
)
def test_secrets_never_in_errors(bad: dict[str, str]) -> None:
    error = error_of({**secret_environ(), **bad})
    assert_no_secret(str(error))
    assert_no_secret(repr(error))
    assert error.__cause__ is None


def test_invalid_secret_value_from_toml_is_not_echoed(elsewhere: Path) -> None:
    # From the environment any text is a token; from TOML a non-string is the invalid form.
    config = toml(elsewhere / "health.toml", "coder_token = 73519462\n")
    error = error_of({}, config)
    assert error.key == f"{config}: coder_token"
    assert "must be text, not int" in str(error)
    assert "73519462" not in str(error)



def test_toml_syntax_error_near_a_secret_is_not_echoed(elsewhere: Path) -> None:
    config = toml(elsewhere / "health.toml", f'coder_token = "{TOKEN}\n')
    error = error_of({}, config)
    assert_no_secret(str(error))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"mysql://coder:{ENCODED}@db/coder", "is not a postgresql:// URL"),
        (f"postgresql://coder:{ENCODED}@db/coder?sslmode=sometimes", "sslmode 'sometimes'"),
        (f"postgresql://coder:{ENCODED}@db:port/coder", "port that is not a number"),
        (f"postgresql://coder:{ENCODED}@/coder", "has no host"),
        # An unencoded '#' cuts the URL short; the message must still not show the rest.
        (f"postgresql://coder:{PASSWORD}@db/coder", "must be percent-encoded"),
    ],
)
def test_database_url_errors_fail_at_load_and_do_not_show_the_password(
    url: str, problem: str
) -> None:
    error = error_of({"DEPLOYHEALTH_DATABASE_URL": url})
    assert error.key == "DEPLOYHEALTH_DATABASE_URL"
    assert problem in str(error)
    assert "example: DEPLOYHEALTH_DATABASE_URL=postgresql://" in str(error)
    assert_no_secret(str(error))


def test_secret_wrapper() -> None:
    secret = Secret(TOKEN)
    assert repr(secret) == "Secret('***')"
    assert str(secret) == "***"
    assert f"{secret}" == "***"
    assert secret == Secret(TOKEN)
    assert secret != Secret("other")
    assert secret.reveal() == TOKEN


# --- database targets ------------------------------------------------------------------


def test_database_url_fields() -> None:
    target = DatabaseTarget.from_url(DB_URL)
    assert (target.host, target.port, target.user, target.database, target.sslmode) == (
        "db.internal",
        5432,
        "coder",
        "coder",
        "require",
    )
    assert target.password.reveal() == PASSWORD
    socket = DatabaseTarget.from_url("postgresql://coder@/coder?host=/var/run/postgresql")
    assert socket.unix_socket == "/var/run/postgresql/.s.PGSQL.5432"


def test_rds_secret() -> None:
    target = DatabaseTarget.from_rds_secret(
        '{"host": "db", "port": "6432", "username": "coder", "password": "'
        + PASSWORD
        + '", "dbname": "coder"}',
        "DEPLOYHEALTH_DATABASE_SECRET",
    )
    assert (target.host, target.port, target.user) == ("db", 6432, "coder")
    assert target.sslmode == "require"  # RDS secrets default to TLS
    assert DatabaseTarget.from_rds_secret(DB_URL, "K").host == "db.internal"
    with pytest.raises(SettingsError, match="secret lacks password"):
        DatabaseTarget.from_rds_secret('{"host": "db", "username": "coder"}', "K")
    with pytest.raises(SettingsError) as caught:
        DatabaseTarget.from_rds_secret(f"not json {PASSWORD}", "K")
    assert_no_secret(str(caught.value))


def test_with_overrides_returns_a_new_settings() -> None:
    base = Settings()
    changed = base.with_overrides(name="other")
    assert (base.name, changed.name) == ("coder", "other")


def test_every_invalid_setting_is_collected_in_one_error(elsewhere: Path) -> None:
    config = toml(elsewhere / "health.toml", 'acess_url = "x"\nstore = "redis://x"\n')
    error = error_of(
        {"DEPLOYHEALTH_READY_FAIL_AFTER": "0", "DEPLOYHEALTH_CODER_TOKEN_SECRTE": "x",
         "DEPLOYHEALTH_DATABASE_URL": "postgresql://coder:hunter2-secret@db:notaport/x"},
        config,
    )
    keys = [e.key for e in error.errors]
    assert sorted(keys) == sorted([
        f"{config}: acess_url", f"{config}: store", "DEPLOYHEALTH_READY_FAIL_AFTER",
        "DEPLOYHEALTH_CODER_TOKEN_SECRTE", "DEPLOYHEALTH_DATABASE_URL",
    ])
    assert len(str(error).splitlines()) == 5
    assert "hunter2" not in str(error)
    # One bad setting is still a plain SettingsError naming it.
    assert error_of({"DEPLOYHEALTH_STORE": "redis://x"}).errors[0].key == "DEPLOYHEALTH_STORE"
