"""The serving engine: continuous batching of generation requests over many adapters on one base model.

Orca (Yu et al., OSDI 2022) schedules at the granularity of one decode step: requests join the running batch
when they arrive and leave it when they finish, instead of waiting for a whole batch to drain. S-LoRA
(arXiv:2311.03285) and Punica (arXiv:2310.18547) add that the rows of one batch may each use a different LoRA
adapter. Here each :meth:`Engine.step`:

1. installs adapters the pool finished reading and drops cancelled, finished and timed-out rows;
2. admits waiting requests (arrival order; one whose adapter is still loading waits, the others go ahead)
   and prefills them together, left-padded, each row with its own adapter;
3. runs one decode step for every running row, each with its own adapter, through the model's mixed-batch
   path (:mod:`grafting.batching`), and samples each row's next token with its own parameters.

The cache of the running rows is one left-padded tensor pair per layer (:mod:`grafting.serve.kv`). Greedy
output does not depend on what else is in the batch, up to floating-point ties: padding is masked, positions
are per row, and every row's adapter is applied to that row alone.

``Engine.start()`` runs steps on a background thread; ``submit`` is thread-safe and returns a handle whose
events stream the output (text deltas), or ``handle.result()`` waits for all of it.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque

import torch

from ..errors import GraftingError
from .kv import BatchCache, cache_tensors, kv_bytes_per_token, room
from .logprobs import prompt_entries, token_entry
from .loop import BackgroundLoop, EngineStopped, QueueFull, RecentRate
from .model_facts import context_size, eos_ids, pad_id, vocab_size
from .pool import AdapterError
from .request import Completion, Output, Request, RequestHandle
from .sampling import SamplingParams, make_generator, sample_token
from .text import Detokenizer

log = logging.getLogger("grafting.serve")

__all__ = ["Completion", "Engine", "EngineStopped", "Output", "QueueFull", "Request", "RequestHandle"]


class Engine(BackgroundLoop):
    """Continuous batching over ``model`` (an :class:`~grafting.AdaptedModel` around a transformers causal LM).

    ``pool``: an :class:`~grafting.serve.AdapterPool` resolving adapter names (without one, names are the
    model's own adapters). ``max_batch``: running rows at most; ``max_queue``: waiting requests at most
    (more raise :class:`QueueFull`); ``max_prefill_tokens``: prompt tokens prefilled in one step at most (one
    long prompt still goes alone); ``max_model_len``: prompt + output tokens at most (default: the model's
    context size); ``max_kv_bytes``: bytes the running batch's key/value cache may hold (default: no limit),
    enforced by admitting fewer rows and, when decoding would outgrow it, by preempting the most recently
    admitted rows (their cache is dropped and recomputed from prompt + output when they rejoin). The model is
    put in eval mode: serving never drops activations (``lora_dropout``)."""

    task = "generate"
    thread_name = "grafting-engine"

    def __init__(self, model, tokenizer=None, pool=None, max_batch: int = 32, max_queue: int = 1024,
                 max_prefill_tokens: int = 4096, max_model_len: int | None = None, eos_token_ids=None,
                 max_kv_bytes: int | None = None):
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        config = getattr(model, "config", None)
        self.max_model_len = max_model_len or context_size(config)
        self.eos_token_ids = set(eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self.pad_token_id = pad_id(tokenizer, config)
        self.waiting: deque = deque()
        self.running: list = []
        self.cache = BatchCache()
        self._init_loop()
        self.device = next(model.parameters()).device
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "base_model", model)
        forward = getattr(inner, "forward", None)
        accepted = inspect.signature(forward).parameters if forward is not None else {}
        self._keep_last = "logits_to_keep" in accepted
        self._cache_kw = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.2x
        self.vocab_size = vocab_size(inner, config)
        self.max_kv_bytes = max_kv_bytes
        self.kv_bytes_per_token = kv_bytes_per_token(config, next(model.parameters()).dtype)
        if max_kv_bytes is not None and self.kv_bytes_per_token is None:
            raise GraftingError("max_kv_bytes: this model's config does not say its layers, heads and head size, "
                                "so its key/value cache cannot be budgeted")
        self.stats = {"requests": 0, "finished": 0, "errors": 0, "generated_tokens": 0, "prompt_tokens": 0,
                      "steps": 0, "batch_rows": 0, "preemptions": 0}
        self.token_rate = RecentRate()  # generated tokens per second, recently (the metrics' gauge)
        self.on_finish = None  # callable(Request), e.g. metrics
        if pool is not None:
            pool.on_change = self._wake

    # ---- submitting (any thread) ------------------------------------------------------------------------------
    def submit(self, prompt, params: SamplingParams | None = None, adapter: str | None = None,
               timeout: float | None = None, on_event=None, request_id: str | None = None) -> RequestHandle:
        """Queue one request: ``prompt`` a string (needs a tokenizer) or token ids; ``adapter`` a pool (or
        model) adapter name, None for the base model."""
        params = (params or SamplingParams()).validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GraftingError("a text prompt needs the engine's tokenizer; pass token ids instead")
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise GraftingError("prompt: expected at least one token")
        bad = next((i for i, t in enumerate(prompt_ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:  # the embedding lookup would fail the whole prefill, other requests included
            raise GraftingError(f"prompt: token id {prompt_ids[bad]} at position {bad} is outside the vocabulary "
                                f"(0 to {self.vocab_size - 1})")
        if len(prompt_ids) >= self.max_model_len:
            raise GraftingError(f"prompt: {len(prompt_ids)} tokens, but this model's context is "
                                f"{self.max_model_len} tokens (prompt plus output)")
        self._check_adapter(adapter)
        if self.max_kv_bytes is not None:
            need = self._kv_bytes(1, min(len(prompt_ids) + params.max_tokens, self.max_model_len))
            if need > self.max_kv_bytes:
                raise GraftingError(f"max_tokens: the prompt ({len(prompt_ids)} tokens) and max_tokens "
                                    f"({params.max_tokens}) need {need} bytes of key/value cache, more than the "
                                    f"engine's budget of {self.max_kv_bytes}")
        request = Request(prompt_ids, params, adapter,
                          deadline=None if timeout is None else time.monotonic() + timeout)
        if request_id is not None:
            request.id = request_id
        handle = RequestHandle(self, request)
        request.on_event = on_event or handle.events.put
        request.generator = make_generator(params)
        request.detok = Detokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output,
                                    params.skip_special_tokens)
        self._enqueue(request)
        return handle

    def _check_adapter(self, adapter) -> None:
        if adapter is None:
            return
        if self.pool is not None:
            if adapter not in self.pool:
                raise AdapterError(f"no adapter named '{adapter}'")
        elif adapter not in self.model.peft_config:
            raise AdapterError(f"no adapter named '{adapter}'; loaded: {self.model.adapter_names()}")

    def generate(self, prompts, params: SamplingParams | None = None, adapters=None) -> list[Completion]:
        """Submit every prompt (``adapters``: one name or None per prompt) and run steps until all are done;
        on the calling thread unless the engine runs its own."""
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        handles = [self.submit(p, params, a) for p, a in zip(prompts, adapters)]
        if self._thread is None:
            while any(h.request.finish_reason is None for h in handles):
                self.step()
        return [h.result() for h in handles]

    # ---- the loop (BackgroundLoop runs step on its thread) ------------------------------------------------------
    def _drained(self) -> bool:
        return not self.waiting and not self.running

    def _cancel_all(self) -> None:
        for r in list(self.waiting) + self.running:
            r.cancelled = True

    def _has_work(self) -> bool:
        now = time.monotonic()
        return bool(self.running) or any(
            r.cancelled or self.pool is None or r.adapter is None or not self.pool.pending(r.adapter)
            or (r.deadline is not None and now > r.deadline)
            for r in self.waiting) or bool(self.pool and self.pool._ready)

    def step(self) -> None:
        """One scheduling iteration: admit and prefill waiting requests, then one decode step for all rows."""
        if self.pool is not None:
            self.pool.poll()
        self._retire()
        new = self._admit()
        with torch.inference_mode():
            if new:
                try:
                    self._prefill(new)
                except Exception as e:
                    # only the admitted requests fail: the running rows' cache is joined after a prefill
                    # succeeds, so they go on untouched
                    log.exception("prefill of %d requests failed", len(new))
                    for r in new:
                        if r.finish_reason is None and r not in self.running:
                            self._finish(r, "error", f"internal error in prefill: {type(e).__name__}: {e}")
                self._retire()
            self._make_room()
            if self.running:
                self._decode()
        self.stats["steps"] += 1
        self.stats["batch_rows"] += len(self.running)
        self.token_rate.add(self.stats["generated_tokens"])
        self._retire()
        if self.pool is not None and self.pool._deferred:
            # rows that finished in this step freed room that the names deferred at admission may now take;
            # left as they were, they would stay 'waiting their turn' and the loop would sleep on them
            with self._lock:
                waiting = list(self.waiting)
            self._want(waiting)

    # ---- scheduling -------------------------------------------------------------------------------------------
    def _want(self, waiting: list) -> None:
        """Tell the pool which adapters the queue waits for, in admission order (AdapterPool.want)."""
        self.pool.want([r.adapter for r in waiting if r.adapter is not None and not r.cancelled])

    def _admit(self) -> list:
        new, budget = [], self.max_prefill_tokens
        now = time.monotonic()
        with self._lock:
            candidates = list(self.waiting)
        if self.pool is not None:
            self._want(candidates)
            if self.pool._ready:  # copies from the host tier are ready now: install them for this step, not next
                self.pool.poll()
        live = []
        for request in candidates:  # all of them, so a full batch never keeps gone clients' places in the queue
            if request.cancelled or (request.deadline is not None and now > request.deadline):
                self._remove_waiting(request)
                self._finish(request, "cancelled" if request.cancelled else "timeout",
                             None if request.cancelled else "the request timed out while waiting")
            else:
                live.append(request)
        width = self.cache.columns
        try:
            for request in live:
                if len(self.running) + len(new) >= self.max_batch:
                    break
                if new and len(request.context) > budget:
                    break
                wider = max(width, len(request.context))
                if (self.running or new) and not self._kv_fits(len(self.running) + len(new) + 1, wider + 1):
                    break  # in arrival order: a long prompt is not overtaken for ever by short ones
                if request.adapter is not None and request.internal is None:  # a preempted one keeps its adapter
                    if self.pool is None:
                        request.internal = request.adapter
                    else:
                        try:
                            request.internal = self.pool.acquire(request.adapter)
                        except AdapterError as e:
                            self._remove_waiting(request)
                            self._finish(request, "error", str(e), status=400)
                            continue
                        if request.internal is None:
                            continue  # being read: later requests may go ahead meanwhile
                self._remove_waiting(request)
                new.append(request)
                budget -= len(request.context)
                width = wider
        except BaseException:
            # admitted ones go back to the front of the queue (keeping their pinned adapters), not lost: the
            # loop fails what waits if the step keeps failing
            with self._lock:
                self.waiting.extendleft(reversed(new))
            raise
        return new

    # ---- the key/value cache budget ----------------------------------------------------------------------------
    def _kv_bytes(self, rows: int, columns: int) -> int:
        return rows * room(columns) * self.kv_bytes_per_token

    def _kv_fits(self, rows: int, columns: int) -> bool:
        return self.max_kv_bytes is None or self._kv_bytes(rows, columns) <= self.max_kv_bytes

    def _make_room(self) -> None:
        """Before a decode step that must grow the cache past the budget: preempt the rows that arrived last
        (vLLM's recompute preemption) until it fits; the one that arrived first always stays."""
        if self.max_kv_bytes is None or self.cache.columns + 1 <= self.cache.capacity:
            return  # the step writes into room the buffers already have
        while len(self.running) > 1 and not self._kv_fits(len(self.running), self.cache.columns + 1):
            newest = max(range(len(self.running)), key=lambda i: self.running[i].created)
            r = self.running[newest]
            self._drop_rows({newest})
            r.preemptions += 1
            self.stats["preemptions"] += 1
            with self._lock:
                self.waiting.appendleft(r)  # first to rejoin, keeping its adapter pinned

    def _retire(self) -> None:
        """Drop finished, cancelled and timed-out rows from the batch and the cache."""
        now = time.monotonic()
        keep = []
        for i, r in enumerate(self.running):
            if r.finish_reason is None and r.cancelled:
                self._finish(r, "cancelled")
            elif r.finish_reason is None and r.deadline is not None and now > r.deadline:
                self._finish(r, "timeout", "the request timed out")
            if r.finish_reason is None:
                keep.append(i)
        if len(keep) != len(self.running):
            kept = set(keep)
            self._drop_rows({i for i in range(len(self.running)) if i not in kept})

    def _drop_rows(self, gone: set) -> None:
        """Remove rows ``gone`` from the batch and the cache: the last rows take the leaving rows' places, so
        the cache moves about as many rows as left instead of sliding every later row up."""
        n = len(self.running)
        order = list(range(n - len(gone)))
        holes = [j for j in order if j in gone]
        tail = [i for i in range(n - len(gone), n) if i not in gone]
        for j, i in zip(holes, tail):
            order[j] = i
        self.running = [self.running[i] for i in order]
        self.cache.keep(torch.tensor(order, dtype=torch.long, device=self.device))

    def _fail_waiting(self, why: str) -> None:
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for r in waiting:
            self._finish(r, "error", why)

    def _fail_all(self, why: str) -> None:
        for r in self.running:
            if r.finish_reason is None:
                self._finish(r, "error", why)
        self.running, self.cache = [], BatchCache()

    # ---- model calls ------------------------------------------------------------------------------------------
    def _forward(self, input_ids, mask, positions, cache, names, every_position: bool = False):
        """Logits of each row's last position (of every position if ``every_position``) and the (keys,
        values) per layer; ``cache``: a transformers cache of the running rows (decode) or None (prefill)."""
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if self._keep_last and not every_position:
            kwargs["logits_to_keep"] = 1
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = names
        out = self.model(**kwargs)
        cache = out.get("cache") if "cache" in out else out.past_key_values
        logits = out.logits if every_position else out.logits[:, -1, :]
        return logits.float().cpu(), cache_tensors(cache)

    def _prefill(self, new: list) -> None:
        contexts = [r.context for r in new]  # a preempted row recomputes its output so far too
        width = max(len(c) for c in contexts)
        ids = torch.full((len(new), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(new), width, dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        scoring = [r.params.prompt_logprobs is not None and not r.preemptions for r in new]
        logits, kv = self._forward(ids, mask, positions, None, [r.internal for r in new], any(scoring))
        if any(scoring):
            for i, r in enumerate(new):
                if scoring[i]:
                    r.on_event(Output(r.id, "", [], prompt_logprobs=prompt_entries(
                        logits[i, width - len(r.prompt_ids):], r.prompt_ids, r.params.prompt_logprobs)))
            logits = logits[:, -1]
        # padding columns hold whatever the pad token produced: zero them so no later step can read NaN there
        keep = mask[:, None, :, None].to(kv[0][0].dtype)
        kv = [(k * keep, v * keep) for k, v in kv]
        self.cache.join(kv, mask)
        self.running.extend(new)
        for r in new:
            self.stats["prompt_tokens"] += len(r.prompt_ids) if not r.preemptions else 0
        for i, r in enumerate(new):
            if r.params.max_tokens == 0:  # scoring the prompt only
                self._finish(r, "length")
            else:
                self._emit(r, sample_token(logits[i], r.params, r.generator), logits[i])

    def _decode(self) -> None:
        rows = self.running
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)
        positions = self.cache.mask.sum(1, keepdim=True)
        mask = torch.cat([self.cache.mask, self.cache.mask.new_ones(len(rows), 1)], dim=1)
        logits, kv = self._forward(ids, mask, positions, self.cache.model_cache(), [r.internal for r in rows])
        self.cache.append_step(kv)
        for i, r in enumerate(rows):
            if r.finish_reason is None:
                self._emit(r, sample_token(logits[i], r.params, r.generator), logits[i])

    # ---- outputs ----------------------------------------------------------------------------------------------
    def _emit(self, r: Request, token: int, logits: torch.Tensor) -> None:
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
        self.stats["generated_tokens"] += 1
        r.completion_tokens += 1
        ends = token in r.params.stop_token_ids or (token in self.eos_token_ids and not r.params.ignore_eos)
        # sampling holds these back before min_tokens; one arriving anyway is an ordinary token
        if ends and len(r.output_ids) >= r.params.min_tokens:
            self._finish(r, "stop", text=r.detok.flush())
            return
        r.output_ids.append(token)
        r.last_token = token
        text, stopped = r.detok.add(token, may_stop=len(r.output_ids) >= r.params.min_tokens)
        total = len(r.prompt_ids) + len(r.output_ids)
        lp = None if r.params.logprobs is None else [token_entry(logits, token, r.params.logprobs)]
        if stopped:
            self._finish(r, "stop", text=text, token_ids=[token], logprobs=lp)
        elif len(r.output_ids) >= r.params.max_tokens or total >= self.max_model_len:
            self._finish(r, "length", text=text + r.detok.flush(), token_ids=[token], logprobs=lp)
        else:
            r.on_event(Output(r.id, text, [token], logprobs=lp))

    def _finish(self, r: Request, reason: str, error: str | None = None, text: str = "", token_ids=(),
                status: int | None = None, logprobs: list | None = None) -> None:
        if r.finish_reason is not None:
            return
        if status is None and reason in ("timeout", "error"):
            status = 504 if reason == "timeout" else 500
        r.finish_reason, r.error, r.finished_at = reason, error, time.monotonic()
        if r.internal is not None and self.pool is not None:
            self.pool.release(r.internal)
        self.stats["finished"] += 1
        self.stats["errors"] += reason == "error"
        r.on_event(Output(r.id, text, list(token_ids), reason, error, status, logprobs))
        if self.on_finish is not None:
            self.on_finish(r)
