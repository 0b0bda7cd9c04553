"""Cold start: a fresh interpreter that imports a handler, against a bare interpreter start.

What a Lambda cold start runs before the first event: the interpreter starts, the function's
directory is first on sys.path, and `import app` loads the handler and everything it imports.
Measured as a whole fresh process, `python -c "...; import app"`, for a check handler
(functions/checks/access_url/app.py) and for the API handler (functions/api/app.py), against
`python -c pass` in the same run, rounds interleaved so that drift on the machine affects both
alike; medians of at least MIN_ROUNDS.

The figure is the import's own time, the handler's median minus the bare start's, against
300 ms: what Lambda bills as INIT above the runtime's own start. A ratio to `python -c pass`
would have no target that means anything (the interpreter's start is not what a user waits
for), and the difference is already relative to a baseline from the same run.

Each child reports when it is ready (after `import app`, before the interpreter tears down,
which Lambda does not do after INIT): its CLOCK_MONOTONIC, which the parent shares, and its
own CPU time. The CPU time is printed beside the wall time: on a busy machine the wall time
includes waiting for a core, the CPU time does not.

The .pyc files are written once before the rounds, as a deployed layer carries them;
`-X importtime` then names the top-level packages that dominate each import.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from figures import MIN_ROUNDS, Figure, record

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 9
TARGET_MS = 300.0

HANDLERS = {
    "check handler (functions/checks/access_url)": ROOT / "functions" / "checks" / "access_url",
    "API handler (functions/api)": ROOT / "functions" / "api",
}

# Printed by every child once it is ready, so that the bare start and the import pay the same.
_READY = "import os, time; os.write(1, b'%r %r' % (time.monotonic(), time.process_time()))"


@dataclass(frozen=True)
class Start:
    """One fresh interpreter, from the parent's spawn to the child's readiness."""

    wall: float  # seconds
    cpu: float  # seconds of the child's own CPU


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONSTARTUP",
                 "PYTHONPROFILEIMPORTTIME"):
        env.pop(name, None)
    return env


def _import_code(directory: Path) -> str:
    # As Lambda does: the function's directory first on sys.path, then `import app`.
    return f"import sys; sys.path.insert(0, {str(directory)!r}); import app"


def _run(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    # From a temporary directory: `python -c` puts the working directory on sys.path, and the
    # repository's root must not be there.
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True,
        env=_environment(), cwd=tempfile.gettempdir(), check=True,
    )


def _start(code: str) -> Start:
    # time.monotonic and perf_counter are both CLOCK_MONOTONIC on Linux: one clock for both.
    spawned = time.monotonic()
    ready, cpu = (float(v) for v in _run(f"{code}; {_READY}").stdout.split())
    return Start(wall=ready - spawned, cpu=cpu)


def _interleaved(code: str, rounds: int) -> tuple[Start, Start]:
    """Medians of (the import, the bare start), rounds alternating between them."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"a figure needs at least {MIN_ROUNDS} rounds, not {rounds}")
    ours: list[Start] = []
    bare: list[Start] = []
    for _ in range(rounds):
        bare.append(_start("pass"))
        ours.append(_start(code))

    def median(starts: list[Start]) -> Start:
        return Start(statistics.median(s.wall for s in starts),
                     statistics.median(s.cpu for s in starts))

    return median(ours), median(bare)


def dominated_by(directory: Path, top: int = 5) -> str:
    """The top-level packages whose modules took the most time importing, own time summed.

    -X importtime prints each module's own microseconds and its cumulative ones; own times
    summed by top-level package add up to the whole, cumulative ones count nested imports
    twice and credit a package with whatever it happened to import first.
    """
    trace = _run(_import_code(directory), "-X", "importtime").stderr
    own: Counter[str] = Counter()
    for line in trace.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \| \s*(\S+)", line)
        if match:
            own[match.group(2).split(".")[0]] += int(match.group(1))
    return ", ".join(f"{name} {us / 1000:.0f} ms" for name, us in own.most_common(top))


def bench() -> None:
    print("cold start: a fresh interpreter importing a handler vs `python -c pass`")
    for label, directory in HANDLERS.items():
        code = _import_code(directory)
        _run(code)  # compile the .pyc files once
        ours, bare = _interleaved(code, ROUNDS)
        record(Figure(
            name=f"cold start, import of the {label}",
            value=(ours.wall - bare.wall) * 1000,
            target=TARGET_MS,
            unit=" ms",
            detail=(
                f"fresh import {ours.wall * 1000:.0f} ms vs python -c pass "
                f"{bare.wall * 1000:.0f} ms (wall, median of {ROUNDS}, "
                f"{ours.wall / bare.wall:.1f}x); CPU {ours.cpu * 1000:.0f} vs "
                f"{bare.cpu * 1000:.0f} ms; own import time by package: "
                f"{dominated_by(directory)}"
            ),
        ))


if __name__ == "__main__":
    bench()
