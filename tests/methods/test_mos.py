"""MoS (arXiv 2410.00938): LoRA factors assembled from routed shards of pools shared by every layer, on small
tensors; the routing's structure (subset selection, pair dissociation, vector sharding, private shards) and its
reproducibility from the seed and module names; the parameter count (a rank-e LoRA's); the zero init; gradients
reaching each shared shard from every layer that reads it; adapter files read without the model; config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.methods.mos import MosConfig, routing


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(16, 8), nn.Linear(8, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


E, P, R, L = 3, 1, 4, 2  # equivalent rank, private rank, active rank, shards per vector


def cfg(**kw):
    return MosConfig(**{"r": R, "valid_param_lora_r": E, "valid_param_private_r": P, "num_chunk_per_vec": L,
                        "lora_alpha": 6, "target_modules": ["a", "b"], **kw})


def by_hand(pool_A, pool_B, route_A, route_B):
    """Vector j of A = shards route_A[j, 0], route_A[j, 1], ... end to end; B's vectors are its columns."""
    A = torch.stack([torch.cat([pool_A[i] for i in row]) for row in route_A.tolist()])
    B = torch.stack([torch.cat([pool_B[i] for i in row]) for row in route_B.tolist()], 1)
    return A, B


def test_forward_is_lora_with_factors_assembled_from_routed_shards():
    model = gf.adapt(Net(), cfg(init_weights=False))
    pools = model.shared_tensors["default"]
    assert pools.mos_A_pool.shape == (E * (16 + 8) // 2, 2)  # shard length gcd(16, 8, 8, 12) / l = 2
    assert pools.mos_B_pool.shape == (E * (8 + 12) // 2, 2)
    host = dict(model.hosts())["b"]
    ad = host.adapters["default"]
    assert ad.mos_route_A.shape == (R, 8 // 2) and ad.mos_route_B.shape == (R, 12 // 2)
    A, B = by_hand(pools.mos_A_pool, pools.mos_B_pool, ad.mos_route_A, ad.mos_route_B)
    x = torch.randn(5, 8)
    expect = x @ host.base_layer.weight.t() + host.base_layer.bias + (6 / R) * (x @ A.t()) @ B.t()
    torch.testing.assert_close(host(x), expect, atol=1e-6, rtol=1e-5)
    low_A, low_B, scale = host.methods["default"].low_rank(ad)
    assert torch.equal(low_A, A) and torch.equal(low_B, B) and scale == 6 / R


def test_routing_selects_dissociates_shards_and_privatises():
    model = gf.adapt(Net(), cfg())
    hosts = dict(model.hosts())
    for side, widths in (("A", {"a": 8, "b": 4}), ("B", {"a": 4, "b": 6})):
        shared = (E - P) * sum(widths.values())
        private = []
        for name, n in widths.items():
            route = getattr(hosts[name].adapters["default"], f"mos_route_{side}")
            picked, own = route[: R - P].flatten(), route[R - P:].flatten()
            assert len(set(picked.tolist())) == (R - P) * n and int(picked.max()) < shared  # distinct, shared part
            assert int(own.min()) >= shared and own.tolist() == list(range(int(own[0]), int(own[0]) + P * n))
            private += own.tolist()
        assert len(private) == len(set(private)) == P * sum(widths.values())  # no layer reads another's
    ad = hosts["a"].adapters["default"]
    assert not torch.equal(ad.mos_route_A[: R - P, :4], ad.mos_route_B[: R - P])  # A and B routed apart


def test_routing_is_reproducible_from_the_seed_and_module_names():
    targets = [("a", 16, 8), ("b", 8, 12)]
    model = gf.adapt(Net(), cfg(seed=5))
    again = routing(cfg(seed=5), targets, 2)
    other = routing(cfg(seed=6), targets, 2)
    for name, host in model.hosts():
        ad = host.adapters["default"]
        assert torch.equal(ad.mos_route_A, again[name][0]) and torch.equal(ad.mos_route_B, again[name][1])
        assert not torch.equal(ad.mos_route_A, other[name][0])
    assert torch.equal(gf.adapt(Net(), cfg(seed=5)).base_model.a.adapters["default"].mos_route_A,
                       model.base_model.a.adapters["default"].mos_route_A)


def test_init_starts_at_the_base_and_the_parameter_count_is_a_rank_e_loras():
    model = gf.adapt(Net(), cfg())
    pools = model.shared_tensors["default"]
    assert torch.all(pools.mos_B_pool == 0) and pools.mos_A_pool.abs().max() <= 1 / 16 ** 0.5
    x = torch.randn(3, 16)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base)
    assert model.trainable_summary()["trainable"] == E * ((16 + 8) + (8 + 12))  # whatever the active rank R
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["shared_tensors.default.mos_A_pool", "shared_tensors.default.mos_B_pool"]


def test_gradients_reach_every_shared_shard_from_every_layer_reading_it():
    model = gf.adapt(Net(), cfg(init_weights=False))
    pools = model.shared_tensors["default"]
    hosts = dict(model.hosts())
    x = torch.randn(4, 16)
    model(x).pow(2).sum().backward()

    # the same network written out by hand, factors assembled from the same pools
    net, s = Net(), 6 / R
    factors = {n: by_hand(pools.mos_A_pool, pools.mos_B_pool, hosts[n].adapters["default"].mos_route_A,
                          hosts[n].adapters["default"].mos_route_B) for n in ("a", "b")}
    h = x
    for n in ("a", "b"):
        layer, (A, B) = getattr(net, n), factors[n]
        h = torch.tanh(h @ layer.weight.t() + layer.bias + s * (h @ A.t()) @ B.t())
    loss = net.head(h).pow(2).sum()
    flat = [t for n in ("a", "b") for t in factors[n]]
    g_Aa, g_Ba, g_Ab, g_Bb, g_poolA = torch.autograd.grad(loss, flat + [pools.mos_A_pool])
    torch.testing.assert_close(pools.mos_A_pool.grad, g_poolA, atol=1e-6, rtol=1e-5)

    # each layer's gradient lands on the shards it read, and a shard read by both layers sums both
    per_layer = {}
    for n, gA in (("a", g_Aa), ("b", g_Ab)):
        route = hosts[n].adapters["default"].mos_route_A.flatten()
        per_layer[n] = torch.zeros_like(g_poolA).index_add_(0, route, gA.reshape(len(route), -1))
    torch.testing.assert_close(per_layer["a"] + per_layer["b"], pools.mos_A_pool.grad, atol=1e-6, rtol=1e-5)
    both = set(hosts["a"].adapters["default"].mos_route_A.flatten().tolist()) & \
        set(hosts["b"].adapters["default"].mos_route_A.flatten().tolist())
    assert both  # the shared part is shared: some shards feed both layers
    for i in both:
        assert per_layer["a"][i].abs().sum() > 0 and per_layer["b"][i].abs().sum() > 0
    assert pools.mos_B_pool.grad.abs().sum() > 0


@torch.no_grad()
def test_an_adapter_file_gives_the_factors_without_the_model(tmp_path):
    from grafting.io.peft_format import inspect_adapter
    from grafting.io.reader import AdapterReader
    mine = gf.adapt(Net(), cfg(init_weights=False))
    mine.save_adapter(tmp_path / "mos")
    reader = AdapterReader(tmp_path / "mos")
    assert set(reader.shared_tensors()) == {"mos_A_pool", "mos_B_pool"}  # the pools once, not per layer
    for name, host in mine.hosts():
        A, B, scale = reader.factors(name)
        want_A, want_B, want_scale = host.methods["default"].low_rank(host.adapters["default"])
        assert torch.equal(A, want_A) and torch.equal(B, want_B) and scale == want_scale
    info = inspect_adapter(tmp_path / "mos")
    routes = R * (16 // 2 + 8 // 2) + R * (8 // 2 + 12 // 2)  # the frozen shard indices, (r, width / 2) each
    assert info["ranks"] == [R] and info["parameters"] == E * 44 + routes
    back = gf.load(Net(), tmp_path / "mos")
    x = torch.randn(2, 16)
    torch.testing.assert_close(back(x), mine(x), atol=0, rtol=0)


def test_bad_configs_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'r' must be a positive integer"):
        MosConfig(r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'valid_param_private_r' must be an integer in"):
        MosConfig(valid_param_lora_r=2, valid_param_private_r=3, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'r' must be equal to valid_param_private_r"):
        MosConfig(r=4, valid_param_lora_r=2, valid_param_private_r=2, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'lora_dropout' must be a number in"):
        MosConfig(lora_dropout=-0.1, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'num_chunk_per_vec' must divide 4"):
        gf.adapt(Net(), cfg(num_chunk_per_vec=3))
    with pytest.raises(gf.GraftingError, match="'r' must be at most 4 for layer 'a'"):  # 1 + 24 shards // 8
        gf.adapt(Net(), cfg(r=5))


def test_routes_load_only_as_integers(tmp_path):
    from safetensors.torch import load_file, save_file
    gf.adapt(Net(), cfg()).save_adapter(tmp_path / "mos")
    f = tmp_path / "mos" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = "base_model.model.a.mos_route_A"
    assert tensors[key].dtype == torch.int64
    save_file({**tensors, key: tensors[key].float()}, f)
    with pytest.raises(gf.GraftingError, match="mos_route_A' has dtype torch.float32; expected torch.int64"):
        gf.load(Net(), tmp_path / "mos")
