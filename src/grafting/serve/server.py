"""Build a serving stack from a model reference and adapter directories; run it under uvicorn.

``MODEL`` is a local transformers directory, a GGUF file, or a packaged name (``packaged:smollm2-135m-instruct``);
``graft serve`` is :func:`serve`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import GraftingError
from ..io.reader import CONFIG_NAME

log = logging.getLogger("grafting.serve")


def served_name(model: str) -> str:
    if model.startswith("packaged:"):
        return model.split(":", 1)[1]
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.resolve().name


TASKS = ("auto", "generate", "embed")


def model_task(model: str) -> str:
    """"generate" for a causal LM (its config's architectures end in ForCausalLM / LMHeadModel, or it is a
    GGUF file), "embed" for anything else (an encoder: served on /v1/embeddings)."""
    from ..train.models import resolve

    directory, extra = resolve(model)
    if "gguf_file" in extra:
        return "generate"
    try:
        architectures = json.loads((Path(directory) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise GraftingError(f"{Path(directory) / 'config.json'}: cannot read it ({e})") from None
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures)
    return "generate" if causal else "embed"


STACK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def build_engine(model: str, adapters: dict | None = None, adapter_root=None, max_loras: int = 8,
                 max_lora_rank: int | None = None, max_batch: int = 32, max_queue: int = 1024,
                 max_model_len: int | None = None, max_adapter_bytes: int | None = None, task: str = "auto",
                 preload: bool = False, stack_dtype: str | None = None, max_cpu_loras: int | None = None,
                 max_kv_bytes: int | None = None):
    """(engine, tokenizer): the base model loaded for inference, an AdapterPool with ``adapters`` (name ->
    directory) and every adapter directory directly under ``adapter_root`` registered by its folder name.
    ``adapters`` are read and checked against the model now (:meth:`AdapterPool.load`): one that cannot serve
    stops the start with the reason, since it was asked for by name. Under ``adapter_root`` only configs are
    read (a thousand adapters register in moments), a directory that cannot register is skipped with a
    warning naming it (requests for it fail with the reason, :meth:`AdapterPool.refuse`), and the pool keeps
    every read inside the root.
    ``task`` "generate" gives an :class:`~grafting.serve.Engine` (a causal LM), "embed" an
    :class:`~grafting.serve.embed.Embedder` (an encoder); "auto" picks by the model (:func:`model_task`).
    ``max_cpu_loras``: adapters kept in memory as read (default ``max_loras``), so one evicted from the model
    comes back without a disk read. ``preload``: read and install the first ``max_loras`` registered adapters,
    and read the next ones up to ``max_cpu_loras`` into memory, before returning.
    ``stack_dtype``: "bfloat16" keeps the mixed-batch factors in bf16 (half the bytes a decode step with many
    adapters reads), "int8" in int8 with per-rank scales (a quarter; :meth:`~grafting.AdaptedModel.set_stack_dtype`);
    default: the adapters' own.
    ``max_kv_bytes``: the running batch's key/value cache budget (:class:`~grafting.serve.Engine`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..model import AdaptedModel
    from ..train.models import load_model, resolve
    from .embed import Embedder, encoder_view, read_pooling
    from .engine import Engine
    from .pool import AdapterPool

    if task not in TASKS:
        raise GraftingError(f"task '{task}': expected one of {', '.join(TASKS)}")
    if task == "auto":
        task = model_task(model)
    tokenizer, base = load_model(model, task="causal_lm" if task == "generate" else "embed")
    base.eval()
    adapted = AdaptedModel(base)
    if stack_dtype is not None:
        if stack_dtype not in STACK_DTYPES:
            raise GraftingError(f"stack_dtype '{stack_dtype}': expected one of {', '.join(STACK_DTYPES)}")
        adapted.set_stack_dtype(STACK_DTYPES[stack_dtype])
    if max_cpu_loras is not None and max_cpu_loras < max_loras:
        raise GraftingError(f"max_cpu_loras ({max_cpu_loras}): expected at least max_loras ({max_loras})")
    pool = AdapterPool(adapted, max_loras=max_loras, max_rank=max_lora_rank, max_bytes=max_adapter_bytes,
                       prepare=encoder_view(adapted) if task == "embed" else None, max_cpu_loras=max_cpu_loras,
                       root=adapter_root)
    if max_lora_rank is not None:
        adapted.reserve(pool.max_installed, max_lora_rank)  # the stacks never reallocate while serving
    if adapter_root is not None:
        root = Path(adapter_root)
        if not root.is_dir():
            raise GraftingError(f"--adapter-root {root}: not a directory")
        for d in sorted(root.iterdir()):
            if (d / CONFIG_NAME).is_file():
                try:
                    pool.register(d.name, d)
                except (GraftingError, OSError, ValueError) as e:  # a directory scan serves what it can
                    log.warning("--adapter-root: skipping %s, requests for '%s' will get 400: %s", d, d.name, e)
                    pool.refuse(d.name, str(e))
    for name, path in (adapters or {}).items():
        try:
            pool.load(name, path, root=None)  # named by the operator: it may live outside the root
        except GraftingError as e:
            raise GraftingError(f"--adapter {name}={path}: cannot serve it: {e}") from None
    if preload:
        pool.preload()
    if task == "embed":
        pooling = read_pooling(resolve(model)[0])
        if max_model_len is not None:
            pooling.max_length = max_model_len
        return Embedder(adapted, tokenizer, pool, pooling=pooling, max_batch=max_batch, max_queue=max_queue), tokenizer
    engine = Engine(adapted, tokenizer=tokenizer, pool=pool, max_batch=max_batch, max_queue=max_queue,
                    max_model_len=max_model_len, max_kv_bytes=max_kv_bytes)
    return engine, tokenizer


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, adapter_root=None, adapters: dict | None = None,
          request_timeout: float | None = None, log_level: str = "info", timeout_keep_alive: float = 5.0,
          **engine_kwargs) -> None:
    """Load ``model`` and serve it (and its adapters) over HTTP until interrupted."""
    try:
        import uvicorn

        from .http import create_app
    except ImportError as e:
        raise GraftingError(f"serving needs the serve extra: pip install 'grafting[serve]' ({e.name} missing)") \
            from None
    engine, _ = build_engine(model, adapters=adapters, adapter_root=adapter_root, **engine_kwargs)
    app = create_app(engine, served_model_name or served_name(model), api_key=api_key, adapter_root=adapter_root,
                     request_timeout=request_timeout, model_path=model)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60,
                timeout_keep_alive=timeout_keep_alive)
