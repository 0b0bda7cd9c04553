"""Both scenarios, measured and priced: what `make cost` prints, and what tests call."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from costmodel.cfn import Template, load
from costmodel.measure import SCENARIOS, Measurement, Scenario, measure
from costmodel.model import Assumptions, Estimate, estimate
from costmodel.prices import CHECKED, PRICES, REGION

# The library's default when the template sets no DEPLOYHEALTH_HISTORY_RETENTION_DAYS.
_RETENTION_KEY = "DEPLOYHEALTH_HISTORY_RETENTION_DAYS"


def measure_all(
    template: Template, scenarios: Iterable[Scenario] = SCENARIOS
) -> list[Measurement]:
    """Measure each scenario with what the template gives every function: the deployment
    name and namespace the metrics carry, the STUN servers of the default DERP map, and the
    history retention (the library's default unless the template sets it)."""
    from deployhealth.settings import Settings

    env = template.resolve(template.data.get("Globals", {}).get("Function", {}))
    variables = (env.get("Environment") or {}).get("Variables") or {}
    stun = [s for s in str(variables.get("DEPLOYHEALTH_STUN_SERVERS", "")).split(",") if s]
    retention = variables.get(_RETENTION_KEY) or Settings().history_retention_days
    return [
        measure(
            scenario,
            deployment=str(variables.get("DEPLOYHEALTH_NAME") or "coder"),
            namespace=str(variables.get("DEPLOYHEALTH_METRICS_NAMESPACE") or "DeployHealth"),
            stun_servers=len(stun),
            retention_days=float(retention),
        )
        for scenario in scenarios
    ]


def estimates(
    template: Template | None = None,
    measurements: Sequence[Measurement] | None = None,
    assumptions: Assumptions | None = None,
) -> list[Estimate]:
    """The monthly estimate of each scenario (measuring them unless given)."""
    template = template or Template(load())
    measurements = measurements or measure_all(template)
    out = []
    for m in measurements:
        e = estimate(template, m, assumptions)
        e.title = f"({m.scenario.key}) {m.scenario.title}"
        out.append(e)
    return out


# --- printing -------------------------------------------------------------------------------


def render(e: Estimate) -> str:
    """One scenario's table, its per-function figures and the metrics it pays for."""
    out = [e.title, ""]
    header = f"  {'service':<12}{'line item':<58}{'quantity':>14}  {'unit price':<30}{'$/month':>9}"
    out += [header, "  " + "-" * (len(header) - 2)]
    for line in e.lines:
        price = PRICES[line.price_key]
        out.append(
            f"  {line.service:<12}{line.item[:57]:<58}{_quantity(line.quantity):>14}  "
            f"{price.label()[:29]:<30}{line.monthly:>9.2f}"
        )
    out.append("  " + "-" * (len(header) - 2))
    out.append(f"  {'total (the sum of the lines above)':<114}{e.total:>9.2f}")
    out += ["", "  per function (durations: loopback as measured, region as assumed)", ""]
    out.append(
        f"  {'function':<56}{'MB':>5}{'runs/month':>12}{'loopback s':>12}{'assumed s':>11}"
        f"{'log B/run':>11}{'WRU/run':>9}{'RRU/run':>9}"
    )
    for c in e.functions:
        f = c.function
        out.append(
            f"  {f.logical_id + ' (' + f.kind + ')':<56}{f.memory_mb:>5}{c.invocations:>12,.0f}"
            f"{c.measured_seconds:>12.3f}{c.seconds:>11.2f}{c.log_bytes:>11,.0f}"
            f"{c.write_units:>9.0f}{c.read_units:>9.0f}"
        )
    out += ["", f"  custom metrics emitted ({len(e.metric_names)}):"]
    out += [f"    {name}" for name in e.metric_names]
    if e.notes:
        out += ["", *(f"  note: {n}" for n in e.notes)]
    return "\n".join(out)


def render_assumptions(a: Assumptions | None = None) -> str:
    a = a or Assumptions()
    durations = ", ".join(f"{k} {v:g} s" for k, v in a.field_seconds.items())
    return "\n".join([
        f"Prices: list prices, {REGION}, arm64 Lambda, checked {CHECKED} (scripts/costmodel/"
        "prices.py); no free tier applied.",
        "Assumptions (docs/cost.md):",
        f"  - a month is {a.days_per_month:g} days; a rate(N minutes) schedule runs "
        f"{a.days_per_month:g} x 1440 / N times;",
        f"  - run durations in a region, not loopback's: {durations}; derp +"
        f"{a.seconds_per_extra_derp_region:g} s per extra region, workspace_proxy +"
        f"{a.seconds_per_extra_proxy:g} s per extra proxy; every run +{a.store_seconds:g} s "
        "for its two DynamoDB writes;",
        f"  - the websocket idle probe lasts WebsocketIdleSeconds + {a.idle_extra_seconds:g} s;"
        f" a warm /readyz {a.api_seconds:g} s, reading the store at most once per "
        f"{a.api_readiness_cache_seconds:g} s (the API function's snapshot cache);",
        f"  - cold starts: {a.cold_starts_per_day:g} a day per function run at least every "
        f"{a.warm_gap_minutes:g} min, else every run; INIT {a.init_seconds:g} s each;",
        f"  - /readyz callers besides Route 53: {a.probe_requests_per_minute:g} a minute; "
        f"Route 53: {a.route53_checkers_per_region:g} request per checker region per "
        f"interval, endpoint priced as {'an AWS' if a.route53_endpoint_is_aws else 'a non-AWS'}"
        " endpoint;",
        "  - every metric the run emits is billed for the whole month (metrics are prorated "
        "by the hour: one emitted rarely costs less);",
        "  - logs are billed as the bytes the functions print: EMF records as measured, the "
        "check handler's JSON line, Lambda's START/END/REPORT; storage uncompressed;",
        f"  - DynamoDB items as measured (two per run: history with TTL, latest); reads are "
        f"strongly consistent Queries of the latest partition, and each put's GetItem of "
        f"the latest item; {a.alarm_emails_per_month:g} "
        "alarm e-mails a month.",
    ])


def _quantity(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.4f}"
