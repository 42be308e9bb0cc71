"""``graft compress`` / ``graft decompress``: ComPEFT-compress an adapter directory, and write it back in PEFT format.

    graft compress out/adapter out/adapter.compeft --density 0.1
    graft decompress out/adapter.compeft out/adapter.restored

The work is in grafting/merge/compress.py; this module only parses arguments and prints the sizes.
"""

from __future__ import annotations

import argparse


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _scale(text: str):
    if text == "norm":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'norm' nor a number") from None


def cmd_compress(args) -> int:
    from ..merge.compress import compress

    r = compress(args.adapter_dir, args.output_dir, density=args.density, scale=args.scale)
    print(f"original    {_size(r.original_bytes):>10}  ({r.original_bytes:,} bytes)")
    print(f"compressed  {_size(r.compressed_bytes):>10}  ({r.compressed_bytes:,} bytes; {r.compressed_tensors} "
          f"tensors compressed, {r.raw_tensors} stored as is)")
    print(f"ratio       {r.ratio:>9.1f}x  -> {r.path}")
    return 0


def cmd_decompress(args) -> int:
    from ..merge.compress import decompress

    print(f"adapter written to {decompress(args.compressed_dir, args.output_dir)}")
    return 0


def register(subparsers) -> None:
    """Add ``compress`` and ``decompress`` to the ``graft`` sub-command parsers."""
    p = subparsers.add_parser(
        "compress", help="ComPEFT-compress an adapter (sparse signs, one scale per tensor)",
        description="Keep each LoRA factor's largest entries as signs times one scale per tensor (ComPEFT, "
                    "arXiv 2311.13171); other tensors are stored as they are. `graft decompress` writes the "
                    "PEFT adapter back.")
    p.add_argument("adapter_dir", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("output_dir", help="directory for the compressed adapter (compeft.json + compeft.safetensors)")
    p.add_argument("--density", type=float, default=0.1,
                   help="fraction of each factor's entries kept, in (0, 1] (default 0.1)")
    p.add_argument("--scale", type=_scale, default="norm",
                   help="'norm' (each tensor keeps its L2 norm; default) or the paper's α: the kept entries "
                        "become ±α·std(tensor)")
    p.set_defaults(func=cmd_compress)
    p = subparsers.add_parser("decompress", help="write a compressed adapter back as a PEFT adapter",
                              description="Write the PEFT adapter a `graft compress` directory holds.")
    p.add_argument("compressed_dir", help="directory written by graft compress")
    p.add_argument("output_dir", help="directory for the adapter (adapter_config.json + adapter_model.safetensors)")
    p.set_defaults(func=cmd_decompress)
