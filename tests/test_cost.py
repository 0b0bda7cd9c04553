"""`make cost`: the cost model adds up, counts the metrics a real run emits, follows the template.

The model (scripts/costmodel) measures one run of every function against the simulated
deployment, for the template's defaults (a) and for 50 workspace proxies and 5 DERP regions
(b), then prices template.yaml's resources. The dollar figures depend on list prices and on
assumptions (docs/cost.md), so no test pins them; these check what a user relies on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from costmodel.cfn import Template, load  # noqa: E402
from costmodel.measure import DEFAULTS, LARGE, Measurement  # noqa: E402
from costmodel.model import Estimate, estimate  # noqa: E402
from costmodel.report import estimates, measure_all, render  # noqa: E402


@pytest.fixture(scope="module")
def template() -> Template:
    return Template(load())


@pytest.fixture(scope="module")
def measured(template: Template) -> dict[str, Measurement]:
    return {m.scenario.key: m for m in measure_all(template, (DEFAULTS, LARGE))}


@pytest.fixture(scope="module")
def priced(template: Template, measured: dict[str, Measurement]) -> dict[str, Estimate]:
    return {
        key: e
        for key, e in zip(measured, estimates(template, list(measured.values())), strict=True)
    }


def test_the_defaults_total_is_the_sum_of_its_lines(priced: dict[str, Estimate]) -> None:
    for e in priced.values():
        assert e.lines
        for line in e.lines:
            assert line.quantity >= 0 and line.unit_price >= 0, line
            assert line.monthly == pytest.approx(line.quantity * line.unit_price)
        assert e.total == pytest.approx(sum(line.monthly for line in e.lines))
        # The printed table ends with the same total.
        assert f"{e.total:.2f}" in render(e).split("total (the sum of the lines above)")[1]


def test_every_function_of_the_template_was_measured(
    template: Template, measured: dict[str, Measurement], priced: dict[str, Estimate]
) -> None:
    for key, e in priced.items():
        kinds = {c.function.kind for c in e.functions}
        assert kinds <= set(measured[key].runs), kinds - set(measured[key].runs)
        for c in e.functions:
            run = measured[key].runs[c.function.kind]
            assert run.emf_records, f"{c.function.logical_id} emitted no EMF record"
            if c.function.rate_minutes is not None:
                assert len(run.written_items) == 2, "a history item and the latest item"


def test_scenario_b_really_is_bigger(measured: dict[str, Measurement]) -> None:
    a, b = measured["a"], measured["b"]
    assert (b.proxies, b.derp_regions) == (50, 5)
    # 25 times the proxies; the stored body is compressed, so the item grows less than that.
    assert max(b.runs["workspace_proxy"].written_items) > 3 * max(
        a.runs["workspace_proxy"].written_items
    )
    assert b.runs["derp"].emf_bytes > a.runs["derp"].emf_bytes


def test_the_metric_set_does_not_grow_with_the_deployment(
    measured: dict[str, Measurement],
) -> None:
    """product.md: the set of metrics is small and fixed, whatever the deployment's size."""
    a, b = measured["a"].combinations, measured["b"].combinations
    assert a, "the run emitted no metric at all"
    grown = sorted(b - a)
    assert len(b) <= len(a), (
        f"{len(a)} metrics at (a), {len(b)} at (b); new at (b), e.g.: {grown[:4]}"
    )


def test_removing_a_resource_lowers_the_total(
    template: Template, measured: dict[str, Measurement]
) -> None:
    full = estimate(template, measured["a"]).total
    for rtype in (
        "AWS::CloudWatch::Alarm",
        "AWS::CloudWatch::CompositeAlarm",
        "AWS::Serverless::Function",
    ):
        present = [logical_id for logical_id, _ in template.resources(rtype)]
        assert present, f"the template has no {rtype}"
        smaller = estimate(template.copy_without(present[0]), measured["a"]).total
        assert smaller < full, f"removing {present[0]} ({rtype}) did not lower the total"


def test_a_resource_whose_condition_is_false_costs_nothing(
    measured: dict[str, Measurement],
) -> None:
    off = Template(load(), {"EnableRoute53HealthCheck": "false"})
    on = Template(load(), {"EnableRoute53HealthCheck": "true"})
    without = estimate(off, measured["a"])
    with_check = estimate(on, measured["a"])
    assert not [line for line in without.lines if line.service == "Route 53"]
    assert [line for line in with_check.lines if line.service == "Route 53"]
    assert with_check.total > without.total
