"""The running batch's key/value cache: one left-padded buffer pair per layer, rows joining and leaving.

Continuous batching over a model that computes attention itself (any transformers causal LM) needs the cache
of rows of different lengths in one tensor. Rows are right-aligned: row i's real tokens sit in the last
``length[i]`` columns and an attention mask hides the padding on the left, so every decode step appends one
column for all rows. A joining row (or batch) is left-padded to the longer of the two; leaving rows are
dropped and the padding columns no row needs any more are cut (Text Generation Inference's batch
concatenate / filter). Memory is rows x longest row; requests of similar length waste little.

Each layer's keys and values live in a buffer with room for more columns than the rows use, and a decode
step writes its column into that room: transformers' ``DynamicCache`` concatenates instead, copying the
whole cache every step, which at a few hundred columns was about half of a SmolLM2 decode step. A full
buffer is replaced by one with room for an eighth more, so the copies that remain cost a few columns a step.
"""

from __future__ import annotations

import torch

try:  # transformers >= 4.56: caches are lists of layer objects that a model updates in turn
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the model concatenates, the last column is copied back
    DynamicCache = DynamicLayer = None


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


def kv_bytes_per_token(config, dtype: torch.dtype) -> int | None:
    """Bytes one token (one cache column of one row) takes in every layer's keys and values, from a
    transformers config (GPT-2's names map to these); None when the config does not say."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not all(isinstance(x, int) and x > 0 for x in (layers, heads)):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if isinstance(hidden, int) else None)
    if not head_dim:
        return None
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def room(columns: int) -> int:
    """Columns a buffer holding ``columns`` gets: an eighth more, at least 32 (a new buffer every so often)."""
    return columns + columns // 8 + 32


if DynamicLayer is not None:
    class BufferLayer(DynamicLayer):
        """A cache layer whose keys/values are the first ``used`` columns of larger buffers; ``update`` writes
        the new columns in place, growing the buffers only when they are full."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, used: int):
            super().__init__()
            self.key_buffer, self.value_buffer, self.used = keys, values, used
            self.keys, self.values = keys[:, :, :used], values[:, :, :used]
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.used + key_states.shape[-2]
            if end > self.key_buffer.shape[2]:
                self.key_buffer = _regrow(self.key_buffer, self.used, room(end))
                self.value_buffer = _regrow(self.value_buffer, self.used, room(end))
            self.key_buffer[:, :, self.used:end] = key_states
            self.value_buffer[:, :, self.used:end] = value_states
            self.used = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

    class BufferCache(DynamicCache):
        """A ``DynamicCache`` over :class:`BufferLayer` objects."""

        def __init__(self, layers: list):
            super(DynamicCache, self).__init__(layers=layers)


class BatchCache:
    """Keys/values and the attention mask of the running rows (row order = the engine's row order).

    Rows leaving and rows joining move as little as they can: :meth:`keep` copies in place only the rows whose
    position changes (used columns only), and joining rows are written into the rows that left when they fit,
    so the buffers are rarely copied whole (copying them on every leave was a sixth of a serving step)."""

    def __init__(self):
        self.buffers: list | None = None  # per layer (keys, values), each (rows, kv_heads, capacity, head_dim)
        self.mask: torch.Tensor | None = None  # (rows, columns), 1 = a real token
        self._layers: list | None = None  # the BufferLayers lent to the model for the current decode step

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else self.buffers[0][0].shape[2]

    @property
    def kv(self) -> list | None:
        """(keys, values) per layer: views of the used columns."""
        if self.buffers is None:
            return None
        n = self.columns
        return [(k[:, :, :n], v[:, :, :n]) for k, v in self.buffers]

    def set(self, kv, mask: torch.Tensor) -> None:
        self.buffers, self.mask = None, None
        self.join(kv, mask)

    def join(self, kv, mask: torch.Tensor) -> None:
        """Append rows (their own cache and mask, right-aligned as well) below the running ones."""
        if self._join_in_place(kv, mask):
            return
        width = max(self.columns, mask.shape[1])
        parts = [] if self.buffers is None else [self.kv]
        parts.append(kv)
        rows = self.rows + mask.shape[0]
        buffers = []
        for layer in zip(*parts):  # layer: ((keys, values) of the running rows, of the new rows)
            keys, values = (t.new_empty(rows, t.shape[1], room(width), t.shape[3]) for t in layer[0])
            top = 0
            for k, v in layer:  # right-aligned: zeros left of a short row are its padding (the room stays unset)
                for dst, src in ((keys, k), (values, v)):
                    dst[top:top + k.shape[0], :, :width - k.shape[2]] = 0
                    dst[top:top + k.shape[0], :, width - k.shape[2]:width] = src
                top += k.shape[0]
            buffers.append((keys, values))
        masks = [] if self.mask is None else [self.mask]
        masks.append(mask)
        self.buffers = buffers
        self.mask = torch.cat([_left_pad(m, width, dim=1) for m in masks])

    def _join_in_place(self, kv, mask: torch.Tensor) -> bool:
        """Write the new rows into rows that earlier rows left, when they fit there and are no wider than the
        running rows (a wider one would need every running row shifted). The buffers are views of the first rows
        and last columns of the tensors allocated for them (``_base``)."""
        if self.buffers is None:
            return False
        n, m, width = self.rows, mask.shape[0], self.columns
        allocated = _allocated(self.buffers[0][0]).shape
        offset = allocated[2] - self.capacity  # columns cut off the left
        if mask.shape[1] > width or n + m > allocated[0]:
            return False
        pad = width - mask.shape[1]
        buffers = []
        for layer, new in zip(self.buffers, kv):
            keys, values = (_allocated(t) for t in layer)
            for dst, src in zip((keys, values), new):
                dst[n:n + m, :, offset:offset + pad] = 0
                dst[n:n + m, :, offset + pad:offset + width] = src
            buffers.append((keys[:n + m, :, offset:], values[:n + m, :, offset:]))
        self.buffers = buffers
        self.mask = torch.cat([self.mask, _left_pad(mask, width, dim=1)])
        return True

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in their new order); cut padding columns no kept row uses. In place: only
        rows whose position changes are copied (used columns only); the engine fills the places of leaving rows
        with the last rows, so a leave moves about as many rows as left."""
        if len(rows) == 0:
            self.buffers, self.mask = None, None
            return
        mask = self.mask.index_select(0, rows)
        cut = mask.shape[1] - int(mask.sum(1).max())  # columns left of every kept row's first real token
        moves = [(j, i) for j, i in enumerate(rows.tolist()) if i != j]
        if moves:
            dst, src = (torch.tensor(m, dtype=torch.long, device=rows.device) for m in zip(*moves))
            with torch.inference_mode(self.buffers[0][0].is_inference()):  # the engine retires outside it
                for kv in self.buffers:
                    for t in kv:
                        used = t[:, :, cut:self.columns]
                        used.index_copy_(0, dst, used.index_select(0, src))  # sources read before any write
        # the buffers keep their room on the right: the cut columns are a view's offset, not a copy
        self.buffers = [(k[:len(rows), :, cut:], v[:len(rows), :, cut:]) for k, v in self.buffers]
        self.mask = mask[:, cut:]

    def model_cache(self):
        """The cache to hand the model for one decode step (then :meth:`append_step` with what it returns)."""
        if DynamicLayer is None:
            self._layers = None
            return make_cache(self.kv)
        self._layers = [BufferLayer(k, v, self.columns) for k, v in self.buffers]
        return BufferCache(self._layers)

    def append_step(self, kv) -> None:
        """After a decode step: the model's cache (one more column) and a real token in that column per row."""
        if self._layers is not None:  # the layers wrote their column in place, into new buffers if full
            self.buffers = [(layer.key_buffer, layer.value_buffer) for layer in self._layers]
            self._layers = None
        else:
            n = self.columns
            if n + 1 > self.capacity:
                self.buffers = [(_regrow(k, n, room(n + 1)), _regrow(v, n, room(n + 1))) for k, v in self.buffers]
            for (kb, vb), (k, v) in zip(self.buffers, kv):
                kb[:, :, n] = k[:, :, -1]
                vb[:, :, n] = v[:, :, -1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)

    def nbytes(self) -> int:
        """Bytes the buffers' storage holds (room, rows left behind, and columns cut off the left, included)."""
        if self.buffers is None:
            return 0
        return sum(t.untyped_storage().nbytes() for kv in self.buffers for t in kv)


def _allocated(buffer: torch.Tensor) -> torch.Tensor:
    """The tensor a buffer view was cut from (itself if it is not a view)."""
    return buffer if buffer._base is None else buffer._base


def _regrow(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    grown = buffer.new_empty(buffer.shape[0], buffer.shape[1], capacity, buffer.shape[3])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
