"""Model soups (Wortsman et al., arXiv 2203.05482): the uniform soup is the plain average; the greedy soup
(Recipe 1), on a small real setting, is at least as good as the best single model on held-out data and
rejects a deliberately bad ingredient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from grafting.errors import GraftingError
from grafting.merge.soup import greedy_soup, uniform_soup

D = 10


def make_data(n, w_star, noise, g):
    x = torch.randn(n, D, generator=g)
    return x, x @ w_star + noise * torch.randn(n, 1, generator=g)


def fine_tune(init: nn.Module, x, y, steps=150, lr=0.05) -> dict:
    model = copy.deepcopy(init)
    for _ in range(steps):  # plain full-batch gradient descent
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, gr in zip(model.parameters(), grads):
                p -= lr * gr
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def setting():
    """Five nn.Linear regressors fine-tuned from one init, each on its own small noisy sample of one task
    (so each overfits its own noise), plus one fine-tuned on the same inputs with negated targets."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    init = nn.Linear(D, 1)
    w_star = torch.randn(D, 1, generator=g)
    good = [fine_tune(init, *make_data(14, w_star, 1.0, g)) for _ in range(5)]
    x, y = make_data(14, w_star, 1.0, g)
    bad = fine_tune(init, x, -y)
    held_x, held_y = make_data(2000, w_star, 1.0, g)
    probe = copy.deepcopy(init)

    def evaluate(sd) -> float:  # higher is better: negative held-out MSE
        probe.load_state_dict(sd)
        with torch.no_grad():
            return -nn.functional.mse_loss(probe(held_x), held_y).item()

    # the bad one in the middle, so it is the ranking, not the position, that puts it last
    return good[:2] + [bad] + good[2:], 2, evaluate


def test_greedy_soup_is_at_least_as_good_as_the_best_ingredient_and_rejects_the_bad_one(setting):
    candidates, bad, evaluate = setting
    res = greedy_soup(candidates, evaluate)

    individual = [evaluate(c) for c in candidates]
    assert res.individual_scores == pytest.approx(individual)
    best = max(range(len(candidates)), key=individual.__getitem__)
    assert res.kept[0] == best  # the soup starts from the best single model
    assert res.score == pytest.approx(evaluate(res.state_dict))
    assert res.score >= max(individual)
    assert len(res.kept) >= 2  # a real soup, not just the best model
    assert bad not in res.kept and bad in res.rejected
    # the bad candidate ranks last and is tried last; the soup with it is worse than without
    assert res.trials[-1][0] == bad and res.trials[-1][1] < res.score
    # the soup is the plain average of what was kept
    kept_avg = uniform_soup([candidates[i] for i in res.kept])
    for k in kept_avg:
        assert_close(res.state_dict[k], kept_avg[k])
    # and it beats averaging everything, bad ingredient included
    assert evaluate(uniform_soup(candidates)) < res.score


def test_greedy_soup_with_loaders_gives_the_same_soup_and_loads_each_candidate_twice(setting):
    candidates, _, evaluate = setting
    calls = [0] * len(candidates)

    def loader(i):
        def load():
            calls[i] += 1
            return {k: v.clone() for k, v in candidates[i].items()}
        return load

    from_dicts = greedy_soup(candidates, evaluate)
    from_loaders = greedy_soup([loader(i) for i in range(len(candidates))], evaluate)
    assert from_loaders.kept == from_dicts.kept
    for k in from_dicts.state_dict:
        assert_close(from_loaders.state_dict[k], from_dicts.state_dict[k])
    assert calls[from_dicts.kept[0]] == 2 and all(c == 2 for c in calls)


def test_greedy_soup_keeps_an_ingredient_that_does_not_make_it_worse():
    a = {"w": torch.tensor([1.0, 2.0])}
    same = {"w": torch.tensor([1.0, 2.0])}
    res = greedy_soup([a, same], lambda sd: 0.5)  # equal scores: "no worse" keeps it (the paper's >=)
    assert res.kept == [0, 1] and res.rejected == []
    other = {"w": torch.tensor([3.0, 2.0])}
    nan = greedy_soup([other, a], lambda sd: 1.0 if sd["w"][0] == 1.0 else float("nan"))
    assert nan.kept == [1] and nan.rejected == [0]  # a NaN ranks last and never wins a trial


def test_uniform_soup_averages_floats_and_copies_equal_integer_buffers():
    sds = [{"w": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.5], dtype=torch.bfloat16),
            "steps": torch.tensor(7)},
           {"w": torch.tensor([3.0, 5.0]), "b": torch.tensor([1.5], dtype=torch.bfloat16),
            "steps": torch.tensor(7)},
           {"w": torch.tensor([2.0, -2.0]), "b": torch.tensor([1.0], dtype=torch.bfloat16),
            "steps": torch.tensor(7)}]
    soup = uniform_soup(sds)
    assert_close(soup["w"], torch.tensor([2.0, 2.0]))
    assert soup["b"].dtype == torch.bfloat16 and soup["b"].item() == 1.0
    assert soup["steps"].item() == 7 and soup["steps"].dtype == torch.int64
    sds[2]["steps"] = torch.tensor(8)
    with pytest.raises(GraftingError, match="steps"):
        uniform_soup(sds)
    with pytest.raises(GraftingError, match="different tensors"):
        uniform_soup([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    with pytest.raises(GraftingError):
        greedy_soup([], lambda sd: 0.0)
