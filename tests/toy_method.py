"""A toy adapter method defined outside the package: the proof that a method plugs in without editing grafting.

Not a published method (deliberately unlike LoRA, so nothing can lean on LoRA's names): every layer's update is
    ΔW = scale · diag(d) · P[:out, :fan_in] · diag(mask)
with P a random matrix shared by all layers of the adapter (one frozen buffer, saved once under
``base_model.toy_P``), ``mask`` a frozen random ±1 buffer per layer, and ``d`` the only trained parameter (zero at
init). ΔW has full rank, so mixed batches take the grouped fallback. The whole method is this file: its config
(with its own ``peft_type``), its tensors, its on-disk keys, and one ``@register`` line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

import grafting as gf


@dataclass
class ToySharedConfig(gf.AdapterConfig):
    """scale: multiplies ΔW. seed: seeds the shared projection and the masks."""

    peft_type = "GRAFT_TOY_SHARED"

    scale: float = 1.0
    seed: int = 0

    def check(self, bad):
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale == 0:
            raise bad("scale", "a non-zero number", self.scale)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "an integer", self.seed)


class ToyShared(nn.Module):
    def __init__(self, out: int, fan_in: int, seed: int, dtype, device):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("toy_P", torch.randn(out, fan_in, generator=g).to(dtype=dtype, device=device))


class ToyAdapter(nn.Module):
    def __init__(self, out: int, fan_in: int, scale: float, seed: int, shared: ToyShared, dtype, device):
        super().__init__()
        g = torch.Generator().manual_seed(seed + out * 7919 + fan_in)
        self.toy_d = nn.Parameter(torch.zeros(out, dtype=dtype, device=device))
        self.register_buffer("toy_mask", (torch.randint(0, 2, (fan_in,), generator=g) * 2 - 1).to(dtype=dtype,
                                                                                                  device=device))
        self.scale = scale
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: the model owns it


def toy_delta(d, mask, P, scale):
    """ΔW in the (out, fan_in) view."""
    return scale * d[:, None] * P[: d.shape[0], : mask.shape[0]] * mask[None, :]


@gf.register("toy-shared", config=ToySharedConfig)
class Toy(gf.Method):
    """A toy full-rank update scale·diag(d)·P·diag(mask) with P shared by all layers (tests only)."""

    def create_shared(self, cfg, targets):
        w = targets[0][1].dense_weight()
        sizes = [h.kind.to_out_in(h.dense_weight()).shape for _, h in targets]
        return ToyShared(max(s[0] for s in sizes), max(s[1] for s in sizes), cfg.seed, w.dtype, w.device)

    def create(self, host, cfg, module_name, shared):
        out, fan_in = host.kind.to_out_in(host.dense_weight()).shape
        w = host.dense_weight()
        return ToyAdapter(out, fan_in, cfg.scale, cfg.seed, shared, w.dtype, w.device)

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        return host.kind.from_out_in(toy_delta(adapter.toy_d, adapter.toy_mask, adapter.shared.toy_P,
                                               adapter.scale), w)

    def deterministic(self, adapter):
        return True

    def peft_keys(self, kind):
        return {"toy_d": "toy_d", "toy_mask": "toy_mask"}

    def shared_keys(self, cfg):
        return {"base_model.toy_P": "toy_P"}

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        return toy_delta(tensors["toy_d"], tensors["toy_mask"], shared["toy_P"], cfg.scale)


@contextlib.contextmanager
def step_recorder(name: str):
    """Register (for the block) a LoRA method whose ``on_step`` appends (step, total, [module names], whether
    every adapter parameter still holds its gradient) to a list; yields (its config class, that list)."""
    from grafting.methods.lora import Lora
    from grafting.registry import unregister

    calls: list = []

    @dataclass
    class StepConfig(gf.LoraConfig):
        peft_type = "GRAFT_TEST_STEPS"

    @gf.register(name, config=StepConfig)
    class Steps(Lora):
        """Test only: records the trainer's per-step calls."""

        def on_step(self, layers, shared, cfg, step, total):
            grads = all(p.grad is not None for _, _, a in layers for p in a.parameters())
            calls.append((step, total, sorted(module for module, _, _ in layers), grads))

    try:
        yield StepConfig, calls
    finally:
        unregister(name)


@contextlib.contextmanager
def calibration_recorder(name: str):
    """Register (for the block) a LoRA method whose init reads activations and records, per module, how many
    activation rows it saw; yields (its config class, that dict)."""
    from grafting.methods.lora import Lora
    from grafting.registry import unregister

    seen: dict = {}

    @dataclass
    class CalibConfig(gf.LoraConfig):
        peft_type = "GRAFT_TEST_CALIB"

    @gf.register(name, config=CalibConfig)
    class Calib(Lora):
        """Test only: an init that reads calibration activations."""

        def needs_calibration(self, cfg):
            return True

        def init(self, adapter, host, cfg, activations):
            seen[id(host)] = activations.shape

    try:
        yield CalibConfig, seen
    finally:
        unregister(name)
