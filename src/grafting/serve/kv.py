"""The running batch's key/value cache: one left-padded tensor pair per layer, rows joining and leaving.

Continuous batching over a model that computes attention itself (any transformers causal LM) needs the cache
of rows of different lengths in one tensor. Rows are right-aligned: row i's real tokens sit in the last
``length[i]`` columns and an attention mask hides the padding on the left, so every decode step appends one
column for all rows. A joining row (or batch) is left-padded to the longer of the two; leaving rows are
dropped and the padding columns no row needs any more are cut (Text Generation Inference's batch
concatenate / filter). Memory is rows x longest row; requests of similar length waste little.
"""

from __future__ import annotations

import torch


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (rows, kv_heads, columns, head_dim), from a transformers cache."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]  # legacy tuples


def make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers ``DynamicCache`` holding ``kv`` (no copy)."""
    from transformers import DynamicCache
    try:
        return DynamicCache(ddp_cache_data=kv)
    except TypeError:  # before 4.56
        return DynamicCache.from_legacy_cache(tuple(kv))


class BatchCache:
    """Keys/values and the attention mask of the running rows (row order = the engine's row order)."""

    def __init__(self):
        self.kv: list | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns), 1 = a real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def set(self, kv, mask: torch.Tensor) -> None:
        self.kv, self.mask = kv, mask

    def join(self, kv, mask: torch.Tensor) -> None:
        """Append rows (their own cache and mask, right-aligned as well) below the running ones."""
        if self.mask is None:
            self.set(kv, mask)
            return
        width = max(self.columns, mask.shape[1])
        old = [(_left_pad(k, width), _left_pad(v, width)) for k, v in self.kv]
        new = [(_left_pad(k, width), _left_pad(v, width)) for k, v in kv]
        self.kv = [(torch.cat([a, c]), torch.cat([b, d])) for (a, b), (c, d) in zip(old, new)]
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in their new order); cut padding columns no kept row uses."""
        if len(rows) == 0:
            self.kv, self.mask = None, None
            return
        mask = self.mask.index_select(0, rows)
        used = int(mask.sum(1).max())
        cut = mask.shape[1] - used  # columns left of every kept row's first real token
        self.mask = mask[:, cut:]
        self.kv = [(k.index_select(0, rows)[:, :, cut:], v.index_select(0, rows)[:, :, cut:]) for k, v in self.kv]

    def append_step(self, kv) -> None:
        """After a decode step: the model's cache (one more column) and a real token in that column per row."""
        self.kv = kv
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
