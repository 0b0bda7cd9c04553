"""Every function of template.yaml, run as Lambda lays it out: its own directory, the two
layers built from the project's own definitions, the runtime's boto3, and nothing else.

What a deployer would otherwise find out after `sam deploy`: a handler that does not import
(a function module shadowing a library, a package missing from the layer), a layer whose
packages break botocore's pins, a check that cannot reach its secrets or its store, an API
that cannot read what the checks wrote. Each function runs in a fresh interpreter with the
template's environment, against the simulated deployment (deployhealth.sim), a real
PostgreSQL, and moto's DynamoDB and Secrets Manager on loopback.

The layers are built once for the module (tests/support/lambda_layout.py): the
dependencies layer with `pip install --require-hashes` from its lock, the library layer
with its Makefile (run from a scratch copy of src/, as SAM does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from support.lambda_layout import (
    RUNTIME_SDK,
    Invocation,
    LambdaFunction,
    Layers,
    build_layers,
    copy_code,
    functions_of,
    installed_distributions,
    invoke,
    lambda_environment,
    top_level_names,
    unmet_requirements,
)
from support.template import ROOT, env_of, load_template, parameter_values, resolve

from deployhealth.model import Section
from deployhealth.sim.stun import servers_of
from deployhealth.store.dynamodb import DynamoDBStore

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimulatedDeployment
    from deployhealth.sim.postgres import LocalPostgres

EVENTS = ROOT / "events"
REGION = "us-east-1"
TEMPLATE = load_template()
FUNCTIONS = functions_of(TEMPLATE)
# In template order: the websocket echo, then its idle probe, as written.
CHECK_FUNCTIONS = [name for name, fn in FUNCTIONS.items() if fn.family]
API_FUNCTIONS = [n for n, fn in FUNCTIONS.items() if fn.code_uri.rstrip("/") == "functions/api"]
# The AWS variables the dynamodb_endpoint fixture sets (dummy credentials, no profile).
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
)
# Findings a healthy simulated deployment may still get on a loaded machine: EDB02 is the
# database's latency warning (15 ms by default), which loopback can exceed under load.
TOLERATED_CODES = {"EDB02"}
# The idle probe holds a WebSocket silent for WebsocketIdleSeconds (90 s by default); here
# it holds it for 1 s, within a 15 s deadline, to keep the test fast. Everything else about
# the idle function (its handler, layers, secrets, store) is as deployed.
IDLE_OVERRIDES = {
    "DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS": "1",
    "DEPLOYHEALTH_WEBSOCKET_DEADLINE_SECONDS": "15",
}


def event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())


# --- one emulated deployment of the template --------------------------------------------


@dataclass
class Stack:
    """The template deployed against one simulated deployment: a table, two secrets, and
    the parameter values that point the functions at them."""

    layers: Layers
    endpoint: str
    table: str
    params: dict[str, str]
    workdir: Path

    def function_setting(self, function: LambdaFunction, key: str) -> Any:
        value = function.props.get(key, TEMPLATE["Globals"]["Function"].get(key))
        return resolve(TEMPLATE, value, self.params)

    def environment(self, function: LambdaFunction) -> dict[str, str]:
        """Lambda's own variables, dummy credentials, and the template's variables."""
        variables: dict[str, str] = {}
        for key, value in env_of(TEMPLATE, function.props).items():
            resolved = resolve(TEMPLATE, value, self.params)
            if resolved == {"Ref": "AWS::NoValue"}:
                continue
            assert isinstance(resolved, str | int | float), f"{function.name}: {key}={resolved}"
            variables[key] = str(resolved)
        store = variables["DEPLOYHEALTH_STORE"]
        assert store == f"dynamodb://{self.table}?region={REGION}", store
        # The one change to the template's values: the store's endpoint is moto's.
        variables["DEPLOYHEALTH_STORE"] = f"{store}&endpoint_url={self.endpoint}"
        if float(variables.get("DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS", "0")) > 0:
            variables.update(IDLE_OVERRIDES)
        code = copy_code(function, self.workdir / "code")
        env = lambda_environment(
            function, code, self.layers, self.timeout(function), self.memory(function)
        )
        env.update({name: os.environ[name] for name in AWS_VARIABLES})
        # Powertools' Parameters (the secrets) and any other boto3 client go to moto.
        env["AWS_ENDPOINT_URL"] = self.endpoint
        env.update(variables)
        return env

    def timeout(self, function: LambdaFunction) -> float:
        return float(self.function_setting(function, "Timeout"))

    def memory(self, function: LambdaFunction) -> int:
        return int(self.function_setting(function, "MemorySize"))

    def invoke(self, function: LambdaFunction, events: list[dict[str, Any]]) -> Invocation:
        code = copy_code(function, self.workdir / "code")
        return invoke(
            function,
            code,
            self.layers,
            self.environment(function),
            events,
            timeout=self.timeout(function),
            memory=self.memory(function),
            workdir=self.workdir,
        )

    def store(self) -> DynamoDBStore:
        """The results as any reader of the table sees them (the test process's boto3)."""
        name = self.params["DeploymentName"]
        return DynamoDBStore(self.table, name, 7.0, region=REGION, endpoint_url=self.endpoint)


StackFactory = Callable[["SimulatedDeployment"], Stack]


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> Layers:
    return build_layers(tmp_path_factory.mktemp("lambda-layers"))


@pytest.fixture(scope="module")
def make_stack(
    layers: Layers,
    dynamodb_endpoint: str,
    local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StackFactory]:
    """`make_stack(sim)`: a fresh table and secrets, and the template's parameters for `sim`."""
    secrets = boto3.client("secretsmanager", region_name=REGION, endpoint_url=dynamodb_endpoint)
    stores: list[DynamoDBStore] = []

    def make(sim: SimulatedDeployment) -> Stack:
        run = uuid.uuid4().hex[:12]
        token = secrets.create_secret(
            Name=f"deployhealth/{run}/coder-token", SecretString=sim.token
        )
        database = secrets.create_secret(
            Name=f"deployhealth/{run}/database",
            # RDS's secret shape. The local server has no TLS, and an RDS secret without
            # sslmode means "require", so this one says "disable".
            SecretString=json.dumps(
                {
                    "engine": "postgres",
                    "host": local_postgres.host,
                    "port": local_postgres.port,
                    "username": local_postgres.user,
                    "password": local_postgres.password,
                    "dbname": local_postgres.database,
                    "sslmode": "disable",
                }
            ),
        )
        table = f"deployhealth-{run}"
        params = parameter_values(
            TEMPLATE,
            DeploymentName=f"lambda-{run}",
            AccessUrl=sim.url,
            CoderTokenSecret=token["Name"],
            DatabaseSecret=database["ARN"],
            StunServers=",".join(servers_of(sim)),
            HealthTable=table,
            **{"AWS::Region": REGION},
        )
        stack = Stack(layers, dynamodb_endpoint, table, params, tmp_path_factory.mktemp(run))
        store = stack.store()
        store.create_table()
        stores.append(store)
        return stack

    yield make
    for store in stores:
        store.close()


@pytest.fixture(scope="module")
def lambda_sim() -> Iterator[SimulatedDeployment]:
    """One healthy simulated deployment for the module's check and API functions."""
    from deployhealth.sim.deployment import SimulatedDeployment

    with SimulatedDeployment() as deployment:
        yield deployment


@dataclass
class Run:
    invocation: Invocation
    stored: Section | None  # the function's section in the table right after it ran


@pytest.fixture(scope="module")
def healthy(make_stack: StackFactory, lambda_sim: SimulatedDeployment) -> tuple[Stack, dict]:
    """Every check function run once, in template order, against the healthy deployment."""
    stack = make_stack(lambda_sim)
    runs: dict[str, Run] = {}
    schedule = event("schedule.json")
    with contextlib.closing(stack.store()) as store:
        for name in CHECK_FUNCTIONS:
            function = FUNCTIONS[name]
            invocation = stack.invoke(function, [schedule])
            runs[name] = Run(invocation, store.latest().get(function.family or ""))
    return stack, runs


# --- the layout -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_module_shadows_no_library(layers: Layers, name: str) -> None:
    # The function's directory comes first on sys.path: a file there named like a package
    # of the layers, the runtime or the standard library hides it from everything.
    function = FUNCTIONS[name]
    taken = {
        "library layer": top_level_names(layers.library),
        "dependencies layer": top_level_names(layers.dependencies),
        "runtime": top_level_names(layers.runtime),
        "standard library": set(sys.stdlib_module_names),
    }
    own = top_level_names(ROOT / function.code_uri) | {function.module.partition(".")[0]}
    clashes = {where: sorted(own & names) for where, names in taken.items() if own & names}
    assert not clashes, f"{name} ({function.code_uri}) shadows {clashes}"


def test_layers_merge_without_overwriting_each_other(layers: Layers) -> None:
    # Both layers unpack into /opt/python: a name in both would be overwritten by the later.
    both = top_level_names(layers.library) & top_level_names(layers.dependencies)
    assert not both, f"both layers ship {sorted(both)}"
    assert top_level_names(layers.library) == {"deployhealth"}
    shipped = installed_distributions([layers.dependencies])
    assert not set(shipped) & set(RUNTIME_SDK), "the runtime provides the SDK"


def test_distributions_on_the_lambda_path_satisfy_each_other(layers: Layers) -> None:
    # Layers come before the runtime on sys.path: the dependencies layer's jmespath,
    # python-dateutil and urllib3 are what the runtime's botocore imports, so they must lie
    # within botocore's ranges. The library's own requirements (pyproject.toml) must be met
    # too, boto3 by the runtime.
    installed = installed_distributions(layers.path)
    assert set(RUNTIME_SDK) <= set(installed)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = unmet_requirements(
        installed, {"deployhealth (pyproject.toml)": pyproject["project"]["dependencies"]}
    )
    assert problems == [], "\n".join(problems)


def test_library_layer_ships_bytecode_that_python_312_uses(layers: Layers, tmp_path: Path) -> None:
    if layers.bytecode_python is None:
        pytest.skip(f"no Python 3.12: the layer was built without bytecode\n{layers.make_output}")
    sources = sorted(layers.library.rglob("*.py"))
    assert sources
    for source in sources:
        pyc = source.parent / "__pycache__" / f"{source.stem}.cpython-312.pyc"
        assert pyc.is_file(), f"{pyc} missing"
        # PEP 552 flags: bit 0 hash-based, bit 1 check_source. Unchecked: 0b01.
        assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01, pyc
    # A copy whose sources have other mtimes, as after zipping and unzipping: the bytecode
    # must still be used as is, and nothing written (Lambda's /opt is read-only).
    copy = tmp_path / "python"
    shutil.copytree(layers.library, copy)
    for source in copy.rglob("*.py"):
        os.utime(source, (1_000_000_000, 1_000_000_000))
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    path = [str(copy), str(layers.dependencies), str(layers.runtime)]
    code = f"import sys; sys.path[:0] = {path!r}; import deployhealth.aws.check_function"
    done = subprocess.run(
        [layers.bytecode_python, "-I", "-S", "-v", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    imported = {
        line.split("'")[1]
        for line in done.stderr.splitlines()
        if line.startswith("import 'deployhealth")
    }
    used = {
        line.split("'")[1]
        for line in done.stderr.splitlines()
        if line.startswith("# code object from ") and str(copy) in line
    }
    assert len(imported) > 5, done.stderr[-4000:]
    for module in imported:
        parts = module.split(".")
        package = copy.joinpath(*parts)
        base = package if package.is_dir() else package.parent
        stem = "__init__" if package.is_dir() else parts[-1]
        assert str(base / "__pycache__" / f"{stem}.cpython-312.pyc") in used, module
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before, "files were written"


# --- the functions, invoked -------------------------------------------------------------


def check_invocation(run: Run, function: LambdaFunction) -> dict[str, Any]:
    """The invocation worked as in Lambda; returns its summary."""
    invocation = run.invocation
    assert invocation.ok, invocation.describe()
    assert invocation.module_file is not None
    assert Path(invocation.module_file).parent.name == function.name, invocation.module_file
    assert not [p for p in invocation.sys_path if "site-packages" in p], invocation.sys_path
    assert invocation.foreign_modules() == {}, "imported from outside the Lambda path"
    (summary,) = invocation.answers
    return summary


@pytest.mark.parametrize("name", CHECK_FUNCTIONS)
def test_check_function_runs_and_stores_its_section(
    healthy: tuple[Stack, dict[str, Run]], name: str
) -> None:
    _, runs = healthy
    function = FUNCTIONS[name]
    run = runs[name]
    summary = check_invocation(run, function)
    assert summary["section"] == function.family, summary
    assert summary["severity"] in ("ok", "warning"), (summary, run.invocation.describe())
    assert set(summary["codes"]) <= TOLERATED_CODES, (summary, run.invocation.describe())
    assert run.stored is not None, f"{name}: no {function.family} section in the table"
    assert run.stored.severity.value == summary["severity"]
    assert run.stored.codes == summary["codes"]


def test_both_websocket_functions_run_their_probes(healthy: tuple[Stack, dict[str, Run]]) -> None:
    _, runs = healthy
    websocket = [n for n in CHECK_FUNCTIONS if FUNCTIONS[n].family == "websocket"]
    assert len(websocket) == 2, websocket
    idle = {}
    for name in websocket:
        check_invocation(runs[name], FUNCTIONS[name])
        stored = runs[name].stored
        assert stored is not None
        idle[name] = stored.details["idle_seconds_configured"]
    # The echo runs without the idle probe; the idle function (overridden to 1 s) with it.
    assert sorted(idle.values()) == [0.0, 1.0], idle
    (idle_name,) = [n for n, seconds in idle.items() if seconds]
    stored = runs[idle_name].stored
    assert stored is not None and stored.details["idle_survived"] is True, stored.details


def emf_values(stdout: str, metric: str) -> list[float]:
    values = []
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "_aws" in record and metric in record:
            value = record[metric]
            values.append(float(value[0] if isinstance(value, list) else value))
    return values


@pytest.mark.parametrize("name", API_FUNCTIONS)
def test_api_function_answers_readyz_from_the_stored_results(
    healthy: tuple[Stack, dict[str, Run]], name: str
) -> None:
    stack, runs = healthy
    for run in runs.values():  # every check function ran healthy first
        assert run.invocation.ok, run.invocation.describe()
    names = [
        "http-healthz.json",
        "http-readyz-verbose.json",
        "http-readyz-section.json",
        "alb-readyz.json",
    ]
    invocation = stack.invoke(FUNCTIONS[name], [event(n) for n in names])
    assert invocation.ok, invocation.describe()
    assert invocation.foreign_modules() == {}, "imported from outside the Lambda path"
    answers = dict(zip(names, invocation.answers, strict=True))
    for file, answer in answers.items():
        assert answer["statusCode"] == 200, (file, answer, invocation.describe())
    verbose = answers["http-readyz-verbose.json"]["body"]
    for section in stack.params["GatingSections"].split(","):
        assert f"[+]{section} ok" in verbose, verbose
    # The readiness metric, as the dashboard and Route 53 see it (/healthz emits none).
    ready = emf_values(invocation.stdout, "Ready")
    assert ready and set(ready) == {1.0}, invocation.stdout[-4000:]


def test_derp_function_reports_a_websocket_only_relay(
    make_stack: StackFactory, sim: SimulatedDeployment
) -> None:
    # A proxy that drops "Upgrade: DERP" leaves only the WebSocket fallback, which the derp
    # family speaks with websocket-client from the dependencies layer: EDERP01, a warning.
    stack = make_stack(sim)
    sim.set_faults({"derp": "websocket-only"})
    (name,) = [n for n in CHECK_FUNCTIONS if FUNCTIONS[n].family == "derp"]
    invocation = stack.invoke(FUNCTIONS[name], [event("schedule.json")])
    summary = check_invocation(Run(invocation, None), FUNCTIONS[name])
    assert summary == {"section": "derp", "severity": "warning", "codes": ["EDERP01"]}, (
        summary,
        invocation.describe(),
    )
    with contextlib.closing(stack.store()) as store:
        stored = store.latest()["derp"]
    assert stored.severity.value == "warning"
    assert [w.code for w in stored.warnings] == ["EDERP01"]
    assert stored.errors == []
