"""Training: recipes (validated YAML), data, a plain training loop, checkpoints, curves.

Needs the ``[train]`` extra (transformers, datasets, pydantic, tqdm, matplotlib); ``import grafting`` does not.
``import grafting.train`` does not either: the recipe names are loaded on first use, so ``require_extra`` can
say what to install before pydantic's absence turns into a ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.util

from ..errors import GraftingError

EXTRA_MODULES = ("transformers", "datasets", "pydantic", "tqdm", "matplotlib")


def require_extra() -> None:
    """Raise GraftingError naming the missing modules of the ``train`` extra, before any work is done.

    Some of them (tqdm, matplotlib) are imported only at the end of a run: without this check a run would
    train for minutes and then fail writing its plots."""
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise GraftingError(f"graft train needs the 'train' extra: pip install 'grafting[train]' "
                            f"(missing: {', '.join(missing)})")


def train(recipe, resume: bool = False, overrides: list[str] | None = None, overwrite: bool = False):
    """Run a recipe (a :class:`Recipe`, a dict, or a YAML path) and return its :class:`TrainResult`."""
    require_extra()
    from .trainer import run
    return run(recipe, resume=resume, overrides=overrides, overwrite=overwrite)


def __getattr__(name: str):
    if name in ("Recipe", "load_recipe"):
        from . import recipe
        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Recipe", "load_recipe", "require_extra", "train"]
