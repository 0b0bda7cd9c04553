"""Checks a report, or one section, against Coder's `HealthcheckReport` and our code table.

The schema, tests/schema/healthcheck_report.schema.json, is written from Coder's sources (its
header says which file and commit each part comes from): every key Coder requires must be
there with Coder's type; keys Coder does not define are deployhealth's documented extensions.

On top of the schema, every code a section carries must be in `deployhealth.codes.CODES`,
belong to that section (or "any"), and sit where its severity allows: a code in `warnings`
has severity warning or ok; a code in `error` has severity error or an `error_when`; and a
section at error has an `error` (readiness fails it, so something must say why).

    report = check_report(response.json())        # raises AssertionError, listing problems
    check_section("derp", probe(settings, deadline))
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from deployhealth.codes import CODES
from deployhealth.model import Section, Severity

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "healthcheck_report.schema.json"

# Each section's definition in the schema.
SECTION_DEFS = {
    "access_url": "AccessURLReport",
    "database": "DatabaseReport",
    "websocket": "WebsocketReport",
    "derp": "DERPHealthReport",
    "workspace_proxy": "WorkspaceProxyReport",
    "provisioner_daemons": "ProvisionerDaemonsReport",
    "entitlements": "EntitlementsSection",
}

# Section.error joins "<CODE>: <message>" lines.
_ERROR_CODE = re.compile(r"^([A-Z][A-Z0-9]+): ")

S = TypeVar("S", Section, Mapping[str, Any])


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(loaded)
    return loaded


@cache
def _validator(definition: str | None) -> Draft202012Validator:
    root = schema()
    if definition is None:
        return Draft202012Validator(root)
    # The definition, resolved against the whole document so its $refs still work.
    return Draft202012Validator({"$defs": root["$defs"], "$ref": f"#/$defs/{definition}"})


def schema_errors(data: Mapping[str, Any], definition: str | None = None) -> list[str]:
    """Every place `data` breaks the schema (or one of its $defs), as `path: problem`."""
    # Through JSON, as a reader gets it: tuples become lists, non-string keys fail here.
    plain = json.loads(json.dumps(data))
    found = sorted(_validator(definition).iter_errors(plain), key=lambda e: list(e.path))
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in map(_reason, found)
    ]


def _reason(error: ValidationError) -> ValidationError:
    """The deepest reason inside "is not valid under any of the given schemas" (T | null)."""
    if not error.context:
        return error
    tried = [c for c in error.context if (c.validator, c.validator_value) != ("type", "null")]
    deepest = max(tried or error.context, key=lambda c: len(c.absolute_path))
    return _reason(deepest)


def code_errors(name: str, data: Mapping[str, Any]) -> list[str]:
    """Codes of one section that are unknown, of another section, or at the wrong level."""
    problems: list[str] = []

    def known(code: str, where: str) -> Any:
        entry = CODES.get(code)
        if entry is None:
            problems.append(f"{name}.{where}: {code} is not in deployhealth.codes.CODES")
        elif entry.section not in (name, "any"):
            problems.append(f"{name}.{where}: {code} belongs to section {entry.section}")
        return entry

    for n, warning in enumerate(data.get("warnings") or []):
        code = warning.get("code", "")
        entry = known(code, f"warnings/{n}")
        if entry is not None and entry.severity not in (Severity.WARNING, Severity.OK):
            problems.append(
                f"{name}.warnings/{n}: {code} has severity {entry.severity.value}; a warning "
                "entry needs a code of severity warning or ok"
            )
    error = data.get("error")
    if data.get("severity") == Severity.ERROR.value and not isinstance(error, str):
        # Readiness fails this section: /readyz and on-call must see a code saying why.
        problems.append(f"{name} is at error but its `error` names no code")
    if isinstance(error, str):
        codes = [m[1] for line in error.splitlines() if (m := _ERROR_CODE.match(line))]
        if not codes:
            problems.append(f"{name}.error does not start with a code: {error[:80]!r}")
        for code in codes:
            entry = known(code, "error")
            if entry is None:
                continue
            if entry.severity is not Severity.ERROR and not getattr(entry, "error_when", None):
                problems.append(
                    f"{name}.error: {code} has severity {entry.severity.value} and no "
                    "error_when; only an error code may appear in `error`"
                )
    return problems


def check_report(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """Assert `report` is Coder's HealthcheckReport and its codes are ours; return it."""
    problems = schema_errors(report)
    for name in SECTION_DEFS:
        section = report.get(name)
        if isinstance(section, Mapping):
            problems += code_errors(name, section)
    assert not problems, "the report does not match Coder's HealthcheckReport:\n" + "\n".join(
        problems
    )
    return report


def check_section(name: str, section: S) -> S:
    """Assert one section matches its part of Coder's report and our code table; return it."""
    data = section.to_dict() if isinstance(section, Section) else section
    problems = schema_errors(data, SECTION_DEFS[name]) + code_errors(name, data)
    assert not problems, f"the {name} section does not match Coder's report:\n" + "\n".join(
        problems
    )
    return section
