"""Model soups: average the weights of models fine-tuned from one initialisation.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022, arXiv 2203.05482:

* uniform soup: θ_soup = (1/k) Σ_i θ_i;
* greedy soup (the paper's Recipe 1, GreedySoup): sort the ingredients by held-out score, best first;
  add each to the soup only if the soup's held-out score with it is no worse than without it, and return
  the average of the ingredients kept. "No worse" is the paper's ``>=``; the authors' main.py uses a
  strict ``>``, which differs only on exact ties (``>=`` keeps an ingredient that changes nothing).

Candidates are state dicts or zero-argument callables returning one, so a large pool is loaded one
model at a time: the soup is kept as a running float32 sum (float64 stays float64), never as a list of
models. A loader is called twice in a greedy soup (once to score it alone, once when it is tried in the
soup). Floating-point tensors are averaged and cast back to the first candidate's dtype; any other
tensor (integer buffers such as ``num_batches_tracked`` or ``position_ids``) must be equal in every
ingredient and is copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch

from ..errors import GraftingError

StateDict = Mapping[str, torch.Tensor]
Candidate = Union[StateDict, Callable[[], StateDict]]


def _load(candidate: Candidate) -> StateDict:
    sd = candidate() if callable(candidate) else candidate
    if not isinstance(sd, Mapping):
        raise GraftingError(f"a soup candidate must be a state dict or a loader of one, got {type(sd).__name__}")
    return sd


class _Pot:
    """A running sum of state dicts (float32 or float64 accumulators), and their count."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.count = 0

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)

    def _check(self, sd: StateDict) -> None:
        if self.count and set(sd) != set(self.sums):
            missing, extra = sorted(set(self.sums) - set(sd)), sorted(set(sd) - set(self.sums))
            raise GraftingError(f"soup candidates have different tensors (missing {missing[:3]}, extra {extra[:3]})")
        for name, t in sd.items():
            if self.count and t.shape != self.sums[name].shape:
                raise GraftingError(f"soup candidates disagree on the shape of {name}: "
                                    f"{tuple(self.sums[name].shape)} vs {tuple(t.shape)}")
            if self.count and not t.is_floating_point() and not torch.equal(t.detach().cpu(), self.sums[name]):
                raise GraftingError(f"{name} is not floating-point and differs between soup candidates; "
                                    "it cannot be averaged")

    def with_(self, sd: StateDict) -> dict[str, torch.Tensor]:
        """The average of the pot plus ``sd``, without adding it."""
        self._check(sd)
        n = self.count + 1
        out = {}
        for name, t in sd.items():
            if not t.is_floating_point():
                out[name] = t.detach().clone()
                continue
            total = self._acc(t) if not self.count else self.sums[name] + self._acc(t)
            out[name] = (total / n).to(self.dtypes.get(name, t.dtype))
        return out

    def add(self, sd: StateDict) -> None:
        self._check(sd)
        for name, t in sd.items():
            if not t.is_floating_point():
                self.sums.setdefault(name, t.detach().cpu().clone())
                continue
            self.dtypes.setdefault(name, t.dtype)
            self.sums[name] = self._acc(t).clone() if not self.count else self.sums[name] + self._acc(t)
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise GraftingError("a soup needs at least one ingredient")
        return {name: (s / self.count).to(self.dtypes[name]) if name in self.dtypes else s.clone()
                for name, s in self.sums.items()}


def uniform_soup(candidates: Sequence[Candidate]) -> dict[str, torch.Tensor]:
    """The plain average (1/k) Σ θ_i of the candidates' state dicts."""
    pot = _Pot()
    for c in candidates:
        pot.add(_load(c))
    return pot.average()


@dataclass
class GreedySoupResult:
    """A greedy soup and how it was made. Indices refer to the order of ``candidates``."""

    state_dict: dict[str, torch.Tensor]
    kept: list[int]  # the ingredients, in the order they were added
    individual_scores: list[float]  # each candidate's held-out score alone
    score: float  # the returned soup's held-out score
    trials: list[tuple[int, float, bool]] = field(default_factory=list)  # (candidate, soup score with it, kept)

    @property
    def rejected(self) -> list[int]:
        return [i for i, _, accepted in self.trials if not accepted]


def _rank_key(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def greedy_soup(candidates: Sequence[Candidate], evaluate: Callable[[StateDict], float]) -> GreedySoupResult:
    """Wortsman et al.'s GreedySoup (Recipe 1): ``evaluate(state_dict) -> float`` is higher-is-better on
    held-out data. The best candidate alone starts the soup; each next-best is kept iff the soup with it
    scores ``>=`` the soup without it. Candidates with equal scores keep their given order; a NaN score
    ranks last and a NaN soup score rejects the candidate."""
    if not candidates:
        raise GraftingError("greedy_soup needs at least one candidate")
    individual = []
    for c in candidates:
        individual.append(float(evaluate(dict(_load(c)))))
    order = sorted(range(len(candidates)), key=lambda i: _rank_key(individual[i]), reverse=True)

    pot = _Pot()
    pot.add(_load(candidates[order[0]]))
    best, kept = individual[order[0]], [order[0]]
    trials = [(order[0], best, True)]
    for i in order[1:]:
        sd = _load(candidates[i])
        trial = pot.with_(sd)
        score = float(evaluate(trial))
        accepted = score >= best  # False for NaN
        if accepted:
            pot.add(sd)
            best = score
            kept.append(i)
        trials.append((i, score, accepted))
        del sd, trial
    return GreedySoupResult(pot.average(), kept, individual, best, trials)
