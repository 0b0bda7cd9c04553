"""The check families: one module each, each exposing `probe(settings, deadline) -> Section`.

Modules are imported on first use so that the API function, which only reads stored
results, does not pay for the probes' dependencies at cold start.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from deployhealth.deadline import Deadline
from deployhealth.model import Section
from deployhealth.settings import Settings

Probe = Callable[[Settings, Deadline], Section]

# Families in report order. Later families are added here and in template.yaml.
FAMILIES: tuple[str, ...] = ("access_url", "database")


def get_probe(family: str) -> Probe:
    if family not in FAMILIES:
        raise KeyError(f"no check family {family!r}; families: {', '.join(FAMILIES)}")
    module = importlib.import_module(f"deployhealth.checks.{family}")
    probe: Probe = module.probe
    return probe
