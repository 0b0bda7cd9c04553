"""The real programs the interop tests talk to (nginx, coturn, haproxy): `make peers`."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_program(program: str, package: str) -> str:
    """The program's path; fails the test (it does not skip) when it is not installed."""
    path = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.path.exists(p)), None
    )
    if path is None:
        pytest.fail(
            f"{program} is not installed: this interop test needs the real one "
            f"(sudo apt-get install -y {package})"
        )
    return path


@contextlib.contextmanager
def running_nginx(prefix: Path, conf: str, *ports: int) -> Iterator[None]:
    """nginx in the foreground with `conf` (written to prefix/nginx.conf) until the block ends.

    Enters once every one of `ports` on 127.0.0.1 accepts a connection; fails the test with
    nginx's logs when it exits or does not listen first.
    """
    binary = require_program("nginx", "nginx")
    path = prefix / "nginx.conf"
    path.write_text(conf)
    with (prefix / "stderr.log").open("wb") as stderr:
        proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(path),
             "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        for port in ports:
            _await_listening(proc, port, prefix)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _await_listening(proc: subprocess.Popen[bytes], port: int, prefix: Path) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            pytest.fail(f"nginx exited with {proc.returncode}:\n{_logs(prefix)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return
        # Waiting on the process, not sleeping: an nginx that dies ends the wait at once.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
    pytest.fail(f"nginx did not listen on 127.0.0.1:{port}:\n{_logs(prefix)}")


def _logs(prefix: Path) -> str:
    found = (prefix / name for name in ("error.log", "stderr.log"))
    return "\n".join(path.read_text(errors="replace") for path in found if path.exists())
