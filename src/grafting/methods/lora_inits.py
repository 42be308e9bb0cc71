"""LoRA initialisations that decompose the base weight (``init_lora_weights`` values, named as peft names them).

Every init here sets A, B from a decomposition of the layer's weight W (out × in) and replaces the base by the
residual W_res = W − s·B A, so that at step 0 the adapted layer computes exactly W x (s = the LoRA scale; the
kept singular values are divided by s first, as peft does, so that s·B A is the chosen component itself).

- ``"pissa"`` (PiSSA, Meng et al., 2024, arXiv:2404.02948, Sec. 3): W = U S Vᵀ, A = √S_r V_rᵀ,
  B = U_r √S_r with the r *principal* components (full SVD).
- ``"pissa_niter_N"`` (the same paper's fast SVD, Sec. 4.5 / Halko et al. 2011): the principal components from
  ``torch.svd_lowrank(W, r, niter=N)``, which draws a random test matrix from torch's global generator. The
  draws happen in the same order as peft's (per layer: nn.Linear's init of A and B, then the SVD), so the same
  seed gives the same factors as peft on the same base.
- ``"olora"`` (OLoRA, Büyükakyüz, 2024, arXiv:2406.01775, Sec. 3): W = Q R, B = Q[:, :r], A = R[:r].
- ``"milora"`` (MiLoRA, Wang et al., 2024, arXiv:2406.09044, Sec. 3): the r *minor* singular components,
  A = √S_m V_mᵀ, B = U_m √S_m with the last r of U, S, V (the principal ones stay in the frozen base). peft
  0.21.2 does not ship it: it is a grafting extension (init value ``"milora"``). S_m is divided by s as peft
  does for ``"pissa"``, so W_res + s·B A = W holds for any α (the split of √S_m between A and B follows PiSSA).
- ``"corda"`` (CorDA, Yang et al., 2024, arXiv:2406.05223, Sec. 3): context-oriented SVD. From the layer
  inputs X of the calibration batches, C = mean over batches of X̂ᵀX̂ (X̂ = X / |max X| per batch, peft's
  normalisation), damped as C + λ·mean(diag C)·I (λ = 0.01, doubled until the inverse is accurate), then
  W C = U S Vᵀ and W = U S (Vᵀ C⁻¹). ``corda_method="ipm"`` (instruction-previewed) adapts the r principal
  components, ``"kpm"`` (knowledge-preserved) the r minor ones; A = √S_r (Vᵀ C⁻¹)_r, B = U_r √S_r.

All are saved, by default, as a plain LoRA against the *original* base (lora.py's conversion). pissa, olora and
milora depend only on W and r, so an adapter saved *without* conversion can be applied to the original base by
recomputing them (:func:`initial_factors`; W − U_r S_r V_rᵀ and W − Q_r R_r do not depend on the signs of the
vectors). corda and pissa_niter_N depend on data or random draws that the file does not record.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import GraftingError

CORDA_DEFAULTS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                  "use_float16_for_covariance": False, "prune_temporary_fields": True}
_NITER = re.compile(r"^pissa_niter_(\d+)$")
#: inits recomputable from the original weight and r alone
DETERMINISTIC = ("pissa", "olora", "milora")


def is_pissa_niter(init) -> bool:
    return isinstance(init, str) and _NITER.match(init) is not None


def changes_base(init) -> bool:
    return init in DETERMINISTIC or init == "corda" or is_pissa_niter(init)


def check_corda_config(cfg, bad) -> None:
    cc = cfg.corda_config
    if cc is None:
        return
    if not isinstance(cc, dict):
        raise bad("corda_config", "a mapping of CordaConfig fields or null", cc)
    for key in cc:
        if key not in CORDA_DEFAULTS:
            raise bad(f"corda_config[{key!r}]", f"one of the CordaConfig fields {sorted(CORDA_DEFAULTS)}", key)
    if cc.get("corda_method", "ipm") not in ("ipm", "kpm"):
        raise bad("corda_config['corda_method']", "'ipm' or 'kpm'", cc.get("corda_method"))
    for key in ("cache_file", "covariance_file"):
        if cc.get(key) is not None:
            raise bad(f"corda_config[{key!r}]", "null (grafting neither writes nor reads peft's torch.save caches; "
                      "pass the calibration batches instead)", cc[key])
    for key in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
        if not isinstance(cc.get(key, False), bool):
            raise bad(f"corda_config[{key!r}]", "true or false", cc[key])


def corda_setting(cfg, key):
    return {**CORDA_DEFAULTS, **(cfg.corda_config or {})}[key]


def draw_randomized_svd(adapter, w_out_in: torch.Tensor, niter: int) -> None:
    """pissa_niter_N at creation time: consume torch's generator exactly as peft's layer creation does (nn.Linear
    initialises A (r × in) and B (out × r) before the SVD draws its test matrix), then keep the SVD's result
    for the init stage."""
    r = adapter.r
    nn.init.kaiming_uniform_(torch.empty(r, w_out_in.shape[1]), a=math.sqrt(5))
    nn.init.kaiming_uniform_(torch.empty(w_out_in.shape[0], r), a=math.sqrt(5))
    U, S, V = torch.svd_lowrank(w_out_in.float(), r, niter=niter)
    adapter._pending_svd = (U, S, V.t())


def corda_statistic(cfg, inputs: list) -> torch.Tensor:
    """CorDA's covariance (peft's calib_cov_distribution): per forward call X̂ = X / |max X|, C = mean of X̂ᵀX̂."""
    half = corda_setting(cfg, "use_float16_for_covariance")
    cov = 0
    for x in inputs:
        x = x.half() if half else x.float()
        x = x / x.max().abs()
        cov = cov + x.t() @ x
    return cov / len(inputs)


def corda_decomposition(w: torch.Tensor, cov: torch.Tensor):
    """W C = U S Vᵀ and W = U S (Vᵀ C⁻¹), C damped until it inverts accurately (as peft's
    collect_eigens_for_layer)."""
    cov = cov.float()
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + eye * cov.diagonal().mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return U, S, Vh @ inv


def decompose(w: torch.Tensor, init: str, r: int, scale: float, pending=None, statistic=None, cfg=None):
    """(A, B) for ``init`` from the float32 weight ``w`` (out × in); the residual is w − scale·B A."""
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        return R[:r], Q[:, :r]
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    elif init == "milora":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, -r:], S[-r:], Vh[-r:]
    elif is_pissa_niter(init):
        if pending is None:
            U, S, V = torch.svd_lowrank(w, r, niter=int(_NITER.match(init)[1]))
            pending = (U, S, V.t())
        U, S, Vh = pending
    elif init == "corda":
        U, S, Vh = corda_decomposition(w, statistic)
        keep = slice(None, r) if corda_setting(cfg, "corda_method") == "ipm" else slice(-r, None)
        U, S, Vh = U[:, keep], S[keep], Vh[keep]
    else:
        raise ValueError(init)
    root = (S / scale).sqrt()
    return root[:, None] * Vh, U * root


def initial_factors(w: torch.Tensor, init: str, r: int, scale: float):
    """The factors a deterministic init (pissa, olora, milora) gave on the original weight ``w`` (out × in)."""
    return decompose(w.float(), init, r, scale)


def unsupported_init(init: str, where: str):
    return GraftingError(
        f"{where}: field 'init_lora_weights' = {init!r}: the adapter's factors apply to a residual base that this "
        "init computed from calibration data or random draws the file does not record (corda, loftq, randomized "
        "'pissa_niter_*'), so loading it onto the original base would give wrong outputs. Save it from peft with "
        "save_pretrained(..., path_initial_model_for_weight_conversion=<dir of the adapter right after init>) "
        "(a plain LoRA against the original base) and load that.")


def needs_original_base(init: str, module_name: str):
    return GraftingError(
        f"module '{module_name}': the adapter was saved with field 'init_lora_weights' = {init!r} and no conversion, "
        "so its factors apply to a residual base; its ΔW against the original base needs that base weight "
        "(pass base_weight / a base model), or save it converted (grafting: save_adapter's default; peft: "
        "path_initial_model_for_weight_conversion)")
