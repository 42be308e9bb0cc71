"""BiDoRA: DoRA with magnitude and direction trained at two levels (Qin, Zhang & Xie, 2024, arXiv:2410.09758).

The model is DoRA's (arXiv:2402.09353, eq. 5): W' = m · V / ||V||_c with V = W0 + s·B A. BiDoRA (Sec. 3)
trains the direction (A, B) on the training split, with an orthogonality penalty on the normalised direction,
and the magnitude m on the validation split through the hypergradient, so the two are no longer updated in the
coupled way DoRA's joint gradient imposes. The hypergradient differentiates through the norm, so the norm is
exact here by default (``exact_norm``, see methods/dora.py): a detached norm would give the hypergradient of a
different function.

Penalty: R = ||D Dᵀ − I||²_F / d² with D = V / ||V||_c (rows = output features, unit norm), i.e. the mean
squared cosine between different output features' directions, weighted by ``orth_reg_weight`` and averaged
over layers. The paper states the penalty on the direction matrix without fixing its normalisation; the mean
makes one weight fit layers of every size. It is computed from the smaller Gram matrix
(||DDᵀ||_F = ||DᵀD||_F and tr(DDᵀ) = d), never the d x d one when the input is narrower.

Saved (``save_adapter``) as a plain DoRA adapter (peft's ``use_dora``): same tensors, same outputs;
``export=False`` keeps ``peft_type: BIDORA``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..registry import register
from .dora import Dora, DoraConfig
from .lora import LoraConfig


@dataclass
class BiDoraConfig(DoraConfig):
    """DoRA for bi-level training: direction (A, B) on training data, magnitude on validation data.

    exact_norm: differentiate the norm (default true: hypergradients need it). orth_reg_weight: weight of the
    direction's orthogonality penalty."""

    peft_type = "BIDORA"

    exact_norm: bool = True
    orth_reg_weight: float = 0.1

    def check(self, bad) -> None:
        super().check(bad)
        if not self.use_dora:
            raise bad("use_dora", "true (BiDoRA is DoRA)", self.use_dora)
        g = self.orth_reg_weight
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise bad("orth_reg_weight", "a number >= 0", g)


def direction_penalty(host, adapter) -> torch.Tensor:
    """||D Dᵀ − I||²_F / d² for the normalised direction D of one layer (differentiable in A and B)."""
    w = host.kind.to_out_in(host.dense_weight()).detach().to(adapter.lora_A.dtype)
    A = adapter.lora_A.reshape(adapter.lora_A.shape[0], -1)
    B = adapter.lora_B.reshape(adapter.lora_B.shape[0], -1)
    v = torch.addmm(w, B, A, alpha=adapter.scaling)
    d = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = d.t() @ d if d.shape[1] < d.shape[0] else d @ d.t()
    rows = d.shape[0]
    return (gram.pow(2).sum() - rows) / rows ** 2


@register("bidora", config=BiDoraConfig)
class BiDora(Dora):
    """DoRA whose magnitudes train on validation data and directions on training data (exact norm)."""

    layer_kinds = frozenset({"linear", "conv1d"})

    def regularizer(self, layers, shared, cfg):
        if not cfg.orth_reg_weight or not layers:
            return None
        return cfg.orth_reg_weight * sum(direction_penalty(h, a) for _, h, a in layers) / len(layers)

    def export_config(self, cfg):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{**fields, "use_dora": True})

    def export_tensors(self, now, cfg, module_name):
        return dict(now)
