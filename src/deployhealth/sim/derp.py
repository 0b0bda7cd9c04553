"""Simulated derp surface (see sim/deployment.py for how surfaces plug in)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployhealth.sim.deployment import SimulatedDeployment


def register(sim: SimulatedDeployment) -> None:
    """Add this surface's routes and fault switches to `sim`."""
