"""Per-request sampling: greedy, temperature, nucleus (top-p, Holtzman et al., 2019, arXiv:1904.09751), a seed.

Each request owns a ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the same tokens
whatever else shares its batch: sampling is per row, after the batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import GraftingError


@dataclass
class SamplingParams:
    """What OpenAI's completions API calls ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop``.

    ``temperature=0`` is greedy decoding. ``stop`` strings end the output before the first occurrence (the
    string itself is not returned); the end-of-sequence token ends it too unless ``ignore_eos``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])

    def validate(self) -> "SamplingParams":
        def bad(field_name, expected, value):
            raise GraftingError(f"{field_name}: expected {expected}, got {value!r}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1", self.max_tokens)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 100:
            bad("temperature", "a number in [0, 100]", self.temperature)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]", self.top_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "an integer", self.seed)
        if len(self.stop) > 16 or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "at most 16 non-empty strings", self.stop)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()  # fresh entropy: unseeded requests differ
    else:
        g.manual_seed(params.seed)
    return g


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of next-token logits (shape (vocab,))."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, 0)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        keep = (cumulative - sorted_p) < params.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
