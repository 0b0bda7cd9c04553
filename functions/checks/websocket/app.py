"""Scheduled entry point of the websocket check family: both the echo and the idle probe
function run it (no logic here: see deployhealth.aws)."""

from deployhealth.aws.check_function import check_handler

handler = check_handler("websocket")
