"""The `deployhealth` command: check, serve, demo, codes.

Exit status of `check`: 0 ready, 1 not ready, 2 bad settings. With `--json`, stdout holds
the report and nothing else; progress, logs and metric records go to stderr or nowhere.
`serve` and `demo` write timestamped log lines (deployhealth.console): a `round:` line when
a round's verdict changed, a `heartbeat:` line every 300 s (`--heartbeat`) in between.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from deployhealth import codes as code_docs
from deployhealth.checks import FAMILIES
from deployhealth.console import DEFAULT_HEARTBEAT_SECONDS, RoundLog, log, log_block
from deployhealth.model import UnknownSectionError, canonical_section
from deployhealth.readiness import Readiness
from deployhealth.redact import safe_url
from deployhealth.settings import (
    DEFAULT_CONFIG_FILE,
    ENV_PREFIX,
    Settings,
    SettingsError,
    known_keys,
    load_settings,
)

if TYPE_CHECKING:
    from deployhealth.scheduler import Scheduler

EXIT_READY, EXIT_NOT_READY, EXIT_BAD_SETTINGS = 0, 1, 2
# How long a stop signal may wait for serve's main thread (see serve()).
SIGNAL_POLL_SECONDS = 0.5


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        code: int = args.run(args)
        return code
    except SettingsError as exc:
        # Every bad setting, one per line: a user fixes them all in one go.
        errors = exc.errors
        if len(errors) == 1:
            print(f"deployhealth: invalid settings: {errors[0]}", file=sys.stderr)
        else:
            print(f"deployhealth: {len(errors)} invalid settings:", file=sys.stderr)
            for error in errors:
                print(f"  {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `deployhealth codes | head`: the reader has gone, which is not an error. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def package_version() -> str:
    try:
        return version("deployhealth")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _settings_help() -> str:
    """The settings epilog of `check` and `serve`: where settings come from, every variable."""
    names = ", ".join(f"{ENV_PREFIX}{k}" for k in known_keys() if "_DEADLINE_" not in k)
    listed = textwrap.fill(names, width=78, initial_indent="  ", subsequent_indent="  ",
                           break_on_hyphens=False)
    return (
        "settings:\n"
        "  Environment variables beat the TOML file (--config FILE, default\n"
        f"  ./{DEFAULT_CONFIG_FILE} when it exists; keys are the variable names in lower case\n"
        "  without the prefix), which beats the defaults. Every bad setting is reported at\n"
        "  once. The variables (meaning and defaults in docs/configuration.md):\n"
        f"{listed},\n"
        f"  and {ENV_PREFIX}<FAMILY>_DEADLINE_SECONDS per check family.\n"
    )


_CONFIG_HELP = f"TOML settings file (default ./{DEFAULT_CONFIG_FILE} when it exists)"

_CHECK_EXITS = """exit status:
  0    ready: every gating section passes (with --section: every named section)
  1    not ready
  2    bad settings (each one named), or bad arguments
  130  interrupted (Ctrl-C)
"""

_SERVE_EXITS = """exit status:
  0    stopped by Ctrl-C, SIGTERM or SIGHUP
  2    bad settings (each one named), or the port cannot be listened on
"""

_LOG_HELP = f"""log lines (stderr, each with its local time):
  round: ...      after a round whose verdict differs from the last one written
                  (every round with --verbose)
  heartbeat: ...  while nothing changes, every --heartbeat seconds (default
                  {DEFAULT_HEARTBEAT_SECONDS:g}): rounds are still running
  store: ...      when the result store fails, changes failure, or recovers
"""

_DEMO_HELP = """The demo prints `export DEPLOYHEALTH_...` lines: paste them into another shell and
`deployhealth check` (or `serve --port ...`) runs against the simulated deployment. They
hold the demo's own throwaway token and database password, made up for this run.
PostgreSQL and the demo's temporary files go away however it stops: Ctrl-C, SIGTERM,
SIGHUP (closing the terminal) or its parent process dying.

exit status:
  0    stopped by Ctrl-C, SIGTERM or SIGHUP (or its parent dying)
  2    the port is taken (try --port), or PostgreSQL could not start
"""


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="deployhealth",
        description="Outside-in health and readiness checks for a Coder deployment.",
        epilog="`deployhealth COMMAND --help` for a command's settings and exit status.",
    )
    parser.add_argument(
        "--version", action="version", version=f"deployhealth {package_version()}"
    )
    sub = parser.add_subparsers(title="commands")

    check = sub.add_parser(
        "check", help="run every check once and print the report",
        description="Run every check family once, concurrently, and print the report.",
        epilog=_settings_help() + "\n" + _CHECK_EXITS, formatter_class=raw,
    )
    check.add_argument("--config", type=Path, help=_CONFIG_HELP)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--section", action="append", default=[], metavar="NAME",
        help="run only this family (repeatable); the exit status is judged on these alone",
    )
    check.set_defaults(run=_check)

    serve = sub.add_parser(
        "serve", help="run the scheduler and the HTTP API locally",
        description="Run the checks every interval and serve the HTTP API on the embedded store.",
        epilog=_settings_help() + "\n" + _LOG_HELP + "\n" + _SERVE_EXITS, formatter_class=raw,
    )
    serve.add_argument("--config", type=Path, help=_CONFIG_HELP)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--interval", type=float, help="seconds between check rounds")
    _add_log_options(serve)
    serve.set_defaults(run=_serve)

    demo = sub.add_parser(
        "demo", help="simulate a deployment on loopback and serve against it",
        description="Simulate a Coder deployment on loopback (real PostgreSQL, DERP, STUN, "
        "proxies) and serve deployhealth's API against it.",
        epilog=_DEMO_HELP + "\n" + _LOG_HELP, formatter_class=raw,
    )
    demo.add_argument("--port", type=int, default=8080, help="the API's port (default 8080)")
    demo.add_argument("--interval", type=float, default=10.0, help=argparse.SUPPRESS)
    _add_log_options(demo)
    demo.set_defaults(run=_demo)

    explain = sub.add_parser(
        "codes", help="explain the health codes",
        description="List the health codes, or explain one (also in docs/codes.md).",
        epilog="exit status:\n  0    listed or explained\n  2    unknown code\n",
        formatter_class=raw,
    )
    explain.add_argument("code", nargs="?", help="one code, e.g. EDB01")
    explain.set_defaults(run=_codes)
    return parser


def _add_log_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--heartbeat", type=float, default=DEFAULT_HEARTBEAT_SECONDS, metavar="SECONDS",
        help="while nothing changes, a heartbeat line this often "
        f"(default {DEFAULT_HEARTBEAT_SECONDS:g})",
    )
    command.add_argument(
        "-v", "--verbose", action="store_true",
        help="write the round: line after every round, not only when something changed",
    )


# --- check --------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from deployhealth.model import Report
    from deployhealth.readiness import evaluate
    from deployhealth.runner import run_families

    settings = load_settings(config_file=args.config)
    try:
        families = [canonical_section(s) for s in args.section] or list(FAMILIES)
    except UnknownSectionError as exc:
        raise SettingsError("--section", str(exc)) from None
    unchecked = [f for f in families if f not in FAMILIES]
    if unchecked:
        raise SettingsError("--section", f"no check for {', '.join(unchecked)} in this version")

    progress = _Progress(families, sys.stderr)
    sections = run_families(settings, families, on_done=progress.done)
    progress.finish()

    report = Report(settings.name, sections, coder_version=_coder_version(sections))
    # With --section, each named section counts as gating; otherwise the configured ones.
    gating = families if args.section else [s for s in settings.gating_sections if s in sections]
    readiness = evaluate(settings, sections, gating)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(settings, report.sections, readiness, sys.stdout)
    return EXIT_READY if readiness.ready else EXIT_NOT_READY


def _coder_version(sections: dict) -> str | None:
    for section in sections.values():
        version = section.details.get("coder_version")
        if isinstance(version, str):
            return version
    return None


class _Progress:
    """A one-line progress counter on a terminal; silent when stderr is not one."""

    def __init__(self, families: Sequence[str], stream: TextIO) -> None:
        self.total = len(families)
        self.finished: list[str] = []
        self.stream = stream
        self.enabled = stream.isatty()
        self._lock = threading.Lock()
        self._show()

    def done(self, name: str, _section: object) -> None:
        with self._lock:
            self.finished.append(name)
            self._show()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _show(self) -> None:
        if self.enabled:
            last = f" ({self.finished[-1]} done)" if self.finished else ""
            self.stream.write(f"\r\033[Kchecking: {len(self.finished)}/{self.total}{last}")
            self.stream.flush()


def _print_table(
    settings: Settings, sections: dict, readiness: Readiness, out: TextIO
) -> None:
    width = shutil.get_terminal_size((100, 20)).columns
    shown = safe_url(settings.access_url) if settings.access_url else "(no access URL)"
    out.write(f"deployhealth: {settings.name}  {shown}\n\n")
    rows = [("SECTION", "SEVERITY", "CODES", "SUMMARY")]
    for name, section in sections.items():
        first = (section.errors or section.warnings or [None])[0]
        summary = first.message if first else _ok_summary(name, section)
        codes = ",".join(dict.fromkeys(section.codes)) or "-"
        rows.append((name, section.severity.value, codes, summary.replace("\n", " ")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3]))
        line = f"{line}  {row[3]}"
        out.write((line[: width - 1] if out.isatty() else line) + "\n")
    verdict = "ready" if readiness.ready else "NOT READY"
    failing = [c.name for c in readiness.checks if not c.passed]
    out.write(f"\n{verdict}" + (f" ({', '.join(failing)} failing)" if failing else "") + "\n")


def _ok_summary(name: str, section: object) -> str:
    details = getattr(section, "details", {})
    if name == "access_url" and "status_code" in details:
        total = details.get("timings_ms", {}).get("total")
        return f"{details['status_code']} in {total:.0f} ms" if total else "ok"
    if name == "database" and "latency" in details:
        return f"median latency {details['latency']}"
    return "ok"


# --- serve --------------------------------------------------------------------------

# How long `serve` answers /readyz from one read of the store (see ApiContext).
SERVE_READINESS_CACHE_SECONDS = 1.0


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(config_file=args.config)
    if args.interval is not None:
        if args.interval < 1:
            raise SettingsError(
                "--interval", f"{args.interval:g} is below 1 second", "--interval 60"
            )
        settings = replace(settings, check_interval_seconds=args.interval)
    return serve(
        settings, args.host, args.port,
        round_log=RoundLog(heartbeat_seconds=args.heartbeat, every_round=args.verbose),
    )


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    banner: str = "",
    ready: threading.Event | None = None,
    on_scheduler: Callable[[Scheduler], None] | None = None,
    round_log: RoundLog | None = None,
    listening: socket.socket | None = None,
) -> int:
    """Run the scheduler and the local API until SIGINT, SIGTERM or SIGHUP.

    `on_scheduler` sees the scheduler before its first round (the demo links its fault
    switches to `Scheduler.between_rounds`). `round_log` writes the round lines.
    `listening`: a socket already bound to host:port, which the server takes over.
    """
    from deployhealth.api.app import ApiContext, create_app
    from deployhealth.api.local import LocalApiServer
    from deployhealth.metrics import MetricsSink
    from deployhealth.scheduler import Scheduler
    from deployhealth.store import StoreUnavailable, open_store_lazily

    # Opened on first use and retried until it opens: a store that cannot be opened now
    # (a garbage file, no permission) stops neither the server nor the scheduler; /readyz
    # says 503 naming it until the first round or request after the repair opens it.
    store = open_store_lazily(settings.store, settings.name, settings.history_retention_days)
    try:
        store.open()
    except StoreUnavailable as exc:
        log(f"store: {exc}; serving anyway, retrying every round")
    # Metric records are for CloudWatch Logs; a local terminal has no use for them.
    metrics = MetricsSink(settings.metrics_namespace, settings.name, None)
    # Load balancers ask /readyz many times a second; the results change once a round. Reads
    # are shared for up to a second (what another process writes to the same store shows
    # within it), and each of this scheduler's rounds makes the next read fresh.
    context = ApiContext(
        settings=settings, store=store, metrics=metrics,
        readiness_cache_seconds=SERVE_READINESS_CACHE_SECONDS,
    )
    try:
        server = LocalApiServer(create_app(context), host, port, listening=listening)
    except OSError as exc:
        raise SettingsError("--port", f"cannot listen on {host}:{port}: {exc.strerror}") from None
    log_round = round_log or RoundLog()

    def on_round(sections: dict, store_errors: list[str]) -> None:
        context.forget_snapshot()  # before the round is logged: what follows it sees it
        log_round(sections, store_errors)

    scheduler = Scheduler(settings, store, metrics, on_round=on_round)
    if on_scheduler is not None:
        on_scheduler(scheduler)
    stop = threading.Event()
    for sig in stop_signals():
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    scheduler.start()
    try:
        if banner:
            log_block(banner.replace("{api}", server.url))
        log(
            f"deployhealth serving {settings.name} on {server.url} "
            f"(checks every {settings.check_interval_seconds:g} s, store {store.description})"
        )
        if ready is not None:
            ready.set()
        # A timed wait, not stop.wait(): the kernel may deliver SIGTERM or SIGHUP to any
        # thread (the scheduler's, a server's), and then nothing interrupts an untimed
        # wait in this one, where Python runs the handler; the demo stayed up one time
        # in five. Each timeout lets the handler run.
        while not stop.wait(SIGNAL_POLL_SECONDS):
            pass
        log("deployhealth: stopping")
    finally:
        # Also when interrupted: a scheduler left running would write the store again
        # after the demo removed it.
        scheduler.stop()
        server.close()
        store.close()
    return 0


def stop_signals() -> list[signal.Signals]:
    """The signals that stop serve and demo in order: Ctrl-C, SIGTERM, and SIGHUP (the
    terminal closing) unless it was ignored when we started (`nohup` asks for that)."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


# --- demo ---------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from deployhealth.sim.demo import run_demo

    return run_demo(
        args.port, args.interval,
        round_log=RoundLog(heartbeat_seconds=args.heartbeat, every_round=args.verbose),
    )


# --- codes --------------------------------------------------------------------------


def _codes(args: argparse.Namespace) -> int:
    if args.code:
        code = code_docs.lookup(args.code)
        if code is None:
            known = ", ".join(code_docs.CODES)
            print(
                f"deployhealth: unknown code {args.code!r}; known codes: {known}", file=sys.stderr
            )
            return EXIT_BAD_SETTINGS
        print(f"{code.code}  ({code.section}, {code.severity_text})")
        print(f"  {code.title}")
        print(f"  What to do: {code.action}")
        print(f"  Docs: {code.anchor}")
        return 0
    rows = [
        (code.code, code.section, code.severity.value,
         code.title + (f" (error when {code.error_when})" if code.error_when else ""))
        for code in code_docs.CODES.values()
    ]
    # Widths from the content: section names such as provisioner_daemons are long.
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
