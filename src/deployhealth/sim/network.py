"""The simulation's network surfaces: WebSocket echo, DERP relay, STUN servers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deployhealth.sim import derp, stun, wsecho

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimulatedDeployment


def register(sim: SimulatedDeployment) -> None:
    """Add the network surfaces' routes and fault switches to `sim`."""
    wsecho.register(sim)
    derp.register(sim)
    stun.register(sim)
