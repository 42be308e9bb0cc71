"""NF4 token embeddings, and the output head that shares them: a grafting extension of QLoRA.

QLoRA (arXiv 2305.14314) and bitsandbytes keep the embedding and the output head in 16 bits. On a small model
that is most of the memory left after quantizing the linear layers (SmolLM2-135M: its 49,152 x 576 embedding is
113 MB in fp32 against 52 MB for all 210 NF4 linear layers), so ``quantize(model, embeddings=True)`` stores it in
NF4 too: a lookup dequantizes only the rows it reads (whole blocks: ``embedding_dim`` must be a multiple of the
block size), and a tied output head becomes an :class:`NF4Linear` over the same bytes. The embedding stays frozen
and hosts no adapter. bitsandbytes checkpoints have no place for it, so ``save_pretrained`` refuses such a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraftingError
from .linear import NF4Linear
from .nf4 import NF4Weight, quantize_nf4
from .storage import NF4Storage


class NF4Embedding(NF4Storage):
    """``F.embedding`` over an NF4 (num_embeddings, embedding_dim) table; rows dequantized on lookup."""

    def __init__(self, q: NF4Weight, padding_idx: int | None = None):
        if len(q.shape) != 2 or q.shape[1] % q.block_size:
            raise GraftingError(f"NF4Embedding: embedding_dim {q.shape[-1]} is not a multiple of the block size "
                                f"{q.block_size}; rows must be whole blocks")
        super().__init__(q)
        self.num_embeddings, self.embedding_dim = int(q.shape[0]), int(q.shape[1])
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, block_size: int = 64, double_quant: bool = True) -> "NF4Embedding":
        if emb.max_norm is not None or emb.sparse:
            raise GraftingError("NF4Embedding: max_norm and sparse embeddings are not supported")
        return cls(quantize_nf4(emb.weight.detach(), block_size, double_quant), emb.padding_idx)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dense rows ``ids`` (flat), dequantized: only the blocks those rows hold are read."""
        per_row = self.embedding_dim // self.block_size
        packed = self.packed.view(self.num_embeddings, self.embedding_dim // 2)[ids]
        codes = torch.stack([packed >> 4, packed & 15], -1).view(len(ids), self.embedding_dim).long()
        values = self.code.float()[codes]
        blocks = ids[:, None] * per_row + torch.arange(per_row, device=ids.device)
        if self.nested_absmax is None:
            scales = self.absmax.float()[blocks]
        else:
            scales = self.nested_code.float()[self.absmax[blocks].long()] * self.nested_absmax.float()[blocks // 256] \
                + self.offset.float()
        out = values.view(len(ids), per_row, self.block_size) * scales.unsqueeze(-1)
        return out.view(len(ids), self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise GraftingError(f"NF4Embedding: expected integer token ids, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise GraftingError(f"NF4Embedding: token ids must be in [0, {self.num_embeddings}), got "
                                f"[{int(flat.min())}, {int(flat.max())}]")
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = F.embedding(inverse, self.rows(unique))
        return rows.view(*ids.shape, self.embedding_dim).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, block_size={self.block_size}"


def tied_head(embedding: NF4Embedding, bias: torch.Tensor | None = None) -> NF4Linear:
    """An output head over the embedding's own NF4 bytes (weight tying, as ``tie_word_embeddings``)."""
    head = NF4Linear(embedding.weight_nf4, bias)
    head.compute_dtype = embedding.compute_dtype
    return head
