"""Merge parameter settings as mergekit writes them: a scalar, a gradient over the layers, or filtered branches.

A setting is a scalar, a list (a gradient over the layers, interpolated at t = layer / (num_layers - 1)), or a
list of ``{filter, value}`` conditionals (the first whose filter is a substring of the tensor name wins).
:func:`parse_setting` turns a raw YAML value into branches once, converting every scalar to the type the method
declares; :func:`evaluate` gives a setting's value for one tensor; :func:`resolve` looks a parameter up through
scopes (the model's own, then the global one), falling back to the method's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import GraftingError

@dataclass(frozen=True)
class Conditional:
    """One branch of a parameter setting: ``value`` (a scalar, or a tuple: a gradient) where ``filter`` matches."""

    filter: Optional[str]
    value: Any

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter == "*" or (bool(name) and self.filter in name)

Setting = tuple  # of Conditional; a plain scalar or gradient is one unconditional branch
SCALARS = (bool, int, float, str)


def resolve(param, scopes, name: str, t: float, where: str, source: str):
    for scope in scopes:
        if param.name in scope:
            value = evaluate(scope[param.name], name, t, param.type)
            if value is not None:
                return value
    if param.required:
        raise GraftingError(f"{source}: {where}: parameter '{param.name}' has no value for tensor '{name}' "
                            f"(no filter matched, and the method gives no default)")
    return param.default


def evaluate(setting: Setting, name: str, t: float, type_: type):
    """The value of ``setting`` for tensor ``name`` at depth ``t``; None when no branch applies."""
    for branch in setting:
        if not branch.matches(name):
            continue
        value = branch.value
        if not isinstance(value, tuple):
            return value
        if len(value) == 1:
            return value[0]
        pos = t * (len(value) - 1)
        if type_ in (bool, str):  # discrete values cannot be interpolated: take the segment's left end
            return value[int(pos)]
        lo = int(pos)
        hi = min(lo + 1, len(value) - 1)
        frac = pos - lo
        mixed = (1 - frac) * value[lo] + frac * value[hi]
        return round(mixed) if type_ is int else mixed
    return None


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _convert(value, type_: type, where: str):
    """One scalar of a setting as the parameter's declared type (PyYAML reads 1e-3, without a dot, as a string)."""
    if type_ not in SCALARS:
        raise GraftingError(f"{where}: the method declares type {type_!r}, which configs cannot set")
    try:
        if type_ is bool:
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
        elif isinstance(value, bool):
            pass  # true/false is neither a number nor a name
        elif type_ is int and isinstance(value, int):
            return value
        elif type_ in (int, float) and isinstance(value, (int, float, str)):
            number = float(value)
            if type_ is float:
                return number
            if number.is_integer():
                return int(number)
        elif type_ is str and isinstance(value, (str, int, float)):
            return str(value)
    except ValueError:  # float("abc")
        pass
    raise GraftingError(f"{where}: expected {type_.__name__}, got {value!r}")


def _parse_value(value, type_, where: str):
    if isinstance(value, SCALARS):
        return _convert(value, type_, where)
    if isinstance(value, list):
        if not value:
            raise GraftingError(f"{where}: an empty list has no value")
        if not all(isinstance(v, SCALARS) for v in value):
            raise GraftingError(f"{where}: a gradient is a list of scalars, got {value!r}")
        return tuple(_convert(v, type_, f"{where}[{i}]") for i, v in enumerate(value))
    raise GraftingError(f"{where}: expected a scalar or a list of scalars (a gradient), got {value!r}")


def parse_setting(value, type_: type, where: str) -> Setting:
    """A raw YAML setting (scalar, gradient, {filter, value}, or a list of those) as branches."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        branches = []
        for i, cond in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(cond, dict):
                raise GraftingError(f"{at}: a list of conditionals holds only {{filter, value}} entries, got {cond!r}")
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown:
                raise GraftingError(f"{at}: unknown key '{unknown[0]}' (a conditional has filter and value)")
            if "value" not in cond:
                raise GraftingError(f"{at}: a conditional needs a value")
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise GraftingError(f"{at}.filter: expected a string (a substring of tensor names), got {flt!r}")
            branches.append(Conditional(flt, _parse_value(cond["value"], type_, f"{at}.value")))
        return tuple(branches)
    return (Conditional(None, _parse_value(value, type_, where)),)
