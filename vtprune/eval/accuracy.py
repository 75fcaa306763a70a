"""Exact-match accuracy of vtprune's trained models on the `vtprune.scenes` test split, unpruned and pruned.

    python -m vtprune.eval.accuracy --variant llava15 --scenes 100 --out docs/trained/llava15
    python -m vtprune.eval.accuracy --variant llava_next --scenes 60 --out docs/trained/llava_next
    python -m vtprune.eval.accuracy --variant llava15 --no-sweep          # the accuracy table only

One question per type per test scene (`scenes.eval_questions`), answered by batched greedy
generation; an answer is correct when `scenes.normalize(answer) == expected`. Reported per question
type beside two baselines:

- `majority`: the most frequent answer of each type on the training split (what a model that ignores
  the image and knows only the answer prior could get at best without the question's words);
- `blank image`: the same model with every image replaced by a plain grey one of the same size.

The sweep runs every registered method that supports the model's family at `--keep` visual tokens
(LLaVA-NeXT: `keep_ratio = keep / 576`, the same fraction of each image's own tokens), plus
`random` and `pool`, each through `vtprune.patch(model, name, keep=k)` / `pruner.unpatch()`.
`atp` has no budget knob (its counts are chosen per image); it runs once with its defaults and its
realized token count is reported. Output: `accuracy.csv` / `accuracy.md` (unpruned + baselines)
and `sweep.csv` / `sweep.md` (method x budget, per type; realized visual tokens entering the LLM and their mean over the
decoder layers, the figure that compares in-LLM methods with the others).
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
import time

import torch

from .. import scenes as S

KEEPS = (16, 32, 64, 128)


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    except Exception:  # pragma: no cover - tqdm is a transformers dependency

        class _P:
            def update(self, n):
                pass

            def close(self):
                pass

        return _P()


def test_set(variant: str, n_scenes: int, seed: int = 0):
    """(scenes, [(scene index, question)]) of the test split."""
    sc = S.scenes("test", n_scenes, variant, seed=seed)
    return sc, S.eval_questions(sc)


def predict(model, processor, images, questions, batch_size: int = 16, max_new_tokens: int = 3, desc: str = "", pruner_stats=None):
    """Greedy answers (decoded new tokens) for parallel lists of PIL images and question strings."""
    from ..testing import make_inputs

    out = []
    bar = _progress(len(questions), desc)
    tok = processor.tokenizer
    for i in range(0, len(questions), batch_size):
        imgs, qs = images[i : i + batch_size], questions[i : i + batch_size]
        inputs = make_inputs(processor, list(imgs), list(qs))
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = seq[:, inputs["input_ids"].shape[1] :]
        out.extend(tok.batch_decode(new, skip_special_tokens=True))
        if pruner_stats is not None:
            pruner_stats()
        bar.update(len(qs))
    bar.close()
    return out


def per_type(preds, items) -> dict[str, float]:
    hits = collections.defaultdict(list)
    for p, (_, q) in zip(preds, items):
        ok = S.normalize(p) == q.answer
        hits[q.type].append(ok)
        hits["overall"].append(ok)
    return {t: 100.0 * sum(v) / len(v) for t, v in hits.items()}


def presence_split(preds, items, sc) -> list[dict]:
    """Presence accuracy split by case: "yes", "no" whose colour and kind are both in the scene (on
    different objects: the colour-shape conjunction a model that does not bind them gets wrong;
    `vtprune.trained.train.conjunction`), and the other "no" questions."""
    from ..trained.train import conjunction

    hits = collections.defaultdict(list)
    for p, (i, q) in zip(preds, items):
        if q.type != "presence":
            continue
        case = "yes" if q.answer == "yes" else ("no, colour and kind present" if conjunction(sc[i], q) else "no, other")
        hits[case].append(S.normalize(p) == q.answer)
    cases = [c for c in ("yes", "no, colour and kind present", "no, other") if c in hits]
    return [{"presence case": c, "questions": len(hits[c]), "right": sum(hits[c]), "model": 100.0 * sum(hits[c]) / len(hits[c])} for c in cases]


def majority_answers(variant: str, n_train: int = 400, seed: int = 0) -> dict[str, str]:
    """Most frequent answer of each question type on training scenes (same question sampler)."""
    sc = S.scenes("train", n_train, variant, seed=seed)
    counts = collections.defaultdict(collections.Counter)
    for _, q in S.eval_questions(sc):
        counts[q.type][q.answer] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def _blank(img):
    from PIL import Image

    return Image.new("RGB", img.size, (128, 128, 128))


def _fmt_table(rows, cols) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _write(out_dir, name, rows, cols):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: (round(r[c], 2) if isinstance(r[c], float) else r[c]) for c in cols})
    md = _fmt_table(rows, cols)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(md + "\n")
    return md


def accuracy_table(model, processor, variant, items, sc, batch_size=16, blank_baseline=True):
    types = list(S.QUESTION_TYPES) + ["overall"]
    images = [sc[i].render() for i, _ in items]
    qtext = [q.text for _, q in items]
    t0 = time.time()
    preds = predict(model, processor, images, qtext, batch_size, desc="unpruned")
    secs = time.time() - t0
    acc = per_type(preds, items)
    blank = collections.defaultdict(str)  # "" = not measured (--no-blank)
    if blank_baseline:
        blank.update(per_type(predict(model, processor, [_blank(im) for im in images], qtext, batch_size, desc="blank image"), items))
    maj = majority_answers(variant)
    maj_acc = per_type([maj[q.type] for _, q in items], items)
    n = collections.Counter(q.type for _, q in items)
    n["overall"] = len(items)
    rows = [
        {"type": t, "questions": n[t], "model": acc[t], "majority": maj_acc[t], "blank image": blank[t], "majority answer": maj.get(t, "")}
        for t in types
    ]
    return rows, preds, images, secs


def sweep(model, processor, variant, items, images, keeps=KEEPS, methods=None, batch_size=16):
    import vtprune

    family = "llava_next" if variant == "llava_next" else "llava"
    listing = [m for m in vtprune.methods() if family in m.families and m.name != "none"]
    names = [m.name for m in listing if methods is None or m.name in methods]
    qtext = [q.text for _, q in items]
    rows = []
    combos = []
    for name in names:
        if name == "atp":
            combos.append((name, None))
        else:
            combos.extend((name, k) for k in keeps)
    for name, k in combos:
        params = {}
        if k is not None:
            params = {"keep_ratio": k / 576} if variant == "llava_next" else {"keep": k}
        pruner = vtprune.patch(model, name, **params)
        realized, entering = [], []

        def stat():
            realized.extend(pruner.last.mean_tokens)
            entering.extend(pruner.last.num_visual_tokens)

        try:
            t0 = time.time()
            preds = predict(model, processor, images, qtext, batch_size, desc=f"{name} {k}", pruner_stats=stat)
            secs = time.time() - t0
        finally:
            pruner.unpatch()
        acc = per_type(preds, items)
        row = {
            "method": name,
            "keep": k if k is not None else "auto",
            "entering LLM": sum(entering) / max(1, len(entering)),
            "mean visual tokens": sum(realized) / max(1, len(realized)),
            "seconds": secs,
        }
        row.update(acc)
        rows.append(row)
        print(f"{name:10s} keep {row['keep']!s:5s} tokens {row['mean visual tokens']:7.1f} overall {acc['overall']:5.1f} ({secs:.0f}s)", file=sys.stderr, flush=True)
    return rows


def _unpruned_tokens(model, processor, image) -> int:
    from ..testing import make_inputs

    ids = make_inputs(processor, [image], ["?"])["input_ids"]
    return int((ids == model.config.image_token_id).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["llava15", "llava_next"], default="llava15")
    ap.add_argument("--model-dir", default=None, help="a `python -m vtprune.trained.train --out` folder (default: the weights installed in vtprune.trained)")
    ap.add_argument("--scenes", type=int, default=100, help="test scenes (one question per type each)")
    ap.add_argument("--sweep-scenes", type=int, default=None, help="run the sweep on the first N test scenes only (default: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--keep", default=",".join(map(str, KEEPS)), help="budgets (visual tokens of a 576-token image)")
    ap.add_argument("--methods", default=None, help="comma list (default: every method supporting the family)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-blank", action="store_true", help="skip the blank-image baseline (a second pass over every question; its column stays empty)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for accuracy.{csv,md}, presence.{csv,md} and sweep.{csv,md}")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..trained import load

    model, processor = load(args.variant, directory=args.model_dir)
    sc, items = test_set(args.variant, args.scenes)
    rows, preds, images, secs = accuracy_table(model, processor, args.variant, items, sc, args.batch_size, not args.no_blank)
    cols = ["type", "questions", "model", "majority", "blank image", "majority answer"]
    out = args.out
    md = _write(out, "accuracy", rows, cols) if out else _fmt_table(rows, cols)
    print(f"## {args.variant}: unpruned exact-match accuracy (%), test split, {len(items)} questions ({secs:.0f}s)\n")
    print(md)
    prows = presence_split(preds, items, sc)
    pcols = ["presence case", "questions", "right", "model"]
    print("\n### presence questions by case\n")
    print(_write(out, "presence", prows, pcols) if out else _fmt_table(prows, pcols))
    if not args.no_sweep:
        methods = set(args.methods.split(",")) if args.methods else None
        keeps = tuple(int(k) for k in args.keep.split(","))
        sitems, simages = items, images
        if args.sweep_scenes is not None:
            pick = [j for j, (i, _) in enumerate(items) if i < args.sweep_scenes]
            sitems, simages = [items[j] for j in pick], [images[j] for j in pick]
            base_acc = per_type([preds[j] for j in pick], sitems)
            rows = [dict(r, model=base_acc[r["type"]]) for r in rows]
        srows = sweep(model, processor, args.variant, sitems, simages, keeps, methods, args.batch_size)
        scols = ["method", "keep", "entering LLM", "mean visual tokens"] + list(S.QUESTION_TYPES) + ["overall", "seconds"]
        full = sum(_unpruned_tokens(model, processor, im) for im in images[:1])
        base = {"method": "none (unpruned)", "keep": "all", "entering LLM": float(full), "mean visual tokens": float(full), "seconds": secs}
        base.update({r["type"]: r["model"] for r in rows})
        smd = _write(out, "sweep", [base] + srows, scols) if out else _fmt_table([base] + srows, scols)
        print(f"\n## {args.variant}: pruning sweep, exact-match accuracy (%), {len(sitems)} questions\n")
        print(smd)


if __name__ == "__main__":
    main()
