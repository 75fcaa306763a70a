"""Prefill benchmark: the unpatched model vs the patched model vs "feed the kept tokens directly",
measured side by side in one run.

Rows, for one image and one question:
- `unpatched`: the stock model, all visual tokens (vision tower + LLM prefill);
- `<method>`: the model patched with the method at the budget (tower + scoring hooks + selection +
  prompt shrinking + LLM prefill on the kept tokens);
- `direct`: the stock vision tower, then the first `keep` visual tokens handed straight to the
  unpatched model with a prompt of exactly `keep` placeholders (`mm_encoder_outputs`): pruning with
  no scoring and no vtprune machinery — the floor a method can reach at that budget.

Rows are interleaved repeat by repeat (drift hits every row alike), after warm-ups; each figure is
the median with min-max. `unpatched / row` is the speedup; `method / direct` is vtprune's overhead
(scoring + plumbing). Prefill = one forward with the cache on and `logits_to_keep=1`, as generate's
first step. No figure here is asserted by a test: rerun it to re-measure.

    python -m vtprune.eval.bench --shapes tiny,llava-0.5b --methods vtc-cls --keep 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="tiny,llava-0.5b", help="comma list of built-in shapes (tiny, llava-0.5b, llava-1.5-7b, ...) or checkpoint paths")
    p.add_argument("--methods", default="vtc-cls,random,pool")
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU (CPUs without AVX-512-BF16/AMX run bf16 several times slower)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _shrunk_prompt(input_ids, attention_mask, image_token_id, keep):
    ids = input_ids[0]
    ph = (ids == image_token_id).nonzero()[:, 0]
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[ph[keep:]] = False
    return ids[mask][None], attention_mask[:, mask]


def bench_shape(model, proc, methods, keep: int, repeats: int, warmup: int, label: str = "", progress=None) -> dict:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from .. import api
    from ..testing import make_image
    from .compare import _to, build_inputs

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = _to(build_inputs(proc, make_image(0), "What is the colour of the circle on the left?"), device, dtype)
    tok_id = model.config.image_token_id
    available = int((inputs["input_ids"] == tok_id).sum())
    k = min(keep, available)
    ids_k, mask_k = _shrunk_prompt(inputs["input_ids"], inputs["attention_mask"], tok_id, k)
    vision_kwargs = {"pixel_values": inputs["pixel_values"]}
    if "image_sizes" in inputs:
        vision_kwargs["image_sizes"] = inputs["image_sizes"]

    def unpatched():
        model(**inputs, use_cache=True, logits_to_keep=1)

    def direct():
        feats = model.model.get_image_features(**vision_kwargs, return_dict=True).pooler_output
        mm = {"image": BaseModelOutputWithPooling(pooler_output=[f[:k] for f in feats])}
        model(input_ids=ids_k, attention_mask=mask_k, mm_encoder_outputs=mm, use_cache=True, logits_to_keep=1)

    rows = {"unpatched": (None, unpatched)}
    for m in methods:
        rows[m] = (m, unpatched)
    rows["direct"] = (None, direct)
    times = {name: [] for name in rows}
    tokens = {"unpatched": available, "direct": k}
    with torch.no_grad():
        for rep in range(warmup + repeats):
            for name, (method, fn) in rows.items():
                pruner = api.patch(model, method, keep=keep) if method else None
                try:
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    dt = time.perf_counter() - t0
                finally:
                    if pruner is not None:
                        tokens[name] = pruner.last.num_visual_tokens[0]
                        pruner.unpatch()
                if rep >= warmup:
                    times[name].append(dt)
                if progress is not None:
                    progress()
    stats = {}
    for name, ts in times.items():
        stats[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "visual_tokens": tokens[name]}
    base, floor = stats["unpatched"]["median_s"], stats["direct"]["median_s"]
    for name, s in stats.items():
        s["speedup_vs_unpatched"] = base / s["median_s"]
        s["ratio_vs_direct"] = s["median_s"] / floor
    return {"label": label, "available": available, "keep": keep, "repeats": repeats, "dtype": str(dtype).replace("torch.", ""), "device": str(device), "rows": stats}


def format_result(res: dict) -> str:
    head = f"{res['label']}: {res['available']} visual tokens -> keep {res['keep']}, {res['dtype']} on {res['device']}, median of {res['repeats']} [min-max]"
    lines = [head, f"  {'row':12s} {'tokens':>7s} {'prefill ms':>22s} {'speedup':>8s} {'vs direct':>10s}"]
    for name, s in res["rows"].items():
        rng = f"{s['median_s'] * 1e3:8.1f} [{s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}]"
        lines.append(f"  {name:12s} {s['visual_tokens']:>7d} {rng:>22s} {s['speedup_vs_unpatched']:>7.2f}x {s['ratio_vs_direct']:>9.2f}x")
    return "\n".join(lines)


def main(args) -> int:
    from .compare import _to  # noqa: F401  (import check)
    from .shapes import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        model, proc, label = load_model(shape, dtype=dtype)
        model = model.to(device=device, dtype=dtype)
        bar = tqdm(total=(args.warmup + args.repeats) * (len(methods) + 2), desc=shape, file=sys.stderr, leave=False) if tqdm else None
        res = bench_shape(model, proc, methods, args.keep, args.repeats, args.warmup, label=f"{shape} ({label})", progress=bar.update if bar else None)
        if bar:
            bar.close()
        print(format_result(res), flush=True)
        results.append(res)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
