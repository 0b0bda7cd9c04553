"""The `deployhealth` command as a separate process: its environment and `serve`/`demo`
running in the background, whose stderr lines are the events tests wait on (no sleeps)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from deployhealth.sim.tcp import free_port

COMMAND = str(Path(sys.executable).parent / "deployhealth")
# Long enough for any round on a loaded CI machine, short enough to fail fast when broken.
EVENT_TIMEOUT = 60


def clean_env(**settings: str) -> dict[str, str]:
    """The test process's environment without any DEPLOYHEALTH_* of the developer's, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYHEALTH_")}
    env.update(settings)
    return env


class ServeProcess:
    """`deployhealth serve` (or `demo`) in the background; its stderr lines are events."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        *,
        prefix: tuple[str, ...] = (),
        new_session: bool = False,
    ) -> None:
        # `prefix`: a command that runs `deployhealth` with other rights (setpriv), or a
        # shell to be its parent. `new_session`: its own session and process group, as a
        # terminal's job has, so that signals sent to it reach nothing of the test's.
        # SIGHUP at its default, as a terminal starts a command: the suite itself may run
        # under nohup (SIGHUP ignored, inherited), and serve and the demo rightly leave an
        # ignored SIGHUP ignored, which would make the SIGHUP tests test nohup instead.
        self.proc = subprocess.Popen(
            [*prefix, COMMAND, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            text=True, env=env, cwd=cwd, start_new_session=new_session,
            preexec_fn=_default_sighup,
        )
        port = args[args.index("--port") + 1] if "--port" in args else "8080"
        self.base = f"http://127.0.0.1:{port}"
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def on_free_port(
        cls,
        env: dict[str, str],
        cwd: Path,
        *,
        command: str = "serve",
        interval: str = "1",
        prefix: tuple[str, ...] = (),
        every_round: bool = True,
        new_session: bool = False,
    ) -> ServeProcess:
        """`deployhealth serve` (or `demo`) on a free loopback port; `.base` is its URL.

        `every_round` (`--verbose`): a `round:` line after every round, which
        `next_round_started_after_now` counts; without it, only rounds that changed the
        verdict write one, as a user sees by default.
        """
        args = [command, "--port", str(free_port()), "--interval", interval]
        if every_round:
            args.append("--verbose")
        return cls(args, env, cwd, prefix=prefix, new_session=new_session)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")  # EOF

    def wait_for(self, prefix: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=EVENT_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no line starting {prefix!r}; so far: {''.join(self.seen)}")
            self.seen.append(line)
            if line == "":
                pytest.fail(f"process ended before {prefix!r}: {''.join(self.seen)}")
            if message(line).startswith(prefix):
                return line

    def next_round_started_after_now(self) -> str:
        # The round in flight may have started before the change; the one after it cannot.
        self.wait_for("round:")
        return self.wait_for("round:")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=EVENT_TIMEOUT)


# The local time each log line of `serve` and `demo` starts with (deployhealth.console).
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ")


def message(line: str) -> str:
    """A stderr line without its timestamp and indentation: what `wait_for` matches."""
    return TIMESTAMP.sub("", line).lstrip()


def readyz(base: str) -> requests.Response:
    return requests.get(f"{base}/readyz", params={"verbose": ""}, timeout=10)


def _default_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
