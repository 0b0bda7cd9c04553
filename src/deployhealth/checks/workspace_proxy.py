"""workspace_proxy: `GET <proxy url>/healthz-report` on every workspace proxy, concurrently.

The proxies come from the inventory (`deployhealth.inventory`); deleted ones and the primary
are left out. Each registered proxy is probed once with a 5 s budget (clipped by the family
deadline), at most `settings.proxy_concurrency` at a time, with `netguard.fetch` on one
asyncio loop: a proxy URL that is, or resolves to, a link-local or metadata address is
refused before any connection, the connection goes to the vetted address, and a proxy that
trickles its answer is cut off when its budget ends. At most 256 KiB of a report is read.
asyncio rather than a thread pool running requests: for 500 proxies, threads spent about
1 ms of GIL-bound CPU per request and took four to five times as long. The loop is uvloop's
where it is installed, and each host is vetted once per run (`netguard.HostVetting`): at
thousands of proxies the time above ceil(proxies / concurrency) answer times is the loop's
work, CPU and how soon each request goes out (`fetch` sends it in the step that connected),
about 1.15x that floor for 5,000 proxies (benchmarks/bench_proxies.py, docs/design.md).

Classification (checks.md): `unregistered` (no URL), `ok` (200, JSON `{"errors": [],
"warnings": [...]}`), `unhealthy` (anything else that answered, a refused or unparseable
URL), `unreachable` (DNS, connect, TLS, timeout). Two choices the contract leaves open:

- A probe cut short by the *family* deadline (its budget was under 5 s when it started, and
  it timed out) did not finish: the proxy is listed under EWP01 with status `unknown`
  (`status_value` -3 in the EMF record) instead of being called unreachable for a timeout
  shorter than its own. Proxies not started before the deadline are listed the same way.
  Unprobed proxies do not count in the verdict (unknown is not broken): the section is at
  least a warning by EWP01.
- A URL refused by the address guard is `unhealthy` (the registered URL is wrong), and an
  unregistered proxy carries one error saying it has no URL, so that every proxy that is
  not `ok` says why in `error` or `warnings`.

Without a licence for workspace proxies, Coder answers the proxy list with its feature gate's
403 (`inventory.FeatureNotLicensed`). The section is then what Coder's own report says for
such a deployment, ok with no regions, and deployhealth's own key `note` says why there was
nothing to check. Any other failure to read the list is EWP02 (error): could not look is not
"no proxies".

The section stays within SECTION_BUDGET_BYTES of JSON, whatever the number of proxies and
whatever their reports say, so that it can always be stored (DynamoDB's item limit is
400 KB) and served (Lambda answers at most 6 MB, a history holds many sections):

- each proxy's report keeps at most REPORT_ENTRIES errors and as many warnings, each cut
  at ENTRY_CHARS characters;
- EWP04 lists at most FINDINGS_LISTED problems, then one entry counting the rest; EWP01
  names at most FINDINGS_LISTED proxies, then counts the rest;
- `regions` keeps full entries for the proxies that are not ok first, then the ok ones,
  in their order, while they fit what is left of the budget; the ones left out are
  counted in deployhealth's key `regions_omitted` (`count`, `ok`, `not_ok`), and the
  verdict still counts every proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from deployhealth.deadline import Deadline
from deployhealth.inventory import (
    FeatureNotLicensed,
    InventoryError,
    NothingConfigured,
    Proxy,
    coder_error_text,
    open_inventory,
)
from deployhealth.model import (
    ZERO_TIME,
    Finding,
    Section,
    Severity,
    coder_uuid,
    rfc3339,
    utcnow,
)
from deployhealth.net import PhaseError, networks, open_files_limit, tls_context
from deployhealth.netguard import (
    BlockedAddressError,
    Fetched,
    FetchError,
    GuardError,
    HostVetting,
    fetch,
)
from deployhealth.redact import safe_url
from deployhealth.settings import Settings

PROBE_TIMEOUT_SECONDS = 5.0
REPORT_CAP = 256 * 1024
REPORT_PATH = "/healthz-report"
# Probes end this long before the family deadline, and results are collected until
# COLLECT_MARGIN before it, so that the section is built and returned in time.
PROBE_MARGIN_SECONDS = 0.25
COLLECT_MARGIN_SECONDS = 0.1
BUILD_VERSION_HEADER = "X-Coder-Build-Version"
USER_AGENT = "deployhealth/0.1 (+workspace_proxy check)"

# What the section may weigh as JSON (messages and details): under DynamoDB's 400 KB item
# limit even if nothing compresses, with room for the item's other attributes.
SECTION_BUDGET_BYTES = 300_000
REPORT_ENTRIES = 10
ENTRY_CHARS = 300
FINDINGS_LISTED = 50

STATUS_VALUE = {"ok": 1, "unhealthy": -1, "unreachable": -2, "unregistered": 0, "unknown": -3}
_EPOCH = datetime.min.replace(tzinfo=UTC)


@dataclass
class _Outcome:
    status: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked_at: datetime = field(default_factory=utcnow)


def probe(settings: Settings, deadline: Deadline) -> Section:
    allowance = deadline.remaining()
    probing = Deadline(deadline.at - PROBE_MARGIN_SECONDS)
    source = settings.inventory_source
    details: dict[str, Any] = {"workspace_proxies": {"regions": []}}
    try:
        with closing(open_inventory(settings)) as inventory:
            proxies = inventory.proxies(probing)
    except FeatureNotLicensed as exc:
        # Not a finding: Coder's report is ok with no proxies here, so no warning either.
        details["note"] = (
            "workspace proxies are an Enterprise feature this deployment is not licensed for "
            f"({exc}): nothing to check"
        )
        return Section.from_findings([], details, healthy=True)
    except NothingConfigured as exc:
        finding = Finding(
            "ENOTCHECKED", f"the workspace proxies are not checked: {exc}", Severity.WARNING
        )
        return Section.from_findings([finding], details, healthy=True)
    except InventoryError as exc:
        finding = Finding(
            "EWP02", f"cannot read the workspace proxies ({source} inventory): {exc}",
            Severity.ERROR,
        )
        return Section.from_findings([finding], details, healthy=False)

    proxies.sort(key=lambda p: (p.created_at or _EPOCH, p.name))
    collect = Deadline(deadline.at - COLLECT_MARGIN_SECONDS)
    # Outcomes are keyed by position: a static list need not give its proxies ids.
    outcomes = _probe_all(proxies, settings, probing, collect)
    regions = [_region(p, outcomes.get(n, _Outcome("unknown"))) for n, p in enumerate(proxies)]
    details["workspace_proxies"] = {"regions": regions}
    return _verdict(proxies, outcomes, regions, allowance)


def _probe_all(
    proxies: list[Proxy], settings: Settings, probing: Deadline, collect: Deadline
) -> dict[int, _Outcome]:
    outcomes: dict[int, _Outcome] = {}
    registered: dict[int, Proxy] = {}
    for n, proxy in enumerate(proxies):
        if proxy.url.strip():
            registered[n] = proxy
        else:
            outcomes[n] = _Outcome(
                "unregistered",
                errors=["has no URL: the proxy was created but has never registered (started)"],
            )
    if registered:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            outcomes.update(runner.run(_probe_many(registered, settings, probing, collect)))
    return outcomes


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (it is a dependency), else asyncio's own.

    Profiled at 5,000 proxies, two thirds of the family's CPU was asyncio's own Python
    (selectors, transports, callbacks); uvloop does that work in C (libuv), about a
    quarter less CPU a proxy. Imported here, not at module level: only this family uses
    it, and other handlers' cold starts should not pay for it.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _probe_many(
    proxies: dict[int, Proxy], settings: Settings, probing: Deadline, collect: Deadline
) -> dict[int, _Outcome]:
    vetting = HostVetting(allowed=networks(settings.ssrf_allow))
    tls: ssl.SSLContext | None = None
    if any(p.url.strip().lower().startswith("https:") for p in proxies.values()):
        # Once: loading the CA store costs milliseconds. A bad bundle is left for each
        # https probe to report as its TLS failure.
        with contextlib.suppress(PhaseError):
            tls = tls_context()

    # `concurrency` workers taking proxies in turn, rather than a task per proxy waiting
    # on a semaphore: 5,000 proxies are then 512 tasks, not 5,000 tasks each woken once
    # to queue and once to run. A proxy taken but not finished by the collect deadline is
    # cancelled with its worker and left unprobed, like those never taken.
    outcomes: dict[int, _Outcome] = {}
    queue = iter(proxies.items())

    async def worker() -> None:
        for n, proxy in queue:
            outcome = await _probe_one(proxy, probing, tls, vetting)
            if outcome is not None:
                outcomes[n] = outcome

    count = min(len(proxies), concurrency(settings))
    workers = [asyncio.create_task(worker()) for _ in range(count)]
    done, late = await asyncio.wait(workers, timeout=collect.remaining())
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for task in done:
        task.result()  # a bug here is the runner's EUNKNOWN, not a proxy status
    return outcomes


def concurrency(settings: Settings) -> int:
    """`proxy_concurrency`, kept to half the process's file-descriptor limit.

    Each probe holds one socket; a default that suits Lambda (1024 descriptors) must not
    turn into "Too many open files" on a laptop whose limit is 256.
    """
    wanted = max(1, settings.proxy_concurrency)
    files = open_files_limit()
    if files is None:
        return wanted
    return max(1, min(wanted, files // 2))


def _report_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(url)
    _ = parts.port  # raises ValueError on a port that is not a number
    path = parts.path.rstrip("/") + REPORT_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


async def _probe_one(
    proxy: Proxy,
    probing: Deadline,
    tls: ssl.SSLContext | None,
    vetting: HostVetting,
) -> _Outcome | None:
    """One proxy's outcome; None when it was not (fully) probed before the family deadline."""
    try:
        url = _report_url(proxy.url)
    except ValueError:
        return _Outcome(
            "unhealthy",
            errors=[
                f"the proxy URL {safe_url(proxy.url)!r} does not parse as an absolute http(s) URL"
            ],
        )
    if probing.expired:
        return None
    cap = min(PROBE_TIMEOUT_SECONDS, probing.remaining())
    truncated = cap < PROBE_TIMEOUT_SECONDS
    checked_at = utcnow()
    try:
        answer = await fetch(
            url,
            probing.sooner(cap),
            headers={"Accept": "application/json"},
            cap=REPORT_CAP,
            tls=tls,
            user_agent=USER_AGENT,
            vetting=vetting,
        )
    except BlockedAddressError as exc:
        return _Outcome("unhealthy", errors=[str(exc)], checked_at=checked_at)
    except FetchError as exc:
        if exc.timed_out and truncated:
            return None
        return _Outcome("unreachable", errors=[str(exc)], checked_at=checked_at)
    except GuardError as exc:
        return _Outcome("unhealthy", errors=[str(exc)], checked_at=checked_at)
    return _classify(url, answer, checked_at)


def _classify(raw_url: str, answer: Fetched, checked_at: datetime) -> _Outcome:
    status, reason, body, more = answer.status, answer.reason, answer.body, answer.truncated
    content_type = answer.headers.get("content-type", "")
    report = None if status != 200 or more else _parse_report(body)
    media_type = content_type.split(";", 1)[0].strip().lower()
    if report is not None and media_type == "application/json":
        errors, warnings = report
        return _Outcome(
            "unhealthy" if errors else "ok", _clipped(errors), _clipped(warnings), checked_at
        )
    # Not a health report: the URL (made safe to show only now, as the ok case above is
    # most of thousands of proxies) and why, for the message.
    url = safe_url(raw_url)
    build = answer.headers.get(BUILD_VERSION_HEADER.lower(), "")

    def unhealthy(message: str) -> _Outcome:
        return _Outcome("unhealthy", errors=[message], checked_at=checked_at)

    if status != 200:
        said = coder_error_text(body)
        if said is None:
            excerpt = body[:200].decode("utf-8", "replace").strip()
            said = f"body {excerpt!r}" if excerpt else "empty body"
        return unhealthy(
            f"GET {url} answered {status} {reason}".rstrip()
            + f": {said} (try it by hand: curl -i {url})"
        )
    if report is None and build:
        return unhealthy(
            f"GET {url} answered 200 with {BUILD_VERSION_HEADER} {build} but no proxy health "
            "report: it is a Coder server but not a workspace proxy (is the primary's URL "
            "registered as a proxy?)"
        )
    if media_type != "application/json":
        return unhealthy(
            f"GET {url} answered 200 with content type {content_type or 'none'!r}, not "
            "application/json: it is not a workspace proxy's health report"
        )
    size = f"more than {REPORT_CAP} bytes" if more else f"{_excerpt(body)!r}"
    return unhealthy(
        f"GET {url} answered 200 with {size}, not a health report "
        '{"errors": [...], "warnings": [...]}: the URL is not a workspace proxy'
    )


def _clipped(entries: list[str]) -> list[str]:
    """A proxy's report entries within the per-proxy budget; what is cut says so."""
    kept = [e if len(e) <= ENTRY_CHARS else e[: ENTRY_CHARS - 1] + "…" for e in entries]
    if len(kept) > REPORT_ENTRIES:
        more = len(kept) - (REPORT_ENTRIES - 1)
        kept = [*kept[: REPORT_ENTRIES - 1], f"... and {more} more not kept"]
    return kept


def _excerpt(body: bytes) -> str:
    text = body[:80].decode("utf-8", "replace").strip()
    return text + ("..." if len(body) > 80 else "")


def _parse_report(body: bytes) -> tuple[list[str], list[str]] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(data, dict) or "errors" not in data or "warnings" not in data:
        return None
    errors, warnings = data["errors"] or [], data["warnings"] or []
    if not isinstance(errors, list) or not isinstance(warnings, list):
        return None
    return [str(e) for e in errors], [str(w) for w in warnings]


def _region(proxy: Proxy, outcome: _Outcome) -> dict[str, Any]:
    # codersdk.WorkspaceProxy; an id or time the source does not give (a static list) is Go's
    # zero value, which Coder's Go client can decode ("", null or "eu-1" it cannot).
    return {
        "id": coder_uuid(proxy.id),
        "name": proxy.name,
        "display_name": proxy.display_name,
        "icon_url": proxy.icon_url,
        "healthy": outcome.status == "ok",
        "path_app_url": proxy.url,
        "wildcard_hostname": proxy.wildcard_hostname,
        "derp_enabled": proxy.derp_enabled,
        "derp_only": proxy.derp_only,
        "status": {
            "status": outcome.status,
            "report": {"errors": list(outcome.errors), "warnings": list(outcome.warnings)},
            "checked_at": rfc3339(outcome.checked_at),
        },
        "created_at": ZERO_TIME if proxy.created_at is None else rfc3339(proxy.created_at),
        "updated_at": ZERO_TIME if proxy.updated_at is None else rfc3339(proxy.updated_at),
        "deleted": proxy.deleted,
        "version": proxy.version,
    }


def _verdict(
    proxies: list[Proxy],
    outcomes: dict[int, _Outcome],
    regions: list[dict[str, Any]],
    allowance: float,
) -> Section:
    probed = list(outcomes.values())
    ok = [o for o in probed if o.status == "ok"]
    if not probed or (len(ok) == len(probed) and not any(o.warnings for o in ok)):
        severity = Severity.OK
    elif not ok:
        severity = Severity.ERROR
    else:
        severity = Severity.WARNING
    # A proxy's error is a warning entry unless the whole section is at error (checks.md).
    error_level = Severity.ERROR if severity is Severity.ERROR else Severity.WARNING
    problems: list[Finding] = []
    for n, proxy in enumerate(proxies):
        outcome = outcomes.get(n)
        if outcome is None:
            continue
        problems += [Finding("EWP04", f"{proxy.name}: {e}", error_level) for e in outcome.errors]
        problems += [
            Finding("EWP04", f"{proxy.name}: {w}", Severity.WARNING) for w in outcome.warnings
        ]
    findings = problems[:FINDINGS_LISTED]
    if len(problems) > FINDINGS_LISTED:
        rest = problems[FINDINGS_LISTED:]
        findings.append(
            Finding(
                "EWP04",
                f"... and {len(rest)} more problems not listed here (the section keeps its size "
                "bounded): the regions show the proxies that are not ok",
                Severity.worst(f.severity for f in rest),
            )
        )
    unprobed = [p.name for n, p in enumerate(proxies) if n not in outcomes]
    if unprobed:
        named = ", ".join(unprobed[:FINDINGS_LISTED])
        if len(unprobed) > FINDINGS_LISTED:
            named += f" and {len(unprobed) - FINDINGS_LISTED} more"
        findings.append(
            Finding(
                "EWP01",
                f"{len(unprobed)} of {len(proxies)} workspace proxies were not probed before the "
                f"family deadline ({allowance:.1f} s): {named}",
                Severity.WARNING,
            )
        )
        severity = Severity.worst([severity, Severity.WARNING])
    details: dict[str, Any] = {"workspace_proxies": {"regions": regions}}
    used = len(json.dumps([f.message for f in findings]))
    kept, omitted = _within(regions, SECTION_BUDGET_BYTES - used)
    if omitted:
        details = {"workspace_proxies": {"regions": kept}, "regions_omitted": omitted}
    section = Section.from_findings(findings, details, healthy=severity is not Severity.ERROR)
    section.severity = severity
    return section


def _within(
    regions: list[dict[str, Any]], budget: int
) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    """The regions that fit `budget` bytes of JSON, those not ok first; what was left out."""
    sizes = [len(json.dumps(r)) + 2 for r in regions]
    if sum(sizes) <= budget:
        return regions, None
    not_ok_first = sorted(range(len(regions)), key=lambda n: regions[n]["status"]["status"] == "ok")
    keep: set[int] = set()
    for n in not_ok_first:
        if sizes[n] <= budget:
            keep.add(n)
            budget -= sizes[n]
    left_out = [r for n, r in enumerate(regions) if n not in keep]
    ok = sum(1 for r in left_out if r["status"]["status"] == "ok")
    omitted = {"count": len(left_out), "ok": ok, "not_ok": len(left_out) - ok}
    return [r for n, r in enumerate(regions) if n in keep], omitted


def section_properties(section: Section) -> dict[str, Any]:
    """`proxies`: one item per proxy, `name`, `status` and `status_value`.

    A property of the section's EMF record, not a metric (see deployhealth.metrics).
    `status_value` is STATUS_VALUE's number: 1 ok, -1 unhealthy, -2 unreachable,
    0 unregistered, -3 unknown. Only the name: a URL is not copied.
    """
    items: list[dict[str, Any]] = []
    for region in (section.details.get("workspace_proxies") or {}).get("regions") or []:
        status = str((region.get("status") or {}).get("status", "unknown"))
        if status not in STATUS_VALUE:
            status = "unknown"
        items.append(
            {"name": str(region.get("name", "")), "status": status,
             "status_value": STATUS_VALUE[status]}
        )
    return {"proxies": items}
