"""Vision-tower cost of the vision-side methods, side by side in one run (CLIP ViT-L/14-336 shape).

Rows, for one image:
- `plain`: the stock transformers tower (SDPA), all 24 layers, as LLaVA calls it;
- `<method>`: the bare tower patched with the method (SDPA + scores recomputed from q/k/v hooks; for
  flowcut the sequence really shortens between layers);
- `oracle`: a plain SDPA tower run on the *same per-layer token schedule* the method produced, with
  fixed indices and no scoring at all — `method / oracle` is the scoring overhead;
- `eager+attn`: the reference implementations' approach, eager attention with
  `output_attentions=True` on every layer (full attention maps), unpruned.

Rows are interleaved repeat by repeat after warm-ups; medians with min-max. Random weights, with the
query/key projections scaled (`--attention-gain`) so CLS attention is peaked as in a trained CLIP
(FlowCut's schedule depends on its entropy). No figure is asserted by a test.

    python -m vtprune.eval.tower_bench --methods flowcut,vtc-cls --keep 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def build_tower(gain: float, seed: int = 0, attn_implementation: str = "sdpa", state=None):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .shapes import _CLIP_L

    cfg = CLIPVisionConfig(**_CLIP_L)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    tower = CLIPVisionModel(cfg).eval()
    if state is not None:
        tower.load_state_dict(state)
    else:
        with torch.no_grad():
            for name, p in tower.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(gain)
    return tower


def schedule_of(tower, run) -> list[int]:
    """Tokens entering each encoder layer during `run()`."""
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for layer in tower.encoder.layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return lengths


def oracle(tower, pixels, schedule: list[int]):
    """The stock layers on a fixed-index schedule: cut to `schedule[i+1]` tokens after layer i."""
    h = tower.pre_layrnorm(tower.embeddings(pixels))
    for i, layer in enumerate(tower.encoder.layers):
        h = layer(h, None)
        nxt = schedule[i + 1] if i + 1 < len(schedule) else h.shape[1]
        if nxt < h.shape[1]:
            h = h[:, :nxt]
    return tower.post_layernorm(h[:, 0])


def run(methods, keep: int, repeats: int, warmup: int, gain: float, progress=None) -> dict:
    import vtprune

    tower = build_tower(gain)
    eager = build_tower(gain, attn_implementation="eager", state=tower.state_dict())
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    rows = {"plain": lambda: tower(pixel_values=pixels)}
    schedules = {}
    for m in methods:
        pr = vtprune.patch(tower, m, keep=keep)
        try:
            with torch.no_grad():
                schedules[m] = schedule_of(tower, lambda: tower(pixel_values=pixels))
        finally:
            pr.unpatch()
    for m in methods:
        rows[m] = m
        rows[f"oracle[{m}]"] = (lambda s: (lambda: oracle(tower, pixels, s)))(schedules[m])
    rows["eager+attn"] = lambda: eager(pixel_values=pixels, output_attentions=True)
    times = {name: [] for name in rows}
    with torch.no_grad():
        for rep in range(warmup + repeats):
            for name, fn in rows.items():
                pr = vtprune.patch(tower, fn, keep=keep) if isinstance(fn, str) else None
                call = (lambda: tower(pixel_values=pixels)) if pr is not None else fn
                try:
                    t0 = time.perf_counter()
                    call()
                    dt = time.perf_counter() - t0
                finally:
                    if pr is not None:
                        pr.unpatch()
                if rep >= warmup:
                    times[name].append(dt)
                if progress:
                    progress()
    med = {n: statistics.median(t) for n, t in times.items()}
    out = {"keep": keep, "repeats": repeats, "schedules": schedules, "rows": {}}
    for name, ts in times.items():
        r = {"median_s": med[name], "min_s": min(ts), "max_s": max(ts), "vs_plain": med[name] / med["plain"]}
        if name in methods:
            r["vs_oracle"] = med[name] / med[f"oracle[{name}]"]
        out["rows"][name] = r
    return out


def format_result(res: dict) -> str:
    lines = [f"CLIP ViT-L/14-336 tower, 1 image, keep {res['keep']}, median of {res['repeats']} [min-max]",
             f"  {'row':18s} {'time ms':>24s} {'vs plain':>9s} {'vs oracle':>10s}"]
    for name, r in res["rows"].items():
        rng = f"{r['median_s'] * 1e3:8.1f} [{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}]"
        vo = f"{r['vs_oracle']:.3f}x" if "vs_oracle" in r else ""
        lines.append(f"  {name:18s} {rng:>24s} {r['vs_plain']:>8.3f}x {vo:>10s}")
    for m, s in res["schedules"].items():
        lines.append(f"  schedule[{m}] (tokens entering layers 0..): {s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="flowcut,vtc-cls")
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention-gain", type=float, default=15.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        from tqdm import tqdm

        bar = tqdm(total=(args.warmup + args.repeats) * (2 * len(methods) + 2), file=sys.stderr, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    res = run(methods, args.keep, args.repeats, args.warmup, args.attention_gain, progress=bar.update if bar else None)
    if bar:
        bar.close()
    print(format_result(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
