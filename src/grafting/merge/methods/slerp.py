"""SLERP: spherical linear interpolation between the base model's tensor and one other model's.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985, eq. for Slerp:

    slerp(p0, p1; t) = sin((1 − t) Ω) / sin Ω · p0 + sin(t Ω) / sin Ω · p1,   cos Ω = p̂0 · p̂1

applied, as mergekit does, to each tensor flattened into one vector: Ω is the angle between the two
*normalised* tensors, and the coefficients multiply the *unnormalised* ones, so the result interpolates
the direction along the great circle and the magnitude roughly in between. Behaviour matched to mergekit's
``slerp`` (merge_methods/slerp.py):

* ``t = 0`` gives the base model, ``t = 1`` the other one; ``t`` is global and may be a gradient over
  layers (the config resolves it per tensor before calling us);
* nearly colinear (or antipodal) pairs, ``|cos Ω| > 0.9995``, fall back to linear interpolation
  ``(1 − t) p0 + t p1``, where ``sin Ω`` is too small to divide by;
* a vector whose norm is at most ``1e-8`` is "normalised" by 1 rather than by its norm, so an all-zero
  tensor gives ``cos Ω = 0`` instead of NaN.
"""

from __future__ import annotations

import torch

from ..base import Param, TensorGroup, merge_method

DOT_THRESHOLD = 0.9995  # mergekit's: above it, sin Ω is small enough to lose precision
EPS = 1e-8

T = Param("t", float, scope="global",
          doc="interpolation factor: 0 keeps the base model, 1 the other model; may be a gradient over layers")


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = EPS) -> torch.Tensor:
    """Spherical interpolation of two same-shaped tensors, each taken as one flat vector."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    # Normalising before the product keeps the dot in [-1, 1] up to rounding even for huge tensors.
    dot = ((a / na) * (b / nb)).sum().clamp(-1.0, 1.0)
    if dot.abs() > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    c0 = torch.sin((1 - t) * omega) / sin_omega
    c1 = torch.sin(t * omega) / sin_omega
    return (c0 * a + c1 * b).reshape(v0.shape)


@merge_method("slerp", params=[T], needs_base=True, min_models=1, max_models=1,
              paper="Shoemake, SIGGRAPH 1985 (Slerp); mergekit's slerp",
              summary="sin((1−t)Ω)/sinΩ · θ_base + sin(tΩ)/sinΩ · θ_1, lerp when nearly colinear")
def slerp_merge(group: TensorGroup, params: dict) -> torch.Tensor:
    return slerp(float(params["t"]), group.base, group.models[0].tensor)
