"""The simulation's network surfaces: WebSocket echo, DERP relay, STUN servers (issue 3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimulatedDeployment


def register(sim: SimulatedDeployment) -> None:
    """Add this module's routes and fault switches to `sim`."""
