"""The `/health` status page and the `/health/codes` table, as HTML strings.

What on-call reads first comes first: the readiness verdict (what `/readyz` answers now and
which gating section makes it so), then one card per section with its findings, an uptime
figure and a latency trend over the stored history, and links to the JSON and text views.

Everything is in the document: one `<style>` block allowed by its hash in the CSP, inline SVG
for the charts, no script, no external asset. The page reloads itself with `<meta
http-equiv=refresh>`, which a CSP does not govern. Links are relative (`api/v2/debug/health`,
`health/codes#eacs04`), so they resolve behind an API Gateway stage prefix as well as on
`deployhealth serve`, and reach routes that ask for the same credentials as the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

from deployhealth.codes import CODES, DOCS_PATH, Code
from deployhealth.model import (
    CODER_SECTION_NAMES,
    SECTION_NAMES,
    Report,
    Section,
    Severity,
    rfc3339,
    section_failing,
    utcnow,
)
from deployhealth.readiness import (
    HYSTERESIS_WINDOW,
    CheckStatus,
    Readiness,
    evaluate_summaries,
    gating_sections,
)
from deployhealth.settings import Settings
from deployhealth.store import ReadinessSnapshot, ResultStore

# Results read per section for the uptime figure and the latency trend: one bounded query
# per section keeps the page as cheap as a few /readyz calls. The same number as readiness's
# hysteresis window, so one read serves both.
PAGE_HISTORY_LIMIT = HYSTERESIS_WINDOW
# Seconds between reloads; `?refresh=` picks another (0: off) within these bounds.
REFRESH_DEFAULT_SECONDS = 30
REFRESH_MIN_SECONDS = 5
REFRESH_MAX_SECONDS = 3600
# The path of the code table, relative to the page (the page is /health).
CODES_ROUTE = "/health/codes"
_CODES_FROM_PAGE = "health/codes"
_PAGE_FROM_CODES = "../health"

_STYLE = """
:root{--bg:#f4f5f7;--card:#fff;--fg:#1d2329;--muted:#5f6b77;--line:#e2e5e9;
--ok:#1f8a4c;--warn:#b86e00;--err:#c9302c;--none:#8a939c;--link:#1b5fc1}
@media (prefers-color-scheme:dark){:root{--bg:#14171a;--card:#1d2125;--fg:#e6e8ea;
--muted:#9aa4ae;--line:#2e3439;--ok:#3fb86f;--warn:#e29a2e;--err:#ef5a55;--none:#6c757d;
--link:#7fb0ff}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,sans-serif}
a{color:var(--link)}code{font:600 .9em ui-monospace,SFMono-Regular,Menlo,monospace}
main{max-width:68rem;margin:0 auto;padding:1rem}
.top{display:flex;flex-wrap:wrap;gap:.5rem 1.5rem;align-items:baseline;
justify-content:space-between;margin-bottom:1rem}
h1{font-size:1.5rem;margin:0}h2{font-size:1.15rem;margin:0}h3{font-size:1.05rem;margin:0}
.meta{color:var(--muted);font-size:.87rem;margin:.2rem 0 0}
nav{display:flex;flex-wrap:wrap;gap:.35rem}
nav a{padding:.2rem .6rem;border:1px solid var(--line);border-radius:999px;
background:var(--card);text-decoration:none;font-size:.87rem}
.verdict{border-radius:.6rem;padding:1rem 1.1rem;margin-bottom:1.25rem;color:#fff}
.verdict.ready{background:var(--ok)}.verdict.not-ready{background:var(--err)}
.verdict h2{font-size:1.35rem}.verdict p{margin:.3rem 0 0}
.verdict a{color:inherit}
.gates{list-style:none;margin:.75rem 0 0;padding:0;display:grid;gap:.3rem}
.gates li{background:rgba(255,255,255,.16);border-radius:.4rem;padding:.35rem .6rem;
overflow-wrap:anywhere}
.gates .fail{background:rgba(0,0,0,.22);font-weight:600}
.gates b{display:inline-block;min-width:4.2rem}
.cards{margin-top:.6rem;display:grid;gap:.9rem;grid-template-columns:repeat(auto-fill,minmax(min(100%,30rem),1fr))}
.card{background:var(--card);border:1px solid var(--line);border-left:.35rem solid var(--none);
border-radius:.6rem;padding:.85rem 1rem;min-width:0}
.card.ok{border-left-color:var(--ok)}.card.warning{border-left-color:var(--warn)}
.card.error{border-left-color:var(--err)}.card.dismissed{opacity:.7}
.card header{display:flex;flex-wrap:wrap;gap:.4rem;align-items:center}
.card header h3{margin-right:auto}.card h3 small{color:var(--muted);font-weight:400}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:999px;font-size:.78rem;
font-weight:600;color:#fff;background:var(--none);white-space:nowrap}
.badge.ok{background:var(--ok)}.badge.warning{background:var(--warn)}
.badge.error{background:var(--err)}
.tag{font-size:.78rem;color:var(--muted);border:1px solid var(--line);border-radius:999px;
padding:0 .45rem;white-space:nowrap}.tag.fails{color:var(--err);border-color:var(--err)}
.facts{display:flex;flex-wrap:wrap;gap:.2rem 1.4rem;margin:.55rem 0}
.facts div{min-width:0}.facts dt{font-size:.75rem;color:var(--muted)}
.facts dd{margin:0;font-weight:600}
.findings{list-style:none;margin:.4rem 0;padding:0;display:grid;gap:.35rem}
.findings li{overflow-wrap:anywhere}.findings .badge{margin-right:.3rem}
.quiet{color:var(--muted);margin:.4rem 0}
.chart{margin-top:.6rem}.chart p{margin:0 0 .15rem;font-size:.78rem;color:var(--muted)}
.chart svg{display:block;width:100%;height:1.6rem}.chart svg.trend{height:2.6rem}
.beat-none{fill:var(--line)}.beat-ok{fill:var(--ok)}.beat-warning{fill:var(--warn)}.beat-error{fill:var(--err)}
.trend polyline{fill:none;stroke:var(--link);stroke-width:1.6}
.trend line{stroke:var(--line);stroke-width:1}
footer{color:var(--muted);font-size:.8rem;margin:1.5rem 0 .5rem}
table{border-collapse:collapse;width:100%;background:var(--card)}
th,td{text-align:left;vertical-align:top;padding:.45rem .6rem;border-bottom:1px solid var(--line)}
td{overflow-wrap:anywhere}tr:target{background:rgba(255,200,0,.22)}
:target{scroll-margin-top:.75rem}
.codes .badge{white-space:normal}
@media (max-width:40rem){main{padding:.6rem}.codes thead{display:none}
.codes,.codes tbody{display:block}
.codes tr{display:block;border-bottom:1px solid var(--line);padding:.4rem 0}
.codes td{display:block;border:0;padding:.1rem .5rem}}
"""

# The CSP allows exactly this style block (by hash) and nothing else: no script, no
# inline style attribute, no fetch, no image, no frame, no form.
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Verdict:
    """What `/readyz` answers now, as the page shows it.

    `readiness` is deployhealth.readiness's judgement of the gating sections; `problem` is set
    instead when readiness cannot be judged (the store's last write failed), which `/readyz`
    answers with 503 too.
    """

    readiness: Readiness | None
    problem: str = ""
    # Configured as gating but dismissed: not judged.
    dismissed_gating: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.readiness is not None and not self.problem and self.readiness.ready

    @property
    def status(self) -> int:
        return 200 if self.ready else 503

    def check(self, name: str) -> CheckStatus | None:
        if self.readiness is None:
            return None
        return next((c for c in self.readiness.checks if c.name == name), None)


def page_verdict(
    settings: Settings,
    readiness: ReadinessSnapshot,
    dismissed: Sequence[str],
    store: ResultStore,
) -> Verdict:
    """What `/readyz` would answer now: the same read and rule (deployhealth.readiness)."""
    gone = set(dismissed)
    dismissed_gating = tuple(s for s in settings.gating_sections if s in gone)
    if readiness.problem:
        # /readyz answers 503 naming the store, not a verdict per section.
        return Verdict(None, f"result store {store.description}: {readiness.problem}",
                       dismissed_gating)
    sections = gating_sections(settings, dismissed)
    return Verdict(evaluate_summaries(settings, readiness.summaries, sections), "",
                   dismissed_gating)


@dataclass(frozen=True)
class PageOptions:
    docs_base_url: str = ""
    refresh_seconds: int = REFRESH_DEFAULT_SECONDS
    window: int = PAGE_HISTORY_LIMIT
    now: datetime = field(default_factory=utcnow)


# --- small pieces --------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def ago(moment: datetime, now: datetime) -> str:
    """"12 s ago", "4 min ago", "3 h ago", "2 d ago"; "in 5 s" for a moment after now."""
    seconds = (now - moment).total_seconds()
    future = seconds < 0
    amount = _span(abs(seconds))
    return f"in {amount}" if future else f"{amount} ago"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h".replace(".0 h", " h")
    return f"{seconds / 86400:.1f} d".replace(".0 d", " d")


def _time(moment: datetime, now: datetime) -> str:
    exact = rfc3339(moment)
    shown = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<time datetime="{_e(exact)}" title="{_e(shown)}">{_e(ago(moment, now))}</time>'


def code_href(code: str, docs_base_url: str = "") -> str:
    """Where a code's explanation is: the server's own table, or the configured docs site."""
    known = CODES.get(code)
    fragment = quote(code.lower(), safe="")
    if docs_base_url:
        path = known.anchor.partition("#")[0] if known is not None else DOCS_PATH
        return f"{docs_base_url}{path}#{fragment}"
    return f"{_CODES_FROM_PAGE}#{fragment}"


def _code_link(code: str, docs_base_url: str) -> str:
    known = CODES.get(code)
    title = f' title="{_e(known.title)}"' if known is not None else ""
    return f'<a href="{_e(code_href(code, docs_base_url))}"{title}><code>{_e(code)}</code></a>'


def _badge(severity: str | None, text: str | None = None) -> str:
    if severity not in ("ok", "warning", "error"):
        return f'<span class="badge">{_e(text or "no result")}</span>'
    return f'<span class="badge {severity}">{_e(text or severity)}</span>'


def _label(name: str) -> str:
    return f"{_e(CODER_SECTION_NAMES[name])} <small>{_e(name)}</small>"


# --- the verdict ---------------------------------------------------------------------------


def _verdict(verdict: Verdict, report: Report, expected: Sequence[str]) -> str:
    head = "Ready: /readyz answers 200" if verdict.ready else "Not ready: /readyz answers 503"
    checks = verdict.readiness.checks if verdict.readiness is not None else ()
    failed = [c for c in checks if not c.passed]
    if verdict.problem:
        summary = f"Readiness cannot be judged: {_e(verdict.problem)}"
    elif not checks:
        summary = "No section gates readiness: /readyz answers 200 whatever the results."
    elif failed:
        summary = f"{len(failed)} of {len(checks)} gating sections fail."
    else:
        summary = f"All {len(checks)} gating sections pass."
    gates = []
    # Failing ones first: they are the answer to "why 503".
    for check in sorted(checks, key=lambda c: c.passed):
        if check.status == "failed":
            why, mark = check.reason + _meanings(check.codes), "fails"
        elif check.status == "excluded":
            why, mark = "excluded", "passes"
        else:
            why, mark = _passing_reason(report.sections.get(check.name), check.name), "passes"
        gates.append(
            f'<li class="{"pass" if check.passed else "fail"}"><b>{mark}</b> '
            f'<a href="#{_e(check.name)}">{_e(check.name)}</a>: {_e(why)}</li>'
        )
    gating = {c.name for c in checks}
    others = [n for n in expected if n not in gating and n not in verdict.dismissed_gating]
    notes = []
    if others:
        failing = [n for n in others if _failing(n, report.sections.get(n))]
        note = f"Not gating: {', '.join(others)}"
        if failing:
            note += f" ({', '.join(failing)} failing, which does not change the answer)"
        notes.append(note + ".")
    if verdict.dismissed_gating:
        notes.append(f"Dismissed, so not judged: {', '.join(verdict.dismissed_gating)}.")
    cls = "ready" if verdict.ready else "not-ready"
    return (
        f'<section class="verdict {cls}" id=verdict><h2>{head}</h2><p>{summary}</p>'
        f"<ul class=gates>{''.join(gates)}</ul>"
        + "".join(f"<p>{_e(n)}</p>" for n in notes)
        + "</section>"
    )


def _meanings(codes: Sequence[str]) -> str:
    titles = [CODES[c].title for c in codes if c in CODES]
    return f" ({' '.join(titles)})" if titles else ""


def _passing_reason(section: Section | None, name: str) -> str:
    if section is None:
        return "ok"
    if section.severity is Severity.OK:
        return "ok, fresh"
    # A warning passes everywhere but access_url: say so, or on-call wonders.
    return f"{section.severity.value} ({' '.join(section.codes)}), which does not fail {name}"


def _failing(name: str, section: Section | None) -> bool:
    return section is not None and section_failing(name, section)


# --- one section -----------------------------------------------------------------------------


def _findings(section: Section, docs_base_url: str) -> str:
    items = [
        f"<li>{_badge(f.severity.value)}{_code_link(f.code, docs_base_url)}: {_e(f.message)}</li>"
        for f in [*section.errors, *section.warnings]
    ]
    if not items:
        return "<p class=quiet>No findings.</p>"
    return f"<ul class=findings>{''.join(items)}</ul>"


def _uptime(name: str, past: Sequence[Section], now: datetime) -> tuple[str, str]:
    """The uptime figure and what it is over: share of stored results not failing."""
    if not past:
        return "n/a", "no stored results"
    up = sum(1 for s in past if not section_failing(name, s))
    share = 100.0 * up / len(past)
    figure = f"{share:.1f} %".replace(".0 %", " %") if share not in (0, 100) else f"{share:.0f} %"
    oldest = min(s.checked_at for s in past)
    over = f"of {len(past)} results, {_span((now - oldest).total_seconds())}"
    return figure, over


def _beats(name: str, past: Sequence[Section], window: int, now: datetime) -> str:
    """Uptime Kuma's heartbeat bar: one mark per stored result, oldest left, newest right.

    The bar always has `window` slots; slots without a result yet are drawn faint, so a
    bar's fill says how much history the uptime figure stands on.
    """
    if not past:
        return ""
    oldest_first = list(reversed(past))
    slots = max(window, len(oldest_first))
    start = slots - len(oldest_first)  # right-aligned: the newest result is always at the edge
    rects = [
        f'<rect class="beat-none" x="{i * 10 + 1}" y="0" width="8" height="20"/>'
        for i in range(start)
    ]
    for i, s in enumerate(oldest_first):
        kind = "error" if section_failing(name, s) else s.severity.value
        codes = " ".join(s.codes) or "no codes"
        tip = f"{rfc3339(s.checked_at)} ({ago(s.checked_at, now)}): {s.severity.value}, {codes}"
        rects.append(
            f'<rect class="beat-{_e(kind)}" x="{(start + i) * 10 + 1}" y="0" width="8" '
            f'height="20"><title>{_e(tip)}</title></rect>'
        )
    failed = sum(1 for s in past if section_failing(name, s))
    caption = f"Last {len(past)} results, newest right: {failed} failed {name}"
    return (
        f"<div class=chart><p>{_e(caption)}</p>"
        f'<svg class=beats viewBox="0 0 {slots * 10} 20" preserveAspectRatio="none" '
        f'role=img aria-label="{_e(caption)}">{"".join(rects)}</svg></div>'
    )


def _trend(name: str, past: Sequence[Section]) -> str:
    """The duration of each stored result as a sparkline, oldest left."""
    durations = [s.duration_ms for s in reversed(past)]
    if len(durations) < 2:
        return ""
    top = max(durations) or 1.0
    step = 200 / (len(durations) - 1)
    points = " ".join(
        f"{i * step:.1f},{38 - 36 * d / top:.1f}" for i, d in enumerate(durations)
    )
    median = statistics.median(durations)
    caption = (
        f"Check duration: last {durations[-1]:.0f} ms, median {median:.0f} ms, "
        f"max {top:.0f} ms"
    )
    return (
        f"<div class=chart><p>{_e(caption)}</p>"
        '<svg class=trend viewBox="0 0 200 40" preserveAspectRatio="none" role=img '
        f'aria-label="{_e(name)}: {_e(caption)}">'
        '<line x1="0" y1="38" x2="200" y2="38" vector-effect="non-scaling-stroke"/>'
        f'<polyline points="{points}" vector-effect="non-scaling-stroke"/></svg></div>'
    )


def _card(
    name: str,
    section: Section | None,
    past: Sequence[Section],
    verdict: Verdict,
    options: PageOptions,
) -> str:
    check = verdict.check(name)
    failing = section is not None and section_failing(name, section)
    if check is None:
        tag = "dismissed" if name in verdict.dismissed_gating else "not gating"
        tags = "<span class='tag fails'>failing</span>" if failing else ""
        tags += f"<span class=tag>{tag}</span>"
    elif check.passed:
        tags = "<span class=tag>gating</span>"
    else:
        tags = "<span class='tag fails'>gating: fails readiness</span>"
    if section is None:
        return (
            f'<article class=card id="{_e(name)}"><header><h3>{_label(name)}</h3>'
            f"{_badge(None)}{tags}</header><p class=quiet>No result yet: the {_e(name)} "
            "family has not stored one.</p></article>"
        )
    uptime, over = _uptime(name, past, options.now)
    classes = f"card {section.severity.value}" + (" dismissed" if section.dismissed else "")
    return (
        f'<article class="{classes}" id="{_e(name)}"><header><h3>{_label(name)}</h3>'
        f"{_badge(section.severity.value)}{tags}</header>"
        "<dl class=facts>"
        f"<div><dt>checked</dt><dd>{_time(section.checked_at, options.now)}</dd></div>"
        f"<div><dt>took</dt><dd>{section.duration_ms:.0f} ms</dd></div>"
        f"<div><dt>uptime</dt><dd>{_e(uptime)} <small class=meta>{_e(over)}</small></dd></div>"
        "</dl>"
        f"{_findings(section, options.docs_base_url)}"
        f"{_beats(name, past, options.window, options.now)}{_trend(name, past)}"
        "</article>"
    )


# --- the pages -------------------------------------------------------------------------------


def _head(title: str, refresh_seconds: int = 0) -> str:
    refresh = (
        f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds > 0 else ""
    )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"{refresh}<title>{_e(title)}</title><style>{_STYLE}</style></head>"
    )


def render_page(
    report: Report,
    expected: Sequence[str],
    history: Mapping[str, Sequence[Section]],
    docs_base_url: str = "",
    *,
    verdict: Verdict | None = None,
    options: PageOptions | None = None,
) -> str:
    """The status page. `history` is each section's stored results, newest first."""
    if options is None:
        options = PageOptions(docs_base_url=docs_base_url)
    if verdict is None:
        verdict = Verdict(None, "readiness was not judged")
    now = options.now
    cards = [
        _card(name, report.sections.get(name), history.get(name, ()), verdict, options)
        for name in SECTION_NAMES
        if name in expected
    ]
    version = f"Coder {_e(report.coder_version)} · " if report.coder_version else ""
    refresh = (
        f"reloads every {options.refresh_seconds} s"
        if options.refresh_seconds > 0
        else "does not reload (refresh=0)"
    )
    state = "ready" if verdict.ready else "NOT READY"
    return (
        _head(f"{state} · {report.deployment}: deployment health", options.refresh_seconds)
        + "<body><main>"
        f"<div class=top><div><h1>{_e(report.deployment)}</h1>"
        f"<p class=meta>{version}results as of {_time(report.time, now)} · this page "
        f"{_e(refresh)}</p></div>"
        "<nav aria-label='Other views'>"
        '<a href="api/v2/debug/health">JSON report</a>'
        '<a href="api/v2/debug/health?format=text">text report</a>'
        '<a href="readyz?verbose">/readyz?verbose</a>'
        f'<a href="{_CODES_FROM_PAGE}">codes</a></nav></div>'
        f"{_verdict(verdict, report, expected)}"
        "<section><h2>Sections</h2>"
        f"<p class=meta>Uptime: share of the last {options.window} stored results per section "
        "that did not fail the section (Coder's rule: access_url fails above ok, the others "
        "at error). The bar and the trend show the same results, newest right.</p>"
        f"<div class=cards>{''.join(cards)}</div></section>"
        f"<footer>deployhealth · page built {_e(rfc3339(now))} · the section's readiness "
        "rules are in /readyz?verbose</footer>"
        "</main></body></html>\n"
    )


def _code_row(code: Code) -> str:
    anchor = code.code.lower()
    return (
        f'<tr id="{_e(anchor)}"><td><a href="#{_e(anchor)}"><code>{_e(code.code)}</code></a></td>'
        f"<td>{_e(code.section)}</td><td>{_badge(code.severity.value, code.severity_text)}</td>"
        f"<td>{_e(code.title)}</td><td>{_e(code.action)}</td></tr>"
    )


def render_codes_page(deployment: str) -> str:
    """Every code deployhealth emits, one anchored row each (`#eacs04`), from deployhealth.codes."""
    rows = "".join(_code_row(code) for code in CODES.values())
    return (
        _head(f"{deployment}: deployhealth codes")
        + "<body><main>"
        f"<div class=top><div><h1>Codes</h1><p class=meta>What each code on the "
        f"{_e(deployment)} status page means and what to do about it.</p></div>"
        f'<nav><a href="{_PAGE_FROM_CODES}">back to the status page</a></nav></div>'
        "<table class=codes><thead><tr><th>code</th><th>section</th><th>severity</th>"
        f"<th>meaning</th><th>what to do</th></tr></thead><tbody>{rows}</tbody></table>"
        "<footer>The same table as <code>deployhealth codes</code> and docs/codes.md."
        "</footer></main></body></html>\n"
    )
