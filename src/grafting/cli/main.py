"""``graft`` entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .. import __version__
from ..errors import GraftingError


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_inspect(args) -> int:
    from ..io.peft_format import inspect_adapter

    info = inspect_adapter(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ranks = ", ".join(map(str, info["ranks"])) or (str(info["r"]) if info["r"] is not None else "-")
    rows = [
        ("path", info["path"]),
        ("method", info["method"] + (" (rsLoRA scaling)" if info["use_rslora"] else "")
         + f" [{info['peft_type']}]"),
        ("rank(s)", ranks),
        ("lora_alpha", info["lora_alpha"] if info["lora_alpha"] is not None else "-"),
        ("target_modules", info["target_modules"]),
        ("adapted layers", f"{len(info['targets'])}"),
        ("shared tensors", ", ".join(info["shared_tensors"]) or "-"),
        ("modules_to_save", ", ".join(info["modules_to_save"]) or "-"),
        ("parameters", f"{info['parameters']:,}"),
        ("dtypes", ", ".join(info["dtypes"])),
        ("size on disk", _human(info["size_bytes"])),
        ("base model", info["base_model"] or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def method_table() -> list[dict]:
    """Every registered method: name, PEFT type and flags, one-line description, config fields with defaults."""
    import dataclasses

    from ..config import AdapterConfig
    from ..registry import methods

    common = {f.name for f in dataclasses.fields(AdapterConfig)}
    rows = []
    for m in methods():
        fields = []
        for f in dataclasses.fields(m.config_class):
            if f.name in common or f.name in m.flags:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            fields.append({"name": f.name, "default": default})
        rows.append({"name": m.name, "peft_type": m.config_class.peft_type, "flags": m.flags,
                     "config": m.config_class.__name__, "description": m.description, "paper": m.paper,
                     "fields": fields,
                     "layer_kinds": sorted(m.layer_kinds), "mergeable": m.mergeable, "low_rank": m.low_rank_form})
    return rows


def cmd_methods(args) -> int:
    rows = method_table()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        flags = "".join(f", {k}={v}" for k, v in row["flags"].items())
        print(f"{row['name']}  ({row['config']}, peft_type {row['peft_type']}{flags})")
        print(f"    {row['description']}")
        if row["paper"]:
            print(f"    paper: {row['paper']}")
        fields = ", ".join(f"{f['name']}={f['default']!r}" for f in row["fields"])
        print(f"    fields: {fields}")
        print(f"    layers: {', '.join(row['layer_kinds'])}; mergeable: {row['mergeable']}; "
              f"low-rank: {row['low_rank']}")
    print("\nevery config also takes: target_modules, exclude_modules, layers_to_transform, layers_pattern, "
          "modules_to_save, base_model_name_or_path, task_type")
    return 0


def cmd_train(args) -> int:
    from ..train import require_extra

    require_extra()  # before trainer's imports: pydantic missing would otherwise be a ModuleNotFoundError
    from ..train.trainer import format_summary, run

    result = run(args.recipe, resume=args.resume, overrides=args.overrides, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(format_summary(result, result.best["metric"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="grafting: adapt pretrained models cheaply.")
    parser.add_argument("--version", action="version", version=f"graft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="show what an adapter directory holds",
                       description="Show an adapter's method, ranks, targets, parameter count, size and base model.")
    p.add_argument("path", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("methods", help="list the registered adapter methods and their config fields",
                       description="List every registered adapter method: PEFT type, description, config fields.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("train", help="train an adapter from a YAML recipe",
                       description="Train an adapter from a YAML recipe. Runs under torchrun for several processes.")
    p.add_argument("recipe", help="recipe YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. train.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint if it exists")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty output_dir, replacing the earlier run's files")
    p.set_defaults(func=cmd_train)
    from .merge import register as register_merge, register_extract
    register_merge(sub)
    register_extract(sub)
    from .compress import register as register_compress
    register_compress(sub)
    from .serve import register as register_serve
    register_serve(sub)
    from .quantize import register as register_quantize
    register_quantize(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except GraftingError as e:
        print(f"graft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
