"""NF4Linear: its own forward and backward, slice by slice, and every low-rank method trained, merged and served
on it."""

from __future__ import annotations

import math

import pytest
import torch

import bnb_reference  # noqa: F401  (bitsandbytes' reference kernels on every CPU: see the module)
import torch.nn.functional as F
from torch import nn

import grafting as gf
from toys import adapted_twins, assert_rows_match, randomize
from grafting.quant import NF4Linear, quantize_nf4
from grafting.quant.model import quantize, requantize_errors

# methods whose init rewrites the base (a residual, PiSSA-like) re-quantize it by design, so no dense twin can
# match them and the packed bytes change: they are left out here and tested on a packed base in their own files
LOW_RANK = [m for m in gf.method_names() if gf.get_method(m).low_rank_form
            and not gf.get_method(m).changes_base(gf.get_method(m).make_config())]


def layer(out=48, inn=80, chunk=None, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(inn, out, bias=bias)
    q = NF4Linear.from_linear(lin)
    if chunk is not None:
        q.chunk_elements = chunk
    return q


@pytest.mark.parametrize("chunk", [None, 64 * 5, 1])  # one slice; several; the smallest block-aligned unit
def test_forward_and_input_gradient_equal_the_dense_dequantized_layer(chunk):
    q = layer(chunk=chunk)
    if chunk is not None:
        assert len(q.row_slices()) > 1
        assert all((r1 - r0) * q.in_features <= max(chunk, math.lcm(80, 64)) for r0, r1 in q.row_slices())
    w = q.dequantize()
    x = torch.randn(3, 5, 80, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, w, q.bias), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    torch.testing.assert_close(gx, g @ w, atol=1e-5, rtol=1e-5)
    # second order: d/dx <gx, v> = 0 (linear in x); d/dg of <gx, v> = v W^T: Hessian-vector products flow
    v = torch.randn_like(gx)
    g2 = g.clone().requires_grad_(True)
    (gx2,) = torch.autograd.grad(q(x), x, g2, create_graph=True)
    (dg,) = torch.autograd.grad((gx2 * v).sum(), g2)
    torch.testing.assert_close(dg, v @ w.t(), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("shape", [(48, 80), (256, 320)])  # 60 blocks; 1,280 (5 nested blocks of 256)
def test_every_forward_route_equals_the_dense_layer(shape):
    """Without a graph to build the layer skips its autograd Function; with one (an input that needs its
    gradient) or a trainable bias it takes the Function: all three give the dense layer's output."""
    q = layer(*shape)
    w = q.dequantize()
    x = torch.randn(2, 3, shape[1])
    dense = F.linear(x, w, q.bias)
    with torch.no_grad():
        torch.testing.assert_close(q(x), dense, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(q(x), dense, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    assert y.grad_fn is not None
    torch.testing.assert_close(y.detach(), dense, atol=1e-5, rtol=1e-5)
    q.bias.requires_grad_(True)
    y = q(x)
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), dense, atol=1e-5, rtol=1e-5)
    # the block scales undone from double quantization: those of bitsandbytes' rule, absmax code x nested + mean
    nf4 = q.weight_nf4
    nested = nf4.nested_absmax.repeat_interleave(256)[: nf4.absmax.numel()]
    torch.testing.assert_close(nf4.block_scales(), nf4.nested_code[nf4.absmax.long()] * nested + nf4.offset,
                               atol=0, rtol=0)


def test_rows_not_aligned_to_blocks_and_a_partial_last_block():
    torch.manual_seed(1)
    lin = nn.Linear(50, 13)  # 650 elements: rows straddle blocks, the last block holds 10
    q = NF4Linear.from_linear(lin)
    q.chunk_elements = 100
    assert all((r0 * 50) % 64 == 0 for r0, _ in q.row_slices())
    x = torch.randn(4, 50)
    torch.testing.assert_close(q(x), F.linear(x, quantize_nf4(lin.weight).dequantize(), lin.bias))


def test_to_bfloat16_keeps_the_statistics_exact():
    q = layer()
    dense = q.dequantize()
    q.to(torch.bfloat16)
    assert q.nested_absmax.dtype == torch.float32 and q.code.dtype == torch.float32
    assert q.dequantize().dtype == torch.bfloat16
    assert torch.equal(q.dequantize(), dense.to(torch.bfloat16))
    x = torch.randn(2, 80, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(gf.GraftingError, match="80"):
        layer()(torch.randn(2, 81))


def mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 6))


def dense_twin(qmodel):
    """The same network with each NF4 layer's dequantized weight in a plain nn.Linear."""
    twin = mlp()
    with torch.no_grad():
        for i in (0, 2):
            twin[i].weight.copy_(qmodel[i].dequantize())
            twin[i].bias.copy_(qmodel[i].bias)
        twin[4].load_state_dict(qmodel[4].state_dict())
    return twin


def config(method, **kw):
    m = gf.get_method(method)
    return m.make_config(**{"target_modules": ["0", "2"], **m.tiny_fields, **kw})


@pytest.mark.parametrize("method", LOW_RANK)
def test_every_low_rank_method_trains_serves_and_saves_on_an_nf4_base(method, tmp_path):
    base = quantize(mlp(), targets=["0", "2"])
    assert isinstance(base[0], NF4Linear) and isinstance(base[4], nn.Linear)
    q0 = base[0]
    packed = q0.packed.clone()
    twin = dense_twin(base)
    model, reference = adapted_twins(base, twin, lambda **kw: config(method, **kw))
    ref_params = dict(reference.named_parameters())
    x = torch.randn(4, 7, 64)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    model(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters." in n or n.startswith("shared_tensors.") for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_params[n].grad, atol=1e-4, rtol=1e-3)
    assert torch.equal(q0.packed, packed)
    with torch.no_grad():
        assert_rows_match(model, x, ["other", None, "default", "other"])
    model.save_adapter(tmp_path / "a", name="default")
    loaded = gf.load(quantize(mlp(), targets=["0", "2"]), tmp_path / "a")
    model.set_active("default")
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", LOW_RANK)
def test_merge_requantizes_reports_the_error_and_unmerge_restores_the_bytes(method):
    base = quantize(mlp(), targets=["0", "2"])
    q0 = base[0]
    before = {k: v.clone() for k, v in q0.state_dict().items()}
    model = gf.adapt(base, config(method))
    randomize(model)
    host = dict(model.hosts())["0"]
    with torch.no_grad():
        target, _ = host.methods["default"].merge(host.adapters["default"], host)
        model.merge()
    expected = quantize_nf4(target)
    assert torch.equal(q0.packed, expected.packed) and torch.equal(q0.absmax, expected.absmax)
    errors = requantize_errors(model)
    assert set(errors) == {"0", "2"}
    want = float((expected.dequantize() - target).norm() / target.norm())
    assert errors["0"] == pytest.approx(want, rel=1e-5) and 0 < errors["0"] < 0.2
    model.unmerge()
    assert all(torch.equal(v, q0.state_dict()[k]) for k, v in before.items())


def test_quantize_targets_skip_and_errors():
    m = quantize(mlp())
    assert [type(m[i]).__name__ for i in (0, 2, 4)] == ["NF4Linear"] * 3  # no output-head notion here
    m = quantize(mlp(), skip=["4"])
    assert isinstance(m[4], nn.Linear) and isinstance(m[0], NF4Linear)
    with pytest.raises(gf.GraftingError, match="no linear layer matches"):
        quantize(mlp(), targets=["nope"])
    with pytest.raises(gf.GraftingError, match="quantize the base model first"):
        quantize(gf.adapt(mlp(), gf.LoraConfig(target_modules=["0"])))
    with pytest.raises(gf.GraftingError, match="block_size"):
        quantize(mlp(), block_size=100)


def test_bitsandbytes_backend_gives_the_same_outputs_and_training_keeps_the_bounded_path():
    pytest.importorskip("bitsandbytes")
    from grafting.quant import get_backend, set_backend
    q = layer()
    x = torch.randn(2, 9, 80)
    with torch.no_grad():
        ours = q(x)
    set_backend("bitsandbytes")
    try:
        with torch.no_grad():
            theirs = q(x)
        xg = x.clone().requires_grad_(True)
        y = q(xg)  # needs an input gradient: grafting's own path
        assert "NF4Matmul" in type(y.grad_fn).__name__
    finally:
        set_backend("torch")
    assert get_backend() == "torch"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(gf.GraftingError, match="expected one of"):
        set_backend("cuda")


def test_a_trainable_bias_gets_its_gradient():
    q = layer()
    q.bias.requires_grad_(True)
    x = torch.randn(6, 80)
    g = torch.randn(6, 48)
    q(x).backward(g)
    torch.testing.assert_close(q.bias.grad, g.sum(0))


def test_inference_mode_and_training_calls_share_the_scratch_buffers():
    from grafting.quant.nf4 import _scratch
    _scratch.__dict__.clear()  # the first call of this thread creates them: under inference mode here
    q = layer(out=96, inn=128)
    x = torch.randn(3, 128)
    with torch.inference_mode():
        first = q(x)
    xg = x.clone().requires_grad_(True)
    second = q(xg)
    second.sum().backward()
    torch.testing.assert_close(second.detach(), first.clone())
    assert xg.grad is not None


def test_nf4_embeddings_and_a_tied_head_share_one_set_of_bytes():
    from grafting.quant import NF4Embedding, quantized_nbytes
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

    def build():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    emb_weight = build().model.embed_tokens.weight.detach().clone()
    plain = quantize(build())
    model = quantize(build(), embeddings=True)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, NF4Embedding) and isinstance(head, NF4Linear) and head.packed is emb.packed
    expect = quantize_nf4(emb_weight).dequantize()
    ids = torch.tensor([[5, 7, 5, 199, 0]])
    torch.testing.assert_close(emb(ids)[0], expect[ids[0]], atol=0, rtol=0)
    torch.testing.assert_close(head.dequantize(), expect, atol=0, rtol=0)
    with torch.no_grad():  # the same network as dequantized embeddings in a plain model
        plain.model.embed_tokens.weight.copy_(expect)
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    assert quantized_nbytes(model)["total"] < 0.5 * quantized_nbytes(plain)["total"]
    with pytest.raises(gf.GraftingError, match="bitsandbytes checkpoints cannot hold"):
        from grafting.quant import save_pretrained
        save_pretrained(model, "/tmp/never-written")
    with pytest.raises(gf.GraftingError, match="token ids must be in"):
        emb(torch.tensor([[200]]))
