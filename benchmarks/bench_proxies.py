"""The workspace_proxy family's fan-out: 5,000 proxies near the floor (target <= 1.3x).

Each proxy is its own URL (its own port on 127.0.0.1) and answers its health report after
200 ms, as a proxy in another region would. The family probes them `proxy_concurrency` at
a time on one asyncio loop, so no run can beat the floor: ceil(5,000 / proxies at once)
waves of 200 ms. The figure is the median run against that floor, computed from the
concurrency the family actually uses (`workspace_proxy.concurrency`, which the open-files
limit may lower), and printed. The default `proxy_concurrency`, 512, is what is measured: it
is the most Lambda's 1,024 open files allow (one socket a probe, half the descriptors), so
this is the family as deployed.

What is above the floor is how soon each probe's request goes out and its answer is read
on the one loop. A wave's 512 probes are started in one pass of the loop; when each probe
waited further passes for its connection, its transport and then its request, every
request of a wave went out behind all 512 setups, and each wave's answers came back about
70 ms after their 200 ms (1.4-1.5x the floor). `netguard.fetch` now sends a plain HTTP
request in the step that connected (1.13-1.16x). The rounds of one proxy (the fixed cost of
a run) are interleaved with the figure's as context, and this process's CPU per proxy is
printed; so is the peak memory of a run (tracemalloc), as information.

The proxies are a peer, not deployhealth: one nginx process (`farm`), one `listen` per
port, answering after 200 ms (the echo module's echo_sleep, then a fixed `return`, so the
answer has a Content-Length like a Go proxy's). Its CPU is printed beside the figure (about
0.05 ms a proxy, a quarter of the client's), so that the reader sees how much of the two
cores the baseline's peer took. Where nginx or its echo module is missing (`make bench`
installs them: scripts/install-bench-tools), FARM_PROCESSES Python processes serve the
ports (deployhealth.sim.inventory.ProxyFarm, about twice nginx's CPU; the figure came out
the same, 1.13x), and the printed line says so.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import MIN_ROUNDS, Figure, record  # noqa: E402

PROXIES = 5000
DELAY_SECONDS = 0.200
TARGET = 1.3
# The Python fallback's processes: with one behind a wave's 512 requests each probe took
# about 30 ms longer, time the simulation added, not the family.
FARM_PROCESSES = 2

# The proxies' report, as a healthy workspace proxy answers it.
REPORT = '{"errors":[],"warnings":[]}'


@dataclass
class Farm:
    """The simulated proxies: their ports, what serves them, and that server's CPU."""

    ports: list[str]
    what: str  # for the reader: what the baseline's peer is
    pids: list[int]  # the processes serving them (nginx: its master, whose workers count)

    def cpu_seconds(self) -> float:
        """CPU the serving processes (and their children: nginx's workers) have used."""
        return sum(_cpu_seconds(pid) for pid in _with_children(self.pids))


@contextlib.contextmanager
def farm(count: int, delay: float) -> Iterator[Farm]:
    """`count` simulated proxies answering `REPORT` after `delay` seconds, one port each.

    Served by nginx when it (and, for a delay, its echo module) is installed, as `make
    bench` makes sure (scripts/install-bench-tools); else by FARM_PROCESSES Python
    processes (deployhealth.sim.inventory.ProxyFarm), and the printed line says so.
    """
    load = None if shutil.which("nginx") is None else _echo_module() if delay > 0 else ""
    if load is not None:
        with _nginx_farm(count, delay, load) as served:
            yield served
    else:
        with _python_farm(count, delay) as served:
            yield served


# nginx: one process serving every port (a `listen` each in one server block), as cheap a
# peer as a benchmark can have: a 200 ms answer is a timer (the echo module's echo_sleep),
# then an internal redirect to a fixed `return`, so the answer has a Content-Length as a
# Go proxy's small JSON does. One worker: the peer stands for other machines, and the
# fewer of this machine's two cores it takes, the less it decides the figure. Every port
# costs the worker a connection slot and a descriptor, hence the limits.
_NGINX_CONF = """
{load}
worker_processes 1;
worker_rlimit_nofile {files};
pid nginx.pid;
error_log error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    default_type application/json;
    client_body_temp_path tmp; proxy_temp_path tmp; fastcgi_temp_path tmp;
    uwsgi_temp_path tmp; scgi_temp_path tmp;
    server {{
{listens}
        location = /healthz-report {{ {answer} }}
        location = /report {{ internal; return 200 '{report}'; }}
    }}
}}
"""
# Ports below Linux's ephemeral range (32768-60999 by default), where the probes' own
# source ports come from; a block another program holds is skipped, and a block taken
# between the check and nginx's bind is retried further on.
_FIRST_PORT = 10_000
_LAST_PORT = 32_767


def _echo_module() -> str | None:
    """The `load_module` line for nginx's echo module (echo_sleep), or None if missing."""
    shown = subprocess.run(["nginx", "-V"], capture_output=True, text=True, check=False)
    paths = [Path(m) for m in re.findall(r"--modules-path=(\S+)", shown.stderr)]
    paths += [Path("/usr/lib/nginx/modules"), Path("/usr/lib64/nginx/modules")]
    for path in paths:
        if (path / "ngx_http_echo_module.so").is_file():
            return f"load_module {path / 'ngx_http_echo_module.so'};"
    return None


def _free_block(count: int, start: int) -> int:
    """The first port of `count` consecutive free loopback ports from `start` on."""
    first = start
    while first + count - 1 <= _LAST_PORT:
        for port in range(first, first + count):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    first = port + 1
                    break
        else:
            return first
    raise RuntimeError(f"no {count} consecutive free ports between {start} and {_LAST_PORT}")


def _raise_open_files() -> None:
    # nginx's master binds every port before its worker starts: more descriptors than a
    # default soft limit of 1,024. Only the child's limit: the family's concurrency reads
    # this process's own.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def _nginx_farm(count: int, delay: float, load: str) -> Iterator[Farm]:
    answer = f"echo_sleep {delay}; echo_exec /report;" if delay > 0 else f"return 200 '{REPORT}';"
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory:
        Path(directory, "tmp").mkdir()
        start = _FIRST_PORT
        for _attempt in range(5):
            first = _free_block(count, start)
            ports = [str(p) for p in range(first, first + count)]
            config = Path(directory, "nginx.conf")
            config.write_text(
                _NGINX_CONF.format(
                    load=load,
                    files=count + 8192,
                    connections=count + 4096,
                    listens="\n".join(f"        listen 127.0.0.1:{p};" for p in ports),
                    answer=answer,
                    report=REPORT,
                )
            )
            server = subprocess.Popen(
                ["nginx", "-p", directory, "-c", str(config), "-e", "error.log",
                 "-g", "daemon off; master_process on;"],
                stdin=subprocess.DEVNULL,
                preexec_fn=_raise_open_files,
            )
            try:
                if _listening(server, int(ports[-1])):
                    version = subprocess.run(
                        ["nginx", "-v"], capture_output=True, text=True, check=False
                    ).stderr.strip().removeprefix("nginx version: ")
                    what = f"{version}, 1 worker process, {count} ports" + (
                        ", echo module's echo_sleep" if delay > 0 else ""
                    )
                    yield Farm(ports, what, [server.pid])
                    return
            finally:
                server.terminate()
                server.wait(timeout=30)
            log = Path(directory, "error.log")
            said = log.read_text(errors="replace") if log.exists() else ""
            if "Address already in use" not in said:
                raise RuntimeError(f"nginx did not start: {said[-2000:]}")
            start = first + count  # someone took a port of the block meanwhile
        raise RuntimeError("nginx found no free block of ports in five attempts")


def _listening(server: subprocess.Popen[bytes], port: int) -> bool:
    """Whether nginx came to listen on `port` (its last, bound after all others)."""
    while server.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        # Polled, not slept on: nginx binds thousands of ports in a fraction of a second.
        time.sleep(0.01)
    return False


# The Python fallback: one ProxyFarm serving that many ports; prints them, then runs until
# the benchmark closes its stdin. It raises its own open-files limit (a descriptor a
# port). Its loop is uvloop's, for the same reason nginx has one worker.
_FARM = """
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
try:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
except ImportError:
    pass
from deployhealth.sim.inventory import ProxyFarm, ProxyReply
with ProxyFarm() as farm:
    proxies = farm.add_many(int(sys.argv[1]), ProxyReply(delay=float(sys.argv[2])))
    print(" ".join(str(p.port) for p in proxies), flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def _python_farm(count: int, delay: float, processes: int = FARM_PROCESSES) -> Iterator[Farm]:
    shares = [count // processes + (n < count % processes) for n in range(processes)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _FARM, str(share), str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for share in shares
    ]
    try:
        ports = []
        for child in children:
            assert child.stdout is not None
            ports += child.stdout.readline().split()
        if len(ports) != count:
            raise RuntimeError(f"the proxy processes started {len(ports)} proxies, not {count}")
        what = (
            f"Python ProxyFarm (nginx or its echo module missing), {processes} processes, "
            f"{count} ports"
        )
        yield Farm(ports, what, [c.pid for c in children])
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            child.wait(timeout=60)


def _with_children(pids: list[int]) -> list[int]:
    """`pids` and their direct children (nginx's workers), from /proc."""
    found = list(pids)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in pids:
                found.append(int(stat.parent.name))
    return found


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proxy_settings(ports: list[str]) -> Any:
    from deployhealth.settings import Settings

    proxies = tuple(
        {
            "id": f"proxy-{n}",
            "name": f"proxy-{n:04d}",
            "path_app_url": f"http://127.0.0.1:{port}",
            "created_at": "2024-01-01T00:00:00Z",
        }
        for n, port in enumerate(ports)
    )
    return Settings(static_proxies=proxies)


class Runs:
    """Runs of the family, timed, with what went wrong kept for the report."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def run(self, settings: Any) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one run."""
        from deployhealth.checks.workspace_proxy import probe
        from deployhealth.deadline import Deadline

        cpu, start = time.process_time(), time.perf_counter()
        section = probe(settings, Deadline.after(60))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if section.severity.value != "ok":
            self.problems.append(f"{section.codes} {section.error}")
        return wall, cpu


def _peak(runs: Runs, settings: Any) -> int:
    tracemalloc.start()
    try:
        runs.run(settings)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench() -> None:
    from deployhealth.checks.workspace_proxy import concurrency

    print(f"workspace_proxy: {PROXIES} proxies answering after "
          f"{DELAY_SECONDS * 1000:.0f} ms vs the floor")
    runs = Runs()
    with farm(PROXIES, DELAY_SECONDS) as proxies:
        one, everyone = proxy_settings(proxies.ports[:1]), proxy_settings(proxies.ports)
        at_once = concurrency(everyone)
        runs.run(everyone)  # warm: imports, every port's first accept

        walls, cpus, singles, served = [], [], [], []
        for _ in range(MIN_ROUNDS):
            singles.append(runs.run(one)[0])
            before = proxies.cpu_seconds()
            wall, cpu = runs.run(everyone)
            served.append(proxies.cpu_seconds() - before)
            walls.append(wall)
            cpus.append(cpu)
        peak = _peak(runs, everyone)

    waves = math.ceil(PROXIES / at_once)
    floor = waves * DELAY_SECONDS
    median = statistics.median(walls)
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"   floor: ceil({PROXIES} / {at_once} at once) x {DELAY_SECONDS * 1000:.0f} ms "
          f"= {floor * 1000:.0f} ms (proxy_concurrency {at_once}; open-files limit {soft})")
    print(f"   proxies: {proxies.what}; its CPU {statistics.median(served) * 1000:.0f} ms a run, "
          f"{statistics.median(served) / PROXIES * 1000:.3f} ms a proxy (median of {MIN_ROUNDS})")
    record(
        Figure(
            f"workspace_proxy, {PROXIES} proxies at {DELAY_SECONDS * 1000:.0f} ms vs the floor",
            median / floor,
            TARGET,
            detail=(
                f"{median * 1000:.0f} ms (median of {MIN_ROUNDS}; fastest "
                f"{min(walls) * 1000:.0f} ms), floor {floor * 1000:.0f} ms; CPU "
                f"{statistics.median(cpus) / PROXIES * 1000:.3f} ms a proxy; one proxy "
                f"{statistics.median(singles) * 1000:.0f} ms (interleaved)"
            ),
        )
    )
    print(f"   info: peak memory of a run (tracemalloc) {peak / 1024 / 1024:.1f} MiB, "
          f"{peak / PROXIES / 1024:.1f} KiB a proxy")
    for problem in runs.problems[:3]:
        print(f"   ! a run was not ok: {problem[:200]}")
    if runs.problems:
        raise RuntimeError(f"{len(runs.problems)} runs were not ok: the figure measured failures")


if __name__ == "__main__":
    bench()
