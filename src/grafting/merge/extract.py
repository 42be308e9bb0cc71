"""Extract a LoRA adapter from a fine-tuned full model: truncated SVD of each weight delta.

For every linear weight, ΔW = W_ft − W_base is factored as U S Vᵀ and cut to rank k: B = U_k √S_k,
A = √S_k V_kᵀ, the best rank-k approximation in Frobenius norm (Eckart-Young). k is fixed (``rank``) or, per
layer, the fewest components keeping ``energy`` of ||ΔW||²_F (written as a ``rank_pattern``). The result is a
PEFT LoRA adapter with scaling 1 (``lora_alpha`` = rank) that peft loads onto the base; what it cannot hold
(changed biases, norms, embeddings) is listed in the result with its relative change, not silently dropped.
Inputs stream tensor by tensor: memory is about three copies of the largest weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from ..errors import GraftingError
from ..io.reader import PREFIX
from .adapters import truncated_svd, write_lora_adapter

NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "norm", "ln_")


@dataclass
class ExtractResult:
    output: Path
    ranks: dict[str, int]
    energy: dict[str, float]  # per module: fraction of ||ΔW||² the adapter keeps
    not_captured: dict[str, float] = field(default_factory=dict)  # tensor -> ||ΔW|| / ||W||, changed but not linear
    unchanged: int = 0  # linear weights equal in both models (no adapter entry)


def linear_weights(model_dir: Path | None, names: list[str]) -> dict[str, str]:
    """tensor name -> "linear" | "conv1d" for the weights a LoRA can adapt.

    With a config.json the model's own module types decide (built on the meta device: no memory, no weights);
    without one, 2-D ``*.weight`` tensors not named like embeddings, norms or the output head."""
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        try:
            import transformers
            from torch import nn
        except ImportError:
            transformers = None
        if transformers is not None:
            cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
            archs = getattr(cfg, "architectures", None) or []
            cls = getattr(transformers, archs[0], None) if archs else None
            if cls is not None:
                with torch.device("meta"):
                    model = cls(cfg)
                kinds = {}
                conv1d = getattr(transformers.pytorch_utils, "Conv1D", ())
                for mname, mod in model.named_modules():
                    kind = "conv1d" if isinstance(mod, conv1d) else "linear" if isinstance(mod, nn.Linear) else None
                    if kind and not any(x in mname for x in ("lm_head",)):
                        kinds[f"{mname}.weight"] = kind
                found = {n: kinds[n] for n in names if n in kinds}
                if found:
                    return found
    return {n: "linear" for n in names if n.endswith(".weight") and not any(x in n for x in NOT_LINEAR)}


def extract_adapter(base, finetuned, output_dir, *, rank: int | None = None, energy: float | None = None,
                    targets: list[str] | None = None, base_dir=None, progress: bool = False) -> ExtractResult:
    """Write a LoRA adapter at ``output_dir`` approximating ``finetuned`` − ``base``.

    ``base`` / ``finetuned``: opened model inputs (names/shape/get) with the same tensor names; ``base_dir``:
    the base's directory (its config.json tells linear layers apart). ``targets``: module-name suffixes to
    restrict to (PEFT's ``target_modules`` rule). Exactly one of ``rank`` or ``energy``."""
    if (rank is None) == (energy is None):
        raise GraftingError("extract_adapter: give exactly one of rank (an integer) or energy (a fraction)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise GraftingError(f"extract_adapter: rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise GraftingError(f"extract_adapter: energy must be in (0, 1], got {energy!r}")
    names = list(base.names())
    other = set(finetuned.names())
    if set(names) != other:
        diff = sorted(set(names) ^ other)[0]
        raise GraftingError(f"extract_adapter: the models' tensors differ ('{diff}' is in only one of them)")
    kinds = linear_weights(base_dir, names)
    if targets:
        kinds = {n: k for n, k in kinds.items()
                 if any(n[: -len(".weight")] == t or n[: -len(".weight")].endswith("." + t) for t in targets)}
        if not kinds:
            raise GraftingError(f"extract_adapter: no linear weight matches targets {targets}")
    tensors, ranks, kept, result = {}, {}, {}, ExtractResult(Path(output_dir), {}, {})
    it = names
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(names, desc="extract", unit="tensor")
    for name in it:
        if tuple(base.shape(name)) != tuple(finetuned.shape(name)):
            raise GraftingError(f"extract_adapter: '{name}' has shape {tuple(base.shape(name))} in the base and "
                                f"{tuple(finetuned.shape(name))} in the fine-tuned model")
        w0 = base.get(name).float()
        dw = finetuned.get(name).float() - w0
        if not bool(dw.any()):
            result.unchanged += name in kinds
            continue
        if name not in kinds:
            result.not_captured[name] = float(dw.norm() / w0.norm().clamp_min(1e-12))
            continue
        if kinds[name] == "conv1d":
            dw = dw.t()
        module = name[: -len(".weight")]
        A, B, k, share = truncated_svd(dw, rank, energy, 1)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.contiguous()
        ranks[module], kept[module] = k, share
    if not ranks:
        raise GraftingError("extract_adapter: no linear weight differs between the models; nothing to extract")
    result.ranks, result.energy = ranks, kept
    fan = {kinds[m + ".weight"] == "conv1d" for m in ranks}
    if len(fan) > 1:
        raise GraftingError("extract_adapter: the model mixes Linear and Conv1D layers; extract each kind with "
                            "targets= separately (a PEFT adapter has one fan_in_fan_out)")
    write_lora_adapter(output_dir, tensors, ranks, fan.pop(),
                       base_model=str(base_dir) if base_dir is not None else None)
    return result
