"""`make cost`: the monthly cost of the stack in template.yaml at list prices, line by line.

Two scenarios: (a) the template's defaults, (b) 50 workspace proxies and 5 DERP regions.
Each runs every function once against the simulated deployment (scripts/costmodel/measure.py)
and prices the template's resources with what the run wrote (scripts/costmodel/model.py).

    python scripts/cost.py [--scenario a|b] [--probes-per-minute N]
                           [--parameter Name=Value ...] [--route53-aws-endpoint]

docs/cost.md explains the model, its prices and its assumptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from costmodel.cfn import Template, load
from costmodel.measure import SCENARIOS
from costmodel.model import Assumptions
from costmodel.report import estimates, measure_all, render, render_assumptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[s.key for s in SCENARIOS], action="append",
                        help="only this scenario (repeatable; default: both)")
    parser.add_argument("--probes-per-minute", type=float, default=0.0,
                        help="/readyz requests a minute besides Route 53's (default 0)")
    parser.add_argument("--parameter", action="append", default=[], metavar="NAME=VALUE",
                        help="a template parameter value (e.g. EnableRoute53HealthCheck=true)")
    parser.add_argument("--route53-aws-endpoint", action="store_true",
                        help="price the Route 53 health check as an AWS endpoint")
    args = parser.parse_args(argv)

    overrides = dict(p.split("=", 1) for p in args.parameter)
    template = Template(load(), overrides)
    assumptions = dataclasses.replace(
        Assumptions(),
        probe_requests_per_minute=args.probes_per_minute,
        route53_endpoint_is_aws=args.route53_aws_endpoint,
    )
    chosen = [s for s in SCENARIOS if not args.scenario or s.key in args.scenario]
    print(f"deployhealth: monthly cost of template.yaml at list prices "
          f"({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'parameter defaults'})",
          flush=True)
    print("measuring one run of every function on the simulated deployment ...\n", flush=True)
    results = estimates(template, measure_all(template, chosen), assumptions)
    for e in results:
        print(render(e))
        print()
    print(render_assumptions(assumptions))
    print()
    for e in results:
        print(f"{e.title}: ${e.total:.2f} a month")
    return 0


if __name__ == "__main__":
    sys.exit(main())
