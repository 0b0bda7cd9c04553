"""Lambda entry points, one module per kind of function, so each imports only what it runs.

- `deployhealth.aws.check_function.check_handler(family)`: a scheduled check function. It
  never imports the API's router (Powertools' event handler and everything behind it).
- `deployhealth.aws.api_function.api_handler`: the API function (HTTP API and ALB events).

The handlers in functions/ hold no logic; they bind these. Both log through `logger` below.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME") or "deployhealth")
# The library logs through stdlib loggers under `deployhealth`. Under the default service name
# they propagate into this Logger; under another, they need its JSON handler copied to them.
copy_config_to_registered_loggers(source_logger=logger, include={"deployhealth"})
