"""`vtprune compare`: one image, one question, several methods side by side with the unpruned model.

For each row: the answer (greedy), visual tokens that reached the LLM (of the unpruned count), and
the prefill time (vision tower + selection + LLM prefill: one `model(**inputs)` forward with the
cache on, median of `repeats` after a warm-up, rows interleaved so drift hits every row alike).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from .. import api


@dataclass
class Row:
    method: str
    answer: str
    visual_tokens: int
    available: int
    prefill_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def build_inputs(processor, image, question: str):
    content = [{"type": "image"}, {"type": "text", "text": question}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        text = f"USER: <image>\n{question} ASSISTANT:"
    return processor(images=image, text=text, return_tensors="pt")


def _to(inputs, device, dtype):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def compare(model, processor, image, question: str, methods, keep=None, keep_ratio=None, max_new_tokens: int = 32, repeats: int = 3, progress=None):
    """Rows for the unpruned (unpatched) model and each method, in that order."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = _to(build_inputs(processor, image, question), device, dtype)
    T = inputs["input_ids"].shape[1]
    names = ["none"] + [m for m in methods if m != "none"]
    budget = {} if keep is None and keep_ratio is None else ({"keep": keep} if keep is not None else {"keep_ratio": keep_ratio})
    rows: dict[str, Row] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    tok = getattr(processor, "tokenizer", processor)
    available = int((inputs["input_ids"] == model.config.image_token_id).sum())
    for rep in range(repeats + 1):  # the first pass is the warm-up (and produces the answers)
        for name in names:
            # the unpruned row is the plain, unpatched model
            scope = contextlib.nullcontext() if name == "none" else api.pruned(model, name, **budget)
            with scope as pr, torch.no_grad():
                _sync(device)
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                _sync(device)
                dt = time.perf_counter() - t0
                if rep == 0:
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                    answer = tok.decode(out[0, T:], skip_special_tokens=True).strip()
                    kept = available if pr is None else pr.last.num_visual_tokens[0]
                    rows[name] = Row("unpruned" if name == "none" else name, answer, kept, available, 0.0)
                else:
                    times[name].append(dt)
            if progress is not None:
                progress()
    for name in names:
        rows[name].prefill_s = statistics.median(times[name]) if times[name] else float("nan")
    return [rows[n] for n in names]


def format_table(rows: list[Row], width: int = 48) -> str:
    base = next((r.prefill_s for r in rows if r.method == "unpruned"), None)
    head = f"{'method':10s} {'visual tokens':>15s} {'prefill':>10s} {'speedup':>8s}  answer"
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = f"{base / r.prefill_s:.2f}x" if base and r.prefill_s == r.prefill_s and r.prefill_s > 0 else "-"
        ans = r.answer.replace("\n", " ")
        if len(ans) > width:
            ans = ans[: width - 1] + "…"
        lines.append(f"{r.method:10s} {f'{r.visual_tokens}/{r.available}':>15s} {r.prefill_s * 1000:>8.1f}ms {sp:>8s}  {ans}")
    return "\n".join(lines)
