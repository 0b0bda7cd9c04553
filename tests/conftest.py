"""Shared fixtures: stores of either backend, the simulated deployment, a real PostgreSQL,
a test certificate authority, and a record of the addresses sockets connect to.

Helpers that are not fixtures are in tests/support/.
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from support.tls import CertAuthority

from deployhealth.store import ResultStore

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.inventory import ProxyFarm
    from deployhealth.sim.postgres import LocalPostgres

# Dummy credentials for the loopback DynamoDB endpoint. The secret is distinctive so that a
# test can search every error text for it.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-must-never-print",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No developer profile or instance metadata may leak into the tests.
    "AWS_CONFIG_FILE": "/nonexistent/deployhealth-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/deployhealth-tests/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def dynamodb_endpoint() -> Iterator[str]:
    """moto's DynamoDB in server mode on 127.0.0.1 (a free port), spoken to over HTTP."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS_TEST_ENV.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_REGION", raising=False)
        # werkzeug logs every request at INFO; a failing test's report should show ours.
        quiet = logging.getLogger("werkzeug")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            quiet.setLevel(level)


StoreFactory = Callable[..., ResultStore]


@pytest.fixture(params=["sqlite", "dynamodb"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Open stores of one backend that share one file or table for the whole test.

    `make(deployment="coder", retention_days=7.0)`: several deployments or retentions can
    look at the same storage, as several Lambda functions look at one table.
    """
    opened: list[ResultStore] = []
    if request.param == "sqlite":
        path = str(tmp_path / "results.db")

        def make(deployment: str = "coder", retention_days: float = 7.0) -> ResultStore:
            from deployhealth.store.sqlite import SQLiteStore

            store = SQLiteStore(path, deployment, retention_days)
            opened.append(store)
            return store

    else:
        endpoint = request.getfixturevalue("dynamodb_endpoint")
        table = f"health-{uuid.uuid4().hex[:12]}"
        created = False

        def make(deployment: str = "coder", retention_days: float = 7.0) -> ResultStore:
            from deployhealth.store.dynamodb import DynamoDBStore

            nonlocal created
            store = DynamoDBStore(table, deployment, retention_days, endpoint_url=endpoint)
            if not created:
                store.create_table()
                created = True
            opened.append(store)
            return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> ResultStore:
    """A fresh, empty store of each backend (the contract suite runs against both)."""
    return store_factory()


@pytest.fixture(scope="session")
def local_postgres() -> Iterator[object]:
    """A real, password-protected PostgreSQL on 127.0.0.1, shared by the session.

    Tests must leave it running with its password unchanged; a test that needs a stopped
    server starts its own `LocalPostgres`.
    """
    from deployhealth.sim.postgres import LocalPostgres

    server = LocalPostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg(local_postgres: object) -> LocalPostgres:
    """The session's PostgreSQL, typed."""
    from deployhealth.sim.postgres import LocalPostgres

    assert isinstance(local_postgres, LocalPostgres)
    return local_postgres


@pytest.fixture
def coder_db(pg: LocalPostgres) -> Iterator[tuple[str, Callable[[str], object]]]:
    """A fresh database for Coder's tables: (its URL, a function that runs SQL in it)."""
    name = f"coder_{uuid.uuid4().hex[:12]}"
    pg.execute(f"CREATE DATABASE {name}")

    def execute(sql: str) -> object:
        conn = pg.connect(database=name)
        try:
            return conn.run(sql)
        finally:
            conn.close()

    url = (
        f"postgresql://{quote(pg.user, safe='')}:{quote(pg.password, safe='')}"
        f"@127.0.0.1:{pg.port}/{name}?sslmode=disable"
    )
    yield url, execute
    pg.execute(f"DROP DATABASE {name} WITH (FORCE)")


# --- the simulated deployment -------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[SimulatedDeployment]:
    """A simulated Coder deployment for one test (modules that share one override this)."""
    from deployhealth.sim.deployment import SimulatedDeployment

    with SimulatedDeployment() as deployment:
        yield deployment


@pytest.fixture
def farm() -> Iterator[ProxyFarm]:
    """Simulated workspace proxies, each on its own port of 127.0.0.1."""
    from deployhealth.sim.inventory import ProxyFarm

    with ProxyFarm() as proxies:
        yield proxies


# --- TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """A certificate authority for the module's TLS servers."""
    return CertAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def system_trust_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from the system CA store, whatever the developer's shell sets."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)


# --- watching connections -----------------------------------------------------------
# An audit hook sees every socket.connect the interpreter makes, whoever makes it: nothing
# of deployhealth is patched. It records only while a test holds the `connects` fixture.

_connects: list[str] = []
_recording = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect" and _recording.is_set():
        address = args[1]
        if isinstance(address, tuple):
            _connects.append(str(address[0]))


sys.addaudithook(_audit)


@pytest.fixture
def connects() -> Iterator[list[str]]:
    """The IP addresses of every socket connect during the test, in order."""
    _connects.clear()
    _recording.set()
    try:
        yield _connects
    finally:
        _recording.clear()


@pytest.fixture
def healthy_env(sim: SimulatedDeployment, pg: LocalPostgres) -> dict[str, str]:
    """The environment of a `deployhealth` process watching a healthy simulated deployment
    (each test adds its store)."""
    from support.serve import clean_env

    return clean_env(
        DEPLOYHEALTH_NAME="cli-test",
        DEPLOYHEALTH_ACCESS_URL=sim.url,
        DEPLOYHEALTH_DATABASE_URL=pg.url,
        DEPLOYHEALTH_CODER_TOKEN=sim.token,
        # Loopback is fast, but a loaded CI machine is not: EDB02 is not under test here.
        DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS="1000",
    )
