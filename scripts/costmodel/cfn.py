"""template.yaml as plain data, and an evaluator for the intrinsic functions it uses.

cfn-lint's decoder reads the short tags (!Ref, !Sub, ...) as {"Ref": ...}, {"Fn::Sub": ...};
`Template.resolve` evaluates them for given parameter values. A `Ref` to a resource or a
pseudo parameter other than AWS::NoValue is left as it is: the cost model never needs
physical names.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfnlint.decode import cfn_yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"

# What Fn::If / Ref AWS::NoValue yield: the property is dropped by the caller.
NO_VALUE = object()


def load(path: Path = TEMPLATE) -> dict[str, Any]:
    """The template as plain dicts and lists (intrinsic functions kept as written)."""
    data: dict[str, Any] = json.loads(json.dumps(cfn_yaml.load(str(path))))
    return data


def parameter_defaults(template: dict[str, Any]) -> dict[str, str]:
    """Every parameter's default as text (a CommaDelimitedList as its text)."""
    return {k: str(p.get("Default", "")) for k, p in template.get("Parameters", {}).items()}


@dataclass
class Template:
    """A template and the parameter values it is evaluated with (defaults unless given)."""

    data: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = {**parameter_defaults(self.data), **self.overrides}

    def copy_without(self, logical_id: str) -> Template:
        """A copy of the template with one resource removed (for what-if comparisons)."""
        data = copy.deepcopy(self.data)
        del data["Resources"][logical_id]
        return Template(data, dict(self.overrides))

    # --- resources --------------------------------------------------------------------

    def resources(self, rtype: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(logical id, resource) of every resource present under the parameter values."""
        for logical_id, resource in self.data.get("Resources", {}).items():
            if rtype is not None and resource.get("Type") != rtype:
                continue
            condition = resource.get("Condition")
            if condition is not None and not self.condition(condition):
                continue
            yield logical_id, resource

    def properties(self, resource: dict[str, Any]) -> dict[str, Any]:
        """A resource's properties, every intrinsic function evaluated."""
        props = self.resolve(resource.get("Properties", {}))
        return props if isinstance(props, dict) else {}

    def function_properties(self, resource: dict[str, Any]) -> dict[str, Any]:
        """An AWS::Serverless::Function's properties with the Globals merged, as SAM does."""
        globals_ = self.resolve(self.data.get("Globals", {}).get("Function", {}))
        own = self.properties(resource)
        merged = {**globals_, **own}
        env_globals = (globals_.get("Environment") or {}).get("Variables") or {}
        env_own = (own.get("Environment") or {}).get("Variables") or {}
        merged["Environment"] = {"Variables": {**env_globals, **env_own}}
        return merged

    # --- evaluation -------------------------------------------------------------------

    def condition(self, name: str) -> bool:
        return bool(self.resolve(self.data["Conditions"][name]))

    def resolve(self, value: Any) -> Any:
        """Evaluate the intrinsic functions in `value` for this template's parameters."""
        if isinstance(value, list):
            items = [self.resolve(v) for v in value]
            return [v for v in items if v is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) != 1 or not next(iter(value)).startswith(("Ref", "Fn::", "Condition")):
            out = {k: self.resolve(v) for k, v in value.items()}
            return {k: v for k, v in out.items() if v is not NO_VALUE}
        ((fn, arg),) = value.items()
        return self._function(fn, arg, value)

    def _function(self, fn: str, arg: Any, value: dict[str, Any]) -> Any:
        if fn == "Ref":
            return self._ref(arg, value)
        if fn == "Fn::FindInMap":
            mapping, key, attr = (self.resolve(a) for a in arg)
            return self.data["Mappings"][mapping][str(key)][attr]
        if fn == "Fn::Sub":
            return self._sub(arg)
        if fn == "Fn::Join":
            sep, items = arg
            return sep.join(str(v) for v in self.resolve(items))
        if fn == "Fn::Split":
            sep, text = (self.resolve(a) for a in arg)
            return str(text).split(sep)
        if fn == "Fn::Select":
            index, items = (self.resolve(a) for a in arg)
            return items[int(index)]
        if fn == "Fn::Equals":
            a, b = (self.resolve(x) for x in arg)
            return a == b
        if fn == "Fn::Not":
            return not self.resolve(arg[0])
        if fn == "Fn::And":
            return all(self.resolve(x) for x in arg)
        if fn == "Fn::Or":
            return any(self.resolve(x) for x in arg)
        if fn == "Condition":
            return self.condition(arg)
        if fn == "Fn::If":
            name, yes, no = arg
            return self.resolve(yes if self.condition(name) else no)
        return value  # Fn::GetAtt and the like: left as written

    def _ref(self, name: str, value: dict[str, Any]) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.params:
            text = self.params[name]
            kind = self.data["Parameters"][name]["Type"]
            return text.split(",") if kind == "CommaDelimitedList" else text
        return value  # a resource or another pseudo parameter

    def _sub(self, arg: Any) -> str:
        if isinstance(arg, list):
            text, variables = arg[0], {k: self.resolve(v) for k, v in arg[1].items()}
        else:
            text, variables = arg, {}

        def one(match: re.Match[str]) -> str:
            name = match[1]
            if name.startswith("!"):
                return "${" + name[1:] + "}"  # ${!Literal} is Fn::Sub's escape
            if name in variables:
                return str(variables[name])
            if name in self.params:
                return self.params[name]
            return match[0]

        return re.sub(r"\$\{([^}]+)\}", one, text)
