"""lines (LiNeS, arXiv 2410.17146) and pcb (PCB-merging, arXiv 2410.02396) against their papers' rules on
small hand-built tensors, with the expected numbers worked out in the tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from grafting.errors import GraftingError
from grafting.merge import ModelTensor, TensorGroup, get_merge_method
from grafting.merge.methods.pcb import balancing_scores, drop_and_rescale


def group(base, taus, weights=None, layer=None, num_layers=None):
    weights = weights or [None] * len(taus)
    models = [ModelTensor(f"m{i}", base + tau, {} if w is None else {"weight": w})
              for i, (tau, w) in enumerate(zip(taus, weights))]
    return TensorGroup("w", models, base=base, layer=layer, num_layers=num_layers)


def run(method, grp, **params):
    return get_merge_method(method)(grp, params)


# ---------------------------------------------------------------------------------------------- LiNeS

def test_lines_scales_linearly_from_alpha_at_the_first_block_to_alpha_plus_beta_at_the_last():
    base = torch.tensor([1.0, -2.0, 0.5])
    taus = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, -1.0])]
    summed = taus[0] + taus[1]
    # α = 0.2, β = 0.6, L = 5: λ(ℓ) = 0.2 + 0.6 (ℓ−1)/4 for ℓ = 1..5 (driver layers 0..4)
    for layer, lam in zip(range(5), [0.2, 0.35, 0.5, 0.65, 0.8]):
        out = run("lines", group(base, taus, layer=layer, num_layers=5), alpha=0.2, beta=0.6)
        assert_close(out, base + lam * summed)


def test_lines_scales_tensors_outside_the_layer_stack_by_alpha():
    base, taus = torch.zeros(4), [torch.ones(4), 2 * torch.ones(4)]
    out = run("lines", group(base, taus, layer=None, num_layers=12), alpha=0.25, beta=0.5)
    assert_close(out, 0.25 * 3 * torch.ones(4))
    # a one-block model has no depth to scale over: α as well
    assert_close(run("lines", group(base, taus, layer=0, num_layers=1), alpha=0.25, beta=0.5), 0.75 * torch.ones(4))


def test_lines_alpha_unset_is_one_over_the_number_of_tasks():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    taus = [torch.randn(3, 4, generator=g) for _ in range(4)]
    first = run("lines", group(base, taus, layer=0, num_layers=6), beta=0.5)
    assert_close(first, base + sum(taus) / 4)  # α = 1/T: the shallowest block is the plain average
    last = run("lines", group(base, taus, layer=5, num_layers=6), beta=0.5)
    assert_close(last, base + (0.25 + 0.5) * sum(taus))


def test_lines_weights_scale_each_task_vector_and_set_the_default_alpha():
    base = torch.tensor([0.0, 1.0])
    taus = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])]
    # Σ w_i τ_i = [2, 3]; α = 1 / (2 + 1) = 1/3; layer 1 of 3: λ = 1/3 + 0.3 · 1/2
    out = run("lines", group(base, taus, weights=[2.0, 1.0], layer=1, num_layers=3), beta=0.3)
    assert_close(out, base + (1 / 3 + 0.15) * torch.tensor([2.0, 3.0]))


def test_lines_edits_one_fine_tuned_model_as_in_the_paper():
    # single-task editing: β = 1 − α, so the last block keeps the fine-tuned weights, the first is shrunk to α
    base, tau = torch.tensor([1.0, 2.0]), torch.tensor([0.4, -0.8])
    assert_close(run("lines", group(base, [tau], layer=7, num_layers=8), alpha=0.3, beta=0.7), base + tau)
    assert_close(run("lines", group(base, [tau], layer=0, num_layers=8), alpha=0.3, beta=0.7), base + 0.3 * tau)


def test_lines_parameters():
    m = get_merge_method("lines")
    assert m.needs_base
    assert m.param("beta").required and m.param("beta").scope == "global"
    assert m.param("alpha").default is None and m.param("alpha").scope == "global"
    assert m.param("weight").default == 1.0 and m.param("weight").scope == "model"
    with pytest.raises(GraftingError, match="alpha"):
        run("lines", group(torch.zeros(2), [torch.ones(2), torch.ones(2)], weights=[1.0, -1.0]), beta=0.5)


# ------------------------------------------------------------------------------------------------ PCB

# Two task vectors of D = 4 entries, N = 2.
TAU1 = torch.tensor([0.4, -0.2, 0.1, 0.0])
TAU2 = torch.tensor([0.2, 0.3, 0.1, -0.1])


def hand_scores():
    """The PCB matrix of TAU1, TAU2 worked out by hand.

    intra: Norm(|τ_i|) min-max over the entries, then exp(N · Norm²) (the softmax numerator; we compare up
    to the constant e^N the code divides by):
      |τ1| = [.4, .2, .1, 0]  → Norm = [1, .5, .25, 0]   → Norm² = [1, .25, .0625, 0]
      |τ2| = [.2, .3, .1, .1] → Norm = [.5, 1, 0, 0]     → Norm² = [.25, 1, 0, 0]
    inter: tanh(τ_i ⊙ Σ_j τ_j), Σ_j τ_j = [.6, .1, .2, −.1]
      τ1 ⊙ Σ = [.24, −.02, .02, 0],  τ2 ⊙ Σ = [.12, .03, .02, .01]
    """
    n = 2
    intra1 = [math.exp(n * (x - 1)) for x in (1, 0.25, 0.0625, 0)]
    intra2 = [math.exp(n * (x - 1)) for x in (0.25, 1, 0, 0)]
    inter1 = [math.tanh(x) for x in (0.24, -0.02, 0.02, 0.0)]
    inter2 = [math.tanh(x) for x in (0.12, 0.03, 0.02, 0.01)]
    return (torch.tensor([intra1, intra2]), torch.tensor([inter1, inter2]),
            torch.tensor([[a * b for a, b in zip(intra1, inter1)], [a * b for a, b in zip(intra2, inter2)]]))


def test_pcb_intra_and_inter_balancing_scores():
    intra, inter, beta = balancing_scores(torch.stack([TAU1, TAU2]))
    e_intra, e_inter, e_beta = hand_scores()
    assert_close(intra, e_intra)
    assert_close(inter, e_inter)
    assert_close(beta, e_beta)
    # the entry where τ1 opposes the consensus (−0.2 against Σ = +0.1) scores below τ1's untouched entry
    assert beta[0, 1] < 0 < beta[0, 2] and beta[0, 3] == 0


def test_pcb_drop_keeps_the_top_ratio_and_rescales_between_the_highest_dropped_and_the_top():
    _, _, beta = hand_scores()
    s = drop_and_rescale(beta, 0.5)  # keep ⌈0.5 · 4⌉ = 2 per model
    # model 1: β ≈ [.2355, −.0045, .0031, 0]: keep entries 0 and 2; the highest dropped is entry 3 (0)
    b1 = beta[0]
    assert_close(s[0], torch.stack([torch.tensor(1.0), torch.tensor(0.0), b1[2] / b1[0], torch.tensor(0.0)]))
    # model 2: β ≈ [.0267, .0300, .0027, .0014]: keep entries 1 and 0; the highest dropped is entry 2
    b2 = beta[1]
    assert_close(s[1], torch.stack([(b2[0] - b2[2]) / (b2[1] - b2[2]), torch.tensor(1.0), torch.tensor(0.0),
                                    torch.tensor(0.0)]))
    assert ((s > 0).sum(dim=1) == 2).all()


def test_pcb_merge_on_the_worked_example():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    _, _, beta = hand_scores()
    s = drop_and_rescale(beta, 0.5)
    out = run("pcb", group(base, [TAU1, TAU2]), pcb_ratio=0.5, **{"lambda": 1.0})
    # entry 0: both kept, weighted average; entry 1: τ1 (conflicting sign) dropped, τ2 alone;
    # entry 2: only τ1 kept; entry 3: dropped by both, stays at the base
    expected = torch.stack([(s[0, 0] * 0.4 + s[1, 0] * 0.2) / (s[0, 0] + s[1, 0]), torch.tensor(0.3),
                            torch.tensor(0.1), torch.tensor(0.0)])
    assert_close(out, base + expected)
    # λ scales the merged task vector (the paper's θ_0 + λ τ_m)
    out2 = run("pcb", group(base, [TAU1, TAU2]), pcb_ratio=0.5, **{"lambda": 2.5})
    assert_close(out2 - base, 2.5 * expected)


def test_pcb_weights_scale_a_model_inside_the_average_but_not_its_scores():
    base = torch.zeros(4)
    _, _, beta = hand_scores()
    s = drop_and_rescale(beta, 0.5)
    out = run("pcb", group(base, [TAU1, TAU2], weights=[2.0, 1.0]), pcb_ratio=0.5)
    entry0 = (s[0, 0] * 2 * 0.4 + s[1, 0] * 0.2) / (s[0, 0] + s[1, 0])
    assert_close(out, torch.stack([entry0, torch.tensor(0.3), torch.tensor(0.2), torch.tensor(0.0)]))


def test_pcb_a_model_that_left_the_tensor_unchanged_does_not_dilute_the_others():
    g = torch.Generator().manual_seed(3)
    base, tau = torch.randn(5, 6, generator=g), 0.1 * torch.randn(5, 6, generator=g)
    alone = run("pcb", group(base, [tau]), pcb_ratio=0.3)
    with_idle = run("pcb", group(base, [tau, torch.zeros(5, 6)]), pcb_ratio=0.3)
    assert_close(with_idle, alone)
    kept = (alone != base)
    assert kept.sum() <= math.ceil(0.3 * 30) and kept.any()
    assert_close(alone[kept], (base + tau)[kept])  # one model: its kept entries are its own


def test_pcb_keeps_the_shape_and_validates_the_ratio():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 4, generator=g)
    taus = [0.05 * torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    out = run("pcb", group(base, taus))
    assert out.shape == base.shape and torch.isfinite(out).all()
    for bad in (0.0, 1.5):
        with pytest.raises(GraftingError, match="pcb_ratio"):
            run("pcb", group(base, taus), pcb_ratio=bad)
    m = get_merge_method("pcb")
    assert m.needs_base and m.param("pcb_ratio").default == 0.1 and m.param("lambda").default == 1.0
