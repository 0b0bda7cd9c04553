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
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint_file
from cfnlint.decode import cfn_yaml

from deployhealth.checks import FAMILIES
from deployhealth.settings import ENV_PREFIX, known_keys

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"

# Every family the library runs has its scheduled function.
EXPECTED_FAMILIES = FAMILIES
PUBLIC_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/readyz/{section}")}
IAM_ROUTES = {
    ("GET", "/api/v2/debug/health"),
    ("GET", "/api/v2/debug/health/history"),
    ("GET", "/api/v2/debug/health/settings"),
    ("PUT", "/api/v2/debug/health/settings"),
    ("GET", "/health"),
}


# --- helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # Plain dicts and lists; intrinsic functions stay as {"Ref": ...}, {"Fn::Sub": ...}.
    return json.loads(json.dumps(cfn_yaml.load(str(TEMPLATE))))


def resources_of(template: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == rtype}


def functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return resources_of(template, "AWS::Serverless::Function")


def function_for_family(template: dict[str, Any], family: str) -> tuple[str, dict[str, Any]]:
    for name, fn in functions(template).items():
        props = fn["Properties"]
        if (
            props.get("CodeUri", "").rstrip("/") == "functions/checks"
            and props.get("Handler") == f"{family}.handler"
        ):
            return name, props
    raise AssertionError(f"no function runs functions/checks/{family}.py")


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
    name, props = function_for_family(template, family)
    schedules = [e for e in props["Events"].values() if e["Type"] == "Schedule"]
    assert len(schedules) == 1, f"{name}: one schedule"
    assert schedules[0]["Properties"]["RetryPolicy"]["MaximumRetryAttempts"] == 0
    # EventBridge invokes asynchronously: Lambda's own retries must be off as well.
    assert props["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
    assert props["Timeout"] > float(
        props["Environment"]["Variables"][f"DEPLOYHEALTH_{family.upper()}_DEADLINE_SECONDS"]
    )


def test_every_library_family_is_deployed(template: dict[str, Any]) -> None:
    for family in FAMILIES:
        function_for_family(template, family)


def test_every_function_has_its_own_log_group_and_alarms(template: dict[str, Any]) -> None:
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
        assert watched == {"Errors", "Throttles"}, name


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


def test_api_function_outlives_a_forced_run(template: dict[str, Any]) -> None:
    fns = functions(template).values()
    (api,) = [f for f in fns if f["Properties"]["Handler"] == "app.handler"]
    assert api["Properties"]["Timeout"] >= 30  # force runs every family within 25 s


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
    assert sections == set(EXPECTED_FAMILIES)


def test_composite_alarm_covers_every_severity_alarm(template: dict[str, Any]) -> None:
    (composite,) = resources_of(template, "AWS::CloudWatch::CompositeAlarm").values()
    rule = json.dumps(composite["Properties"]["AlarmRule"])
    for name in severity_alarms(template):
        assert "${" + name + "}" in rule, name


def test_every_alarm_notifies_the_topic(template: dict[str, Any]) -> None:
    for kind in ("AWS::CloudWatch::Alarm", "AWS::CloudWatch::CompositeAlarm"):
        for name, alarm in resources_of(template, kind).items():
            assert alarm["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}], name


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
    requirements = (ROOT / deps["Properties"]["ContentUri"] / "requirements.txt").read_text()
    names = {
        re.split(r"[<>=!~ \[]", line.strip(), maxsplit=1)[0].lower()
        for line in requirements.splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert names == {"aws-lambda-powertools", "requests", "pg8000", "websocket-client", "pynacl"}


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
