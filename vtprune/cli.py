"""The `vtprune` command: methods | compare | bench."""

from __future__ import annotations

import argparse
import json
import sys


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, None: None}[name]


def cmd_methods(args) -> int:
    from .registry import methods

    listing = methods()
    if args.json:
        print(json.dumps([{"name": m.name, "summary": m.summary, "params": m.params, "official": m.official, "families": m.families} for m in listing], indent=2, default=str))
    else:
        print(listing)
    return 0


def cmd_compare(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from .eval.compare import compare, format_table
    from .eval.shapes import load_model

    if not args.question.strip():
        print("error: --question is empty; ask something about the image", file=sys.stderr)
        return 2
    try:
        image = Image.open(args.image).convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, IsADirectoryError) as e:
        print(f"error: cannot read an image from {args.image!r} ({e.__class__.__name__}); pass a PNG/JPEG file", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from . import registry

    for m in methods:
        registry.get(m)  # unknown names fail before the model loads
    model, proc, label = load_model(args.model, _dtype(args.dtype), args.device)
    print(f"model: {label}", file=sys.stderr)
    try:
        from tqdm import tqdm

        bar = tqdm(total=(args.repeats + 1) * (len(methods) + 1), desc="compare", file=sys.stderr, leave=False)
        progress = bar.update
    except ImportError:  # pragma: no cover
        bar, progress = None, None
    rows = compare(model, proc, image, args.question, methods, keep=args.keep, keep_ratio=args.keep_ratio, max_new_tokens=args.max_new_tokens, repeats=args.repeats, progress=progress)
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def cmd_bench(args) -> int:
    from .eval.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtprune", description="Training-free visual token pruning for HF LLaVA-1.5 / LLaVA-NeXT")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("methods", help="list the methods, their parameters and defaults")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_methods)

    c = sub.add_parser("compare", help="answer one question about one image with several methods side by side")
    c.add_argument("--image", required=True)
    c.add_argument("--question", required=True)
    c.add_argument("--methods", default="vtc-cls,random,pool")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, default=None, help="visual tokens per image (default 64)")
    budget.add_argument("--keep-ratio", type=float, default=None)
    c.add_argument("--model", default=None, help="HF checkpoint name/path or a built-in shape; default: the built-in offline model")
    c.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    c.add_argument("--device", default=None)
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--repeats", type=int, default=3, help="timed prefill repeats per row (after one warm-up)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="efficiency side by side: prefill, decode, memory, KV cache, FLOPs, scoring overhead")
    from .eval.bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=cmd_bench)

    # subcommands that live in their own module: `add_arguments(parser)` and `main(args) -> int`
    import importlib

    for name, module, text in (
        ("sweep", "vtprune.eval.sweep", "methods x budgets x tasks through lmms-eval, resumable"),
        ("demo", "vtprune.eval.demo", "a Gradio page comparing methods side by side"),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        sp = sub.add_parser(name, help=text)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.main)
    return p


def main(argv=None) -> int:
    from .errors import VTPruneError

    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "compare" and args.keep is None and args.keep_ratio is None:
        args.keep = 64
    try:
        return args.func(args)
    except VTPruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
