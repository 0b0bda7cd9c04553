"""The HTTP API: `/healthz`, `/readyz`, the report, its history and settings, the HTML page.

One set of routes serves API Gateway HTTP API (payload format 2.0) and ALB events in Lambda,
and the local server (`deployhealth serve`), which turns each request into an HTTP API event.
"""

from deployhealth.api.app import ApiApp, ApiContext, create_app

__all__ = ["ApiApp", "ApiContext", "create_app"]
