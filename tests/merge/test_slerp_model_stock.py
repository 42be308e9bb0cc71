"""slerp and model_stock: each against its formula on hand-built tensors, then against mergekit's own code.

slerp (Shoemake 1985): two orthogonal unit vectors at t sweep the quarter circle, so the result is
(cos(tπ/2), sin(tπ/2)); nearly colinear pairs fall back to lerp. model_stock (Jang et al., arXiv
2403.19522): t = k cosθ / (1 + (k−1) cosθ), merged = t·mean(θ_i) + (1−t)·θ_0.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from grafting.merge import ModelTensor, TensorGroup, get_merge_method


def group(base, *others, layer=None, num_layers=None):
    return TensorGroup("w", [ModelTensor(f"m{i}", t.float()) for i, t in enumerate(others)], base=base.float(),
                       layer=layer, num_layers=num_layers)


def run(method, grp, **params):
    return get_merge_method(method)(grp, params)


# --------------------------------------------------------------------------------------------- slerp

def test_slerp_of_orthogonal_unit_vectors_follows_the_quarter_circle():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = math.sqrt(0.5)
    assert_close(run("slerp", group(e0, e1), t=0.5), torch.tensor([half, half]))
    # Ω = π/2, so sin((1−t)Ω)/sinΩ = cos(tπ/2) and sin(tΩ)/sinΩ = sin(tπ/2)
    for t in (0.0, 0.2, 1 / 3, 0.9, 1.0):
        assert_close(run("slerp", group(e0, e1), t=t), torch.tensor([math.cos(t * math.pi / 2),
                                                                     math.sin(t * math.pi / 2)]))


def test_slerp_keeps_the_norm_on_the_great_circle_where_lerp_shrinks_it():
    a, b = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # orthogonal, norm 2
    out = run("slerp", group(a, b), t=0.5)
    assert out.shape == a.shape
    assert_close(torch.linalg.vector_norm(out), torch.tensor(2.0))
    assert torch.linalg.vector_norm(0.5 * a + 0.5 * b) < 1.5  # lerp: √2


def test_slerp_endpoints_are_the_inputs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    assert_close(run("slerp", group(a, b), t=0.0), a)
    assert_close(run("slerp", group(a, b), t=1.0), b)


@pytest.mark.parametrize("other", ["scaled", "antipodal", "nearly"])
def test_slerp_falls_back_to_lerp_for_nearly_colinear_vectors(other):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, generator=g)
    b = {"scaled": 3 * a, "antipodal": -2 * a, "nearly": a + 0.001 * torch.randn(50, generator=g)}[other]
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    assert cos.abs() > 0.9995
    t = 0.3
    assert_close(run("slerp", group(a, b), t=t), (1 - t) * a + t * b)


def test_slerp_just_below_the_threshold_is_not_lerp():
    a = torch.tensor([1.0, 0.0])
    angle = math.acos(0.999)  # |cos| under 0.9995: still spherical
    b = torch.tensor([math.cos(angle), math.sin(angle)])
    out = run("slerp", group(a, b), t=0.5)
    assert_close(out, torch.tensor([math.cos(angle / 2), math.sin(angle / 2)]))
    assert not torch.allclose(out, 0.5 * a + 0.5 * b, atol=1e-6, rtol=0)


def test_slerp_declares_mergekits_contract():
    m = get_merge_method("slerp")
    assert m.needs_base and (m.min_models, m.max_models) == (1, 1)
    assert m.param("t").required and m.param("t").scope == "global"


# ---------------------------------------------------------------------------------------- model_stock

def test_model_stock_two_models_at_sixty_degrees():
    base = torch.tensor([1.0, -1.0])
    tau1 = torch.tensor([1.0, 0.0])
    tau2 = torch.tensor([0.5, math.sqrt(3) / 2])  # cos θ = 1/2
    t = 2 * 0.5 / (1 + 0.5)  # = 2/3
    expected = base + t * (tau1 + tau2) / 2
    assert_close(run("model_stock", group(base, base + tau1, base + tau2)), expected)


def test_model_stock_three_models_with_equal_pairwise_angles():
    # three unit offsets with every pairwise cosine 1/2
    taus = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0]),
            torch.tensor([0.5, math.sqrt(3) / 6, math.sqrt(2 / 3)])]
    for i in range(3):
        for j in range(i + 1, 3):
            assert_close(torch.dot(taus[i], taus[j]), torch.tensor(0.5))
    base = torch.tensor([0.2, 0.3, -0.4])
    t = 3 * 0.5 / (1 + 2 * 0.5)  # = 3/4
    out = run("model_stock", group(base, *[base + tau for tau in taus]))
    assert_close(out, base + t * sum(taus) / 3)


def test_model_stock_limits_orthogonal_keeps_base_identical_keeps_model_opposite_keeps_base():
    base = torch.tensor([1.0, 2.0, 3.0])
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert_close(run("model_stock", group(base, base + e0, base + e1)), base)  # cos 0 → t 0
    assert_close(run("model_stock", group(base, base + e0, base + e0)), base + e0)  # cos 1 → t 1
    # cos −1 with k = 2: 1 + cos θ = 0, no finite ratio; the base is kept
    assert_close(run("model_stock", group(base, base + e0, base - e0)), base)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio():
    base = torch.zeros(2, 2)
    m1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    m2 = torch.tensor([[0.5, math.sqrt(3) / 2], [2.0, 2.0]])  # row 0: 60°, row 1: same direction
    out = run("model_stock", group(base, m1, m2), filter_wise=True)
    assert_close(out[0], (2 / 3) * (m1[0] + m2[0]) / 2)
    assert_close(out[1], (m1[1] + m2[1]) / 2)  # t = 1
    # one ratio for the whole tensor instead: cos of the flattened offsets
    flat = torch.dot(m1.flatten(), m2.flatten()) / (m1.norm() * m2.norm())
    t = 2 * flat / (1 + flat)
    assert_close(run("model_stock", group(base, m1, m2)), t * (m1 + m2) / 2)
    # a 1-D tensor is one filter either way
    v = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 1.0])]
    assert_close(run("model_stock", group(torch.zeros(3), *v), filter_wise=True),
                 run("model_stock", group(torch.zeros(3), *v), filter_wise=False))


def test_model_stock_declares_mergekits_contract():
    m = get_merge_method("model_stock")
    assert m.needs_base and m.min_models == 2
    assert m.param("filter_wise").default is False


# ------------------------------------------------------------------------------------- against mergekit

def mergekit():
    return pytest.importorskip("mergekit.merge_methods")


def _pair(shape, seed, colinear=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g)
    b = a * 1.7 + 1e-4 * torch.randn(*shape, generator=g) if colinear else torch.randn(*shape, generator=g)
    return a, b


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 5)])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.77, 1.0])
def test_slerp_matches_mergekit(shape, t):
    mk = mergekit()
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    for colinear in (False, True):
        a, b = _pair(shape, seed=len(shape), colinear=colinear)
        ours = run("slerp", group(a, b), t=t)
        assert_close(ours, mk.merge_tensors([a, b], "slerp", base_index=0, parameters={"t": t}))
        # and mergekit's kernel directly: one leading "output" axis, here a batch of one tensor
        direct = mk_slerp(torch.tensor([t]), a.reshape(1, -1), b.reshape(1, -1)).reshape(shape)
        assert_close(ours, direct)


@pytest.mark.parametrize("shape", [(6,), (5, 4), (2, 3, 4)])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(shape, k, filter_wise):
    mk = mergekit()
    g = torch.Generator().manual_seed(10 * k + len(shape))
    base = torch.randn(*shape, generator=g)
    shared = torch.randn(*shape, generator=g)  # a common direction, so the angles are well inside (0, 90°)
    models = [base + shared + 0.8 * torch.randn(*shape, generator=g) for _ in range(k)]
    ours = run("model_stock", group(base, *models), filter_wise=filter_wise)
    theirs = mk.merge_tensors([base, *models], "model_stock", base_index=0,
                              parameters={"filter_wise": filter_wise})
    assert_close(ours, theirs)
