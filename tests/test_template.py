"""What a deployer relies on in template.yaml, checked without an AWS account.

cfn-lint runs SAM's transform locally, so (a) catches both CloudFormation and SAM mistakes.
The rest reads the template as written (short tags such as !Ref kept as {"Ref": ...} by
cfn-lint's decoder) and checks the promises of product.md: handlers exist, every family is
scheduled without retries, the probe routes are public and the rest IAM-only, missing data
alarms, and only known environment variable names are set.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint_file
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.template import env_of, load_template, parameter_values, resolve

from deployhealth.api.app import FORCE_MAX_SECONDS
from deployhealth.checks import FAMILIES
from deployhealth.model import SECTION_NAMES
from deployhealth.settings import ENV_PREFIX, known_keys, load_settings

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"

# Every family the library runs has its scheduled function.
EXPECTED_FAMILIES = FAMILIES
# Families that read the inventory (proxies, provisioner daemons, replicas).
INVENTORY_FAMILIES = ("workspace_proxy", "provisioner_daemons", "entitlements")
PUBLIC_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/readyz/{section}")}
IAM_ROUTES = {
    ("GET", "/api/v2/debug/health"),
    ("GET", "/api/v2/debug/health/history"),
    ("GET", "/api/v2/debug/health/settings"),
    ("PUT", "/api/v2/debug/health/settings"),
    ("GET", "/health"),
    ("GET", "/health/codes"),
}


# --- helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # Plain dicts and lists; intrinsic functions stay as {"Ref": ...}, {"Fn::Sub": ...}.
    return load_template(TEMPLATE)


def resources_of(template: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == rtype}


def functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return resources_of(template, "AWS::Serverless::Function")


def functions_for_family(template: dict[str, Any], family: str) -> dict[str, dict[str, Any]]:
    """Every function that runs functions/checks/<family>/ (websocket has two)."""
    return {
        name: fn["Properties"]
        for name, fn in functions(template).items()
        if fn["Properties"].get("CodeUri", "").rstrip("/") == f"functions/checks/{family}"
    }


def function_for_family(template: dict[str, Any], family: str) -> tuple[str, dict[str, Any]]:
    """The family's function on the check interval (for websocket: the echo, not the idle probe)."""
    for name, props in functions_for_family(template, family).items():
        (schedule,) = [e for e in props["Events"].values() if e["Type"] == "Schedule"]
        if schedule["Properties"]["Schedule"] == {
            "Fn::FindInMap": ["Interval", {"Ref": "CheckIntervalMinutes"}, "Rate"]
        }:
            return name, props
    raise AssertionError(f"no function runs functions/checks/{family}/ every check interval")


def deployed_families(template: dict[str, Any]) -> set[str]:
    return {
        code_uri.rstrip("/").rpartition("/")[2]
        for fn in functions(template).values()
        if (code_uri := fn["Properties"].get("CodeUri", "")).startswith("functions/checks/")
    }


def policies_of(template: dict[str, Any], props: dict[str, Any], params: dict[str, str]) -> list:
    """A function's policies for these parameter values (AWS::NoValue dropped)."""
    out = [resolve(template, p, params) for p in props.get("Policies", [])]
    return [p for p in out if p != {"Ref": "AWS::NoValue"}]


def env_vars(template: dict[str, Any]) -> dict[str, Any]:
    """Every environment variable the template sets, globally or per function."""
    out = dict(template["Globals"]["Function"]["Environment"]["Variables"])
    for fn in functions(template).values():
        out.update(fn["Properties"].get("Environment", {}).get("Variables", {}))
    return out


# --- (a) cfn-lint -----------------------------------------------------------------------


def test_cfn_lint_reports_nothing() -> None:
    matches = lint_file(TEMPLATE, ManualArgs(regions=["us-east-1"]))
    assert [str(m) for m in matches] == []


# --- (b) what users rely on --------------------------------------------------------------


def test_every_handler_file_exists_in_its_code_uri(template: dict[str, Any]) -> None:
    fns = functions(template)
    assert fns
    for name, fn in fns.items():
        props = fn["Properties"]
        module, _, attr = props["Handler"].rpartition(".")
        path = ROOT / props["CodeUri"] / f"{module.replace('.', '/')}.py"
        assert path.is_file(), f"{name}: {path} missing"
        assert re.search(
            rf"^\s*(from .+ import .*\b{attr}\b|{attr}\s*=|def {attr}\b)", path.read_text(), re.M
        ), f"{name}: {path} defines no {attr}"


def test_function_code_holds_no_logic() -> None:
    for path in (ROOT / "functions").rglob("*.py"):
        code = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        assert len(code) <= 6, f"{path} should only call the library"
        assert "deployhealth" in path.read_text()


@pytest.mark.parametrize("family", EXPECTED_FAMILIES)
def test_family_runs_on_a_schedule_without_retries(template: dict[str, Any], family: str) -> None:
    function_for_family(template, family)  # one on the check interval, at least
    for name, props in functions_for_family(template, family).items():
        schedules = [e for e in props["Events"].values() if e["Type"] == "Schedule"]
        assert len(schedules) == 1, f"{name}: one schedule"
        assert schedules[0]["Properties"]["RetryPolicy"]["MaximumRetryAttempts"] == 0
        # EventBridge invokes asynchronously: Lambda's own retries must be off as well.
        assert props["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
        # Timeout and deadline may come from a mapping: check every allowed parameter value.
        for params in every_value_of(template, "WebsocketIdleSeconds"):
            timeout = float(resolve(template, props["Timeout"], params))
            deadline = float(
                resolve(
                    template,
                    props["Environment"]["Variables"][
                        f"DEPLOYHEALTH_{family.upper()}_DEADLINE_SECONDS"
                    ],
                    params,
                )
            )
            assert timeout == deadline + 5, name  # start-up and the store write
            assert timeout <= 900, name  # Lambda's maximum


def every_value_of(template: dict[str, Any], parameter: str) -> list[dict[str, str]]:
    allowed = template["Parameters"][parameter]["AllowedValues"]
    return [parameter_values(template, **{parameter: str(v)}) for v in allowed]


def test_every_library_family_is_deployed(template: dict[str, Any]) -> None:
    for family in FAMILIES:
        function_for_family(template, family)
    # ... and the template deploys no family the library does not know.
    assert deployed_families(template) <= set(SECTION_NAMES)


def test_websocket_echo_runs_every_interval_without_the_idle_probe(
    template: dict[str, Any],
) -> None:
    _, props = function_for_family(template, "websocket")
    assert props["Environment"]["Variables"]["DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS"] == "0"
    assert float(props["Environment"]["Variables"]["DEPLOYHEALTH_WEBSOCKET_DEADLINE_SECONDS"]) == 15


def websocket_idle_function(template: dict[str, Any]) -> dict[str, Any]:
    echo, _ = function_for_family(template, "websocket")
    others = {k: v for k, v in functions_for_family(template, "websocket").items() if k != echo}
    assert list(others) == ["WebsocketIdleCheckFunction"]
    return others["WebsocketIdleCheckFunction"]


def test_websocket_idle_probe_has_its_own_schedule(template: dict[str, Any]) -> None:
    props = websocket_idle_function(template)
    (schedule,) = [e for e in props["Events"].values() if e["Type"] == "Schedule"]
    rate = schedule["Properties"]["Schedule"]
    assert rate == {
        "Fn::FindInMap": ["IdleSchedule", {"Ref": "WebsocketIdleScheduleMinutes"}, "Rate"]
    }
    parameter = template["Parameters"]["WebsocketIdleScheduleMinutes"]
    assert parameter["Default"] == "60"  # hourly: each run is billed for its idle window
    assert [str(v) for v in parameter["AllowedValues"]] == ["5", "10", "15", "30", "60"]
    for params in every_value_of(template, "WebsocketIdleScheduleMinutes"):
        minutes = int(params["WebsocketIdleScheduleMinutes"])
        text = resolve(template, rate, params)
        number, unit = re.fullmatch(r"rate\((\d+) (minutes|hour)\)", text).groups()
        assert int(number) * (60 if unit == "hour" else 1) == minutes, text
        assert resolve(
            template,
            {"Fn::FindInMap": ["IdleSchedule", {"Ref": "WebsocketIdleScheduleMinutes"}, "Seconds"]},
            params,
        ) == str(60 * minutes)


def settings_from(environ: dict[str, str], tmp_path: Path) -> Any:
    """The library's settings from these variables alone (no ./deployhealth.toml)."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return load_settings(environ, config_file=empty)


def test_websocket_idle_probe_outlasts_an_alb_idle_timeout(
    template: dict[str, Any], tmp_path: Path
) -> None:
    props = websocket_idle_function(template)
    env = props["Environment"]["Variables"]
    assert env["DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS"] == {"Ref": "WebsocketIdleSeconds"}
    # Longer than an AWS ALB's default idle timeout (60 s), so that the probe catches it.
    assert float(template["Parameters"]["WebsocketIdleSeconds"]["Default"]) > 60
    for params in every_value_of(template, "WebsocketIdleSeconds"):
        idle = float(resolve(template, env["DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS"], params))
        deadline = resolve(template, env["DEPLOYHEALTH_WEBSOCKET_DEADLINE_SECONDS"], params)
        # The deadline covers the silence plus the dial and the echoes around it ...
        assert float(deadline) >= idle + 20, params["WebsocketIdleSeconds"]
        # ... and the library accepts both values (it caps deadlines).
        settings = settings_from(
            {
                "DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS": str(idle),
                "DEPLOYHEALTH_WEBSOCKET_DEADLINE_SECONDS": str(deadline),
            },
            tmp_path,
        )
        assert settings.websocket_idle_seconds == idle
        assert settings.deadline_for("websocket") == float(deadline)
    # The token is needed to dial /api/v2/debug/ws.
    params = parameter_values(template, CoderTokenSecret="coder/token")
    assert {"Ref": "CoderTokenSecretReadPolicy"} in policies_of(template, props, params)


SECRET_POLICIES = ({"Ref": "CoderTokenSecretReadPolicy"}, {"Ref": "DatabaseSecretReadPolicy"})
PRIVATE_DB = {
    "DatabaseSecret": "coder/db",
    "DatabaseSubnetIds": "subnet-1,subnet-2",
    "DatabaseSecurityGroupIds": "sg-1",
}


@pytest.mark.parametrize(
    ("overrides", "reads_database"),
    [
        # automatic: api with a token, else database with a database secret
        ({"CoderTokenSecret": "coder/token", **PRIVATE_DB}, False),
        ({**PRIVATE_DB}, True),
        ({"InventorySource": "database", "CoderTokenSecret": "coder/token", **PRIVATE_DB}, True),
        ({"InventorySource": "api", **PRIVATE_DB}, False),
        ({"InventorySource": "static", **PRIVATE_DB}, False),
        ({"InventorySource": "database", "DatabaseSecret": "coder/db"}, True),  # public DB
    ],
)
def test_inventory_functions_reach_the_database_only_when_they_read_it(
    template: dict[str, Any], overrides: dict[str, str], reads_database: bool
) -> None:
    params = parameter_values(template, **overrides)
    in_vpc = reads_database and bool(params["DatabaseSubnetIds"])
    for family in INVENTORY_FAMILIES:
        name, props = function_for_family(template, family)
        policies = policies_of(template, props, params)
        has_token = bool(params["CoderTokenSecret"])
        assert ({"Ref": "CoderTokenSecretReadPolicy"} in policies) == has_token, name
        assert ({"Ref": "DatabaseSecretReadPolicy"} in policies) == reads_database, name
        vpc = resolve(template, props.get("VpcConfig", {"Ref": "AWS::NoValue"}), params)
        if in_vpc:
            assert vpc == {"SubnetIds": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
        else:
            assert vpc == {"Ref": "AWS::NoValue"}, name
        assert env_of(template, props)["DEPLOYHEALTH_INVENTORY"] == {"Ref": "InventorySource"}


def test_inventory_source_parameter_matches_the_library(
    template: dict[str, Any], tmp_path: Path
) -> None:
    parameter = template["Parameters"]["InventorySource"]
    assert parameter["Default"] == ""
    for value in parameter["AllowedValues"]:
        # "" is the library's automatic choice, not an error.
        settings = settings_from({"DEPLOYHEALTH_INVENTORY": value}, tmp_path)
        assert settings.inventory == (value or None)
    concurrency = template["Parameters"]["ProxyConcurrency"]
    for bound in ("Default", "MinValue", "MaxValue"):
        settings = settings_from(
            {"DEPLOYHEALTH_PROXY_CONCURRENCY": str(concurrency[bound])}, tmp_path
        )
        assert settings.proxy_concurrency == int(concurrency[bound])
    settings = settings_from(
        {"DEPLOYHEALTH_PROXY_CONCURRENCY": str(concurrency["Default"])}, tmp_path
    )
    assert settings.proxy_concurrency == int(concurrency["Default"])


@pytest.mark.parametrize("family", ["access_url", "derp"])
def test_families_without_secrets_get_no_secret_policy(
    template: dict[str, Any], family: str
) -> None:
    params = parameter_values(template, CoderTokenSecret="coder/token", **PRIVATE_DB)
    for name, props in functions_for_family(template, family).items():
        policies = policies_of(template, props, params)
        assert not [p for p in policies if p in SECRET_POLICIES], name
        assert "VpcConfig" not in props, name


def test_every_function_has_its_own_log_group_and_only_the_api_an_errors_alarm(
    template: dict[str, Any],
) -> None:
    alarms = resources_of(template, "AWS::CloudWatch::Alarm").values()
    for name, fn in functions(template).items():
        group = fn["Properties"]["LoggingConfig"]["LogGroup"]
        assert template["Resources"][group["Ref"]]["Type"] == "AWS::Logs::LogGroup"
        watched = {
            a["Properties"]["MetricName"]
            for a in alarms
            if a["Properties"]["Namespace"] == "AWS/Lambda"
            and {"Name": "FunctionName", "Value": {"Ref": name}} in a["Properties"]["Dimensions"]
        }
        # A check function that fails emits no SectionSeverity: its section alarm (missing
        # data breaches) pages, so an Errors alarm of its own would only cost and page twice.
        expected = {"Errors", "Throttles"} if name == "ApiFunction" else set()
        assert watched == expected, name


def api_routes(template: dict[str, Any]) -> dict[tuple[str, str], Any]:
    routes: dict[tuple[str, str], Any] = {}
    for fn in functions(template).values():
        for event in fn["Properties"].get("Events", {}).values():
            if event["Type"] == "HttpApi":
                p = event["Properties"]
                routes[(p["Method"].upper(), p["Path"])] = p.get("Auth", {}).get("Authorizer")
    return routes


def test_probe_routes_are_public_and_the_rest_need_iam(template: dict[str, Any]) -> None:
    routes = api_routes(template)
    assert set(routes) == PUBLIC_ROUTES | IAM_ROUTES
    for route in PUBLIC_ROUTES:
        assert routes[route] == "NONE", route
    for route in IAM_ROUTES:
        assert routes[route] == "AWS_IAM", route
    # Anything added later without an explicit Auth is IAM-only, not public.
    (api,) = resources_of(template, "AWS::Serverless::HttpApi").values()
    assert api["Properties"]["Auth"]["DefaultAuthorizer"] == "AWS_IAM"
    assert api["Properties"]["Auth"]["EnableIamAuthorizer"] is True


def test_api_function_outlives_a_forced_run_inside_api_gateways_limit(
    template: dict[str, Any],
) -> None:
    fns = functions(template).values()
    (api,) = [f for f in fns if f["Properties"]["CodeUri"].rstrip("/") == "functions/api"]
    # A forced run answers within FORCE_MAX_SECONDS; API Gateway gives the integration 30 s,
    # and a function still running then leaves the client a 503 from API Gateway itself.
    assert FORCE_MAX_SECONDS < api["Properties"]["Timeout"] < 30


def severity_alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v
        for k, v in resources_of(template, "AWS::CloudWatch::Alarm").items()
        if v["Properties"]["MetricName"] == "SectionSeverity"
    }


def test_severity_alarms_treat_missing_data_as_breaching(template: dict[str, Any]) -> None:
    alarms = severity_alarms(template)
    sections = set()
    for name, alarm in alarms.items():
        p = alarm["Properties"]
        assert p["TreatMissingData"] == "breaching", name
        assert p["Namespace"] == "DeployHealth"
        dims = {d["Name"]: d["Value"] for d in p["Dimensions"]}
        # The alarm fires where readiness fails: access_url above ok, the others at error.
        failing_level = 1 if dims.get("Section") == "access_url" else 2
        assert p["Threshold"] == failing_level, name
        assert p["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert set(dims) == {"Deployment", "Section"}, name
        assert dims["Deployment"] == {"Ref": "DeploymentName"}
        sections.add(dims["Section"])
    # One severity alarm per deployed family (a superset of the library's FAMILIES).
    assert sections == deployed_families(template)
    assert sections >= set(EXPECTED_FAMILIES)


def test_composite_alarm_covers_every_severity_alarm(template: dict[str, Any]) -> None:
    (composite,) = resources_of(template, "AWS::CloudWatch::CompositeAlarm").values()
    rule = json.dumps(composite["Properties"]["AlarmRule"])
    for name in severity_alarms(template):
        assert "${" + name + "}" in rule, name


def test_one_incident_pages_once_and_nothing_sends_ok_notices(template: dict[str, Any]) -> None:
    """A section at error pages through the composite alarm only, not a second time through
    its own severity alarm; every other alarm (a function failing) notifies the topic."""
    for kind in ("AWS::CloudWatch::Alarm", "AWS::CloudWatch::CompositeAlarm"):
        for name, alarm in resources_of(template, kind).items():
            props = alarm["Properties"]
            assert "OKActions" not in props, name
            if props.get("MetricName") == "SectionSeverity":
                assert "AlarmActions" not in props, name
            else:
                assert props["AlarmActions"] == [{"Ref": "AlarmTopic"}], name


def test_severity_alarms_tolerate_one_late_datapoint(template: dict[str, Any]) -> None:
    # EMF lands through CloudWatch Logs, sometimes a period late: missing data breaches, but
    # it takes three breaching periods of four, so one late datapoint never alarms alone.
    for name, alarm in severity_alarms(template).items():
        props = alarm["Properties"]
        assert props["TreatMissingData"] == "breaching", name
        assert (props["DatapointsToAlarm"], props["EvaluationPeriods"]) == (3, 4), name


def test_only_known_environment_variable_names(template: dict[str, Any]) -> None:
    # The library refuses unknown DEPLOYHEALTH_* names, so a typo here would fail every run.
    allowed = {ENV_PREFIX + key for key in known_keys()}
    for name in env_vars(template):
        assert name.startswith("POWERTOOLS_") or name in allowed, name


def test_environment_agrees_with_the_alarms(template: dict[str, Any]) -> None:
    env = env_vars(template)
    assert env["DEPLOYHEALTH_METRICS_NAMESPACE"] == env["POWERTOOLS_METRICS_NAMESPACE"]
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "DeployHealth"
    assert env["DEPLOYHEALTH_NAME"] == {"Ref": "DeploymentName"}
    assert env["DEPLOYHEALTH_STORE"] == {
        "Fn::Sub": "dynamodb://${HealthTable}?region=${AWS::Region}"
    }


def test_table_keys_ttl_and_recovery(template: dict[str, Any]) -> None:
    (table,) = resources_of(template, "AWS::DynamoDB::Table").values()
    p = table["Properties"]
    assert p["BillingMode"] == "PAY_PER_REQUEST"
    assert {(k["AttributeName"], k["KeyType"]) for k in p["KeySchema"]} == {
        ("pk", "HASH"),
        ("sk", "RANGE"),
    }
    assert p["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert p["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True


def test_gating_default_matches_product_md(template: dict[str, Any]) -> None:
    default = template["Parameters"]["GatingSections"]["Default"]
    assert default.split(",") == ["access_url", "database", "websocket", "derp", "entitlements"]


def test_layers_build_for_python_312_arm64(template: dict[str, Any]) -> None:
    layers = resources_of(template, "AWS::Serverless::LayerVersion")
    assert set(layers) == {"DependenciesLayer", "DeployHealthLibraryLayer"}
    deps, lib = layers["DependenciesLayer"], layers["DeployHealthLibraryLayer"]
    assert deps["Metadata"]["BuildMethod"] == "python3.12"
    assert (ROOT / deps["Properties"]["ContentUri"] / "requirements.txt").is_file()
    assert lib["Metadata"]["BuildMethod"] == "makefile"
    makefile = ROOT / lib["Metadata"]["ContextPath"] / "Makefile"
    assert "build-DeployHealthLibraryLayer:" in makefile.read_text()
    assert (ROOT / lib["Properties"]["ContentUri"] / "deployhealth").is_dir()
    for layer in layers.values():
        assert layer["Metadata"]["BuildArchitecture"] == "arm64"
        assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
        assert layer["Properties"]["CompatibleRuntimes"] == ["python3.12"]
    # requirements.in: the top-level packages, pyproject's dependencies but boto3 (the runtime
    # ships it). requirements.txt: their lock (`make lock`), every package pinned and hashed.
    content = ROOT / deps["Properties"]["ContentUri"]
    top = {
        canonicalize_name(Requirement(line).name)
        for line in (content / "requirements.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert top == {
        "aws-lambda-powertools", "requests", "pg8000", "websocket-client", "pynacl", "uvloop"
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert top == {canonicalize_name(Requirement(r).name) for r in pyproject["dependencies"]} - {
        "boto3"
    }
    lock = (content / "requirements.txt").read_text().replace("\\\n", " ")
    entries = [line for line in lock.splitlines() if line.strip() and line.lstrip()[0] != "#"]
    pinned = {}
    for entry in entries:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", entry)
        assert match, f"not pinned with hashes: {entry[:120]}"
        pinned[canonicalize_name(match[1])] = match[2]
    assert top <= set(pinned)
    assert not {"boto3", "botocore", "s3transfer"} & set(pinned), "the runtime ships the SDK"


def test_events_are_valid_json() -> None:
    files = sorted((ROOT / "events").glob("*.json"))
    assert {f.name for f in files} >= {
        "schedule.json",
        "http-healthz.json",
        "http-readyz-verbose.json",
        "http-readyz-section.json",
        "http-health-report.json",
        "http-settings-put.json",
        "http-unknown-route.json",
        "alb-healthz.json",
        "alb-readyz.json",
        "alb-readyz-exclude.json",
    }
    for f in files:
        event = json.loads(f.read_text())
        if f.name.startswith("http-"):
            assert event["version"] == "2.0"
            assert event["rawPath"] == event["requestContext"]["http"]["path"]
            path = event["rawPath"]
            protected = path.startswith("/api/") or path == "/health"
            assert ("authorizer" in event["requestContext"]) == protected, f.name
        elif f.name.startswith("alb-"):
            assert "elb" in event["requestContext"]
            # An ALB sends either the single-value or the multi-value fields, never both.
            assert ("headers" in event) != ("multiValueHeaders" in event), f.name


# --- dashboard ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard(template: dict[str, Any]) -> dict[str, Any]:
    """The dashboard body as CloudWatch receives it, with placeholder values substituted."""
    (board,) = resources_of(template, "AWS::CloudWatch::Dashboard").values()
    text, variables = board["Properties"]["DashboardBody"]["Fn::Sub"]

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name.startswith("!"):
            return "${" + name[1:] + "}"  # Fn::Sub's escape for a literal ${...}
        if name in variables:
            return "60"
        return "X" + re.sub(r"\W", "", name)

    body = re.sub(r"\$\{([^}]+)\}", value, text)
    return json.loads(body)


def widget_metrics(dashboard: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    return [
        (w["properties"]["title"], m)
        for w in dashboard["widgets"]
        if w["type"] == "metric"
        for m in w["properties"]["metrics"]
    ]


def test_dashboard_shows_every_section_severity(dashboard: dict[str, Any]) -> None:
    (widget,) = [
        w for w in dashboard["widgets"] if w["properties"]["title"].startswith("Section severity")
    ]
    rows = widget["properties"]["metrics"]
    assert rows[0][:5] == [
        "DeployHealth",
        "SectionSeverity",
        "Deployment",
        "XDeploymentName",
        "Section",
    ]
    sections = [rows[0][5]] + [r[1] for r in rows[1:] if r[0] == "..."]
    assert sections == list(SECTION_NAMES)


def test_dashboard_queries_per_item_values_from_the_logs(dashboard: dict[str, Any]) -> None:
    """Per-item values are EMF properties, not metrics: the dashboard reads them with Logs
    Insights over the families' own log groups."""
    queries = {
        w["properties"]["title"]: w["properties"]["query"]
        for w in dashboard["widgets"]
        if w["type"] == "log"
    }
    derp = [q for q in queries.values() if "unnest record.derp_regions" in q]
    proxies = [q for q in queries.values() if "unnest record.proxies" in q]
    assert len(derp) == 1 and len(proxies) == 1
    assert derp[0].startswith("SOURCE '/aws/lambda/XAWSStackName/derp' |")
    assert proxies[0].startswith("SOURCE '/aws/lambda/XAWSStackName/workspace_proxy' |")
    (durations,) = [q for t, q in queries.items() if t.startswith("Check duration")]
    for family in FAMILIES:
        assert f"SOURCE '/aws/lambda/XAWSStackName/{family}'" in durations, family


def test_dashboard_reads_only_the_fixed_metric_set(dashboard: dict[str, Any]) -> None:
    named = {m[1] for _, m in widget_metrics(dashboard) if m and m[0] == "DeployHealth"}
    assert named == {"SectionSeverity", "Ready"}


def test_dashboard_shows_every_function_s_errors(
    template: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    shown = {m[-1] for title, m in widget_metrics(dashboard) if title.startswith("Function errors")}
    for name in functions(template):
        assert "X" + name in shown, name


def test_the_api_stays_out_of_the_vpc_and_its_forced_runs_skip_what_it_cannot_reach(
    template: dict[str, Any],
) -> None:
    private = {"DatabaseSubnetIds": "subnet-1,subnet-2", "DatabaseSecurityGroupIds": "sg-1"}
    for inventory in ("api", "database"):
        params = parameter_values(
            template, InventorySource=inventory, DatabaseSecret="coder/db", **private
        )
        in_vpc = {
            name
            for name, fn in functions(template).items()
            if resolve(template, fn["Properties"].get("VpcConfig"), params)
            not in (None, {"Ref": "AWS::NoValue"})
        }
        assert "ApiFunction" not in in_vpc
        api = template["Resources"]["ApiFunction"]["Properties"]
        skipped = resolve(template, env_of(template, api), params)[
            "DEPLOYHEALTH_FORCE_SKIP_SECTIONS"
        ].split(",")
        for name in in_vpc:
            family = template["Resources"][name]["Properties"]["CodeUri"].rstrip("/")
            assert family.rpartition("/")[2] in skipped, (inventory, name)
    # Without a private database a forced run runs every family.
    api = template["Resources"]["ApiFunction"]["Properties"]
    env = resolve(template, env_of(template, api), parameter_values(template))
    assert env["DEPLOYHEALTH_FORCE_SKIP_SECTIONS"] == ""


def test_each_function_may_touch_only_its_own_keys_and_never_scan_or_delete(
    template: dict[str, Any],
) -> None:
    for name, fn in functions(template).items():
        policies = fn["Properties"]["Policies"]
        assert not any(isinstance(p, dict) and "DynamoDBCrudPolicy" in p for p in policies), name
        statements = [
            st
            for p in policies
            if isinstance(p, dict) and "Statement" in p
            for st in p["Statement"]
            if st["Resource"] == {"Fn::GetAtt": ["HealthTable", "Arn"]}
        ]
        assert len(statements) == 1, name
        (statement,) = statements
        actions = statement["Action"]
        actions = {actions} if isinstance(actions, str) else set(actions)
        assert actions <= {"dynamodb:PutItem", "dynamodb:Query", "dynamodb:GetItem"}, name
        ((operator, keys),) = statement["Condition"].items()
        allowed = {k["Fn::Sub"] for k in keys["dynamodb:LeadingKeys"]}
        code_uri = fn["Properties"]["CodeUri"].rstrip("/")
        if code_uri == "functions/api":
            assert operator == "ForAllValues:StringLike", name
            assert allowed == {"${DeploymentName}#latest", "${DeploymentName}#history#*"}
        else:
            family = code_uri.rpartition("/")[2]
            assert operator == "ForAllValues:StringEquals", name
            assert allowed == {"${DeploymentName}#latest", f"${{DeploymentName}}#history#{family}"}
