"""Scheduled entry point of the access_url check family (no logic here: see deployhealth.aws)."""

from deployhealth.aws import check_handler

handler = check_handler("access_url")
