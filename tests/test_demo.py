"""The demo's promise: after a fault switch returns, the next round to end shows the fault.

A round reads the deployment in its first milliseconds and ends when its slowest family
does. A switch made while a round is in flight therefore reaches only the next round; the
round in flight still ends after the switch, with the old verdict. Here the derp family
holds every round open for its whole deadline (the sim's STUN servers are silent), and the
switch is made exactly while a round is in flight: after that round has read the proxies,
before it ends. Events, not sleeps, order the steps.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.serve import EVENT_TIMEOUT

from deployhealth.model import Section
from deployhealth.scheduler import Scheduler
from deployhealth.settings import Secret, Settings, StoreLocation
from deployhealth.sim.demo import link_faults_to_rounds
from deployhealth.sim.deployment import SimulatedDeployment
from deployhealth.sim.stun import servers_of
from deployhealth.store import open_store

PROXIES_PATH = "/api/v2/workspaceproxies"
# How long a silent STUN server holds the derp family, and so each round.
HOLD_SECONDS = 2.0


class Rounds:
    """A scheduler on the sim, as the demo runs it, and the rounds it has finished."""

    def __init__(self, sim: SimulatedDeployment, settings: Settings) -> None:
        assert settings.store is not None
        self.store = open_store(settings.store, settings.name, 1.0)
        self.finished: queue.Queue[tuple[int, dict[str, Section]]] = queue.Queue()
        self.scheduler = Scheduler(
            settings, self.store, None, families=("workspace_proxy", "derp"),
            on_round=lambda sections, _errors: self.finished.put(
                (self.scheduler.rounds, sections)
            ),
        )
        link_faults_to_rounds(sim, self.scheduler)

    def next_after(self, number: int) -> dict[str, Section]:
        """The sections of the first round numbered above `number` to finish."""
        while True:
            done, sections = self.finished.get(timeout=EVENT_TIMEOUT)
            if done > number:
                return sections

    def close(self) -> None:
        self.scheduler.stop()
        self.store.close()


@pytest.fixture
def rounds(sim: SimulatedDeployment, tmp_path: Path) -> Iterator[Rounds]:
    settings = Settings(
        name="demo-rounds",
        access_url=sim.url,
        coder_token=Secret(sim.token),
        stun_servers=tuple(servers_of(sim)),
        deadlines={"derp": HOLD_SECONDS},
        check_interval_seconds=3600.0,  # rounds after the first come from switches only
        store=StoreLocation("sqlite", path=str(tmp_path / "results.db")),
    )
    started = Rounds(sim, settings)
    try:
        yield started
    finally:
        started.close()


def test_a_switch_during_a_round_shows_in_the_first_round_to_end_after_it(sim, rounds):
    sim.set_faults({"stun": "silent"})  # every round now lasts the derp deadline
    rounds.scheduler.start()
    # Round 1 has read the proxies (all healthy) and is still in flight: derp waits on STUN.
    assert sim.wait_for_served(PROXIES_PATH, 1, EVENT_TIMEOUT)
    sim.set_faults({"proxy": "unreachable"})
    # What a user of the demo reads: the first round to end after the switch returned.
    after = rounds.next_after(rounds.scheduler.rounds)
    proxy = after["workspace_proxy"]
    assert proxy.severity.value == "warning", proxy.to_dict()
    assert [f.code for f in proxy.warnings] == ["EWP04"]
    assert proxy.warnings[0].message.startswith("us: ")
    # That round read the proxies after the switch; the round in flight read them before.
    assert sim.served(PROXIES_PATH) == 2


def test_the_round_in_flight_keeps_what_it_read_before_the_switch(sim, rounds):
    # The wobble itself: the round in flight at the switch ends after it and says "ok",
    # because it read the proxies before the switch. Only the round after it may count.
    sim.set_faults({"stun": "silent"})
    rounds.scheduler.start()
    assert sim.wait_for_served(PROXIES_PATH, 1, EVENT_TIMEOUT)
    sim.set_faults({"proxy": "unreachable"})
    assert rounds.next_after(0)["workspace_proxy"].severity.value == "ok"
    assert rounds.next_after(1)["workspace_proxy"].severity.value == "warning"
