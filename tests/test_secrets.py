"""Secret references read through Powertools Parameters, from Secrets Manager and SSM served by
moto on loopback (over HTTP, through boto3), as the Lambda functions read them in AWS."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import boto3
import pytest
from aws_lambda_powertools.utilities import parameters
from aws_lambda_powertools.utilities.parameters import base as parameters_base

from deployhealth.deadline import Deadline
from deployhealth.redact import Redactor, safe_url
from deployhealth.runner import run_family
from deployhealth.settings import Settings, SettingsError, is_ssm_reference, load_settings


@pytest.fixture
def aws(dynamodb_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The moto server (it serves every service) as the endpoint of every AWS client."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", dynamodb_endpoint)
    # Powertools keeps one provider (and its boto3 client) per process: start from fresh ones
    # so they pick up this endpoint, and from an empty value cache.
    parameters_base.DEFAULT_PROVIDERS.clear()
    parameters.clear_caches()
    yield dynamodb_endpoint
    parameters_base.DEFAULT_PROVIDERS.clear()
    parameters.clear_caches()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_database_from_an_rds_style_secret_in_secrets_manager(aws, local_postgres):
    name = unique("coder/db")
    boto3.client("secretsmanager", endpoint_url=aws).create_secret(
        Name=name,
        SecretString=json.dumps(
            {
                "host": local_postgres.host,
                "port": local_postgres.port,
                "username": local_postgres.user,
                "password": local_postgres.password,
                "dbname": local_postgres.database,
                "sslmode": "disable",
            }
        ),
    )
    settings = load_settings(
        {"DEPLOYHEALTH_DATABASE_SECRET": name, "DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS": "1000"}
    )
    section = run_family("database", settings, Deadline.after(10))
    assert section.severity.value == "ok", section.to_dict()
    assert section.details["reachable"] is True
    assert local_postgres.password not in json.dumps(section.to_dict())


def test_token_from_an_ssm_secure_string(aws):
    name = f"/{unique('deployhealth')}/coder-token"
    boto3.client("ssm", endpoint_url=aws).put_parameter(
        Name=name, Value="tok-from-ssm-4471", Type="SecureString"
    )
    settings = load_settings({"DEPLOYHEALTH_CODER_TOKEN_SECRET": name})
    assert settings.token() == "tok-from-ssm-4471"
    assert "tok-from-ssm-4471" not in repr(settings)


def test_a_missing_secret_is_a_clear_edb01_naming_the_setting(aws):
    settings = load_settings({"DEPLOYHEALTH_DATABASE_SECRET": unique("missing/secret")})
    with pytest.raises(SettingsError) as caught:
        settings.database()
    assert caught.value.key == "DEPLOYHEALTH_DATABASE_SECRET"
    assert "could not read secret" in str(caught.value)

    section = run_family("database", settings, Deadline.after(10))
    assert section.severity.value == "error"
    assert section.error is not None and section.error.startswith("EDB01")
    assert "DEPLOYHEALTH_DATABASE_SECRET" in section.error


@pytest.mark.parametrize(
    ("reference", "in_ssm"),
    [
        ("/coder/token", True),
        ("arn:aws:ssm:us-east-1:123456789012:parameter/coder/token", True),
        ("arn:aws-cn:ssm:cn-north-1:123456789012:parameter/coder/token", True),
        ("arn:aws-us-gov:ssm:us-gov-west-1:123456789012:parameter/coder/token", True),
        ("arn:aws-cn:secretsmanager:cn-north-1:123456789012:secret:coder-AbCdEf", False),
        ("coder/token", False),
    ],
)
def test_ssm_parameter_arns_are_recognised_in_every_partition(reference, in_ssm):
    # The template's CoderTokenSecretInSsm condition reads the third ARN field the same way.
    assert is_ssm_reference(reference) is in_ssm


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://admin:hunter2@coder.example.com/", "https://coder.example.com/"),
        ("https://tok3n@coder.example.com:8443/x", "https://coder.example.com:8443/x"),
        (
            "https://coder.example.com/m.json?token=abc&v=2",
            "https://coder.example.com/m.json?token=***&v=2",
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=f00&x=1",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1",
        ),
        ("https://coder.example.com/?v=2", "https://coder.example.com/?v=2"),
        ("not a url", "not a url"),
    ],
)
def test_safe_url_drops_userinfo_and_masks_token_parameters(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_the_redactor_masks_what_url_settings_carry() -> None:
    settings = Settings(
        access_url="https://ops:Acc3ss-pw@coder.example.com/",
        derp_map="https://coder.example.com/derp.json?token=D3rp-token",
    )
    redactor = Redactor.for_settings(settings)
    text = redactor.scrub(
        "GET https://ops:Acc3ss-pw@coder.example.com/x failed; map ?token=D3rp-token; ops ok"
    )
    assert "Acc3ss-pw" not in text and "D3rp-token" not in text
    assert text.endswith("ops ok")  # a user name alone is no secret: not masked elsewhere
