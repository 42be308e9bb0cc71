"""Tiny models with one target layer of each kind, and helpers the method tests share."""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("linear", "conv1d", "conv2d", "embedding")


class Toy(nn.Module):
    """A small model whose layer ``target`` is of the given kind, followed by a plain head."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.target = nn.Linear(12, 10)
        elif kind == "conv1d":
            from transformers.pytorch_utils import Conv1D
            self.target = Conv1D(10, 12)  # nf=out, nx=in
            nn.init.normal_(self.target.weight, std=0.2)
            nn.init.normal_(self.target.bias, std=0.2)
        elif kind == "conv2d":
            self.target = nn.Conv2d(3, 10, 3, padding=1)
        elif kind == "embedding":
            self.target = nn.Embedding(20, 10)
        self.head = nn.Linear(10, 4)

    def make_input(self, rows: int = 3, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "embedding":
            return torch.randint(0, 20, (rows, 5), generator=g)
        if self.kind == "conv2d":
            return torch.randn(rows, 3, 6, 6, generator=g)
        return torch.randn(rows, 5, 12, generator=g)

    def forward(self, x):
        h = self.target(x)
        if self.kind == "conv2d":
            h = h.mean((2, 3))
        return self.head(torch.tanh(h))


def make_toy(kind: str) -> Toy:
    torch.manual_seed(1)
    return Toy(kind)


def randomize(model: nn.Module, scale: float = 0.3) -> None:
    """Give every adapter parameter a non-trivial value (so deltas are visible)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapters." in name or "shared_tensors." in name:  # trained model-level tensors too (MoS pools)
                if name.endswith("lora_magnitude"):
                    p.mul_(1.0 + scale * torch.rand_like(p))
                else:
                    p.copy_(torch.randn_like(p) * scale)


def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Copy every adapter parameter of ``src`` into the same-named parameter of ``dst``."""
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for n, p in src.named_parameters():
            if ".adapters." in n or n.startswith("shared_tensors."):
                dst_params[n].copy_(p)


def adapted_twins(base: nn.Module, twin: nn.Module, config_of):
    """``base`` and its dense ``twin``, each adapted with "default" (``config_of()``) and "other"
    (``config_of(r=2)``), holding the same random adapter values."""
    import grafting as gf
    model = gf.adapt(base, config_of())
    model.add_adapter("other", config_of(r=2))
    randomize(model)
    reference = gf.adapt(twin, config_of())
    reference.add_adapter("other", config_of(r=2))
    copy_adapters(model, reference)
    return model, reference


def assert_rows_match(model, x, names, atol=1e-5, rtol=1e-4) -> None:
    """Each row of a mixed batch equals the same row run with that adapter alone (None: the base)."""
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        if name is None:
            with model.disabled():
                single = model(x)
        else:
            model.set_active(name)
            single = model(x)
        torch.testing.assert_close(mixed[i], single[i], atol=atol, rtol=rtol)


class Mlp(nn.Module):
    """12 -> 10 -> 6 -> 3 with tanh, seeded: the method tests' small model (targets ``a`` and ``b``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(12, 10), nn.Linear(10, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))
