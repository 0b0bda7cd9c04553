"""Scheduled entry point of the access_url family (no logic here: see deployhealth.aws)."""

from deployhealth.aws.check_function import check_handler

handler = check_handler("access_url")
