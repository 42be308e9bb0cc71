"""The merge-method interface: one tensor's inputs in, one merged tensor out; a registry maps names to methods.

A merge runs tensor by tensor (streaming, bounded memory). For each tensor name the driver loads the base
model's tensor and every other model's, upcast to float32, resolves each model's parameters for this tensor
(mergekit's scalars, gradients over layers and filters), and calls the method with a :class:`TensorGroup`. The
method returns the merged tensor (float32; the driver casts it to the output dtype). Methods are plain functions:

    @merge_method("task_arithmetic", params=[WEIGHT, LAMBDA], needs_base=True,
                  paper="Ilharco et al., arXiv 2212.04089, eq. 1", summary="base + λ Σ w_i τ_i")
    def task_arithmetic(group, params):
        return group.base + params["lambda"] * sum(m.params["weight"] * tau for m, tau in group.task_vectors())

Adding a method is one new file in ``grafting/merge/methods/`` and one import line in its ``__init__``.
Names and parameters are mergekit's, so mergekit YAML for a shared method runs unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import GraftingError

REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, as mergekit names it.

    ``scope``: ``"model"`` for a value per input model (``weight``, ``density``; set under a model's
    ``parameters`` or, as a default for every model, under the global ``parameters``), ``"global"`` for one value
    for the whole merge (``lambda``, ``normalize``, slerp's ``t``). ``type``: float, int, bool or str; values are
    converted and checked at the edge (the config), so methods can trust them."""

    name: str
    type: type
    default: Any = REQUIRED
    scope: str = "model"
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class ModelTensor:
    """One input model's tensor for the current name, with that model's resolved parameters."""

    model: str  # the model as the config names it
    tensor: torch.Tensor  # float32
    params: dict = field(default_factory=dict)


@dataclass
class TensorGroup:
    """Everything a merge method sees for one tensor name.

    ``models``: the non-base inputs in config order (a model listed in ``models`` that is also ``base_model``
    is the base, not one of these, as in mergekit). ``base``: the base model's tensor, or None when the config
    has no ``base_model``. ``layer`` / ``num_layers``: the transformer block the tensor belongs to (None for
    embeddings, norms, heads outside the stack); ``t`` = layer / (num_layers - 1) in [0, 1] is where mergekit
    evaluates parameter gradients. ``generator``: seeded from the merge's seed and the tensor name, so a
    random method (DARE, DELLA) gives the same result whatever order tensors are merged in. ``owned``: the
    tensors were read for this call alone (the driver's case), so :meth:`take_task_vectors` may turn them into
    task vectors in place instead of allocating N more tensors; a group built by hand is not owned."""

    name: str
    models: list[ModelTensor]
    base: torch.Tensor | None = None
    layer: int | None = None
    num_layers: int | None = None
    generator: torch.Generator | None = None
    owned: bool = False
    _taken: bool = field(default=False, repr=False)

    @property
    def t(self) -> float:
        if self.layer is None or not self.num_layers or self.num_layers < 2:
            return 0.0
        return self.layer / (self.num_layers - 1)

    def task_vectors(self) -> Iterator[tuple[ModelTensor, torch.Tensor]]:
        """(model, τ = θ_model − θ_base) for every non-base input; needs a base."""
        if self.base is None:
            raise GraftingError(f"{self.name}: task vectors need a base_model")
        for m in self.models:
            yield m, m.tensor - self.base

    def take_task_vectors(self) -> list[torch.Tensor]:
        """τ_i for every model as tensors the caller may modify in place.

        When the group is ``owned`` each θ_i is overwritten by τ_i (no new memory) and ``models[i].tensor`` holds
        the task vector afterwards; otherwise each τ_i is a new tensor. Either way it can be taken once."""
        if self.base is None:
            raise GraftingError(f"{self.name}: task vectors need a base_model")
        if self._taken:
            raise GraftingError(f"{self.name}: the task vectors were already taken")
        self._taken = True
        if self.owned:
            return [m.tensor.sub_(self.base) if m.tensor is not self.base else torch.zeros_like(self.base)
                    for m in self.models]
        return [m.tensor - self.base for m in self.models]


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name): reproducible and independent of merge order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: ``fn(group, params) -> Tensor`` plus what the config layer needs to know.

    ``params`` holds the global parameters (resolved for this tensor) keyed by name; each model's own are on
    ``group.models[i].params``. ``needs_base``: the method reads ``group.base`` (a config without
    ``base_model`` is refused before any tensor is read). ``min_models`` / ``max_models``: how many non-base
    inputs it takes (slerp: exactly one besides the base)."""

    name: str
    fn: Callable[[TensorGroup, dict], torch.Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    paper: str
    summary: str
    min_models: int = 1
    max_models: int | None = None

    def __call__(self, group: TensorGroup, params: dict) -> torch.Tensor:
        return self.fn(group, params)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "global")


_MERGES: dict[str, MergeMethod] = {}


def merge_method(name: str, *, params=(), needs_base: bool = False, paper: str, summary: str,
                 min_models: int = 1, max_models: int | None = None) -> Callable:
    """Function decorator registering a merge method under ``name`` (mergekit's name where mergekit has it)."""

    def deco(fn):
        if name in _MERGES:
            raise GraftingError(f"merge method '{name}' is registered twice")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise GraftingError(f"merge method '{name}': a parameter is declared twice ({names})")
        _MERGES[name] = MergeMethod(name, fn, tuple(params), needs_base, paper, summary, min_models, max_models)
        return fn

    return deco


def get_merge_method(name: str) -> MergeMethod:
    _load_builtin()
    try:
        return _MERGES[name]
    except KeyError:
        raise GraftingError(f"unknown merge_method '{name}'; available: {', '.join(sorted(_MERGES))}") from None


def merge_methods() -> dict[str, MergeMethod]:
    _load_builtin()
    return dict(sorted(_MERGES.items()))


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)


# Parameters several methods share, declared once so their names, defaults and docs agree with mergekit's.
WEIGHT = Param("weight", float, REQUIRED, "model", "scale of this model's task vector (or tensor, for linear)")
DENSITY = Param("density", float, 1.0, "model", "fraction of this model's task vector kept by sparsification")
LAMBDA = Param("lambda", float, 1.0, "global", "scale of the merged task vector before it is added to the base")
NORMALIZE = Param("normalize", bool, True, "global", "divide by the sum of the weights (of the kept entries)")
RESCALE = Param("rescale", bool, True, "global", "rescale the kept entries to preserve the task vector's L1 norm")
INT8_MASK = Param("int8_mask", bool, False, "global", "store the sign-consensus mask as int8 (saves memory)")
