"""Scheduled entry point of the derp check family (no logic here: see deployhealth.aws)."""

from deployhealth.aws import check_handler

handler = check_handler("derp")
