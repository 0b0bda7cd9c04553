"""The `deployhealth` command: check, serve, demo, codes.

Exit status of `check`: 0 ready, 1 not ready, 2 bad settings. With `--json`, stdout holds
the report and nothing else; progress, logs and metric records go to stderr or nowhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from deployhealth import codes as code_docs
from deployhealth.checks import FAMILIES
from deployhealth.model import UnknownSectionError, canonical_section
from deployhealth.readiness import Readiness
from deployhealth.redact import safe_url
from deployhealth.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from deployhealth.scheduler import Scheduler

EXIT_READY, EXIT_NOT_READY, EXIT_BAD_SETTINGS = 0, 1, 2


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
        print(f"deployhealth: invalid settings: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `deployhealth codes | head`: the reader has gone, which is not an error. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployhealth",
        description="Outside-in health and readiness checks for a Coder deployment.",
    )
    sub = parser.add_subparsers(title="commands")

    check = sub.add_parser("check", help="run every check once and print the report")
    check.add_argument("--config", type=Path, help="TOML settings file")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--section", action="append", default=[], metavar="NAME",
        help="run only this family (repeatable); the exit status is judged on these alone",
    )
    check.set_defaults(run=_check)

    serve = sub.add_parser("serve", help="run the scheduler and the HTTP API locally")
    serve.add_argument("--config", type=Path, help="TOML settings file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--interval", type=float, help="seconds between check rounds")
    serve.set_defaults(run=_serve)

    demo = sub.add_parser("demo", help="simulate a deployment on loopback and serve against it")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--interval", type=float, default=10.0, help=argparse.SUPPRESS)
    demo.set_defaults(run=_demo)

    explain = sub.add_parser("codes", help="explain the health codes")
    explain.add_argument("code", nargs="?", help="one code, e.g. EDB01")
    explain.set_defaults(run=_codes)
    return parser


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


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(config_file=args.config)
    if args.interval is not None:
        if args.interval < 1:
            raise SettingsError(
                "--interval", f"{args.interval:g} is below 1 second", "--interval 60"
            )
        settings = replace(settings, check_interval_seconds=args.interval)
    return serve(settings, args.host, args.port)


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    banner: str = "",
    ready: threading.Event | None = None,
    on_scheduler: Callable[[Scheduler], None] | None = None,
) -> int:
    """Run the scheduler and the local API until SIGINT/SIGTERM.

    `on_scheduler` sees the scheduler before its first round (the demo links its fault
    switches to `Scheduler.between_rounds`).
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
        print(f"store: {exc}; serving anyway, retrying every round", file=sys.stderr)
    # Metric records are for CloudWatch Logs; a local terminal has no use for them.
    metrics = MetricsSink(settings.metrics_namespace, settings.name, None)
    context = ApiContext(settings=settings, store=store, metrics=metrics)
    try:
        server = LocalApiServer(create_app(context), host, port)
    except OSError as exc:
        raise SettingsError("--port", f"cannot listen on {host}:{port}: {exc.strerror}") from None
    scheduler = Scheduler(settings, store, metrics, on_round=_log_round)
    if on_scheduler is not None:
        on_scheduler(scheduler)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    scheduler.start()
    print(
        f"deployhealth serving {settings.name} on {server.url} "
        f"(checks every {settings.check_interval_seconds:g} s, store {store.description})",
        file=sys.stderr,
    )
    if banner:
        print(banner.replace("{api}", server.url), file=sys.stderr)
    if ready is not None:
        ready.set()
    stop.wait()
    print("deployhealth: stopping", file=sys.stderr)
    scheduler.stop()
    server.close()
    store.close()
    return 0


def _log_round(sections: dict, store_errors: list[str]) -> None:
    parts = [
        f"{name}={s.severity.value}" + (f"({','.join(dict.fromkeys(s.codes))})" if s.codes else "")
        for name, s in sections.items()
    ]
    print("round: " + " ".join(parts), file=sys.stderr)
    for err in store_errors:
        print(f"store: {err}", file=sys.stderr)


# --- demo ---------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from deployhealth.sim.demo import run_demo

    return run_demo(args.port, args.interval)


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
    for code in code_docs.CODES.values():
        when = f" (error when {code.error_when})" if code.error_when else ""
        print(f"{code.code:<12} {code.section:<20} {code.severity.value:<8} {code.title}{when}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
