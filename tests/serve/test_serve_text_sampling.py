"""Streaming detokenization (UTF-8 and stop-string hold-back) and per-row sampling rules."""

from __future__ import annotations

import random

import pytest
import torch

from grafting.serve.sampling import SamplingParams, make_generator, sample_token
from grafting.serve.text import Detokenizer
from serving_models import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def stream(tokenizer, text, stop, include_stop=False):
    d = Detokenizer(tokenizer, stop, include_stop)
    pieces, stopped = [], False
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece, stopped = d.add(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(d.flush())
    return pieces, stopped


def test_multibyte_characters_are_held_until_complete(tokenizer):
    pieces, _ = stream(tokenizer, "añb€", [])
    assert "".join(pieces) == "añb€"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "ñ"  # 'ñ' is two byte tokens: nothing after the first


def test_stop_string_is_never_streamed_partly(tokenizer):
    pieces, stopped = stream(tokenizer, "hello END world", ["END"])
    assert stopped and "".join(pieces) == "hello "
    pieces, stopped = stream(tokenizer, "hello EN world", ["END"])  # a false start is released later
    assert not stopped and "".join(pieces) == "hello EN world"
    assert "E" not in "".join(pieces[:8])  # held while it could still become "END"


def test_stop_string_kept_on_request_ends_the_text(tokenizer):
    pieces, stopped = stream(tokenizer, "hello END world", ["END", "D w"], include_stop=True)
    assert stopped and "".join(pieces) == "hello END"
    pieces, stopped = stream(tokenizer, "hello END world", ["ND", "END"], include_stop=True)
    assert stopped and "".join(pieces) == "hello END"  # both end at the same token: the earlier start wins


# ---- incremental decoding: the deltas add up to the full decode, for linear decode work -------------------------
def sentencepiece_tokenizer(decoder: str):
    """A tiny Llama-style tokenizer: BPE over "▁"-marked pieces with byte fallback, <unk> <s> </s> special.
    ``decoder`` "strip" is Llama 2's tokenizer.json (Replace, ByteFallback, Fuse, Strip one leading space),
    "metaspace" the form newer conversions use; both drop the space of the first token they decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("l", "o"), ("▁", "he"), ("l", "lo"),
              ("▁he", "llo"), ("▁", "中")]
    for piece in ["▁", *"abcdehilnorstw", "中", *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if decoder == "strip":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace("▁", prepend_scheme="first")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from grafting.train.models import resolve
    directory, extra = resolve("packaged:smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(directory, **extra)


@pytest.fixture(params=["smollm2", "bytes", "strip", "metaspace"])
def styled(request):
    """(tokenizer, its special ids, whether any id sequence decodes the same piecewise). Byte-level decoding
    is plain UTF-8 over the bytes; byte fallback decodes a run of byte tokens that is not valid UTF-8 as one
    U+FFFD per byte, so a later invalid byte changes text decoded before it: only real text is fair there."""
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2"), list(range(17)), True
    if request.param == "bytes":
        return byte_tokenizer(), [256, 257], True
    return sentencepiece_tokenizer(request.param), [0, 1, 2], False


PIECES = [*"abcdehlotw", " ", "  ", "\n", "hello", " the", "é", "€", "😀", "中", "文", "👍🏽"]


def random_ids(tokenizer, specials, rng, any_ids):
    """Separately encoded scraps of text (so tokens meet as a model would not put them), special tokens
    between them, and, where ``any_ids``, runs of arbitrary ids (bytes that are no UTF-8 at all)."""
    ids = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.15:
            ids.append(rng.choice(specials))
        elif r < 0.3 and any_ids:
            ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 5))]
        else:
            ids += tokenizer("".join(rng.choices(PIECES, k=rng.randint(1, 6))), add_special_tokens=False)["input_ids"]
    return ids


def released(tokenizer, ids, stop=(), include_stop=False, skip_special_tokens=True):
    d = Detokenizer(tokenizer, list(stop), include_stop, skip_special_tokens)
    pieces = []
    for t in ids:
        piece, stopped = d.add(t)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces + [d.flush()], False


def expected(tokenizer, ids, stop, include_stop, skip_special_tokens):
    """What the output ends as: the full decode, or, at the first token whose text so far holds a stop string,
    that text cut at the earliest (then longest) one."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=skip_special_tokens)
        hits = [(text.find(s), -len(s)) for s in stop if s in text]
        if hits:
            at, minus_length = min(hits)
            return text[: at - minus_length if include_stop else at], True
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), False


def test_streamed_text_adds_up_to_the_full_decode(styled):
    tokenizer, specials, any_ids = styled
    if not any_ids:  # the subtlety the decode window is for: decoding from the second token loses its space
        ids = tokenizer("a 😀 b", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids[1:]) != tokenizer.decode(ids)[1:]
    rng = random.Random(0)
    for _ in range(150):
        ids = random_ids(tokenizer, specials, rng, any_ids and rng.random() < 0.5)
        for skip in (True, False):
            full = tokenizer.decode(ids, skip_special_tokens=skip)
            pieces, stopped = released(tokenizer, ids, skip_special_tokens=skip)
            assert "".join(pieces) == full and not stopped, (ids, skip)
            if "\ufffd" not in full:
                assert all("\ufffd" not in p for p in pieces[:-1]), (ids, skip)  # never half a character
            if full:  # stop strings: stretches of the text, or scraps that may not be in it
                stop = [full[i:i + rng.randint(1, 4)] if rng.random() < 0.7 else "".join(rng.choices(PIECES, k=2))
                        for i in rng.choices(range(len(full)), k=rng.randint(1, 2))]
                stop = [s for s in stop if "\ufffd" not in s]
                include = rng.random() < 0.5
                pieces, stopped = released(tokenizer, ids, stop, include, skip)
                assert ("".join(pieces), stopped) == expected(tokenizer, ids, stop, include, skip), (ids, stop)


class CountingTokenizer:
    """The tokenizer, counting the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded_ids = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_decode_work_is_linear_in_the_output(styled):
    tokenizer, _, _ = styled
    text = "".join(random.Random(1).choices(PIECES, k=3000))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:2000]
    assert len(ids) == 2000
    counting = CountingTokenizer(tokenizer)
    pieces, _ = released(counting, ids, stop=["<never>"])
    assert "".join(pieces) == tokenizer.decode(ids)
    assert counting.decoded_ids < 20 * len(ids)  # decoding everything each time: n^2 / 2, 2 million ids


def test_flush_releases_an_unfinished_character_as_the_full_decode_has_it(styled):
    tokenizer = styled[0]
    ids = tokenizer("ab😀", add_special_tokens=False)["input_ids"][:-1]  # the emoji's last byte is missing
    d = Detokenizer(tokenizer, [])
    assert "\ufffd" not in "".join(d.add(t)[0] for t in ids)
    tail = d.flush()
    assert tail.endswith("\ufffd") and d.text == tokenizer.decode(ids)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    g = make_generator(params)
    draws = {sample_token(logits, params, g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the second token is in, the third is not
    greedy = SamplingParams(temperature=0)
    assert sample_token(logits, greedy, make_generator(greedy)) == 0


def test_temperature_sharpens_towards_greedy():
    logits = torch.tensor([1.0, 0.8, 0.0])
    cold = SamplingParams(temperature=0.01, seed=1)
    g = make_generator(cold)
    assert {sample_token(logits, cold, g) for _ in range(100)} == {0}
    warm = SamplingParams(temperature=1.0, seed=1)
    g = make_generator(warm)
    assert {sample_token(logits, warm, g) for _ in range(200)} == {0, 1, 2}
