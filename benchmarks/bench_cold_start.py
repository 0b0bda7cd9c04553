"""3. Cold start: a fresh interpreter that imports a handler, against a bare interpreter start.

What a Lambda cold start runs before the first event: the interpreter starts, the
function's directory is first on sys.path, and `import app` loads the handler and everything
it imports. Measured as the wall time of a whole fresh process, `python -c "...; import app"`,
for a check handler (functions/checks/access_url/app.py) and for the API handler
(functions/api/app.py), against `python -c pass` in the same run, rounds interleaved so that
drift on the machine affects all three alike; medians. The handler's own cost is the
difference, with a target of 300 ms (what Lambda bills as INIT, above the runtime's start).

The .pyc files are written once before the rounds; `-X importtime` then names the top-level
packages that dominate each import.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 9
TARGET_SECONDS = 0.300

HANDLERS = {
    "check handler (functions/checks/access_url)": ROOT / "functions" / "checks" / "access_url",
    "API handler (functions/api)": ROOT / "functions" / "api",
}


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
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True,
        env=_environment(), cwd=tempfile.gettempdir(), check=True,
    )


def _wall(code: str) -> float:
    start = time.perf_counter()
    _run(code)
    return time.perf_counter() - start


def _dominated_by(directory: Path) -> str:
    # -X importtime: a package's root line (no dot in its name) carries the cumulative
    # microseconds of everything it pulled in; `app` itself is the whole, so it is left out.
    trace = _run(_import_code(directory), "-X", "importtime").stderr
    cumulative: dict[str, int] = {}
    for line in trace.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| \s*(\S+)", line)
        if match and "." not in match.group(2) and match.group(2) != "app":
            cumulative[match.group(2)] = int(match.group(1))
    top = sorted(cumulative.items(), key=lambda kv: kv[1], reverse=True)[:5]
    return ", ".join(f"{name} {us / 1000:.0f} ms" for name, us in top)


def measure(rounds: int = ROUNDS) -> tuple[float, dict[str, float]]:
    """(median seconds of `python -c pass`, median seconds per handler's cold import)."""
    codes = {label: _import_code(directory) for label, directory in HANDLERS.items()}
    for code in codes.values():
        _run(code)  # compile the .pyc files once, as a deployed layer would carry them
    bare: list[float] = []
    handlers: dict[str, list[float]] = {label: [] for label in codes}
    for _ in range(rounds):
        bare.append(_wall("pass"))
        for label, code in codes.items():
            handlers[label].append(_wall(code))
    return statistics.median(bare), {k: statistics.median(v) for k, v in handlers.items()}


def bench() -> None:
    bare, handlers = measure()
    print("3. cold start: a fresh interpreter importing a handler vs a bare interpreter start")
    print(f"   {'python -c pass (baseline)':<58} {bare * 1000:8.1f} ms (median of {ROUNDS})")
    for label, seconds in handlers.items():
        own = seconds - bare
        verdict = "meets target" if own <= TARGET_SECONDS else "MISSES target"
        print(f"   {'import app: ' + label:<58} {seconds * 1000:8.1f} ms  "
              f"ratio {seconds / bare:.1f}x the baseline")
        print(f"      the import itself {own * 1000:.0f} ms (target <= "
              f"{TARGET_SECONDS * 1000:.0f} ms: {verdict}); dominated by:")
        print(f"      {_dominated_by(HANDLERS[label])}")

if __name__ == "__main__":
    bench()
