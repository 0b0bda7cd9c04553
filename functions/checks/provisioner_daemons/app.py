"""Scheduled entry point of the provisioner_daemons family (no logic here: see deployhealth.aws)."""

from deployhealth.aws.check_function import check_handler

handler = check_handler("provisioner_daemons")
