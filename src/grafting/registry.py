"""Name -> adapter method. Adding a method is one new file in ``methods/`` and one ``@register`` line.

Each method declares its capabilities here (layer kinds, mergeable, low-rank, mixed batch); the contract tests
and the model read these declarations instead of special-casing methods.
"""

from __future__ import annotations

from typing import Callable

from .errors import GraftingError

_METHODS: dict = {}


def register(name: str) -> Callable:
    """Class decorator: ``@register("lora") class Lora(Method): ...`` registers one instance under ``name``."""

    def deco(cls):
        if name in _METHODS:
            raise GraftingError(f"method '{name}' is registered twice")
        inst = cls()
        inst.name = name
        _METHODS[name] = inst
        return cls

    return deco


def get_method(name: str):
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise GraftingError(f"unknown adapter method '{name}'; registered: {', '.join(sorted(_METHODS))}") from None


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)
