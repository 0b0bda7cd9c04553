"""deployhealth against Prometheus's blackbox_exporter probing the same URLs: keep no slower.

Two figures, each against blackbox_exporter measured in the same run, rounds interleaved,
medians of at least MIN_ROUNDS:

9. A warm probe of the access URL: the access_url family (`GET <access URL>/healthz`, with
   its per-phase timings) against one blackbox `http_2xx` probe of the same URL, asked for
   as Prometheus asks (`GET /probe?target=...&module=http_2xx` on a kept-alive connection).
   Wall time; target <= 1.0.
10. The workspace_proxy family over 500 proxies against 500 blackbox probes of the same
   proxies' report URLs, all 500 asked for at once. Wall time (target <= 1.0), and CPU:
   deployhealth's process during its fan-out against the exporter's process during its
   500 probes (target <= 1.0). The driver of the 500 requests is not counted as the
   exporter's CPU, and is kept lean (uvloop, raw HTTP/1.1) so that it does not slow the
   exporter's wall time either.

The simulated deployment runs in a child process, the proxies in bench_proxies' farm (nginx,
or Python processes where it is missing; the line above the figures says which); the
exporter (Debian's prometheus-blackbox-exporter, which `make bench` installs) runs on a free
port with a configuration file written to a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxies import Runs, farm, proxy_settings  # noqa: E402
from figures import MIN_ROUNDS, Figure, interleaved_medians, record  # noqa: E402

EXPORTER = "prometheus-blackbox-exporter"
WARM_ROUNDS = 101  # one probe is a few milliseconds: many rounds, the median of probes
FANOUT = 500
FANOUT_ROUNDS = MIN_ROUNDS
CONFIG = """modules:
  http_2xx:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
"""

# The simulated deployment: prints its URL, then runs until the benchmark closes stdin.
_DEPLOYMENT = """
import sys
from deployhealth.sim.deployment import SimulatedDeployment
with SimulatedDeployment() as sim:
    print(sim.url, flush=True)
    sys.stdin.read()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """A process's user and system CPU so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _exporter() -> Iterator[tuple[int, int]]:
    """(port, pid) of a blackbox_exporter of our own, ready to probe."""
    binary = shutil.which(EXPORTER) or f"/usr/bin/{EXPORTER}"
    if not Path(binary).exists():
        raise RuntimeError(f"{EXPORTER} is not installed (make bench installs it from Debian)")
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "blackbox.yml"
        config.write_text(CONFIG)
        port = _free_port()
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{EXPORTER} did not start") from None
                    time.sleep(0.05)
            yield port, process.pid
        finally:
            process.terminate()
            process.wait(timeout=10)


def _probe_path(target: str) -> str:
    return f"/probe?target={quote(target, safe='')}&module=http_2xx"


def _succeeded(body: bytes) -> bool:
    return b"\nprobe_success 1" in body


def warm_access_url(exporter_port: int) -> None:
    from deployhealth.checks.access_url import probe
    from deployhealth.deadline import Deadline
    from deployhealth.settings import Settings

    print("blackbox: warm probe of the access URL: deployhealth's access_url vs one blackbox probe")
    deployment = subprocess.Popen(
        [sys.executable, "-c", _DEPLOYMENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )
    problems: list[str] = []
    try:
        assert deployment.stdout is not None
        url = deployment.stdout.readline().strip()
        if not url:
            raise RuntimeError("the simulated deployment did not start")
        settings = Settings(name="bench", access_url=url)
        exporter = http.client.HTTPConnection("127.0.0.1", exporter_port, timeout=10)
        path = _probe_path(f"{url}/healthz")

        def ours() -> None:
            section = probe(settings, Deadline.after(10))
            if section.severity.value != "ok":
                problems.append(f"access_url: {section.error}")

        def theirs() -> None:
            exporter.request("GET", path)
            body = exporter.getresponse().read()
            if not _succeeded(body):
                problems.append("blackbox: probe_success is not 1")

        ours()
        theirs()  # warm: imports, first connections, the exporter's first probe
        mine, blackbox = interleaved_medians(ours, theirs, rounds=WARM_ROUNDS)
        exporter.close()
    finally:
        if deployment.stdin is not None:
            deployment.stdin.close()
        deployment.wait(timeout=30)
    record(
        Figure(
            "warm access URL probe vs blackbox_exporter (wall)",
            mine / blackbox,
            1.0,
            detail=(
                f"deployhealth {mine * 1000:.2f} ms, blackbox {blackbox * 1000:.2f} ms "
                f"(medians of {WARM_ROUNDS}, interleaved)"
            ),
        )
    )
    _fail_on(problems)


async def _blackbox_fanout(port: int, paths: list[str]) -> int:
    """Ask the exporter for every probe at once; how many succeeded."""

    async def one(path: str) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # HTTP/1.0: the answer comes whole, not chunked (a chunk boundary could split
            # the line looked for), and the connection closes after it.
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            return _succeeded(await reader.read(-1))
        finally:
            writer.close()

    return sum(await asyncio.gather(*(one(p) for p in paths)))


def _run_blackbox(port: int, paths: list[str]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_blackbox_fanout(port, paths))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_blackbox_fanout(port, paths))


def fanout(exporter_port: int, exporter_pid: int) -> None:
    print()
    print(f"blackbox: {FANOUT}-proxy fan-out: deployhealth's workspace_proxy vs {FANOUT} blackbox "
          "probes of the same proxies")
    runs = Runs()
    problems: list[str] = []
    walls: dict[str, list[float]] = {"ours": [], "theirs": []}
    cpus: dict[str, list[float]] = {"ours": [], "theirs": []}
    with farm(FANOUT, 0.0) as proxies:
        settings = proxy_settings(proxies.ports)
        paths = [_probe_path(f"http://127.0.0.1:{p}/healthz-report") for p in proxies.ports]
        runs.run(settings)  # warm
        _run_blackbox(exporter_port, paths)
        for _ in range(FANOUT_ROUNDS):
            before, start = _cpu_seconds(exporter_pid), time.perf_counter()
            ok = _run_blackbox(exporter_port, paths)
            walls["theirs"].append(time.perf_counter() - start)
            cpus["theirs"].append(_cpu_seconds(exporter_pid) - before)
            if ok != FANOUT:
                problems.append(f"blackbox: {FANOUT - ok} of {FANOUT} probes failed")
            wall, cpu = runs.run(settings)
            walls["ours"].append(wall)
            cpus["ours"].append(cpu)
    problems += runs.problems
    print(f"   proxies: {proxies.what}")
    wall_ours, wall_theirs = (statistics.median(walls[k]) for k in ("ours", "theirs"))
    cpu_ours, cpu_theirs = (statistics.median(cpus[k]) for k in ("ours", "theirs"))
    record(
        Figure(
            f"{FANOUT}-proxy fan-out vs {FANOUT} blackbox probes (wall)",
            wall_ours / wall_theirs,
            1.0,
            detail=(
                f"deployhealth {wall_ours * 1000:.0f} ms, blackbox {wall_theirs * 1000:.0f} ms "
                f"(medians of {FANOUT_ROUNDS}, interleaved)"
            ),
        )
    )
    record(
        Figure(
            f"{FANOUT}-proxy fan-out vs {FANOUT} blackbox probes (CPU)",
            cpu_ours / max(cpu_theirs, 1e-9),
            1.0,
            detail=(
                f"deployhealth's process {cpu_ours * 1000:.0f} ms, the exporter's process "
                f"{cpu_theirs * 1000:.0f} ms (medians of {FANOUT_ROUNDS})"
            ),
        )
    )
    _fail_on(problems)


def _fail_on(problems: list[str]) -> None:
    for problem in problems[:3]:
        print(f"   ! a round was not ok: {problem[:300]}")
    if problems:
        raise RuntimeError(f"{len(problems)} rounds were not ok: the figure measured failures")


def bench() -> None:
    with _exporter() as (port, pid):
        warm_access_url(port)
        fanout(port, pid)


if __name__ == "__main__":
    bench()
