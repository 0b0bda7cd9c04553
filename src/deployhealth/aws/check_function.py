"""The scheduled function of one check family: run it, store its section, emit its metrics.

Everything a cold start needs is built on first use and kept for the life of the execution
environment: settings and the store (with its boto3 client). The family's own module is
imported only when it runs, and the API's router never: a check function pays for the check.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deployhealth.aws import logger
from deployhealth.checks import FAMILIES
from deployhealth.metrics import MetricsSink
from deployhealth.runner import run_and_record
from deployhealth.settings import Settings, SettingsError, load_settings
from deployhealth.store import ResultStore, StoreUnavailable, open_store

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]


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
