"""Per-request sampling: greedy, temperature, top-k, nucleus (top-p, Holtzman et al., 2019, arXiv:1904.09751),
min-p, a seed, and the logits rules of OpenAI's and vLLM's APIs (logit bias, presence / frequency /
repetition penalties, a minimum output length).

Each request owns a ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the same tokens
whatever else shares its batch: sampling is per row, after the batched forward.

The rules apply in vLLM's order: logit bias, the ``min_tokens`` mask, the repetition penalty (Keskar et al.,
2019, arXiv:1909.05858, as transformers and vLLM apply it: a seen token's logit divided by the penalty when
positive, multiplied when negative; seen = in the prompt or the output), then the frequency and presence
penalties (OpenAI: ``logit -= count * frequency_penalty + (count > 0) * presence_penalty``, counting the
output only). Greedy decoding takes the argmax of the result; otherwise temperature, then top-k (ties with the
k-th logit kept), top-p on what top-k kept, renormalised, then min-p (tokens below ``min_p`` times the most
likely one's probability dropped).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import GraftingError

SEED_MODULUS = 2 ** 64  # torch.Generator takes 64-bit seeds; larger ones wrap, as in vLLM
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily, as in vLLM
MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's top_logprobs limit; vLLM's default max_logprobs)


@dataclass
class SamplingParams:
    """OpenAI's ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``,
    ``frequency_penalty`` and ``logit_bias``, and vLLM's ``top_k``, ``min_p``, ``min_tokens``,
    ``stop_token_ids``, ``repetition_penalty``, ``ignore_eos``, ``include_stop_str_in_output`` and
    ``skip_special_tokens``; ``logprobs`` (None: off; k: each generated token's log probability and its k most
    likely alternatives, :mod:`grafting.serve.logprobs`); ``prompt_logprobs`` the same for each prompt token.
    ``max_tokens`` 0 generates nothing (with ``prompt_logprobs``: scoring the prompt).

    ``temperature`` 0 (or below 1e-5) is greedy decoding (the penalties and logit bias still apply).
    ``stop`` strings end the output before the first occurrence (the string itself is not returned); the
    end-of-sequence token and ``stop_token_ids`` end it too (not returned as text or token ids, counted as a
    completion token), EOS not if ``ignore_eos``; ``include_stop_str_in_output`` keeps the stop string that
    ended the output in its text, ``skip_special_tokens`` False keeps special tokens' text. None of these ends
    the output before ``min_tokens`` tokens.
    ``top_k`` -1 or 0 and ``min_p`` 0 are off; ``seed`` is any integer, used modulo 2**64. ``logit_bias``
    maps token ids to a number in [-100, 100] added to their logits."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    ignore_eos: bool = False
    top_k: int = -1
    min_p: float = 0.0
    min_tokens: int = 0
    stop_token_ids: list = field(default_factory=list)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})

    def validate(self) -> "SamplingParams":
        def bad(field_name, expected, value):
            raise GraftingError(f"{field_name}: expected {expected}, got {value!r}")

        def number(value):
            return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

        def integer(value):
            return not isinstance(value, bool) and isinstance(value, int)

        if not integer(self.max_tokens) or self.max_tokens < 0:
            bad("max_tokens", "an integer >= 0", self.max_tokens)
        if not number(self.temperature) or not 0 <= self.temperature <= 100:
            bad("temperature", "a number in [0, 100]", self.temperature)
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]", self.top_p)
        if self.seed is not None and not integer(self.seed):
            bad("seed", "an integer", self.seed)
        if len(self.stop) > 16 or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "at most 16 non-empty strings", self.stop)
        if not integer(self.top_k) or self.top_k < -1:
            bad("top_k", "an integer >= 1, or -1 or 0 for all tokens", self.top_k)
        if not number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]", self.min_p)
        if not integer(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        if not all(integer(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids (integers >= 0)", self.stop_token_ids)
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0 (1 = off)", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not number(value) or not -2 <= value <= 2:
                bad(name, "a number in [-2, 2]", value)
        if not all(integer(t) and t >= 0 and number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()):
            bad("logit_bias", "token ids (integers >= 0) mapped to numbers in [-100, 100]", self.logit_bias)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not integer(value) or not 0 <= value <= MAX_LOGPROBS):
                bad(name, f"an integer in [0, {MAX_LOGPROBS}]", value)
        return self

    def check_vocab(self, vocab_size: int) -> None:
        """GraftingError if ``logit_bias`` or ``stop_token_ids`` names a token id the model does not have."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise GraftingError(f"{name}: token id {bad[0]} is outside the vocabulary (0 to {vocab_size - 1})")

    @property
    def greedy(self) -> bool:
        # below vLLM's threshold the logits divided by the temperature overflow to inf and softmax gives NaN
        return self.temperature < GREEDY_BELOW

    @property
    def reads_history(self) -> bool:
        """Whether sampling depends on the tokens so far (penalties, min_tokens), not on the logits alone."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.min_tokens > 0)


@dataclass
class RowState:
    """What sampling reads of one request besides its logits: its random generator, its prompt and output
    token ids so far, and the end-of-sequence ids that ``min_tokens`` holds back."""

    generator: torch.Generator | None = None
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    eos_token_ids: Collection[int] = ()


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()  # fresh entropy: unseeded requests differ
    else:
        g.manual_seed(params.seed % SEED_MODULUS)
    return g


def _ids(ids, vocab: int) -> torch.Tensor:
    # ids the logits have no entry for (a logit bias for a padded-away id) cannot be sampled: nothing to adjust
    t = torch.as_tensor(list(ids), dtype=torch.long)
    return t[(t >= 0) & (t < vocab)]


def process_logits(logits: torch.Tensor, params: SamplingParams, state: RowState | None = None) -> torch.Tensor:
    """The logits after logit bias, the ``min_tokens`` mask and the penalties (a new float tensor; the
    argument is not changed). Shape (vocab,)."""
    state = state or RowState()
    out = logits.float().clone()
    vocab = out.shape[-1]
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        bias = torch.tensor([float(b) for b in params.logit_bias.values()])
        inside = ids < vocab
        out.index_add_(0, ids[inside], bias[inside])
    if len(state.output_ids) < params.min_tokens:
        ends = list(params.stop_token_ids) + ([] if params.ignore_eos else list(state.eos_token_ids))
        out[_ids(ends, vocab)] = -math.inf
    if params.repetition_penalty != 1:
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[_ids(state.prompt_ids, vocab)] = True
        seen[_ids(state.output_ids, vocab)] = True
        p = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / p, out * p), out)
    if params.presence_penalty != 0 or params.frequency_penalty != 0:
        counts = torch.bincount(_ids(state.output_ids, vocab), minlength=vocab).float()
        out -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    return out


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | RowState | None = None) -> int:
    """One token id from one row of next-token logits (shape (vocab,)). ``generator``: the request's
    generator, or its :class:`RowState` when the penalties or ``min_tokens`` need its tokens so far."""
    state = generator if isinstance(generator, RowState) else RowState(generator)
    if params.logit_bias or params.reads_history:
        logits = process_logits(logits, params, state)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p == 1 and params.min_p == 0:
        return int(torch.multinomial(probs, 1, generator=state.generator))
    sorted_p, order = torch.sort(probs, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
    keep = (torch.cumsum(sorted_p, 0) - sorted_p) < params.top_p
    keep &= sorted_p >= params.min_p * sorted_p[0]
    choice = torch.multinomial(torch.where(keep, sorted_p, torch.zeros_like(sorted_p)), 1, generator=state.generator)
    return int(order[choice])
