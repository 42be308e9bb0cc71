"""Embeddings from an encoder and its adapters, many adapters in one batch: what /v1/embeddings serves.

Sentence embeddings are a pooled encoder output (Sentence-BERT, arXiv:1908.10084, section 3: mean over the
tokens, or the CLS token, or the max). A sentence-transformers model directory says which: ``modules.json``
lists a Pooling module (its ``config.json`` names the mode) and, when the vectors are unit-normalised, a
Normalize module; ``sentence_bert_config.json`` gives the longest input. :func:`read_pooling` reads them, so
the packaged all-MiniLM-L6-v2 gives the vectors sentence-transformers gives.

:class:`Embedder` batches across requests: whatever waits when the model is free goes in one forward pass,
each row through its own adapter (the mixed-batch path, :mod:`grafting.batching`), with adapters paged in by
an :class:`~grafting.serve.AdapterPool`. Adapters trained on a task head (``AutoModelForSequenceClassification``)
serve too: :func:`encoder_view` maps their keys onto the bare encoder and leaves out the head they trained in
full (``modules_to_save``), which an embedding never passes through.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GraftingError
from ..io.reader import PREFIX
from .loop import BackgroundLoop
from .pool import AdapterError

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "last")


@dataclass
class Pooling:
    mode: str = "mean"
    normalize: bool = False
    max_length: int | None = None


def read_pooling(directory) -> Pooling:
    """The pooling a sentence-transformers directory declares; mean pooling, unnormalised, otherwise."""
    d = Path(directory)
    out = Pooling()
    try:
        modules = json.loads((d / "modules.json").read_text())
    except (OSError, ValueError):
        return out
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith(".Pooling"):
            cfg = json.loads((d / m.get("path", "") / "config.json").read_text())
            modes = [k for k in ("cls", "mean", "max", "mean_sqrt_len") if cfg.get(f"pooling_mode_{k}_token")
                     or cfg.get(f"pooling_mode_{k}_tokens") or cfg.get(f"pooling_mode_{k}")]
            if cfg.get("pooling_mode_lasttoken"):
                modes.append("last")
            if len(modes) > 1:
                raise GraftingError(f"{d / m.get('path', '')}/config.json: pooling modes {modes} combined; "
                                    "one mode is supported")
            out.mode = modes[0] if modes else "mean"
        elif kind.endswith(".Normalize"):
            out.normalize = True
    try:
        out.max_length = int(json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return out


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[batch, seq, d] hidden states and a right-padded [batch, seq] mask -> [batch, d]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        return hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(dim=1).values
    summed, count = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
    return summed / (count.sqrt() if mode == "mean_sqrt_len" else count)


def encoder_view(model):
    """A pool ``prepare`` hook: an adapter's config and tensors as the bare encoder inside ``model`` (an
    AdaptedModel) names them. Keys under the task model's encoder attribute (``bert.`` for BERT) lose that
    prefix; modules trained in full that the encoder lacks (the classification head) are left out."""
    inner = model.base_model
    prefix = getattr(inner, "base_model_prefix", "") or ""
    strip = bool(prefix) and not hasattr(inner, prefix)
    names = {n for n, _ in inner.named_modules()}

    def present(module: str) -> bool:
        return any(n == module or n.endswith("." + module) for n in names)

    def prepare(config, tensors: dict):
        saved = list(config.modules_to_save or [])
        kept = [m for m in saved if present(m)]
        dropped = [m for m in saved if m not in kept]
        out = {}
        for key, t in tensors.items():
            rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if strip and rest.startswith(prefix + "."):
                rest = rest[len(prefix) + 1:]
            if any(rest.startswith(m + ".") or f".{m}." in rest for m in dropped):
                continue
            out[PREFIX + rest] = t
        if dropped:
            config = dataclasses.replace(config, modules_to_save=kept or None)
        return config, out

    return prepare


@dataclass
class EmbeddingJob:
    """One request: token-id rows, an adapter (None: the base), the future its [rows, d] tensor goes to."""

    rows: list
    adapter: str | None
    future: Future
    deadline: float | None = None
    internal: str | None = None
    created: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    first_token_at: float | None = None


class Embedder(BackgroundLoop):
    """Batched embeddings over ``model`` (an :class:`~grafting.AdaptedModel` around a transformers encoder).

    ``pool``: resolves adapter names; ``max_batch``: rows per forward pass at most (one larger request still
    goes alone); ``max_queue``: waiting requests at most (more raise QueueFull); ``pooling``: how token states
    become one vector (default: what the model directory declares, see :func:`read_pooling`). The model is put
    in eval mode: serving never drops activations (``lora_dropout``)."""

    task = "embed"
    thread_name = "grafting-embedder"

    def __init__(self, model, tokenizer=None, pool=None, pooling: Pooling | None = None, max_batch: int = 64,
                 max_queue: int = 1024):
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.pooling = pooling or Pooling()
        if self.pooling.mode not in POOLING_MODES:
            raise GraftingError(f"pooling mode '{self.pooling.mode}': expected one of {POOLING_MODES}")
        config = getattr(model, "config", None)
        context = getattr(config, "max_position_embeddings", None) or 512
        self.max_model_len = min(self.pooling.max_length or context, context)
        self.dimensions = getattr(config, "hidden_size", None)
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None) or getattr(config, "pad_token_id", 0) or 0
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque = deque()
        self.running: list = []
        self.device = next(model.parameters()).device
        self.stats = {"requests": 0, "finished": 0, "errors": 0, "generated_tokens": 0, "prompt_tokens": 0,
                      "steps": 0, "batch_rows": 0}
        self.on_finish = None
        self._init_loop()
        if pool is not None:
            pool.on_change = self._wake

    # ---- submitting (any thread) ------------------------------------------------------------------------------
    def tokenize(self, inputs) -> list[list[int]]:
        """Strings (with the tokenizer's special tokens) or token-id lists (taken as they are) -> id rows."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise GraftingError("input: expected at least one text or token list")
        rows = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise GraftingError("a text input needs the embedder's tokenizer; pass token ids instead")
                ids = self.tokenizer(item)["input_ids"]
            else:
                ids = [int(t) for t in item]
            if not ids:
                raise GraftingError(f"input[{i}]: expected at least one token")
            if len(ids) > self.max_model_len:
                raise GraftingError(f"input[{i}]: {len(ids)} tokens, but this model reads at most "
                                    f"{self.max_model_len}")
            rows.append(ids)
        return rows

    def submit(self, inputs, adapter: str | None = None, timeout: float | None = None) -> Future:
        """Queue one request; the future holds a float32 [rows, d] tensor (or the error)."""
        rows = self.tokenize(inputs)
        if adapter is not None and self.pool is not None and adapter not in self.pool:
            raise self.pool.unknown(adapter)
        job = EmbeddingJob(rows, adapter, Future(), None if timeout is None else time.monotonic() + timeout)
        self._enqueue(job)
        return job.future

    def embed(self, inputs, adapter: str | None = None) -> torch.Tensor:
        """Embed now: on the calling thread unless the embedder runs its own."""
        future = self.submit(inputs, adapter)
        while self._thread is None and not future.done():
            self.step()
        return future.result()

    # ---- the loop (BackgroundLoop runs step on its thread) ------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.waiting)

    def _drained(self) -> bool:
        return not self.waiting

    def _cancel_all(self) -> None:
        for job in self.waiting:
            job.future.cancel()

    def _fail_all(self, why: str) -> None:
        pass  # step finishes its own batch with the error

    def step(self) -> bool:
        """Embed one batch of what waits; whether anything ran."""
        if self.pool is not None:
            self.pool.poll()
        batch = self._take()
        if not batch:
            return False
        self.running = batch
        rows = [r for job in batch for r in job.rows]
        names = [job.internal for job in batch for _ in job.rows]
        try:
            vectors = self._forward(rows, names)
            start = 0
            for job in batch:
                self._finish(job, vectors[start:start + len(job.rows)])
                start += len(job.rows)
        except Exception as e:  # never leave a client hanging; the next batch runs as usual
            for job in batch:
                self._finish(job, error=GraftingError(f"internal error: {type(e).__name__}: {e}"))
        finally:
            self.running = []
        self.stats["steps"] += 1
        self.stats["batch_rows"] += len(rows)
        return True

    def _take(self) -> list:
        batch, rows, now = [], 0, time.monotonic()
        with self._lock:
            candidates = list(self.waiting)
        if self.pool is not None:
            self.pool.want([j.adapter for j in candidates if j.adapter is not None and not j.future.cancelled()])
        for job in candidates:
            if job.future.cancelled() or (job.deadline is not None and now > job.deadline):
                self._remove_waiting(job)
                if not job.future.cancelled():
                    self._finish(job, error=TimeoutError("the request timed out while waiting"))
                continue
            if batch and rows + len(job.rows) > self.max_batch:
                break
            if job.adapter is not None and self.pool is not None:
                try:
                    job.internal = self.pool.acquire(job.adapter)
                except AdapterError as e:
                    self._remove_waiting(job)
                    self._finish(job, error=e)
                    continue
                if job.internal is None:
                    continue  # being read: later requests go ahead meanwhile
            else:
                job.internal = job.adapter
            self._remove_waiting(job)
            if not job.future.set_running_or_notify_cancel():
                self._release(job)
                continue
            batch.append(job)
            rows += len(job.rows)
        return batch

    def _forward(self, rows: list, names: list) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # always per row: without adapter_names the model would apply its active adapter to base rows
        kwargs = {"adapter_names": names} if hasattr(self.model, "peft_config") else {}
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, **kwargs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            vectors = pool_hidden(hidden.float(), mask, self.pooling.mode)
            if self.pooling.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        self.stats["prompt_tokens"] += int(mask.sum())
        return vectors.cpu()

    def _release(self, job) -> None:
        if job.internal is not None and job.adapter is not None and self.pool is not None:
            self.pool.release(job.internal)
            job.internal = None

    def _finish(self, job, vectors: torch.Tensor | None = None, error: Exception | None = None) -> None:
        self._release(job)
        job.finished_at = time.monotonic()
        self.stats["finished"] += 1
        if error is not None:
            self.stats["errors"] += 1
            if not job.future.done():
                job.future.set_exception(error)
        elif not job.future.done():
            job.future.set_result(vectors)
        if self.on_finish is not None:
            self.on_finish(job)
