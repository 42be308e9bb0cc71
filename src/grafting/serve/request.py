"""A generation request, its handle (stream of events, cancel, result) and what it produces."""

from __future__ import annotations

import itertools
import queue
import time
from dataclasses import dataclass, field

from .sampling import RowState, SamplingParams

_IDS = itertools.count(1)


@dataclass
class Output:
    """One event of a request: new text and token ids; ``finish_reason`` set on the last one ("stop",
    "length", "cancelled", "timeout" or "error", with ``error`` saying why and ``status`` the HTTP status
    that fits: 400 for an adapter that cannot load, 504 for a timeout, 500 otherwise)."""

    request_id: str
    text: str
    token_ids: list
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None
    logprobs: list | None = None  # one logprobs.Entry per token id, when the request asked for them
    prompt_logprobs: list | None = None  # one Entry per prompt token (an event of its own, before any token)


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    status: int | None = None
    completion_tokens: int | None = None  # the tokens sampled: ``token_ids`` and the EOS / stop token ending them
    logprobs: list | None = None  # one logprobs.Entry per token id, when the request asked for them
    prompt_logprobs: list | None = None

    def __post_init__(self):
        if self.completion_tokens is None:
            self.completion_tokens = len(self.token_ids)


@dataclass
class Request:
    prompt_ids: list
    params: SamplingParams
    adapter: str | None
    id: str = field(default_factory=lambda: f"req-{next(_IDS)}")
    deadline: float | None = None
    on_event: object = None  # callable(Output); default: the handle's queue
    # engine state
    internal: str | None = None  # the adapter's name inside the model
    output_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    rng: object = None  # torch.Generator, None for greedy
    detok: object = None
    last_token: int | None = None
    eos_token_ids: frozenset = frozenset()  # the engine's, held back by min_tokens
    completion_tokens: int = 0  # tokens sampled, the EOS or stop token that ended the output included (usage)
    preemptions: int = 0  # times its cache was dropped to keep within the engine's memory budget

    @property
    def context(self) -> list:
        """What a prefill of this request runs: the prompt, and the output so far when it was preempted."""
        return self.prompt_ids + self.output_ids if self.preemptions else self.prompt_ids

    # The engine samples with ``sample_token(logits, r.params, r.generator)``: what it gets is the row's
    # RowState, so the penalties and min_tokens see the prompt and the output so far; assigning a
    # torch.Generator sets the row's random generator.
    @property
    def generator(self) -> RowState:
        return RowState(self.rng, self.prompt_ids, self.output_ids, self.eos_token_ids)

    @generator.setter
    def generator(self, value) -> None:
        self.rng = value


class RequestHandle:
    def __init__(self, engine, request: Request):
        self.engine, self.request = engine, request
        # bound here since the handle exists before the first token is sampled
        request.eos_token_ids = frozenset(getattr(engine, "eos_token_ids", ()))
        self.events: queue.Queue = queue.Queue()

    @property
    def id(self) -> str:
        return self.request.id

    def cancel(self) -> None:
        """Stop generating (a client went away); the row leaves the batch at the next step."""
        self.request.cancelled = True
        self.engine._wake()

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        text, ids, logprobs, deadline = [], [], [], None if timeout is None else time.monotonic() + timeout
        prompt_logprobs = None
        while True:
            try:
                event = self.events.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.cancel()
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s") from None
            text.append(event.text)
            ids.extend(event.token_ids)
            logprobs.extend(event.logprobs or [])
            prompt_logprobs = event.prompt_logprobs or prompt_logprobs
            if event.finish_reason is not None:
                return Completion(self.id, "".join(text), ids, event.finish_reason, len(self.request.prompt_ids),
                                  event.error, event.status, self.request.completion_tokens,
                                  logprobs if self.request.params.logprobs is not None else None,
                                  prompt_logprobs)
