"""``graft serve``: one base model and many adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from ..errors import GraftingError
from .merge import parse_size


def _adapter_pairs(items) -> dict:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise GraftingError(f"--adapter {item!r}: expected NAME=DIR")
        out[name] = path
    return out


def cmd_serve(args) -> int:
    from ..serve.server import serve
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
          served_model_name=args.served_model_name, adapter_root=args.adapter_root,
          adapters=_adapter_pairs(args.adapter), request_timeout=args.request_timeout,
          max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
          max_lora_rank=args.max_lora_rank, max_batch=args.max_batch,
          max_queue=args.max_queue, max_model_len=args.max_model_len,
          timeout_keep_alive=args.timeout_keep_alive, task=args.task, preload=args.preload,
          stack_dtype=args.stack_dtype, max_kv_bytes=args.kv_cache_memory)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model and its adapters over an OpenAI-compatible HTTP API",
                       description="Serve MODEL (a local model directory, a GGUF file or a packaged name) and "
                                   "PEFT-format adapters: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/v1/embeddings (an encoder), /v1/load_lora_adapter, /v1/unload_lora_adapter, /health, /metrics.")
    p.add_argument("model", help="model directory, .gguf file, or packaged:NAME")
    p.add_argument("--task", choices=["auto", "generate", "embed"], default="auto",
                   help="generate (a causal LM: completions, chat) or embed (an encoder: /v1/embeddings); "
                        "auto picks by the model's architecture")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="register an adapter, read and checked against the model at startup: one that cannot "
                        "serve stops the start with the reason (repeatable)")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="register every adapter directory in DIR by its name (configs only; a bad one is skipped with "
                        "a warning); runtime loads, and every read of these adapters, stay inside DIR")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the base model's name in requests (default: the model's name)")
    p.add_argument("--max-loras", type=int, default=8, help="adapters resident at once (default 8)")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in memory as read, resident or not (default: --max-loras); an evicted "
                        "one comes back without a disk read")
    p.add_argument("--max-lora-rank", type=int, default=None, help="refuse adapters above this rank (default: any)")
    p.add_argument("--preload", action="store_true",
                   help="read the first --max-loras registered adapters at startup (and the next ones up to "
                        "--max-cpu-loras into memory), so no early request waits")
    p.add_argument("--stack-dtype", choices=["float32", "bfloat16", "int8"], default=None,
                   help="dtype of the mixed-batch adapter factors (default: the adapters' own); bfloat16 halves "
                        "what a decode step with many distinct adapters reads, int8 (per-rank scales) quarters it")
    p.add_argument("--max-batch", type=int, default=32, help="rows in the running batch at most (default 32)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests at most; more get 429")
    p.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                   help="bytes the running batch's key/value cache may hold, e.g. 4G or 500M (default: no limit); "
                        "fewer rows are admitted, and rows that would outgrow it are preempted and recomputed")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request (default: none)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5, uvicorn's)")
    p.set_defaults(func=cmd_serve)
