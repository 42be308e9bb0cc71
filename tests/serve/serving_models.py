"""Tiny causal LMs (GPT-2 and Llama with grouped-query attention) built from configs, random adapters, and a
byte-level tokenizer, for the serving tests (a plain module: every test directory's conftest is "conftest")."""

from __future__ import annotations

import contextlib

import torch

import grafting as gf


def tiny_lm(arch: str, seed: int = 0, tie: bool = True, positions: int = 96):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=260, n_positions=positions,
                            bos_token_id=256, eos_token_id=256)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=260, max_position_embeddings=positions,
                             bos_token_id=256, eos_token_id=256, tie_word_embeddings=tie)
        model = LlamaForCausalLM(config)
    return model.eval()


# a chat template the byte tokenizer can render: <role>content lines, then <assistant>
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")

TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


def add_random_adapter(model, name: str, arch: str, r: int = 8, seed: int = 0, **kwargs):
    model.add_adapter(name, gf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[arch], **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".{name}." in pname and "adapters" in pname:
                if pname.endswith("lora_magnitude"):
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <eos> (256) and <pad> (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def save_tiny_lm(path, arch: str = "gpt2", chat: bool = False, **kwargs):
    """A tiny LM (:func:`tiny_lm` ``kwargs``) and the byte tokenizer, with :data:`TEMPLATE` when ``chat``, saved
    as the model directory ``graft serve PATH`` loads. Returns (model, tokenizer)."""
    model, tokenizer = tiny_lm(arch, **kwargs), byte_tokenizer()
    if chat:
        tokenizer.chat_template = TEMPLATE
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n in order
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_server(app, timeout: float = 30):
    """Serve ``app`` on 127.0.0.1 from a thread; yields its URL and stops it afterwards."""
    import threading
    import time

    import uvicorn
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout)


def wait_healthy(url: str, timeout: float = 120, proc=None) -> None:
    """Poll ``url``/health until it answers 200; fail with the server's output if ``proc`` exits first."""
    import time

    import httpx
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up in {timeout:.0f} s"
        time.sleep(0.2)
