"""Lambda entry points: the API function and one scheduled function per check family.

The handlers in functions/ hold no logic; they bind these. Everything a cold start needs is
built on first use and kept for the life of the execution environment: settings, the store
(and with it its boto3 client), the API's routes. Metric records (EMF) and logs both go to
stdout, where CloudWatch Logs picks them up.

Import cost matters here, because it is paid on every cold start: boto3 arrives with the
DynamoDB store on first use, and the check families only when a family runs.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers

from deployhealth.api.app import ApiApp, ApiContext, create_app
from deployhealth.checks import FAMILIES
from deployhealth.metrics import MetricsSink
from deployhealth.runner import run_and_record
from deployhealth.settings import Settings, SettingsError, load_settings
from deployhealth.store import ResultStore, StoreUnavailable, open_store

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME") or "deployhealth")
# The library logs through stdlib loggers under `deployhealth`. Under the default service name
# they propagate into this Logger; under another, they need its JSON handler copied to them.
copy_config_to_registered_loggers(source_logger=logger, include={"deployhealth"})

_lock = threading.Lock()
_api_app: ApiApp | None = None


def api_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The API function: HTTP API (payload 2.0) and ALB events. Never raises.

    A raised exception would reach the client as API Gateway's or the ALB's own 502, which
    a load balancer reads as "deployhealth is down"; the app turns everything into an answer.
    """
    return _api()(event, context)


def _api() -> ApiApp:
    global _api_app
    if _api_app is None:
        with _lock:
            if _api_app is None:
                context = ApiContext.from_environment(metrics_stream=sys.stdout)
                if context.settings_error is not None:
                    # Answering beats crashing: /healthz stays 200, /readyz says 503 and why,
                    # the other routes 500 naming the setting (never its value).
                    logger.error("invalid settings", extra={"error": str(context.settings_error)})
                _api_app = create_app(context)
    return _api_app


@dataclass
class _Warm:
    """What one scheduled function keeps between invocations of a warm environment."""

    settings: Settings | None = None
    store: ResultStore | None = None


def check_handler(family: str) -> Handler:
    """The scheduled function of one family: run it, store the section, emit its metrics.

    Returns `{"section", "severity", "codes"}`. A store that cannot be written is logged
    and raised, so that the function's Errors alarm fires: a family that silently stops
    recording would otherwise look healthy until its results went stale.
    """
    if family not in FAMILIES:
        # Raised when the function's module is imported: a misnamed handler fails at once.
        raise ValueError(f"no check family {family!r}; families: {', '.join(FAMILIES)}")
    warm = _Warm()

    @logger.inject_lambda_context(clear_state=True)
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        logger.append_keys(section=family)
        settings = _settings(warm)
        store = _store(warm, settings)
        metrics = MetricsSink(settings.metrics_namespace, settings.name, sys.stdout)
        sections, store_errors = run_and_record(settings, [family], store, metrics)
        section = sections[family]
        summary = {"section": family, "severity": section.severity.value, "codes": section.codes}
        logger.info(
            "check finished",
            extra={
                **summary,
                "deployment": settings.name,
                "duration_ms": round(section.duration_ms, 1),
            },
        )
        if store_errors:
            for problem in store_errors:
                logger.error("storing the section failed", extra={"error": problem})
            raise StoreUnavailable(store.description, "the section could not be written")
        return summary

    return handler


def _settings(warm: _Warm) -> Settings:
    if warm.settings is None:
        try:
            warm.settings = load_settings()
        except SettingsError as exc:
            # Fail fast and loud: every run would fail the same way until the template is fixed.
            logger.error("invalid settings", extra={"error": str(exc)})
            raise
    return warm.settings


def _store(warm: _Warm, settings: Settings) -> ResultStore:
    if warm.store is None:
        try:
            warm.store = _open_store(settings)
        except StoreUnavailable as exc:
            logger.error("the result store is unavailable", extra={"error": str(exc)})
            raise
    return warm.store


def _open_store(settings: Settings) -> ResultStore:
    try:
        return open_store(settings.store, settings.name, settings.history_retention_days)
    except StoreUnavailable:
        raise
    except Exception as exc:
        # A backend failing in a way it did not foresee (an OSError creating the SQLite
        # directory, say) is still an unavailable store, and must say which.
        raise StoreUnavailable(settings.store.describe(), f"{type(exc).__name__}: {exc}") from None
