"""Adapters as merge inputs and outputs.

Two things a model merger does not do for adapters, done here:

- :class:`AdapterInput` presents a PEFT adapter directory as the full model it implies (base tensor + ΔW for
  every adapted module, the adapter's full tensors for ``modules_to_save``), so an adapter can stand wherever a
  model stands in a merge config, and ``task_arithmetic`` over one adapter with weight 1 writes it into its base.
- :func:`merge_adapters` merges adapters into one adapter. Linear combinations of LoRA adapters are exact:
  Σ c_i s_i B_i A_i = [c_1 s_1 B_1 | ... | c_n s_n B_n] [A_1; ...; A_n], so the factors are concatenated, whatever
  the ranks, ``rank_pattern`` s, rsLoRA or not (every layer then has scaling 1: ``lora_alpha`` = its rank).
  Every other method (TIES, DARE, ..., and any DoRA input) runs in weight space on the dense ΔW_i of each
  module, and its result is cut back to low rank by a truncated SVD (Eckart-Young: the best rank-k
  approximation in Frobenius norm), with the fraction of the squared singular values kept reported per module.

Without a base model the weight-space methods see task vectors over a zero base, which is exactly what every
method that acts on task vectors computes (TIES, DARE, breadcrumbs, DELLA, model_stock, PCB, LiNeS and
task_arithmetic); ``slerp`` and ``linear`` read the weights themselves, and DoRA's ΔW depends on the base
weight, so those need ``base``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save

from ..errors import GraftingError
from ..io.atomic import atomic_dir
from ..io.reader import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterReader
from .base import ModelTensor, TensorGroup, get_merge_method, tensor_generator
from .io import layer_index as layer_of

EXACT_METHODS = ("linear", "task_arithmetic")


def is_adapter_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


class AdapterInput:
    """An adapter directory seen as a full model over ``base`` (any input with names/shape/dtype/get).

    Tensor names are the base's; an adapted module ``m`` changes the tensor ``m.weight`` (found by exact name, or
    as the unique base name ending in ``.m.weight``, so an adapter trained on a task head's wrapper still maps onto
    a bare checkpoint). Conv1D bases (GPT-2, ``fan_in_fan_out``) store the weight transposed; ΔW is transposed
    to match."""

    def __init__(self, path, base):
        self.path, self.base = Path(path), base
        self.reader = AdapterReader(self.path)
        self.config = getattr(base, "config", None)
        names = list(base.names())
        self._delta_of: dict[str, str] = {}  # base tensor name -> adapter module
        for module in self.reader.modules():
            self._delta_of[_base_name(module + ".weight", names, self.path)] = module
        self._full: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save)
        for e in self.reader:
            if e.role == "full":
                self._full[_base_name(e.module, names, self.path)] = e.key

    def names(self):
        return self.base.names()

    def shape(self, name):
        return self.base.shape(name)

    def dtype(self, name):
        return self.base.dtype(name)

    def get(self, name) -> torch.Tensor:
        if name in self._full:
            return self.reader.get(self._full[name])
        w = self.base.get(name)
        module = self._delta_of.get(name)
        if module is None:
            return w
        transposed = bool(getattr(self.reader.config, "fan_in_fan_out", False)) and w.dim() == 2
        view = (w.t() if transposed else w).float()
        dw = self.reader.delta_weight(module, view.reshape(view.shape[0], -1)).reshape(view.shape)
        out = view + dw
        return (out.t() if transposed else out).to(w.dtype)


def _base_name(name: str, names: list[str], where: Path) -> str:
    if name in set(names):
        return name
    hits = [n for n in names if n.endswith("." + name)]
    parts = name.split(".")
    for k in range(1, len(parts) - 1):  # the adapter's module path may carry a wrapper prefix the base lacks
        if hits:
            break
        hits = [n for n in names if n == ".".join(parts[k:])]
    if len(hits) != 1:
        raise GraftingError(f"{where}: adapter tensor for '{name}' matches "
                            f"{'no' if not hits else len(hits)} tensors of the base model"
                            + (f" ({', '.join(hits[:3])})" if hits else ""))
    return hits[0]


@dataclass
class AdapterMergeResult:
    output: Path
    method: str
    exact: bool
    ranks: dict[str, int]
    energy: dict[str, float] = field(default_factory=dict)  # weight-space merges: fraction of ||ΔW||² kept


def merge_adapters(adapters: list, method: str, output_dir, *, params: list[dict] | None = None,
                   global_params: dict | None = None,
                   resolve: Callable[[str], tuple[list[dict], dict]] | None = None, base=None,
                   rank: int | None = None, energy: float | None = None, seed: int = 0,
                   dtype: torch.dtype | None = None, progress: bool = False) -> AdapterMergeResult:
    """Merge PEFT adapters into one PEFT LoRA adapter at ``output_dir``.

    ``params`` / ``global_params``: each adapter's and the global merge parameters (mergekit's names); or
    ``resolve(tensor_name) -> (params, global_params)`` for parameters that vary per tensor (gradients,
    filters). ``base``: an opened base model (names/get), needed by slerp and linear and for DoRA inputs.
    Weight-space merges keep ``rank`` components per module, or the fewest keeping ``energy`` of ΔW's squared
    Frobenius norm; by default the sum of the inputs' ranks at that module (capped by its shape). The merge
    computes in float32; the factors are written in ``dtype``, by default the inputs' dtype when they all share
    one (fp16 adapters give an fp16 adapter), else float32."""
    if not adapters:
        raise GraftingError("merge_adapters: no adapters given")
    if rank is not None and energy is not None:
        raise GraftingError("merge_adapters: give rank or energy, not both")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise GraftingError(f"merge_adapters: rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise GraftingError(f"merge_adapters: energy must be in (0, 1], got {energy!r}")
    spec = get_merge_method(method)
    readers = [AdapterReader(a) for a in adapters]
    other = [r for r in readers if r.method.name not in ("lora", "dora")]
    if other:  # the output is a LoRA adapter built from lora_A / lora_B; other methods have a full-model path
        raise GraftingError(f"merge_adapters: {other[0].path} is a '{other[0].method.name}' adapter; merging "
                            "into an adapter takes LoRA / DoRA inputs. Merge it into the base model instead "
                            "(an adapter entry in a full-model merge applies any method's ΔW)")
    fan = {bool(getattr(r.config, "fan_in_fan_out", False)) for r in readers}
    if len(fan) > 1:
        raise GraftingError("merge_adapters: the adapters disagree on fan_in_fan_out (they are for different bases)")
    if params is None and resolve is None:
        params = [{} for _ in readers]
    if resolve is None:
        if len(params) != len(readers):
            raise GraftingError(f"merge_adapters: {len(params)} parameter sets for {len(readers)} adapters")
        fixed = ([_with_defaults(spec.model_params(), p) for p in params],
                 _with_defaults(spec.global_params(), global_params or {}))
        resolve = lambda name: fixed  # noqa: E731
    modules = sorted({m for r in readers for m in r.modules()})
    not_lora = [str(r.path) for r in readers if r.method.name != "lora"]  # DoRA: ΔW is not B·A alone
    full = sorted({e.module for r in readers for e in r if e.role == "full"})
    if full:
        raise GraftingError(f"merge_adapters: the adapters save full modules ({', '.join(full[:3])}); merge them "
                            "into the base model instead (adapter entries in a full-model merge), where those "
                            "tensors have a base to be merged against")
    exact = method in EXACT_METHODS and not not_lora
    if base is None and (not_lora or method == "slerp"):
        why = f"{not_lora[0]} is DoRA, whose ΔW depends on the base weight" if not_lora else \
            "slerp interpolates the weights themselves"
        raise GraftingError(f"merge_adapters: give the base model ({why})")
    layers = [layer_of(m + ".weight") for m in modules]
    num_layers = max([x for x in layers if x is not None], default=-1) + 1 or None
    tensors, ranks, kept = {}, {}, {}
    stored: set[torch.dtype] = set()
    it = modules
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(modules, desc="merge adapters", unit="module")
    for module, layer in zip(it, layers):
        mparams, gparams = resolve(module + ".weight")
        holders = [i for i, r in enumerate(readers) if module in set(r.modules())]
        if exact:
            A, B = _concatenated(readers, holders, module, mparams, gparams, method)
            ranks[module] = A.shape[0]
        else:
            dw = _weight_space(readers, module, spec, mparams, gparams, base, layer, num_layers, seed)
            summed = sum(readers[i].layer_tensors(module)["lora_A"].shape[0] for i in holders)
            A, B, ranks[module], kept[module] = truncated_svd(dw, rank, energy, summed)
        for i in holders:
            stored.update(t.dtype for k, t in readers[i].layer_tensors(module).items() if k in ("lora_A", "lora_B"))
        shape_a, shape_b = (readers[holders[0]].layer_tensors(module)[k].shape for k in ("lora_A", "lora_B"))
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.reshape(A.shape[0], *shape_a[1:]).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.reshape(B.shape[0], B.shape[1], *shape_b[2:]).contiguous()
    out_dtype = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    tensors = {k: v.to(out_dtype) for k, v in tensors.items()}
    _write(readers[0], modules, ranks, tensors, output_dir, fan.pop())
    return AdapterMergeResult(Path(output_dir), method, exact, ranks, kept)


def _with_defaults(declared, given: dict) -> dict:
    out = {p.name: p.default for p in declared if not p.required}
    out.update(given)
    missing = [p.name for p in declared if p.required and p.name not in out]
    if missing:
        raise GraftingError(f"merge parameter '{missing[0]}' is required")
    return out


def _coefficients(mparams: list[dict], gparams: dict, holders: list[int], method: str, n: int) -> list[float]:
    """c_i with merged ΔW = Σ c_i ΔW_i, for linear (a weighted mean) and task_arithmetic (λ Σ w_i τ_i)."""
    w = [float(mparams[i]["weight"]) for i in range(n)]
    total = sum(w)
    if method == "linear":
        if not gparams.get("normalize", True) and abs(total - 1.0) > 1e-6:
            raise GraftingError(f"linear without normalize scales the base by the sum of the weights ({total:g}); "
                                "an adapter cannot express that: normalize, or make the weights sum to 1")
        return [wi / total if abs(total) > 1e-8 else wi for wi in w]
    scale = float(gparams.get("lambda", 1.0))
    if gparams.get("normalize", False) and abs(total) > 1e-8:
        scale /= total
    return [scale * wi for wi in w]


def _concatenated(readers, holders, module, mparams, gparams, method):
    c = _coefficients(mparams, gparams, holders, method, len(readers))
    As, Bs = [], []
    for i in holders:
        A, B, s = readers[i].factors(module)
        As.append(A.float())
        Bs.append(B.float() * (c[i] * s))
    return torch.cat(As, 0), torch.cat(Bs, 1)


def _weight_space(readers, module, spec, mparams, gparams, base, layer, num_layers, seed):
    name = module + ".weight"
    w0 = None
    if base is not None:
        bname = _base_name(name, list(base.names()), Path("base model"))
        w = base.get(bname).float()
        transposed = bool(getattr(readers[0].config, "fan_in_fan_out", False)) and w.dim() == 2
        w0 = (w.t() if transposed else w)
        w0 = w0.reshape(w0.shape[0], -1)
    deltas = []
    for r in readers:
        if module in set(r.modules()):
            deltas.append(r.delta_weight(module, w0).float())
        else:
            deltas.append(None)
    shape = next(d for d in deltas if d is not None).shape
    zero = torch.zeros(shape) if w0 is None else w0
    models = [ModelTensor(str(r.path), zero + (d if d is not None else 0.0), p)
              for r, d, p in zip(readers, deltas, mparams)]
    group = TensorGroup(name, models, base=zero, layer=layer, num_layers=num_layers,
                        generator=tensor_generator(seed, name))
    return spec(group, gparams).float() - zero


def truncated_svd(dw: torch.Tensor, rank: int | None, energy: float | None, default_rank: int):
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    power = s.double().pow(2)
    total = float(power.sum())
    if energy is not None:
        if total == 0.0:
            k = 1
        else:
            cum = torch.cumsum(power, 0) / total
            k = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
    else:
        k = rank if rank is not None else max(default_rank, 1)
    k = max(1, min(k, s.numel()))
    root = s[:k].sqrt()
    kept = float(power[:k].sum()) / total if total > 0 else 1.0
    # split √S between the factors so both have comparable norms (what training from this init would like)
    return root[:, None] * vh[:k], u[:, :k] * root[None, :], k, kept


def _write(first: AdapterReader, modules, ranks: dict, tensors: dict, output_dir, fan_in_fan_out: bool) -> None:
    cfg = first.config
    write_lora_adapter(output_dir, tensors, ranks, fan_in_fan_out, task_type=getattr(cfg, "task_type", None),
                       base_model=getattr(cfg, "base_model_name_or_path", None))


def write_lora_adapter(output_dir, tensors: dict, ranks: dict, fan_in_fan_out: bool, task_type=None,
                       base_model=None) -> None:
    """A PEFT LoRA adapter with scaling 1 at every module (lora_alpha = rank, per-module ranks as patterns)."""
    top = max(ranks.values()) if ranks else 1
    pattern = {m: r for m, r in ranks.items() if r != top}
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }
    with atomic_dir(output_dir) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
