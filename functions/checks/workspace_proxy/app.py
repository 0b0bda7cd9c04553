"""Scheduled entry point of the workspace_proxy family (no logic here: see deployhealth.aws)."""

from deployhealth.aws.check_function import check_handler

handler = check_handler("workspace_proxy")
