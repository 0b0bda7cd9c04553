"""HTTP API (payload format 2.0) and ALB entry point (no logic here: see deployhealth.aws)."""

from deployhealth.aws import api_handler as handler

__all__ = ["handler"]
