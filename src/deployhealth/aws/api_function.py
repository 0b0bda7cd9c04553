"""The API function: HTTP API (payload format 2.0) and ALB events, answered from the store.

The app (settings, store, routes) is built on the first request and kept for the life of
the execution environment.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from deployhealth.api.app import ApiApp, ApiContext, create_app
from deployhealth.aws import logger

# A warm function answers probes from results read at most this long ago (see ApiContext).
READINESS_CACHE_SECONDS = 5.0

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
                context = ApiContext.from_environment(
                    metrics_stream=sys.stdout, readiness_cache_seconds=READINESS_CACHE_SECONDS
                )
                if context.settings_error is not None:
                    # Answering beats crashing: /healthz stays 200, /readyz says 503 and why,
                    # the other routes 500 naming the setting (never its value).
                    logger.error("invalid settings", extra={"error": str(context.settings_error)})
                _api_app = create_app(context)
    return _api_app
