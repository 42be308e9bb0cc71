"""Training: recipes (validated YAML), data, a plain training loop, checkpoints, curves.

Needs the ``[train]`` extra (transformers, datasets, pydantic, tqdm, matplotlib); ``import grafting`` does not.
"""

from .recipe import Recipe, load_recipe


def train(recipe, resume: bool = False):
    """Run a recipe (a :class:`Recipe`, a dict, or a YAML path) and return its :class:`TrainResult`."""
    from .trainer import run
    return run(recipe, resume=resume)


__all__ = ["Recipe", "load_recipe", "train"]
