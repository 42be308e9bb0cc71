"""grafting.merge.sparsify: each trim against its paper's rule on hand-built tensors, and against mergekit's own
``mergekit.sparsify`` / ``get_mask`` on the same tensors.

The random trims (DARE, MAGPRUNE) are compared with mergekit exactly: mergekit draws its masks with
``torch.bernoulli`` from torch's global generator, so seeding the global generator and ours with the same seed and
drawing in the same order gives the same masks. Their paper rules (keep probability, unbiased rescale) are
checked in distribution, over many draws.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

from grafting.errors import GraftingError
from grafting.merge.sparsify import (drop_magprune, drop_random, elect_sign, l1_rescaled,
                                     magprune_keep_probabilities, trim_magnitude, trim_outliers)

TAU = torch.tensor([[0.5, -2.0, 0.1], [3.0, -0.2, 1.0]])


def distinct(*shape, seed=0):
    """Random values with distinct magnitudes, so every magnitude ranking is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    mags = (torch.randperm(n, generator=g).float() + 1) / n
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (mags * signs).reshape(shape)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- TIES trim (top-k by magnitude) -------------------------------------------------------------------------

def test_magnitude_keeps_the_top_k_by_absolute_value():
    # 6 entries, density 0.5: k = 3, the largest |.| are -2, 3, 1
    torch.testing.assert_close(trim_magnitude(TAU, 0.5), torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, 1.0]]))


def test_magnitude_rescale_preserves_the_l1_norm():
    out = trim_magnitude(TAU, 0.5, rescale=True)
    scale = TAU.abs().sum() / 6.0  # |−2| + |3| + |1| = 6
    torch.testing.assert_close(out, torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, 1.0]]) * scale)
    torch.testing.assert_close(out.abs().sum(), TAU.abs().sum())


def test_magnitude_density_edges():
    assert trim_magnitude(TAU, 1.0) is TAU  # nothing to trim
    assert torch.equal(trim_magnitude(TAU, 0.0), torch.zeros_like(TAU))
    # a positive density keeps at least one entry, however small
    torch.testing.assert_close(trim_magnitude(TAU, 0.01), torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]))


# --- Breadcrumbs (drop both tails) ----------------------------------------------------------------------------

def test_outliers_drop_the_largest_gamma_and_the_smallest():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # gamma 0.2 drops |10|, |9|; density 0.5 keeps 5; the 3 smallest go
    out = trim_outliers(tau, 0.5, 0.2)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0]))


def test_outliers_density_wins_over_gamma():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # density 0.9 + gamma 0.2 > 1: keep 9, so only the single largest is dropped
    out = trim_outliers(tau, 0.9, 0.2)
    torch.testing.assert_close(out, torch.cat([tau[:9], torch.zeros(1)]))
    # gamma 0 is plain magnitude trimming
    torch.testing.assert_close(trim_outliers(tau, 0.3, 0.0), trim_magnitude(tau, 0.3))
    # unlike trim_magnitude, a density below 1/n keeps nothing
    assert torch.equal(trim_outliers(tau, 0.05, 0.01), torch.zeros_like(tau))
    assert trim_outliers(tau, 1.0, 0.2) is tau


# --- DARE (Bernoulli drop) ------------------------------------------------------------------------------------

def test_random_drop_keeps_entries_unchanged_without_rescale():
    tau = distinct(50, 40)
    out = drop_random(tau, 0.3, generator=gen(1))
    kept = out != 0
    torch.testing.assert_close(out[kept], tau[kept])
    assert abs(kept.float().mean().item() - 0.3) < 0.03  # 2000 Bernoulli(0.3) draws: std 0.01


def test_random_drop_rescale_is_one_common_factor_that_preserves_l1():
    tau = distinct(20, 10)
    out = drop_random(tau, 0.4, generator=gen(2), rescale=True)
    kept = out != 0
    ratios = out[kept] / tau[kept]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())


def test_random_drop_rescaled_is_unbiased_over_many_draws():
    # DARE's point (Yu et al., 2311.03099): E[rescaled drop] = τ. mergekit's L1 rescale gives this up to the
    # fluctuation of the kept fraction, which is small for 400 entries.
    tau = distinct(400)
    g = gen(3)
    draws = 1500
    mean = sum(drop_random(tau, 0.5, generator=g, rescale=True) for _ in range(draws)) / draws
    # per entry: std of the mean = |τ_i| sqrt((1 − d) / (d · draws)) ≈ 0.026 |τ_i|
    assert ((mean - tau).abs() / tau.abs()).max() < 0.15
    assert abs((mean / tau).mean().item() - 1.0) < 0.01


def test_random_drop_reproducible_for_a_seed():
    tau = distinct(8, 8)
    assert torch.equal(drop_random(tau, 0.5, generator=gen(7)), drop_random(tau, 0.5, generator=gen(7)))
    assert not torch.equal(drop_random(tau, 0.5, generator=gen(7)), drop_random(tau, 0.5, generator=gen(8)))
    assert drop_random(tau, 1.0, generator=gen(7)) is tau
    assert torch.equal(drop_random(tau, 0.0, generator=gen(7)), torch.zeros_like(tau))


# --- DELLA MAGPRUNE -------------------------------------------------------------------------------------------

def test_magprune_probabilities_are_linear_in_the_rank_per_row():
    tau = torch.tensor([[0.1, -0.4, 0.2, 0.3], [-5.0, 1.0, 3.0, -2.0]])
    # row 0 ranks (smallest first): 0.1, 0.2, 0.3, 0.4 -> 0, 2, 3, 1 of 3; row 1: 1, 2, 3, 5 -> 3, 0, 2, 1
    rank_norm = torch.tensor([[0.0, 3.0, 1.0, 2.0], [3.0, 0.0, 2.0, 1.0]]) / 3
    expected = (0.5 - 0.1) + rank_norm * 0.2
    torch.testing.assert_close(magprune_keep_probabilities(tau, 0.5, 0.1), expected)
    # a vector is one row
    torch.testing.assert_close(magprune_keep_probabilities(tau[0], 0.5, 0.1), expected[0])
    # a row of one entry has no rank spread: it gets the mean probability
    torch.testing.assert_close(magprune_keep_probabilities(torch.ones(3, 1), 0.5, 0.1), torch.full((3, 1), 0.5))


def test_magprune_keep_frequencies_follow_the_probabilities():
    row = torch.tensor([0.1, -0.4, 0.2, 0.3, -0.05])
    tau = row.repeat(4000, 1)  # every row is ranked alike: 4000 independent draws per column
    out = drop_magprune(tau, 0.5, 0.2, generator=gen(4))
    freq = (out != 0).float().mean(dim=0)
    expected = magprune_keep_probabilities(row, 0.5, 0.2)
    assert (freq - expected).abs().max() < 0.04  # std per column ≈ 0.008
    assert freq[1] > freq[3] > freq[2] > freq[0] > freq[4]  # larger magnitude, kept more often


def test_magprune_epsilon_zero_is_dare_and_bad_epsilon_is_refused():
    tau = distinct(6, 7)
    torch.testing.assert_close(drop_magprune(tau, 0.4, 0.0, generator=gen(5)),
                               drop_random(tau, 0.4, generator=gen(5)))
    with pytest.raises(GraftingError, match="epsilon"):
        drop_magprune(tau, 0.1, 0.15)
    with pytest.raises(GraftingError, match="epsilon"):
        drop_magprune(tau, 0.9, 0.1)
    assert drop_magprune(tau, 1.0, 0.15) is tau
    assert torch.equal(drop_magprune(tau, 0.0, 0.15), torch.zeros_like(tau))


# --- sign election --------------------------------------------------------------------------------------------

def test_elect_sign_by_mass_and_by_count():
    deltas = torch.tensor([[1.0, -2.0, 0.5, 0.0],
                           [-3.0, 1.0, 0.5, 0.0],
                           [1.0, 1.0, -2.0, 0.0]])
    # sums: -1, 0, -1, 0 -> elected -, + (tie), -, +; zeros never agree
    assert torch.equal(elect_sign(deltas, "sum"), torch.tensor([[False, False, False, False],
                                                               [True, True, False, False],
                                                               [False, True, True, False]]))
    # sign counts: +1, +1, +1, 0 -> all +
    assert torch.equal(elect_sign(deltas, "count"), torch.tensor([[True, False, True, False],
                                                                 [False, True, True, False],
                                                                 [True, True, False, False]]))
    with pytest.raises(GraftingError):
        elect_sign(deltas, "median")


def test_l1_rescale_leaves_vanishing_norms_alone():
    tau = torch.zeros(4)
    assert torch.equal(l1_rescaled(tau, torch.ones(4)), tau)
    assert torch.equal(l1_rescaled(torch.ones(4), torch.zeros(4)), torch.zeros(4))


def test_inputs_are_not_modified():
    tau = distinct(5, 6)
    copy = tau.clone()
    for out in (trim_magnitude(tau, 0.3, rescale=True), trim_outliers(tau, 0.5, 0.1, rescale=True),
                drop_random(tau, 0.3, generator=gen(0), rescale=True),
                drop_magprune(tau, 0.5, 0.1, generator=gen(0), rescale=True)):
        assert out.dtype == torch.float32 and out.shape == tau.shape
    elect_sign(torch.stack([tau, -tau * 0.5]))
    assert torch.equal(tau, copy)


# --- against mergekit -----------------------------------------------------------------------------------------

SHAPES = [(7, 9), (30,), (3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
def test_deterministic_trims_match_mergekit(shape, density, rescale):
    tau = distinct(*shape, seed=len(shape))
    norm = RescaleNorm.l1 if rescale else None
    torch.testing.assert_close(trim_magnitude(tau, density, rescale=rescale),
                               sparsify(tau, density, SparsificationMethod.magnitude, rescale_norm=norm))
    for gamma in (0.0, 0.01, 0.1, 0.4):
        torch.testing.assert_close(
            trim_outliers(tau, density, gamma, rescale=rescale),
            sparsify(tau, density, SparsificationMethod.magnitude_outliers, gamma=gamma, rescale_norm=norm))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [False, True])
def test_random_trims_match_mergekit_for_the_same_seed(shape, density, rescale):
    tau = distinct(*shape, seed=10 + len(shape))
    norm = RescaleNorm.l1 if rescale else None
    torch.manual_seed(123)
    ref = sparsify(tau, density, SparsificationMethod.random, rescale_norm=norm)
    torch.testing.assert_close(drop_random(tau, density, generator=gen(123), rescale=rescale), ref)

    epsilon = min(density, 1 - density) / 2
    torch.manual_seed(321)
    ref = sparsify(tau, density, SparsificationMethod.della_magprune, epsilon=epsilon, rescale_norm=norm)
    torch.testing.assert_close(drop_magprune(tau, density, epsilon, generator=gen(321), rescale=rescale), ref)


@pytest.mark.parametrize("method", ["sum", "count"])
def test_sign_election_matches_mergekit(method):
    deltas = torch.randn(4, 6, 5, generator=gen(9))
    deltas[deltas.abs() < 0.3] = 0  # trimmed entries
    deltas[:, 0, 0] = torch.tensor([1.0, -1.0, 0.5, -0.5])  # an exact tie
    assert torch.equal(elect_sign(deltas, method), get_mask(deltas, method=method))


# --- the memory-light top-k -----------------------------------------------------------------------------------

def _stable_top_k(x, k):
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.argsort(x.abs().reshape(-1), descending=True, stable=True)[:k]] = True
    return x * keep.reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_top_k_is_the_stable_sorts_set_even_with_many_ties(dtype, monkeypatch):
    import grafting.merge.sparsify as sp

    g = torch.Generator().manual_seed(0)
    # magnitudes from a handful of values, both signs, zeros: the cut falls inside a run of equal magnitudes
    x = (torch.randint(-4, 5, (37, 11), generator=g) * 0.25).to(dtype)
    for slice_len in (1 << 20, 16, 5):  # one slice, and the cut's ties spread over many slices
        monkeypatch.setattr(sp, "SLICE", slice_len)
        for k in (1, 2, 50, 200, 406, 407):
            density = k / x.numel()
            got = trim_magnitude(x, density)
            assert torch.equal(got, _stable_top_k(x, max(1, int(density * x.numel())))), (slice_len, k)
            y = x.clone()
            assert trim_magnitude(y, density, inplace=True) is y and torch.equal(y, got)


def test_top_k_threshold_on_wide_ranges_of_magnitude():
    from grafting.merge.sparsify import top_k_threshold

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g) * torch.logspace(-30, 30, 5000)
    for k in (1, 17, 2500, 4999, 5000):
        bits, greater = top_k_threshold(x, k)
        value = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
        assert value == torch.sort(x.abs(), descending=True).values[k - 1]
        assert greater == int((x.abs() > value).sum())
