"""linear and the task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*): each against its
paper's rule on hand-computed tensors, and against mergekit's registered merge methods on the same tensors.

The random methods (DARE, DELLA) are compared with mergekit exactly: mergekit draws each model's mask with
``torch.bernoulli`` from torch's global generator, in config order, and grafting draws the same way from
``group.generator``, so seeding both with the same seed gives identical masks.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import get as mergekit_method
from mergekit.merge_methods.api import merge_tensors

from grafting.errors import GraftingError
from grafting.merge import ModelTensor, TensorGroup, get_merge_method

FAMILY = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear"]
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


def group(base, tensors, model_params, seed=None, name="layers.0.mlp.weight"):
    models = [ModelTensor(f"m{i}", t, dict(p)) for i, (t, p) in enumerate(zip(tensors, model_params))]
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return TensorGroup(name, models, base=base, generator=g)


def run(method, base, tensors, model_params, seed=None, **global_params):
    """Our method with its declared defaults filled in, as the config layer would."""
    m = get_merge_method(method)
    filled = [{p.name: p.default for p in m.model_params() if not p.required} | dict(mp) for mp in model_params]
    params = {p.name: p.default for p in m.global_params()} | global_params
    return m(group(base, tensors, filled, seed), params)


def mergekit_run(method, base, tensors, model_params, seed=None, **global_params):
    per_model = {k: [mp[k] for mp in model_params] for k in model_params[0]}
    inputs = list(tensors) if base is None else [base, *tensors]
    if seed is not None:
        torch.manual_seed(seed)
    return merge_tensors(inputs, method, parameters={**per_model, **global_params},
                         base_index=None if base is None else 0)


# --- hand-computed, against the papers ------------------------------------------------------------------------

# The 2x3 TIES example (Yadav et al., Algorithm 1), worked out by hand:
BASE = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
TAU1 = torch.tensor([[0.5, -2.0, 0.1], [3.0, -0.2, 1.0]])
TAU2 = torch.tensor([[-1.5, 1.0, 0.3], [2.0, 0.4, -2.5]])
# Trim, density 0.5 (k = 3 of 6): τ̂1 = [[0, -2, 0], [3, 0, 1]], τ̂2 = [[-1.5, 0, 0], [2, 0, -2.5]].
# Elect with w = (1, 1): column sums [[-1.5, -2, 0], [5, 0, -1.5]] -> signs [[-, -, +], [+, +, -]].
# Disjoint mean: (0,0) τ̂2 alone; (0,1) τ̂1 alone; (1,0) both, (3 + 2) / 2; (1,2) τ̂2 alone; (0,2), (1,1) nobody.
TIES_UNIT = torch.tensor([[-1.5, -2.0, 0.0], [2.5, 0.0, -2.5]])
# With w = (3, 1) the weighted mass elects + at (1,2) (3·1 − 2.5 > 0), so τ̂1 wins there; (1,0) is (9 + 2) / 4.
TIES_WEIGHTED = torch.tensor([[-1.5, -2.0, 0.0], [11 / 4, 0.0, 1.0]])
TIES_WEIGHTED_SUM = torch.tensor([[-1.5, -6.0, 0.0], [11.0, 0.0, 3.0]])  # normalize off: Σ of agreeing w_i τ̂_i


def test_ties_worked_example():
    models = [BASE + TAU1, BASE + TAU2]
    out = run("ties", BASE, models, [{"weight": 1.0, "density": 0.5}] * 2)
    torch.testing.assert_close(out, BASE + TIES_UNIT)
    weighted = [{"weight": 3.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    torch.testing.assert_close(run("ties", BASE, models, weighted, **{"lambda": 0.5}), BASE + 0.5 * TIES_WEIGHTED)
    torch.testing.assert_close(run("ties", BASE, models, weighted, normalize=False), BASE + TIES_WEIGHTED_SUM)


def test_ties_divisor_of_zero_falls_back_to_one():
    # w = (1, −1) on τ = (+1, −1): both weighted vectors are +1 and agree, but their weights sum to 0, so the
    # disjoint mean's divisor is 0 and (as in mergekit) the agreeing mass is kept undivided
    base = torch.zeros(3)
    out = run("ties", base, [base + 1, base - 1], [{"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(out, torch.full((3,), 2.0))
    torch.testing.assert_close(out, mergekit_run("ties", base, [base + 1, base - 1], [{"weight": 1.0},
                                                                                       {"weight": -1.0}]))


def test_task_arithmetic_is_base_plus_lambda_weighted_sum():
    models = [BASE + TAU1, BASE + TAU2]
    mp = [{"weight": 0.5}, {"weight": 2.0}]
    torch.testing.assert_close(run("task_arithmetic", BASE, models, mp, **{"lambda": 0.8}),
                               BASE + 0.8 * (0.5 * TAU1 + 2.0 * TAU2))
    torch.testing.assert_close(run("task_arithmetic", BASE, models, mp, normalize=True),
                               BASE + (0.5 * TAU1 + 2.0 * TAU2) / 2.5)
    # weights summing to zero are not divided by: the divisor falls back to 1
    cancel = [{"weight": 1.0}, {"weight": -1.0}]
    torch.testing.assert_close(run("task_arithmetic", BASE, models, cancel, normalize=True), BASE + TAU1 - TAU2)
    # density is accepted (as mergekit) and trims nothing
    trimmed = [{"weight": 0.5, "density": 0.1}, {"weight": 2.0, "density": 0.1}]
    torch.testing.assert_close(run("task_arithmetic", BASE, models, trimmed), run("task_arithmetic", BASE, models, mp))


def test_linear_is_the_weighted_average():
    a, b, c = TAU1, TAU2, BASE
    mp = [{"weight": 1.0}, {"weight": 3.0}, {"weight": 0.5}]
    torch.testing.assert_close(run("linear", None, [a, b, c], mp), (a + 3 * b + 0.5 * c) / 4.5)
    torch.testing.assert_close(run("linear", None, [a, b, c], mp, normalize=False), a + 3 * b + 0.5 * c)
    with pytest.raises(GraftingError, match="sum to 0"):
        run("linear", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}])


def test_breadcrumbs_drops_both_tails():
    base = torch.linspace(-1, 1, 10)
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    middle = torch.tensor([0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0])  # gamma 0.2, density 0.5
    mp = [{"weight": 0.5, "density": 0.5, "gamma": 0.2}]
    torch.testing.assert_close(run("breadcrumbs", base, [base + tau], mp), base + 0.5 * middle)
    # breadcrumbs_ties: a second model that disagrees in sign everywhere, with less mass, is elected out
    mp2 = mp + [{"weight": 0.5, "density": 0.5, "gamma": 0.2}]
    out = run("breadcrumbs_ties", base, [base + tau, base - 0.5 * tau], mp2)
    torch.testing.assert_close(out, base + 0.5 * middle)


def test_dare_keeps_density_and_is_unbiased():
    # DARE (Yu et al.): E[dropped and rescaled τ] = τ; over many seeds the merged model averages to base + τ
    base = torch.zeros(300)
    tau = torch.linspace(0.5, 2.0, 300)
    mp = [{"weight": 1.0, "density": 0.3}]
    outs = torch.stack([run("dare_linear", base, [base + tau], mp, seed=s) for s in range(600)])
    kept = (outs != 0).float().mean()
    assert abs(kept.item() - 0.3) < 0.01  # 180000 draws
    # per entry: std of the mean ≈ τ_i sqrt(0.7 / (0.3 · 600)) ≈ 0.062 τ_i
    assert ((outs.mean(0) - tau) / tau).abs().max() < 0.3
    assert abs((outs.mean(0) / tau).mean().item() - 1) < 0.02


def test_della_with_zero_epsilon_is_dare_ties():
    # MAGPRUNE with no rank spread keeps every entry with probability density: DARE, drawn the same way
    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    models = [base + torch.randn(5, 8, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    mp = [{"weight": 0.7, "density": 0.4}, {"weight": 1.2, "density": 0.6}]
    no_spread = [p | {"epsilon": 0.0} for p in mp]
    torch.testing.assert_close(run("della", base, models, no_spread, seed=11, normalize=False),
                               run("dare_ties", base, models, mp, seed=11))


def test_della_refuses_an_epsilon_outside_the_density():
    with pytest.raises(GraftingError, match="epsilon"):
        run("della", BASE, [BASE + TAU1], [{"weight": 1.0, "density": 0.1}], seed=0)  # default epsilon 0.15


# --- behaviour ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", FAMILY)
def test_density_one_trims_nothing(method):
    models = [BASE + TAU1, BASE + TAU2]
    mp = [{"weight": 1.0, "density": 1.0}, {"weight": 2.0, "density": 1.0}]
    elect = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    m = get_merge_method(method)
    normalize = m.param("normalize").default
    # untrimmed: the random methods draw nothing, so any seed gives the same model
    out = run(method, BASE, models, mp, seed=1)
    assert torch.equal(out, run(method, BASE, models, mp, seed=2))
    reference = "ties" if elect else "task_arithmetic"
    torch.testing.assert_close(out, run(reference, BASE, models, mp, normalize=normalize))


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_are_reproducible_for_a_seed(method):
    base = torch.zeros(6, 7)
    models = [base + torch.randn(6, 7, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    mp = [{"weight": 1.0, "density": 0.5}] * 2
    assert torch.equal(run(method, base, models, mp, seed=5), run(method, base, models, mp, seed=5))
    assert not torch.equal(run(method, base, models, mp, seed=5), run(method, base, models, mp, seed=6))


@pytest.mark.parametrize("method", FAMILY + ["linear"])
def test_inputs_untouched_and_result_float32(method):
    base = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    models = [base + torch.randn(4, 5, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    copies = [t.clone() for t in [base, *models]]
    mp = [{"weight": w, "density": 0.5} for w in (0.3, 0.5, 0.9)]
    if method == "linear":
        mp = [{"weight": p["weight"]} for p in mp]
    out = run(method, None if method == "linear" else base, models, mp, seed=0, normalize=True)
    assert out.dtype == torch.float32 and out.shape == base.shape
    for t, c in zip([base, *models], copies):
        assert torch.equal(t, c)


def test_declared_parameters_and_defaults_are_mergekits():
    for name in FAMILY + ["linear"]:
        theirs = {p.name: (None if p.required else p.default) for p in mergekit_method(name).spec.parameters}
        ours = {p.name: (None if p.required else p.default) for p in get_merge_method(name).params}
        assert ours == theirs, name
        assert get_merge_method(name).needs_base == (name != "linear")


# --- against mergekit -----------------------------------------------------------------------------------------

def inputs(shape, n_models, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + 0.1 * torch.randn(*shape, generator=g) for _ in range(n_models)]


def model_params(method, n):
    mp = [{"weight": w, "density": d} for w, d in zip((0.6, 1.4, -0.3, 1.0), (0.55, 0.3, 0.7, 0.45))][:n]
    for i, p in enumerate(mp):
        if method.startswith("breadcrumbs"):
            p["gamma"] = (0.05, 0.2, 0.0, 0.1)[i]
        if method.startswith("della"):
            p["epsilon"] = (0.1, 0.2, 0.15, 0.05)[i]
    return mp


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("shape", [(6, 9), (40,), (2, 3, 4)])
def test_family_matches_mergekit_with_defaults(method, shape):
    base, models = inputs(shape, 3, seed=len(shape))
    mp = model_params(method, 3)
    seed = 1234 if method in RANDOM else None
    torch.testing.assert_close(run(method, base, models, mp, seed=seed),
                               mergekit_run(method, base, models, mp, seed=seed))


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_family_matches_mergekit_across_options(method, normalize, rescale):
    base, models = inputs((5, 8), 4, seed=7)
    mp = model_params(method, 4)
    seed = 99 if method in RANDOM else None
    options = {"normalize": normalize, "rescale": rescale, "lambda": 0.7}
    torch.testing.assert_close(run(method, base, models, mp, seed=seed, **options),
                               mergekit_run(method, base, models, mp, seed=seed, **options))


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_matches_mergekit(normalize):
    _, models = inputs((5, 8), 3, seed=3)
    mp = [{"weight": 0.2}, {"weight": 1.5}, {"weight": -0.4}]
    torch.testing.assert_close(run("linear", None, models, mp, normalize=normalize),
                               mergekit_run("linear", None, models, mp, normalize=normalize))


def test_ties_worked_example_matches_mergekit():
    models = [BASE + TAU1, BASE + TAU2]
    for weights in ((1.0, 1.0), (3.0, 1.0)):
        mp = [{"weight": w, "density": 0.5} for w in weights]
        torch.testing.assert_close(run("ties", BASE, models, mp), mergekit_run("ties", BASE, models, mp))


# --- memory: the driver's owned groups ------------------------------------------------------------------------

@pytest.mark.parametrize("method", FAMILY)
def test_an_owned_group_gives_the_same_merge_in_place(method, monkeypatch):
    """The driver hands over tensors read for this call alone; the family then works in them (the result is the
    first model's buffer), slice by slice; slices of 7 entries make every tensor span several."""
    import grafting.merge.methods.task_arithmetic as ta
    import grafting.merge.sparsify as sp

    base, models = inputs((6, 9), 3, seed=11)
    mp = model_params(method, 3)
    m = get_merge_method(method)
    filled = [{p.name: p.default for p in m.model_params() if not p.required} | dict(x) for x in mp]
    params = {p.name: p.default for p in m.global_params()} | {"lambda": 0.8}
    seed = 3 if method in RANDOM else None
    expected = m(group(base, models, filled, seed), params)
    monkeypatch.setattr(ta, "SLICE", 7)
    monkeypatch.setattr(sp, "SLICE", 7)
    owned = group(base.clone(), [t.clone() for t in models], filled, seed)
    owned.owned = True
    first = owned.models[0].tensor
    out = m(owned, params)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if method not in RANDOM and not method.startswith("breadcrumbs"):  # those trims allocate their masks
        assert out.data_ptr() == first.data_ptr()
    with pytest.raises(GraftingError, match="already taken"):
        owned.take_task_vectors()
