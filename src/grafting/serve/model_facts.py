"""What the serving engine reads off a transformers causal LM and its tokenizer: context size, vocabulary
size, end-of-sequence and padding token ids."""

from __future__ import annotations


def context_size(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def vocab_size(model, config) -> int:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(getattr(embed, "num_embeddings", None), int):
        return embed.num_embeddings
    return getattr(config, "vocab_size", None) or 2 ** 62


def eos_ids(model, tokenizer) -> list:
    ids = []
    gen = getattr(getattr(model, "base_model", model), "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.append(source)
        elif isinstance(source, (list, tuple)):
            ids.extend(int(s) for s in source)
    return ids


def pad_id(tokenizer, config) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
