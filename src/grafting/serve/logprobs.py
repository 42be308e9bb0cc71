"""Log probabilities of the sampled tokens and their most likely alternatives, and their OpenAI shapes.

As in vLLM (its default ``raw_logprobs``), they are the model's own distribution, ``log_softmax`` of the
logits, before logit bias, penalties, temperature and top-k/top-p: what a client scoring text needs, whatever
sampling settings produced it. A probability of exactly 0 is reported as -9999.0 (JSON has no -inf), as vLLM
does.

The engine records one :data:`Entry` per generated token, and per prompt token when a request asks for the
prompt's (``prompt_logprobs``: completions with ``echo``, for scoring text as evaluation harnesses do); :func:`completion_logprobs` and
:func:`chat_logprobs` turn a choice's entries into the ``logprobs`` object of ``/v1/completions`` (tokens,
token_logprobs, top_logprobs, text_offset) and of ``/v1/chat/completions`` (``content``: token, logprob,
bytes, top_logprobs). Token strings are each token decoded on its own, so a byte of a multi-byte character
reads as U+FFFD, as in vLLM.
"""

from __future__ import annotations

import math

import torch

FLOOR = -9999.0

# (token id, its log probability, [(id, log probability) of the k most likely tokens, most likely first]);
# (token id, None, None) for a prompt's first token
Entry = tuple


def token_entry(logits: torch.Tensor, token: int, k: int) -> Entry:
    """The entry of ``token`` sampled from one row of next-token ``logits`` (shape (vocab,)), with ``k``
    alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k > 0:
        values, ids = torch.topk(logp, min(k, logp.shape[-1]))
        top = [(int(i), _finite(v)) for i, v in zip(ids.tolist(), values.tolist())]
    return int(token), _finite(float(logp[token])), top


def prompt_entries(logits: torch.Tensor, prompt: list, k: int) -> list:
    """Entries of every prompt token from the prefill's ``logits`` at the prompt's positions (shape
    (len(prompt), vocab)): token j is scored by the logits at position j - 1; the first token has no
    log probability (None), as in OpenAI's and vLLM's echoed prompts."""
    return [(int(prompt[0]), None, None)] + [token_entry(logits[j - 1], prompt[j], k) for j in range(1, len(prompt))]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def _text(tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def completion_logprobs(tokenizer, entries: list, offset: int = 0) -> dict:
    """``/v1/completions``' ``logprobs``: ``top_logprobs`` maps token text to log probability for the k most
    likely tokens and the sampled one (OpenAI: "up to logprobs + 1 elements"); ``text_offset`` counts from the
    start of the choice's text (``offset``: the echoed prompt's length)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, logprob, top in entries:
        text = _text(tokenizer, token)
        text_offset.append(offset)
        offset += len(text)
        tokens.append(text)
        token_logprobs.append(logprob)
        if top is None:  # the prompt's first token: nothing scored it
            top_logprobs.append(None)
            continue
        alternatives = {_text(tokenizer, t): lp for t, lp in top}
        alternatives.setdefault(text, logprob)
        top_logprobs.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(tokenizer, entries: list) -> dict:
    """``/v1/chat/completions``' ``logprobs``: one item per token, with its UTF-8 ``bytes`` and the
    ``top_logprobs`` alternatives (as many as the request's ``top_logprobs``)."""
    def item(token: int, logprob: float) -> dict:
        text = _text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
                        for token, logprob, top in entries],
            "refusal": None}
