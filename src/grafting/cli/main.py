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
    ranks = ", ".join(map(str, info["ranks"])) or str(info["r"])
    rows = [
        ("path", info["path"]),
        ("method", info["method"] + (" (rsLoRA scaling)" if info["use_rslora"] else "")),
        ("rank(s)", ranks),
        ("lora_alpha", info["lora_alpha"]),
        ("target_modules", info["target_modules"]),
        ("adapted layers", f"{len(info['targets'])}"),
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
    p = sub.add_parser("train", help="train an adapter from a YAML recipe",
                       description="Train an adapter from a YAML recipe. Runs under torchrun for several processes.")
    p.add_argument("recipe", help="recipe YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. train.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint if it exists")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty output_dir, replacing the earlier run's files")
    p.set_defaults(func=cmd_train)
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
