"""The method interface every adapter method implements (see docs/concepts.md).

A method is stateless: it builds an adapter module (the adapter's own parameters) for one host layer and says
what that adapter changes. Capabilities are declared as class attributes so that the model, the contract
tests and later consumers (merging, serving, bi-level recipes) read them instead of special-casing methods.
"""

from __future__ import annotations

import torch
from torch import nn


class Method:
    name: str = ""
    #: host-layer kinds this method supports (see layers.KINDS)
    layer_kinds: frozenset = frozenset({"linear", "conv1d", "conv2d", "embedding"})
    #: ΔW can be folded into the base weight
    mergeable: bool = True
    #: rescales the whole output per feature (DoRA-like); mixed batches then need ``output_scale``
    rescales_output: bool = False
    #: ``low_rank`` returns factors (ΔW = scale·B·A): mixed batches use the gathered kernel
    low_rank_form: bool = False

    def make_config(self, **fields):
        """A config that builds this method (what ``LoraConfig(...).method`` resolves back to this name)."""
        from ..config import LoraConfig
        return LoraConfig(**fields)

    def create(self, host: nn.Module, cfg, r: int, alpha: float) -> nn.Module:
        """Build the adapter's parameters for one host layer."""
        raise NotImplementedError

    def delta(self, adapter: nn.Module, host: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the host's current output ``base_out`` for input ``x``."""
        raise NotImplementedError

    def add_delta(self, adapter: nn.Module, host: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + delta(...)``; methods may fuse the two (one pass over the output instead of three)."""
        return out + self.delta(adapter, host, x, out)

    def deterministic(self, adapter: nn.Module) -> bool:
        """The adapter's forward is a fixed function of its input right now (no active dropout or noise), so a
        forward through the merged weight equals the unmerged one. Host layers then may fold ΔW per call."""
        return False

    def delta_weight(self, adapter: nn.Module, host: nn.Module) -> torch.Tensor:
        """Dense ΔW in the base weight's layout: merged weight minus base weight."""
        raise NotImplementedError

    def low_rank(self, adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` with ΔW = scale·B·A in the (out, fan_in) view, or None when not low-rank."""
        return None

    def output_scale(self, adapter: nn.Module, host: nn.Module) -> torch.Tensor | None:
        """Per-output-feature factor g with out = g·(W + ΔW)x + b, for methods that rescale the output."""
        return None

    def merge(self, adapter: nn.Module, host: nn.Module):
        """Returns (merged weight, token for unmerge)."""
        return host.dense_weight() + self.delta_weight(adapter, host), None

    def unmerge(self, adapter: nn.Module, host: nn.Module, token) -> torch.Tensor:
        return host.dense_weight() - self.delta_weight(adapter, host)

    def param_groups(self, adapter: nn.Module) -> dict[str, list[str]]:
        """Parameter names of the adapter by role, so bi-level recipes can place groups at levels."""
        return {"weights": [n for n, _ in adapter.named_parameters()], "architecture": []}

    def peft_keys(self, host: nn.Module) -> dict[str, str]:
        """PEFT checkpoint key suffix -> adapter parameter name."""
        raise NotImplementedError

    def to_peft(self, adapter: nn.Module, host: nn.Module) -> dict[str, torch.Tensor]:
        return {k: getattr(adapter, a).detach() for k, a in self.peft_keys(host).items()}

    def peft_shape(self, adapter: nn.Module, host: nn.Module, attr: str) -> tuple:
        """The shape a tensor has on disk (PEFT's layout)."""
        return tuple(getattr(adapter, attr).shape)

    def from_peft(self, adapter: nn.Module, host: nn.Module, attr: str, tensor: torch.Tensor) -> None:
        param = getattr(adapter, attr)
        with torch.no_grad():
            param.copy_(tensor.reshape(param.shape).to(param.dtype))
