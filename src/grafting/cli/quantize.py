"""``graft quantize MODEL OUT``: write MODEL's linear layers in NF4 as a bitsandbytes 4-bit checkpoint.

    graft quantize packaged:smollm2-135m-instruct out/smollm2-nf4

The work is grafting.quant.checkpoint.quantize_pretrained; this module parses arguments and prints sizes.
"""

from __future__ import annotations


def cmd_quantize(args) -> int:
    from ..quant.checkpoint import quantize_pretrained

    r = quantize_pretrained(args.model, args.output_dir, block_size=args.block_size,
                            double_quant=not args.no_double_quant, skip=args.skip or None)
    mb = 2 ** 20
    print(f"quantized {r['layers']} linear layers to NF4 -> {r['path']}")
    print(f"weights {r['fp32_bytes'] / mb:,.1f} MB fp32 -> {r['bytes'] / mb:,.1f} MB "
          f"({r['bytes'] / r['fp32_bytes']:.3f}x; NF4 layers {r['nf4_bytes'] / mb:,.1f} MB, the rest as loaded)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers to NF4 (a bitsandbytes 4-bit checkpoint)",
                       description="Quantize every Linear / Conv1D layer but the output head to NF4 (QLoRA) and "
                                   "write a checkpoint that transformers + bitsandbytes and grafting load.")
    p.add_argument("model", help="local model directory, GGUF file, or packaged:NAME")
    p.add_argument("output_dir")
    p.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256, 512, 1024, 2048, 4096))
    p.add_argument("--no-double-quant", action="store_true", help="keep the block scales in fp32")
    p.add_argument("--skip", nargs="*", metavar="MODULE", help="module names to keep in full precision")
    p.set_defaults(func=cmd_quantize)
