"""``graft merge CONFIG.yaml OUTPUT_DIR``: run a mergekit-style merge config, called as ``mergekit-yaml`` is.

A thin layer over :func:`grafting.merge.run.merge`; the help's epilog lists the registered merge methods and
their parameters, generated from the registry so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgb]?)b?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_size(text: str) -> int:
    """Bytes from ``5B`` / ``500M`` / ``64K`` / ``1000`` (decimal, B = billion, as mergekit's --out-shard-size)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 5B, 500M, 64K or a byte count, got {text!r}")
    size = int(float(m.group(1)) * _SCALE[m.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return size


def methods_epilog() -> str:
    """Every registered merge method: summary, paper, parameters (name, scope, type, default)."""
    from ..merge.base import merge_methods

    try:
        methods = merge_methods()
    except Exception as e:  # a broken method module must not take the whole CLI's --help down with it
        return f"merge methods: could not be listed ({e})"
    lines = ["merge methods (merge_method: in the config):", ""]
    for m in methods.values():
        base = ", needs base_model" if m.needs_base else ""
        count = (f"exactly {m.min_models}" if m.max_models == m.min_models
                 else f"{m.min_models}+" if m.max_models is None else f"{m.min_models}-{m.max_models}")
        lines.append(f"  {m.name}: {m.summary}")
        lines.append(f"      paper: {m.paper}; models: {count}{base}")
        for p in m.params:
            default = "required" if p.required else f"default {p.default!r}"
            lines.append(f"      {p.name} ({p.scope}, {p.type.__name__}, {default})"
                         + (f": {p.doc}" if p.doc else ""))
        lines.append("")
    lines.append("model parameters go under a model's parameters: (or the global parameters: as a default for "
                 "every model); global ones only under the top-level parameters:.")
    return "\n".join(lines)


def cmd_merge(args) -> int:
    from ..merge.run import merge

    result = merge(args.config, args.output_dir, seed=args.seed, shard_size=args.out_shard_size,
                   progress=not args.no_progress, copy_tokenizer=not args.no_copy_tokenizer)
    print(f"merged {result.tensors} tensors with {result.method} into {result.output_dir} "
          f"({result.bytes_written / 1e6:.1f} MB, {result.seconds:.1f} s)")
    ad = result.adapter
    if ad is not None:
        ranks = sorted(ad.ranks.values())
        how = "exact (concatenated factors)" if ad.exact else "weight space + truncated SVD"
        print(f"adapter: {len(ad.ranks)} modules, ranks {ranks[0]}-{ranks[-1]}, {how}")
        if ad.energy:
            worst = min(ad.energy, key=ad.energy.get)
            print(f"energy kept: mean {sum(ad.energy.values()) / len(ad.energy):.4f}, lowest {ad.energy[worst]:.4f} "
                  f"({worst})")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``merge`` to a ``graft`` subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "merge", help="merge models from a mergekit-style YAML config",
        description="Merge models as a mergekit YAML config says (models:, merge_method:, base_model:,\n"
                    "parameters:, dtype:, out_dtype:, tokenizer_source:, chat_template:), streaming tensor\n"
                    "by tensor. The output directory appears only when the whole merge succeeded.\n"
                    "PEFT adapter directories may be models entries: merged into base_model for a full model,\n"
                    "or into one adapter when every entry is an adapter (grafting's `output:` section:\n"
                    "kind: adapter | model, and rank: N or energy: F for weight-space adapter merges).",
        epilog=methods_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG.yaml", help="merge config (mergekit's YAML)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="where the merged model goes (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of random methods (DARE, DELLA); default 0")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"), metavar="SIZE",
                   help="most bytes per output file, e.g. 5B (default), 500M")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-copy-tokenizer", action="store_true",
                   help="do not copy the tokenizer files (from tokenizer_source, else base_model, else the first model)")
    p.set_defaults(func=cmd_merge)
    return p


def cmd_extract(args) -> int:
    from ..merge import extract_adapter, open_input

    base, tuned = open_input(args.base), open_input(args.finetuned)
    base_dir = args.base if Path(args.base).is_dir() else None
    res = extract_adapter(base, tuned, args.output_dir, rank=args.rank, energy=args.energy,
                          targets=args.targets, base_dir=base_dir, progress=not args.no_progress)
    ranks = sorted(res.ranks.values())
    print(f"extracted {len(res.ranks)} modules into {res.output}: ranks {ranks[0]}-{ranks[-1]}, energy kept "
          f"mean {sum(res.energy.values()) / len(res.energy):.4f}, lowest {min(res.energy.values()):.4f}")
    if res.not_captured:
        worst = max(res.not_captured, key=res.not_captured.get)
        print(f"not captured (not linear weights): {len(res.not_captured)} changed tensors, largest relative "
              f"change {res.not_captured[worst]:.2e} ({worst})")
    return 0


def register_extract(subparsers) -> argparse.ArgumentParser:
    """Add ``extract`` (a LoRA adapter from a fine-tuned model's weight deltas) to ``graft``."""
    p = subparsers.add_parser(
        "extract", help="extract a LoRA adapter from a fine-tuned model (truncated SVD of the weight deltas)",
        description="Factor each linear weight's delta (fine-tuned - base) by a truncated SVD into a PEFT LoRA\n"
                    "adapter that peft loads onto the base. Changed tensors that are not linear weights are\n"
                    "reported, not silently dropped.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base model (directory or .safetensors)")
    p.add_argument("finetuned", help="the fine-tuned model, same architecture")
    p.add_argument("output_dir", help="where the adapter goes")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="components per layer")
    how.add_argument("--energy", type=float, help="per layer, the fewest components keeping this fraction of ||dW||^2")
    p.add_argument("--targets", nargs="+", help="module-name suffixes to extract (default: every linear layer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)
    return p


__all__ = ["register", "register_extract", "cmd_merge", "cmd_extract", "methods_epilog", "parse_size"]
