"""``NF4Storage``: the buffers of one NF4 weight inside a module, shared by the NF4 linear layer and embedding.

Codes and statistics are buffers (they follow ``.to(device)`` and ``state_dict``), but ``.to(bf16)`` must not
round the statistics: the dequantized weight would change. They stay fp32; the module's ``compute_dtype`` (what
``dequantize()`` returns) follows the conversion, as a float weight's dtype would.
"""

from __future__ import annotations

import torch
from torch import nn

from .nf4 import NF4Weight

STATISTICS = ("code", "nested_absmax", "nested_code", "offset")  # float buffers kept in float32
BUFFERS = ("packed", "absmax") + STATISTICS


class NF4Storage(nn.Module):
    def __init__(self, q: NF4Weight):
        super().__init__()
        self.nf4_shape = torch.Size(q.shape)
        self.block_size = q.block_size
        self.weight_dtype = q.dtype
        self.compute_dtype = q.dtype
        for name in BUFFERS:
            self.register_buffer(name, getattr(q, name))

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(0, device=self.packed.device))
        stats = {n: self._buffers[n] for n in STATISTICS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in stats.items():
            self._buffers[n] = t.to(probe.device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    @property
    def weight_nf4(self) -> NF4Weight:
        return NF4Weight(packed=self.packed, absmax=self.absmax, shape=self.nf4_shape, dtype=self.weight_dtype,
                         block_size=self.block_size, code=self.code, nested_absmax=self.nested_absmax,
                         nested_code=self.nested_code, offset=self.offset)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight: codes, every statistic, both codebooks."""
        return self.weight_nf4.nbytes

    def dequantize(self) -> torch.Tensor:
        """The dense weight in ``compute_dtype``."""
        return self.weight_nf4.dequantize(self.compute_dtype)
