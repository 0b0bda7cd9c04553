"""Reading template.yaml as CloudFormation would, for given parameter values, without AWS.

The template is read as written (cfn-lint's decoder keeps short tags such as !Ref as
{"Ref": ...}); `resolve` evaluates the intrinsic functions this template uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cfnlint.decode import cfn_yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    """Plain dicts and lists; intrinsic functions stay as {"Ref": ...}, {"Fn::Sub": ...}."""
    return json.loads(json.dumps(cfn_yaml.load(str(path))))


def env_of(template: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
    """A function's environment: the Globals merged with its own (as SAM merges them)."""
    return {
        **template["Globals"]["Function"]["Environment"]["Variables"],
        **props.get("Environment", {}).get("Variables", {}),
    }


def parameter_values(template: dict[str, Any], **overrides: str) -> dict[str, str]:
    """Every parameter's default (CommaDelimitedList as text), with overrides.

    An override may also name a resource or a pseudo parameter ("HealthTable",
    "AWS::Region"): `resolve` then uses it for Ref and Fn::Sub as well.
    """
    values = {k: str(p.get("Default", "")) for k, p in template["Parameters"].items()}
    values.update(overrides)
    return values


def resolve(template: dict[str, Any], value: Any, params: dict[str, str]) -> Any:
    """Evaluate the intrinsic functions this template uses on parameters, for given values."""
    if isinstance(value, list):
        return [resolve(template, v, params) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or not next(iter(value)).startswith(("Ref", "Fn::", "Condition")):
        return {k: resolve(template, v, params) for k, v in value.items()}
    ((fn, arg),) = value.items()
    if fn == "Ref":
        if arg in params:
            kind = template["Parameters"].get(arg, {}).get("Type")
            text = params[arg]
            return [x for x in text.split(",")] if kind == "CommaDelimitedList" else text
        return value  # a resource or pseudo parameter without a given value: left as is
    if fn == "Fn::FindInMap":
        mapping, key, attr = (resolve(template, a, params) for a in arg)
        return template["Mappings"][mapping][key][attr]
    if fn == "Fn::Sub" and isinstance(arg, str):
        return re.sub(r"\$\{([\w:]+)\}", lambda m: params.get(m[1], m[0]), arg)
    if fn == "Fn::Join":
        sep, items = arg
        return sep.join(resolve(template, items, params))
    if fn == "Fn::Split":
        sep, text = (resolve(template, a, params) for a in arg)
        return text.split(sep)
    if fn == "Fn::Select":
        index, items = (resolve(template, a, params) for a in arg)
        return items[int(index)]
    if fn == "Fn::Equals":
        a, b = (resolve(template, x, params) for x in arg)
        return a == b
    if fn == "Fn::Not":
        return not resolve(template, arg[0], params)
    if fn == "Fn::And":
        return all(resolve(template, x, params) for x in arg)
    if fn == "Fn::Or":
        return any(resolve(template, x, params) for x in arg)
    if fn == "Condition":
        return condition(template, arg, params)
    if fn == "Fn::If":
        name, yes, no = arg
        return resolve(template, yes if condition(template, name, params) else no, params)
    return value


def condition(template: dict[str, Any], name: str, params: dict[str, str]) -> bool:
    return bool(resolve(template, template["Conditions"][name], params))
