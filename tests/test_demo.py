"""The demo's promise: after a fault switch returns, the next round to end shows the fault.

A round reads the deployment in its first milliseconds and ends when its slowest family
does. A switch made while a round is in flight therefore reaches only the next round; the
round in flight still ends after the switch, with the old verdict. Here the derp family
holds every round open for its whole deadline (the sim's STUN servers are silent), and the
switch is made exactly while a round is in flight: after that round has read the proxies,
before it ends. Events, not sleeps, order the steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.serve import COMMAND, EVENT_TIMEOUT, ServeProcess, clean_env, message

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


# --- the demo as a user runs it: a real process, what it prints, how it ends ------------

DEMO_ENDINGS = [signal.SIGHUP, signal.SIGTERM, signal.SIGINT]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: its own, so that what the demo leaves there is visible, and
    short, because PostgreSQL's Unix socket path inside it is limited to ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dh-t-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def processes_mentioning(text: str) -> list[str]:
    """`ps` lines (pid and command line) of every process whose arguments hold `text`."""
    listing = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in listing.splitlines() if text in line and "ps -eo" not in line]


def await_true(what: str, condition: Callable[[], bool]) -> None:
    """Poll `condition` until it holds, for at most EVENT_TIMEOUT seconds."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {EVENT_TIMEOUT} s: {what}")
        time.sleep(0.1)


def start_demo(tmpdir: Path, cwd: Path, **options: object) -> tuple[ServeProcess, Path]:
    """`deployhealth demo` in its own session, once serving; returns it and its work dir."""
    for _attempt in range(3):
        demo = ServeProcess.on_free_port(
            clean_env(TMPDIR=str(tmpdir)), cwd, command="demo", new_session=True, **options
        )
        first = demo.lines.get(timeout=EVENT_TIMEOUT)
        demo.seen.append(first)
        # free_port's port can be taken by another process before the demo binds it, and
        # the demo says so (below, a test of that message); then another port is tried.
        if "cannot listen on" not in first:
            break
        demo.proc.wait(timeout=EVENT_TIMEOUT)
    try:
        workdir = Path(demo.wait_for("temporary files").split()[2])
        demo.wait_for("deployhealth serving")
        assert workdir.parent == tmpdir and workdir.is_dir()
        # What the tests below can see go: the demo's PostgreSQL runs from its work dir.
        assert any("bin/postgres" in line for line in processes_mentioning(str(workdir)))
    except BaseException:
        os.kill(demo.proc.pid, signal.SIGINT)
        demo.proc.wait(timeout=EVENT_TIMEOUT)
        raise
    return demo, workdir


def assert_nothing_left(demo: ServeProcess, workdir: Path, tmpdir: Path) -> None:
    await_true("the demo has exited", lambda: demo.proc.poll() is not None)
    await_true(
        f"no process of {workdir} runs", lambda: processes_mentioning(str(workdir)) == []
    )
    assert not workdir.exists()
    assert list(tmpdir.iterdir()) == []


def kill_leftovers(workdir: Path | None) -> None:
    """After a failed test: no PostgreSQL of it may outlive the test run."""
    if workdir is None:
        return
    for line in processes_mentioning(str(workdir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.mark.parametrize("ending", DEMO_ENDINGS, ids=lambda s: s.name)
def test_the_demo_leaves_no_postgres_and_no_files_however_it_is_stopped(
    short_tmp, tmp_path, ending
):
    demo, workdir = start_demo(short_tmp, tmp_path)
    try:
        os.kill(demo.proc.pid, ending)
        assert demo.proc.wait(timeout=EVENT_TIMEOUT) == 0
        assert_nothing_left(demo, workdir, short_tmp)
    finally:
        demo.proc.kill()
        kill_leftovers(workdir)


def test_the_demo_stops_and_cleans_up_when_its_parent_dies(short_tmp, tmp_path):
    # The demo's parent is a shell (`&` keeps it from exec'ing the demo), as a terminal's
    # is; killed with SIGKILL, the shell can tell nobody, yet the demo must notice.
    parent = ("bash", "-c", '"$0" "$@" & wait')
    demo, workdir = start_demo(short_tmp, tmp_path, prefix=parent, every_round=False)
    try:
        assert demo.proc.args[0] == "bash"
        os.kill(demo.proc.pid, signal.SIGKILL)
        demo.proc.wait(timeout=EVENT_TIMEOUT)
        # The demo's stderr (inherited from the shell) closes when the demo has exited.
        rest: list[str] = []
        deadline = time.monotonic() + EVENT_TIMEOUT
        while (line := demo.lines.get(timeout=EVENT_TIMEOUT)) != "":
            rest.append(message(line))
            assert time.monotonic() < deadline, f"the demo still runs: {rest}"
        assert "deployhealth: stopping\n" in rest, rest
        assert_nothing_left(demo, workdir, short_tmp)
    finally:
        kill_leftovers(workdir)
        for line in processes_mentioning(f"demo --port {demo.base.rsplit(':', 1)[1]} "):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_a_taken_port_is_named_before_anything_starts(short_tmp, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [COMMAND, "demo", "--port", str(port)], capture_output=True, text=True,
            env=clean_env(TMPDIR=str(short_tmp)), cwd=tmp_path, timeout=EVENT_TIMEOUT,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert f"--port {port + 1}" in result.stderr and f"make demo PORT={port + 1}" in result.stderr
    assert "invalid settings" not in result.stderr and "PostgreSQL" not in result.stderr
    assert list(short_tmp.iterdir()) == []


def test_pasting_the_printed_settings_makes_check_pass_on_every_section(short_tmp, tmp_path):
    demo, workdir = start_demo(short_tmp, tmp_path)
    try:
        exports = [message(line) for line in demo.seen if message(line).startswith("export ")]
        names = [line.split("=", 1)[0].removeprefix("export ") for line in exports]
        assert {"DEPLOYHEALTH_ACCESS_URL", "DEPLOYHEALTH_CODER_TOKEN",
                "DEPLOYHEALTH_DATABASE_URL", "DEPLOYHEALTH_STUN_SERVERS"} <= set(names)
        # As a user pastes them: into a shell, then the command (none of the test's
        # DEPLOYHEALTH_* variables in the environment).
        script = "\n".join([*exports, '"$0" check --json'])
        result = subprocess.run(
            ["bash", "-c", script, COMMAND], capture_output=True, text=True,
            env=clean_env(), cwd=tmp_path, timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        severities = {k: v["severity"] for k, v in report.items()
                      if isinstance(v, dict) and "severity" in v}
        assert len(severities) == 7
        assert set(severities.values()) == {"ok"}, severities
    finally:
        os.kill(demo.proc.pid, signal.SIGINT)
        demo.proc.wait(timeout=EVENT_TIMEOUT)
        kill_leftovers(workdir)
