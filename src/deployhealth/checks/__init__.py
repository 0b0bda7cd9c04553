"""The check families: one module each, each exposing `probe(settings, deadline) -> Section`.

Besides `probe`, a family module may define hooks, found by name with `family_hook`:
`section_properties(section) -> dict[str, Any]`, the family's values for the properties of
its section's EMF record (no metrics: see deployhealth.metrics and docs/metrics.md), and
`merge_previous(previous, section) -> Section`, called with the stored latest section before
a new one is recorded (the websocket family carries its idle verdict over with it).

Modules are imported on first use so that the API function, which only reads stored
results, does not pay for the probes' dependencies at cold start.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from deployhealth.deadline import Deadline
from deployhealth.model import SECTION_NAMES, Section
from deployhealth.settings import Settings

Probe = Callable[[Settings, Deadline], Section]

# Every section of the report has its family, in report order (template.yaml schedules each).
FAMILIES: tuple[str, ...] = SECTION_NAMES


def get_probe(family: str) -> Probe:
    if family not in FAMILIES:
        raise KeyError(f"no check family {family!r}; families: {', '.join(FAMILIES)}")
    module = importlib.import_module(f"deployhealth.checks.{family}")
    probe: Probe = module.probe
    return probe


def family_hook(family: str, hook: str) -> Callable[..., Any] | None:
    """A family module's optional hook, or None (also for an unknown family)."""
    if family not in FAMILIES:
        return None
    module = importlib.import_module(f"deployhealth.checks.{family}")
    found: Callable[..., Any] | None = getattr(module, hook, None)
    return found
