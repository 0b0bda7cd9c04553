"""The simulation's inventory surfaces: Coder API, workspace proxies, provisioner daemons,
replicas and entitlements (issue 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimulatedDeployment


def register(sim: SimulatedDeployment) -> None:
    """Add this module's routes and fault switches to `sim`."""
