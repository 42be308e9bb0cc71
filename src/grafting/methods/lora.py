"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685), with rsLoRA scaling and decomposing inits.

Eq. (3) of the LoRA paper: h = W0 x + ΔW x = W0 x + (α/r)·B A x, with A ∈ R^{r×k}, B ∈ R^{d×r}, B = 0 at init
so training starts from the base model. rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) replaces α/r by
α/√r so that the update's scale stays stable as r grows.

Inits that change the base weight (both as in peft, so adapters move between the libraries):
- PiSSA (Meng et al., 2024, arXiv:2404.02948, Sec. 3): W = U S Vᵀ; A = √S_r V_rᵀ, B = U_r √S_r (S_r divided by
  the scale first), and the base becomes the residual W − s·B A.
- OLoRA (Büyükakyüz, 2024, arXiv:2406.01775, Sec. 3): W = Q R; B = Q[:, :r], A = R[:r], base W − s·B A.
More inits that change the base (pissa_niter_N, MiLoRA, CorDA) are in lora_inits.py, EVA in lora_eva.py.
A save writes a delta against the *original* base (peft's conversion: ΔW = s(BA − B₀A₀) = s[B, −B₀][A; A₀],
rank 2r and α doubled, init ``True``) unless ``save_adapter(..., convert_init=False)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig, pattern_value
from ..init_stage import random_init_wanted
from ..registry import register
from . import lora_eva, lora_inits
from .base import Method

BIAS_MODES = ("none", "all", "lora_only")
#: init_lora_weights values grafting builds (and "pissa_niter_<N>"); the strings after "kaiming" change the base
INIT_MODES = (True, False, "gaussian", "kaiming", "pissa", "olora", "milora", "corda", "eva")
# inits that only shape the starting point of training: a saved adapter holds its trained factors in full and
# the base is untouched, so it loads as plain LoRA
_LOAD_AS_PLAIN = ("eva", "orthogonal", "lora_ga", "mica")
_CALIBRATED = ("corda", "eva")

_PEFT_IGNORED = {
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "ensure_weight_tying": (False, None),
    "kasa_config": (None,),
    "layer_replication": (None,),
    "loftq_config": ({}, None),
    "lora_bias": (False, None),
    "lora_ga_config": (None,),
    "megatron_config": (None,),
    "megatron_core": None,
    "monteclora_config": (None,),
    "qalora_group_size": None,
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
    "use_qalora": (False, None),
    "velora_config": (None,),
}


@dataclass
class LoraConfig(AdapterConfig):
    """Configuration of a LoRA-family adapter (LoRA, rsLoRA, DoRA).

    r: rank. lora_alpha: scale numerator (> 0); ``scaling = lora_alpha / r`` (or ``/ sqrt(r)`` with
    ``use_rslora``). rank_pattern / alpha_pattern: per-module overrides, keys matched like PEFT (regex searched at
    the end of the module name). bias: ``none``, ``all`` or ``lora_only``. init_lora_weights: ``True`` /
    ``"kaiming"`` (A kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``"pissa"`` / ``"olora"``
    (factors from the base weight's SVD / QR, base replaced by the residual), ``"pissa_niter_<N>"`` (PiSSA by
    randomized SVD), ``"milora"`` (the minor singular components), ``"corda"`` (context-oriented SVD from
    calibration activations; ``corda_config``: peft's CordaConfig fields as a mapping, ``corda_method`` ``"ipm"``
    or ``"kpm"``), ``"eva"`` (A from the SVD of calibration activations, B = 0, ranks redistributed across layers;
    ``eva_config``: peft's EvaConfig fields as a mapping), ``False`` (random non-zero B: the adapter changes the
    output from the start; for tests).
    """

    peft_type = "LORA"
    peft_ignored = _PEFT_IGNORED

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    fan_in_fan_out: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    corda_config: dict | None = None
    eva_config: dict | None = None

    def check(self, bad) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", "a positive integer", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "a positive number (0 makes an adapter that never changes the output)",
                      self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a number in [0, 1)", self.lora_dropout)
        if self.bias not in BIAS_MODES:
            raise bad("bias", f"one of {BIAS_MODES}", self.bias)
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in ("true", "false"):
            raise bad("init_lora_weights", "the boolean true/false, not a string", init)
        if not any(init is m or (isinstance(m, str) and init == m) for m in INIT_MODES) \
                and not lora_inits.is_pissa_niter(init):
            import difflib
            close = difflib.get_close_matches(str(init), [str(m) for m in INIT_MODES], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise bad("init_lora_weights", f"one of {INIT_MODES} or 'pissa_niter_<N>'{hint}", init)
        if lora_inits.changes_base(init) and self.use_dora:
            raise bad("init_lora_weights", f"not {init!r} with use_dora (the magnitude would describe the residual "
                      "base, and no conversion to the original base exists)", init)
        if lora_inits.changes_base(init) and self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            raise bad("init_lora_weights", f"not {init!r} with use_rslora and rank/alpha patterns (peft cannot "
                      "convert such an adapter to the original base either)", init)
        for name, pattern, kind in (("rank_pattern", self.rank_pattern, int),
                                    ("alpha_pattern", self.alpha_pattern, (int, float))):
            if not isinstance(pattern, dict):
                raise bad(name, "a mapping of module-name pattern to value", pattern)
            for key, value in pattern.items():
                if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                    raise bad(f"{name}[{key!r}]", "a positive number", value)

        lora_inits.check_corda_config(self, bad)
        lora_eva.check_eva_config(self, bad)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module, after rank_pattern / alpha_pattern (PEFT's matching rule)."""
        return (pattern_value(self.rank_pattern, module_name, self.r),
                pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        d["lora_bias"] = False
        if d["init_lora_weights"] == "kaiming":
            d["init_lora_weights"] = True
        return d

    @classmethod
    def from_peft_dict(cls, d, where="adapter_config.json"):
        if isinstance(d, dict):
            init = d.get("init_lora_weights")
            from_file = str(where).endswith("adapter_config.json")  # in memory (recipes) the init runs
            if isinstance(init, str) and init.lower() in _LOAD_AS_PLAIN and from_file:
                d = {**d, "init_lora_weights": True}  # its trained factors are complete; the base is untouched
            elif isinstance(init, str) and (init.lower() in ("corda", "loftq") or init.startswith("pissa_niter_")) \
                    and from_file:
                raise lora_inits.unsupported_init(init, where)
        return super().from_peft_dict(d, where)


class LoraAdapter(nn.Module):
    def __init__(self, a_shape: tuple, b_shape: tuple, r: int, lora_alpha: float, scaling: float,
                 dropout: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def init_factors(adapter: LoraAdapter, init, kind_name: str) -> None:
    """PEFT's random initialisations. Embeddings invert the roles (A = 0, B random) as PEFT does."""
    A, B = adapter.lora_A, adapter.lora_B
    with torch.no_grad():
        if kind_name == "embedding":
            if init is False:
                nn.init.normal_(A)
                nn.init.normal_(B)
            else:
                nn.init.zeros_(A)
                nn.init.normal_(B)
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / adapter.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


def factor_dtype(host) -> torch.dtype:
    w = host.dense_weight()
    return w.dtype if w.is_floating_point() else torch.float32


def create_lora(host, cfg, module_name: str) -> LoraAdapter:
    r, alpha = cfg.rank_and_alpha(module_name)
    a_shape, b_shape = host.kind.factor_shapes(host.base_layer, r)
    w = host.dense_weight()
    adapter = LoraAdapter(a_shape, b_shape, r, alpha, cfg.scaling(r, alpha), cfg.lora_dropout,
                          factor_dtype(host), w.device)
    if not random_init_wanted():  # loading overwrites every factor: no random numbers for it to discard
        return adapter
    if lora_inits.is_pissa_niter(cfg.init_lora_weights) and host.kind.name in ("linear", "conv1d"):
        niter = int(cfg.init_lora_weights.rsplit("_", 1)[1])
        lora_inits.draw_randomized_svd(adapter, host.kind.to_out_in(w), niter)
    else:
        init_factors(adapter, cfg.init_lora_weights, host.kind.name)
    return adapter


def decompose_init(adapter: LoraAdapter, host, cfg, statistic=None) -> None:
    """Factors from a decomposition of the base weight, base replaced by the residual W − s·B A (lora_inits)."""
    from ..errors import GraftingError
    init = cfg.init_lora_weights
    if host.kind.name not in ("linear", "conv1d"):
        raise GraftingError(f"init_lora_weights={init!r} supports linear layers, not {host.kind.name}")
    w = host.kind.to_out_in(host.dense_weight()).to(torch.float32)
    s = adapter.scaling
    A, B = lora_inits.decompose(w, init, adapter.r, s, pending=adapter.__dict__.pop("_pending_svd", None),
                                statistic=statistic, cfg=cfg)
    with torch.no_grad():
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        host.write_weight(host.kind.from_out_in(w - s * (B @ A), host.dense_weight()))


def lowrank_out(adapter: LoraAdapter, host, x: torch.Tensor) -> torch.Tensor:
    """scale·B(A(dropout(x))) in the host's output layout and in the factors' dtype."""
    if x.is_floating_point():
        x = adapter.lora_dropout(x.to(adapter.lora_A.dtype))
    return host.kind.lowrank(host.base_layer, x, adapter.lora_A, adapter.lora_B) * adapter.scaling


def add_lowrank(adapter: LoraAdapter, host, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + scale·B A x. For linear kinds one addmm pass over the output instead of scale, cast and add."""
    if not (host.kind.gathered and x.is_floating_point() and x.dtype == out.dtype == adapter.lora_A.dtype
            and isinstance(adapter.lora_dropout, nn.Identity)):
        return out + lowrank_out(adapter, host, x).to(out.dtype)
    xa = x.reshape(-1, x.shape[-1]) @ adapter.lora_A.t()
    return torch.addmm(out.reshape(-1, out.shape[-1]), xa, adapter.lora_B.t(), alpha=adapter.scaling).view(out.shape)


def lora_deterministic(adapter: LoraAdapter) -> bool:
    return isinstance(adapter.lora_dropout, nn.Identity) or not adapter.lora_dropout.training


def merged_lowrank_weight(adapter: LoraAdapter, host) -> torch.Tensor:
    """W + scale·B·A in the base layout, detached, as one fused pass over W."""
    A, B, scale = lora_factors(adapter)
    return host.kind.add_lowrank_weight(host.dense_weight().detach(), A.detach(), B.detach(), scale)


def lowrank_weight_out_in(adapter: LoraAdapter) -> torch.Tensor:
    """scale·B·A in the (out, fan_in) view."""
    A, B, scale = lora_factors(adapter)
    return (B @ A) * scale


def lora_factors(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) in the (out, fan_in) view: ΔW = scale·B·A."""
    A = adapter.lora_A.reshape(adapter.lora_A.shape[0], -1)
    B = adapter.lora_B.reshape(adapter.lora_B.shape[0], -1)
    return A, B, adapter.scaling


def peft_lora_keys(kind: str) -> dict[str, str]:
    if kind == "embedding":
        return {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}
    return {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}


def lora_factors_from_tensors(tensors: dict, cfg, module_name: str):
    A, B = tensors["lora_A"], tensors["lora_B"]
    r = A.shape[0]
    _, alpha = cfg.rank_and_alpha(module_name)
    return A.reshape(r, -1), B.reshape(B.shape[0], -1), cfg.scaling(r, alpha)


@register("lora", config=LoraConfig)
class Lora(Method):
    """Low-rank update W + (α/r)·B A (rsLoRA: α/√r; PiSSA / OLoRA inits)."""

    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        return create_lora(host, cfg, module_name)

    def changes_base(self, cfg):
        return lora_inits.changes_base(cfg.init_lora_weights)

    def needs_calibration(self, cfg):
        return cfg.init_lora_weights in _CALIBRATED

    def calibration_mask(self, cfg, batch):
        return lora_eva.eva_mask(cfg, batch) if cfg.init_lora_weights == "eva" else None

    def calibration_statistic(self, cfg, inputs):
        if cfg.init_lora_weights == "corda":
            return lora_inits.corda_statistic(cfg, inputs)
        if cfg.init_lora_weights == "eva":
            return inputs  # incremental, batch by batch, in plan()
        return super().calibration_statistic(cfg, inputs)

    def plan(self, cfg, statistics):
        if cfg.init_lora_weights == "eva":
            return lora_eva.eva_plan(cfg, statistics)
        return cfg, statistics

    def init(self, adapter, host, cfg, activations):
        if lora_inits.changes_base(cfg.init_lora_weights):
            decompose_init(adapter, host, cfg, activations)
        elif cfg.init_lora_weights == "eva":
            with torch.no_grad():
                adapter.lora_A.copy_(activations)
                adapter.lora_B.zero_()

    def undo_init(self, initial, adapter, host, cfg):
        A0, B0 = initial["lora_A"], initial["lora_B"]
        w = host.dense_weight()
        restored = host.kind.to_out_in(w).to(torch.float32) + adapter.scaling * (B0.float() @ A0.float())
        host.write_weight(host.kind.from_out_in(restored, w))

    def to_original_base(self, now, initial, cfg):
        return {"lora_A": torch.cat([now["lora_A"], initial["lora_A"]], 0),
                "lora_B": torch.cat([now["lora_B"], -initial["lora_B"]], 1)}

    def original_base_config(self, cfg):
        import dataclasses
        factor = 2 ** 0.5 if cfg.use_rslora else 2  # keeps α/r (α/√r) when r doubles
        return dataclasses.replace(cfg, init_lora_weights=True, corda_config=None, eva_config=None, r=2 * cfg.r,
                                   lora_alpha=cfg.lora_alpha * factor,
                                   rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                                   alpha_pattern={k: 2 * v for k, v in cfg.alpha_pattern.items()})

    def delta(self, adapter, host, x, base_out):
        return lowrank_out(adapter, host, x).to(base_out.dtype)

    def add_delta(self, adapter, host, x, out):
        return add_lowrank(adapter, host, x, out)

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        return host.kind.from_out_in(lowrank_weight_out_in(adapter), w).to(w.dtype)

    def merge(self, adapter, host):
        return merged_lowrank_weight(adapter, host), None

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def low_rank(self, adapter):
        return lora_factors(adapter)

    def peft_keys(self, kind):
        return peft_lora_keys(kind)

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        if cfg.init_lora_weights in lora_inits.DETERMINISTIC:
            raise lora_inits.needs_original_base(cfg.init_lora_weights, module_name)
        return lora_factors_from_tensors(tensors, cfg, module_name)

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        A, B, scale = lora_factors_from_tensors(tensors, cfg, module_name)
        delta = (B.float() @ A.float()) * scale
        init = cfg.init_lora_weights
        if init not in lora_inits.DETERMINISTIC:
            return delta
        # saved without conversion (peft's native form): the factors apply to the residual W − s·B₀A₀, and
        # B₀A₀ is a function of the original W and r alone, so the delta against W is s·B A − s·B₀A₀
        if base_weight is None:
            raise lora_inits.needs_original_base(init, module_name)
        A0, B0 = lora_inits.initial_factors(base_weight, init, A.shape[0], scale)
        return delta - (B0 @ A0) * scale

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
