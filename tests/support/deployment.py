"""Settings for, and faults of, the simulated Coder deployment (deployhealth.sim)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from deployhealth.settings import Secret, Settings
from deployhealth.sim.deployment import SimulatedDeployment


def api_settings(sim: SimulatedDeployment, **overrides: Any) -> Settings:
    """Settings that reach `sim` at its access URL with its session token."""
    return Settings(access_url=sim.url, coder_token=Secret(sim.token)).with_overrides(**overrides)


def set_faults(sim: SimulatedDeployment, **modes: str) -> None:
    """Flip faults the way the demo does: POST /_sim/faults over HTTP."""
    query = "&".join(f"{k}={v}" for k, v in modes.items())
    request = urllib.request.Request(f"{sim.url}/_sim/faults?{query}", method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:
        now = json.load(answer)
    assert all(now[k] == v for k, v in modes.items())
