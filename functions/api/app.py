"""HTTP API (payload format 2.0) and ALB entry point (no logic here: see deployhealth.aws)."""

from deployhealth.aws.api_function import api_handler as handler

__all__ = ["handler"]
