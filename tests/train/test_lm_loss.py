"""The causal-LM loss that never materialises the logits, against F.cross_entropy(F.linear(...))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutput

import grafting as gf
from grafting.train import lm_loss
from grafting.train.trainer import batch_loss


def reference(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("with_bias", [False, True])
def test_value_and_gradients_match_cross_entropy(monkeypatch, with_bias):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 3 * 50)  # 3 tokens per chunk: 11 tokens span 4 chunks
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (11,), generator=g)
    targets[[2, 7]] = -100  # prompt tokens: no loss, no gradient
    leaves = [t for t in (hidden, weight, bias) if t is not None]

    ours = lm_loss.linear_cross_entropy(hidden, weight, bias, targets)
    (ours * 0.37).backward()  # a scaled loss, as the trainer's normalisation does
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = reference(hidden, weight, bias, targets)
    (ref * 0.37).backward()

    torch.testing.assert_close(ours, ref)
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, t.grad)
    assert torch.count_nonzero(got[0][[2, 7]]) == 0
    with torch.no_grad():  # the evaluation path computes no gradients and gives the same value
        torch.testing.assert_close(lm_loss.linear_cross_entropy(hidden, weight, bias, targets), ref.detach())


def test_frozen_head_gets_no_gradient():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    loss = lm_loss.linear_cross_entropy(hidden, weight, None, torch.randint(0, 9, (5,)))
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=32))


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=101))


class SoftCapped(nn.Module):
    """A causal LM that transforms its logits after the output layer (as Gemma 2's soft-capping does)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(101, 16)
        self.lm_head = nn.Linear(16, 101, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        return CausalLMOutput(logits=30 * torch.tanh(self.lm_head(self.embed(input_ids)) / 30))


def test_plain_head_detected_and_restored():
    for make, plain in ((tiny_gpt2, True), (tiny_llama, True), (SoftCapped, False)):
        base = make().train()
        model = gf.adapt(base, gf.LoraConfig(r=2, target_modules=["embed"] if make is SoftCapped else "all-linear"))
        model.train()
        ids = torch.randint(0, 101, (2, 6))
        assert lm_loss.head_is_plain(model, base, input_ids=ids) is plain
        assert model.training and base.training  # the check's eval mode is undone
        assert model(input_ids=ids).logits.shape == (2, 6, 101)  # the output layer runs normally afterwards


class NoHeadCall(SoftCapped):
    """Computes its logits from the output layer's weight without calling the layer."""

    def forward(self, input_ids, attention_mask=None):
        return CausalLMOutput(logits=self.embed(input_ids) @ self.lm_head.weight.t())


def test_head_restored_after_errors_and_models_that_skip_it():
    model = NoHeadCall()
    assert lm_loss.head_is_plain(model, model, input_ids=torch.randint(0, 101, (1, 4))) is False
    assert "forward" not in model.lm_head.__dict__

    base = tiny_gpt2()
    hooked = base.lm_head.forward  # an instance-level forward already in place (as accelerate installs)
    base.lm_head.forward = hooked
    with pytest.raises(IndexError):
        lm_loss.hidden_and_head(base, base, input_ids=torch.tensor([[500]]))  # token id beyond the vocabulary
    assert base.lm_head.forward is hooked
    lm_loss.hidden_and_head(base, base, input_ids=torch.tensor([[5]]))
    assert base.lm_head.forward is hooked


def test_bf16_autocast_loss_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g) * 0.3
    targets = torch.randint(0, 40, (9,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_loss.linear_cross_entropy(hidden, weight, None, targets)
    ours.backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = reference(ref_hidden, weight, None, targets)
    ref.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=0.05 * 9, rtol=0.02)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_trainer_loss_equals_logits_loss(make):
    base = make()
    model = gf.adapt(base, gf.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = torch.randint(0, 101, (3, 7))
    labels = ids.clone()
    labels[:, :3] = -100  # prompt masking
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    grads = []
    for lm in (None, base):
        loss, count = batch_loss(model, batch, "causal_lm", lm)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
        if lm is None:
            plain_loss, plain_count = loss.detach(), count
    torch.testing.assert_close(loss.detach(), plain_loss)
    assert count == plain_count == 3 * 4  # targets are positions 1..6, of which 1 and 2 are prompt
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
