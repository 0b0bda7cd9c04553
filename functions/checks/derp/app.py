"""Scheduled entry point of the derp family (no logic here: see deployhealth.aws)."""

from deployhealth.aws.check_function import check_handler

handler = check_handler("derp")
