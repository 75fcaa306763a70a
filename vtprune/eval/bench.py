"""`vtprune bench`: efficiency you can check — prefill, decode, memory, KV cache, FLOPs and scoring
overhead of every method, side by side with fair references, measured in one run.

For a model (a built-in random-weight shape or a real checkpoint) and a grid of methods x budgets,
every row is measured in the same run, interleaved repeat by repeat so that drift (thermal, other
processes on a shared machine) hits every row alike:

- `unpruned`: the stock, unpatched model (all visual tokens; transformers runs the whole tower);
- `<method>`: the model patched with the method at the budget;
- `oracle`: the same per-layer token schedule as the method — the same counts entering every
  vision-tower layer and every decoder layer, the same visual tokens, the same KV cache — replayed
  with fixed indices and no scoring at all (`ReplayOracle`). `method / oracle` is the cost of
  scoring; `unpruned / method` is the speedup.

Per row: vision-tower time, prefill time (time to first token: one forward with the cache on and
`logits_to_keep=1`, as generate's first step), decode time per token (greedy, the cache of that
prefill), peak memory (on CPU each row in its own fresh subprocess: the peak RSS above the level
with the model loaded, the kernel's peak reset first; on GPU CUDA's max-allocated above the level
before the row, the allocator's peak reset first), KV-cache bytes after the prefill (read from the
real cache, and computed), visual tokens entering each decoder layer, tokens entering each tower
layer, and analytic FLOPs (`vtprune.eval.flops`, with the field's usual formula beside it). Every
row first runs once untimed (recording its schedule, which also warms it up); each time is then
the median of `--repeats` rounds after `--warmup` more, with min-max; ratios are medians of the
per-round ratios (the rows of a round ran back to back). CUDA events time the GPU. On a shared
CPU, `--clock cpu --threads 1` times process CPU time, which other load disturbs far less.

A second table times the vision tower alone: the tower as LLaVA calls it (SDPA), vtprune's tower
with the CLS-row hooks of each method that reads CLS attention, the plain tower run to the same
depth, and the eager tower with `output_attentions=True` (what the reference implementations do).

    vtprune bench --shapes llava-0.5b --methods vtc-cls,flowcut,random --keep 64 --out bench-out

Outputs: a table on the terminal, `bench.json`, `bench.csv` and (with matplotlib, `pip install
'vtprune[plot]'`) `bench.png` in `--out`. Random weights give meaningless answers but real shapes,
so times, memory and FLOPs are real; a method's token schedule can depend on the weights (FlowCut's
adaptive drop counts), which is why every oracle replays the schedule its method actually ran.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import VTPruneError
from ..methods.base import Method, Selection
from ..patches.decoder import LLMStage
from . import flops as F

DEFAULT_KEEP = {"llava": (192, 128, 64), "llava_next": (640, 320, 160)}
NEXT_IMAGE = (672, 672)  # LLaVA-NeXT at a fixed 2x2 grid (2928 visual tokens with newlines)
QUESTION = "What is the colour of the circle on the left?"
SAMPLE_KEYS = ("prefill", "prefill_cpu", "vision", "vision_cpu", "decode", "decode_cpu")
OVERHEAD_LIMITS = {"single": 0.05, "multi": 0.10}  # single-shot methods; in-tower / in-LLM stages
TOWER_LIMIT = 1.05
SPEEDUP_SHARE = 0.90


# --- recording what enters each layer -----------------------------------------------------------------
def _first(args, kwargs, name):
    if args:
        return args[0]
    return kwargs.get(name)


def _parts(model):
    base = model.model
    tower = base.vision_tower
    enc = getattr(tower, "vision_model", tower)
    return enc, base.multi_modal_projector, base.language_model


class Recorder:
    """Forward pre-hooks that record, during one prefill, the tokens entering each vision layer,
    the tiles through the patch embedding, the projector's rows and the tokens entering each
    decoder layer. Use as a context manager around one forward call."""

    def __init__(self, model):
        self.enc, self.proj, self.lm = _parts(model)
        self.handles = []

    def __enter__(self):
        vl, ll = self.enc.encoder.layers, self.lm.layers
        self.vision = [[] for _ in vl]
        self.tiles = 0
        self.rows: list[int] = []
        self.llm: list[int | None] = [None] * len(ll)
        for i, layer in enumerate(vl):
            self.handles.append(layer.register_forward_pre_hook(self._vision(i), with_kwargs=True))
        self.handles.append(self.enc.embeddings.register_forward_pre_hook(self._embed, with_kwargs=True))
        self.handles.append(self.proj.register_forward_pre_hook(self._proj, with_kwargs=True))
        for j, layer in enumerate(ll):
            self.handles.append(layer.register_forward_pre_hook(self._llm(j), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _vision(self, i):
        def hook(module, args, kwargs):
            x = _first(args, kwargs, "hidden_states")
            self.vision[i].append((int(x.shape[0]), int(x.shape[1])))

        return hook

    def _embed(self, module, args, kwargs):
        self.tiles += int(_first(args, kwargs, "pixel_values").shape[0])

    def _proj(self, module, args, kwargs):
        x = _first(args, kwargs, "image_features")
        self.rows.append(int(x.shape[:-1].numel()))

    def _llm(self, j):
        def hook(module, args, kwargs):
            if self.llm[j] is None:
                self.llm[j] = int(_first(args, kwargs, "hidden_states").shape[1])

        return hook

    def schedule(self, report=None, available: int | None = None, evict=()) -> F.Schedule:
        llm = [n or 0 for n in self.llm]
        if report is not None and report.tokens_per_layer:
            visual = list(report.tokens_per_layer[0])
            stages = [(int(s.layer), visual[s.layer]) for s in (report.stages[0] if report.stages else [])]
        else:
            visual, stages = [available or 0] * len(llm), []
        kv = [llm[-1] if j in set(evict) else n for j, n in enumerate(llm)]
        return F.Schedule(vision=[list(r) for r in self.vision], tiles=self.tiles, projector_rows=list(self.rows), llm=llm, visual=visual, stages=stages, kv=kv)


class TowerTimer:
    """Times the vision tower inside a prefill: from the patch embedding to the end of the last
    encoder layer that ran (CUDA events on GPU)."""

    def __init__(self, model, device):
        enc, _, _ = _parts(model)
        self.cuda = device.type == "cuda"
        self.handles = [enc.embeddings.register_forward_pre_hook(self._start)]
        for layer in enc.encoder.layers:
            self.handles.append(layer.register_forward_hook(self._end))
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e1 = torch.cuda.Event(enable_timing=True)
        self.reset()

    def reset(self):
        self.started = False
        self.t0 = self.t1 = None

    def _start(self, module, args):
        if self.started:
            return
        self.started = True
        if self.cuda:
            self.e0.record()
        else:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def _end(self, module, args, output):
        if self.cuda:
            self.e1.record()
        else:
            self.t1, self.c1 = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float | None, float | None]:
        """(wall seconds, process CPU seconds; None on GPU) of the last tower run."""
        if not self.started:
            return None, None
        if self.cuda:
            self.e1.synchronize()
            return self.e0.elapsed_time(self.e1) / 1e3, None
        return (None, None) if self.t1 is None else (self.t1 - self.t0, self.c1 - self.c0)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# --- the oracle -------------------------------------------------------------------------------------------
class _FixedCut(LLMStage):
    def __init__(self, layer: int, keep: list[int]):
        self.layer = layer
        self.keep = torch.tensor(keep, dtype=torch.long)

    def select(self, ctx):
        return [self.keep for _ in ctx.images]


@dataclass
class ReplayOracle(Method):
    """Replays a recorded token schedule with fixed indices and no scoring (the bench's reference).

    `plan` (JSON-able, see `plan_oracle`): the tower cuts (after which layer, which rows of each
    tile continue), the kept patches per partition and the newline policy (or explicit slots) of
    the packed image, the in-LLM cuts (after which decoder layer, which visual tokens continue),
    the decoder layers whose cache keeps only the final survivors, the tower depth and the position
    mode. Patch it with `patch_oracle`, which also removes the capture hooks vtprune installs for
    the tower stage (the oracle reads no signal)."""

    plan: dict | None = None

    name: ClassVar[str] = "oracle"
    summary: ClassVar[str] = "replays a recorded token schedule with fixed indices and no scoring (bench reference)"
    has_official: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        plan = self.plan or {}
        self._cuts = {int(l): (torch.tensor(c["positions"], dtype=torch.long), [torch.tensor(i, dtype=torch.long) for i in c["ids"]]) for l, c in plan.get("vision_cuts", {}).items()}
        self._order = sorted(self._cuts)
        self._dev = {}

    def cls_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        depth = int((self.plan or {}).get("depth", 0))
        return [depth - 1] if depth > feature_layer + 1 else []  # only to run the tower that deep

    def vision_stage_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        return list(self._order)

    def vision_prunes(self, geometry, budget: int) -> bool:
        return bool(self._cuts)

    def vision_begin(self, geometries, budgets, tiles_per_image, feature_layer: int, num_layers: int):
        return {}

    def vision_step(self, state, layer: int, hidden: torch.Tensor, qkv: dict, attn) -> torch.Tensor:
        if layer not in self._cuts:
            return hidden
        key = (layer, hidden.device)
        if key not in self._dev:
            self._dev[key] = self._cuts[layer][0].to(hidden.device)
        pos = self._dev[key]
        patches = torch.gather(hidden[:, 1:], 1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        return torch.cat([hidden[:, :1], patches], dim=1)

    def vision_kept(self, state) -> list[torch.Tensor]:
        return [i.clone() for i in self._cuts[self._order[-1]][1]]

    def select(self, image) -> Selection:
        plan = self.plan or {}
        if plan.get("slots") is not None:
            return Selection(kept=[torch.tensor(k, dtype=torch.long) for k in plan["kept"]], slots=torch.tensor(plan["slots"], dtype=torch.long))
        return Selection(kept=[torch.tensor(k, dtype=torch.long) for k in plan["kept"]], newline=plan.get("newline", "none"))

    def llm_stages(self, family: str, num_layers: int) -> list:
        return [_FixedCut(int(l), keep) for l, keep in (self.plan or {}).get("llm_cuts", [])]

    def llm_evict_layers(self, family: str, num_layers: int) -> list[int]:
        return [int(j) for j in (self.plan or {}).get("evict", [])]


def plan_oracle(method: Method, report, sched: F.Schedule, geometry, family: str, num_llm_layers: int) -> dict:
    """The plan of the oracle for one recorded run of `method` on one image (see `ReplayOracle`)."""
    from ..patches import anyres

    kept = [k.to(torch.long).cpu() for k in report.kept[0]]
    target = int(report.num_visual_tokens[0])
    P = geometry.patches
    counts = sched.vision_counts()
    depth = max((i + 1 for i, c in enumerate(counts) if c), default=0)
    tiles = sched.vision[0][-1][0] if sched.vision and sched.vision[0] else 1
    # tower cuts: after layer i when fewer tokens enter layer i+1; a cut after the last layer run
    # shows in the projector's first call
    targets = {i: counts[i + 1] for i in range(depth - 1) if counts[i + 1] < counts[i]}
    if depth and sched.projector_rows:
        last = sched.projector_rows[0] // max(tiles, 1) + 1
        if last < counts[depth - 1]:
            targets[depth - 1] = last
    cuts = {}
    cur = [list(range(P)) for _ in range(tiles)]
    for layer in sorted(targets):
        m = targets[layer] - 1
        positions, ids = [], []
        for t in range(tiles):
            must = kept[t].tolist() if t < len(kept) else []
            if len(must) > m:
                raise VTPruneError(f"oracle: tile {t} keeps {len(must)} patches but only {m} pass layer {layer}")
            must_set = set(must)
            have = set(cur[t])
            missing = must_set - have
            if missing:
                raise VTPruneError(f"oracle: kept patches {sorted(missing)[:5]} of tile {t} did not survive the tower")
            filler = [i for i in cur[t] if i not in must_set][: m - len(must)]
            new = sorted(must_set | set(filler))
            where = {p: r for r, p in enumerate(cur[t])}
            positions.append([where[p] for p in new])
            ids.append(new)
            cur[t] = new
        cuts[str(layer)] = {"positions": positions, "ids": ids}
    plan = {
        "method": method.name,
        "keep": target,
        "available": int(report.available[0]),
        "depth": depth,
        "vision_cuts": cuts,
        "kept": [k.tolist() for k in kept],
        "newline": None,
        "slots": None,
        "llm_cuts": [],
        "evict": [int(j) for j in method.llm_evict_layers(family, num_llm_layers)],
        "position_mode": method.policy("position_mode"),
    }
    for policy in ("none", "kept-rows", "all-rows"):
        if len(anyres.layout(geometry, kept, policy)) == target:
            plan["newline"] = policy
            break
    else:
        base = anyres.layout(geometry, kept, "none").slots.tolist()
        if len(base) > target:
            raise VTPruneError(f"oracle: cannot pack {len(base)} kept patches into {target} visual tokens")
        plan["slots"] = base + [anyres.NEWLINE] * (target - len(base))
    prev = None
    for st in report.stages[0] if report.stages else []:
        surv = st.surviving.to(torch.long).cpu()
        rel = surv if prev is None else torch.searchsorted(prev, surv)
        plan["llm_cuts"].append([int(st.layer), rel.tolist()])
        prev = surv
    return plan


def patch_oracle(model, plan: dict):
    """Patch `model` with the oracle of `plan`; returns the pruner (unpatch() as usual)."""
    from .. import api

    keep = max(1, int(plan["keep"]))
    pr = api.patch(model, ReplayOracle(keep=keep, plan=plan, position_mode=plan.get("position_mode")))
    cap = getattr(pr, "_capture", None)
    if cap is not None:  # the oracle reads no signal: keep the tower depth, drop the projection hooks
        cap.remove()
    return pr


def patch_row(model, spec: dict | None):
    """Patch `model` for a row spec: None (unpruned), {"method", "params"} or {"oracle": plan}."""
    from .. import api

    if spec is None:
        return None
    if "oracle" in spec:
        return patch_oracle(model, spec["oracle"])
    return api.patch(model, spec["method"], **spec.get("params", {}))


# --- timing ------------------------------------------------------------------------------------------------
class Clock:
    """Wall time and process CPU time on CPU; CUDA events on GPU. `stop()` -> (wall, cpu or None).

    Process CPU time (all threads of this process) is what a shared machine's other load disturbs
    least; with one torch thread it is the compute time of the row (`--clock cpu`)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e1 = torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.e0.record()
        else:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float | None]:
        if self.cuda:
            self.e1.record()
            self.e1.synchronize()
            return self.e0.elapsed_time(self.e1) / 1e3, None
        return time.perf_counter() - self.t0, time.process_time() - self.c0


def run_sample(model, inputs, decode_tokens: int, clock: Clock | None = None, timer: TowerTimer | None = None) -> dict:
    """One prefill (+ `decode_tokens` greedy decode steps on its cache); times if a clock is given."""
    out = {}
    with torch.no_grad():
        if timer is not None:
            timer.reset()
        if clock:
            clock.start()
        res = model(**inputs, use_cache=True, logits_to_keep=1)
        if clock:
            out["prefill"], out["prefill_cpu"] = clock.stop()
        if timer is not None:
            out["vision"], out["vision_cpu"] = timer.elapsed()
        cache = res.cache
        tok = res.logits[:, -1:].argmax(-1)
        del res
        if decode_tokens:
            if clock:
                clock.start()
            for _ in range(decode_tokens):
                step = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
                tok = step.logits[:, -1:].argmax(-1)
                del step
            if clock:
                wall, cpu = clock.stop()
                out["decode"] = wall / decode_tokens
                out["decode_cpu"] = None if cpu is None else cpu / decode_tokens
        del cache
    return out


# --- memory ------------------------------------------------------------------------------------------------
def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_peak_delta(fn) -> int | None:
    """Peak resident memory above the current level while `fn()` runs (Linux: the kernel's peak
    is reset first through /proc/self/clear_refs; else a 1 ms sampler). None off Linux."""
    if not os.path.exists("/proc/self/status"):
        return None
    gc.collect()
    base = _status()["VmRSS"]
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return max(0, _status()["VmHWM"] - base)
    except OSError:
        pass
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status()["VmRSS"])
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(0, peak[0] - base)


def cuda_peak_delta(fn, device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def save_snapshot(model, inputs, path: str) -> None:
    """Everything a memory worker needs to rebuild the model without initialising it."""
    state = model.state_dict()
    buffers = {n: b for n, b in model.named_buffers() if n not in state}
    blob = {
        "cls": f"{type(model).__module__}:{type(model).__qualname__}",
        "config": model.config,
        "dtype": next(model.parameters()).dtype,
        "state": state,
        "buffers": buffers,
        "inputs": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()},
    }
    torch.save(blob, path)


def load_snapshot(path: str):
    import importlib

    from transformers.initialization import no_init_weights

    blob = torch.load(path, weights_only=False)
    mod, _, qual = blob["cls"].partition(":")
    cls = getattr(importlib.import_module(mod), qual)
    old = torch.get_default_dtype()
    torch.set_default_dtype(blob["dtype"])
    try:
        with no_init_weights():
            model = cls(blob["config"])
    finally:
        torch.set_default_dtype(old)
    model.load_state_dict(blob["state"], strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, b in blob["buffers"].items():
        cur = model.get_buffer(name)
        if cur.shape == b.shape and cur.dtype == b.dtype:
            cur.copy_(b)
        else:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = b
    model = model.to(blob["dtype"]).eval()
    inputs = blob["inputs"]
    del blob
    gc.collect()
    return model, inputs


def _memory_worker(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model, inputs = load_snapshot(spec["snapshot"])
    pr = patch_row(model, spec["row"])
    peak = cpu_peak_delta(lambda: run_sample(model, inputs, int(spec["decode_tokens"])))
    if pr is not None:
        pr.unpatch()
    print("VTPRUNE-MEMORY " + json.dumps({"peak_bytes": peak}), flush=True)
    return 0


def subprocess_peak(snapshot: str, row: dict | None, decode_tokens: int, threads: int, timeout: float = 1800) -> int | None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"snapshot": snapshot, "row": row, "decode_tokens": decode_tokens, "threads": threads}, f)
        spec = f.name
    try:
        proc = subprocess.run([sys.executable, "-m", "vtprune.eval.bench", "--memory-worker", spec], capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(spec)
    for line in proc.stdout.splitlines():
        if line.startswith("VTPRUNE-MEMORY "):
            return json.loads(line.split(" ", 1)[1])["peak_bytes"]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError("memory worker failed: " + " | ".join(tail))


# --- the grid ----------------------------------------------------------------------------------------------
def _stats(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _paired(a: list, b: list):
    r = [x / y for x, y in zip(a, b) if x is not None and y]
    return statistics.median(r) if r else None


def _kv_real(cache) -> tuple[list[int], int]:
    lens, total = [], 0
    for layer in getattr(cache, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or not isinstance(k, torch.Tensor) or k.dim() < 3:
            lens.append(0)
            continue
        lens.append(int(k.shape[-2]))
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return lens, total


def _probe(model, inputs, spec, available: int, n_layers: int, family: str, evict=()):
    """One untimed prefill of a row with the recorder on: (report, schedule, kv lengths, kv bytes)."""
    pr = patch_row(model, spec)
    try:
        with Recorder(model) as rec, torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        report = pr.last if pr is not None else None
        lens, total = _kv_real(out.cache)
        del out
        ev = pr.method.llm_evict_layers(family, n_layers) if pr is not None else ()
        return report, rec.schedule(report, available, ev), lens, total
    finally:
        if pr is not None:
            pr.unpatch()


def _count_flops(model, inputs, spec) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    pr = patch_row(model, spec)
    try:
        fc = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fc:
            model(**inputs, use_cache=True, logits_to_keep=1)
        return int(fc.get_total_flops())
    finally:
        if pr is not None:
            pr.unpatch()


def _method_grid(names, budgets):
    """(name, params, keep) per row: methods with a budget get one row per budget; the others
    (their own budget, e.g. atp) one row with their defaults."""
    from .. import registry

    for name in names:
        cls = registry.get(name)
        if cls.needs_budget:
            for k in budgets:
                yield cls.name, {"keep": int(k)}, int(k)
        else:
            yield cls.name, {}, None


def default_methods() -> list[str]:
    """Every registered method but `none` (the unpruned row is the unpatched model)."""
    from ..registry import methods

    return [m.name for m in methods() if m.name != "none"]


def make_inputs(proc, family: str, device, dtype, image=None, question: str = QUESTION):
    from ..testing import make_image
    from .compare import _to, build_inputs

    if image is None:
        image = make_image(0, size=NEXT_IMAGE if family == "llava_next" else (336, 336))
    return _to(build_inputs(proc, image, question), device, dtype)


def bench_model(
    model,
    proc,
    methods=None,
    budgets=None,
    *,
    repeats: int = 5,
    warmup: int = 1,
    decode_tokens: int = 8,
    memory: str = "auto",
    tower: bool = True,
    flop_counter: bool = False,
    clock: str = "wall",
    memory_rows: str = "all",
    image=None,
    question: str = QUESTION,
    label: str = "",
    progress=None,
    log=None,
) -> dict:
    """Benchmark one loaded model (see the module docstring); returns a JSON-able dict.

    `methods`: registered names (default: all but `none`); `budgets`: visual tokens per image
    (default per family: 192/128/64 for LLaVA-1.5, 640/320/160 for LLaVA-NeXT). `memory`: "auto"
    (a subprocess per row on CPU, the allocator's peak on GPU), "subprocess", "inprocess" or "off".
    `clock`: "wall" (default) or "cpu" (process CPU time; CPU only) for the times, ratios and targets.
    `memory_rows`: "all" rows, or "methods" (the unpruned row and the methods, not their oracles).
    `progress(total=n, desc=phase)` / `progress(k)` and `log(str)` are optional callbacks."""
    from .. import api
    from ..patches.llava import check_supported

    log = log or (lambda s: print(s, file=sys.stderr))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    family = check_supported(model)
    methods = default_methods() if methods is None else list(methods)
    budgets = list(budgets or DEFAULT_KEEP[family])
    inputs = make_inputs(proc, family, device, dtype, image, question)
    config = model.config
    dims = F.ModelDims.from_config(config)
    n_layers = dims.layers
    image_token = config.image_token_id
    available = int((inputs["input_ids"] == image_token).sum())
    text_tokens = int(inputs["input_ids"].shape[1]) - available
    adapter = api._adapter(model)
    geometry = adapter.split_pixels(inputs["pixel_values"], inputs.get("image_sizes"))[1][0]
    feature_layer = adapter.feature_layer()
    elsize = torch.tensor([], dtype=dtype).element_size()
    if memory == "auto":
        memory = "cuda" if device.type == "cuda" else "subprocess"
    if memory in ("inprocess", "subprocess") and device.type == "cuda":
        memory = "cuda"  # on a GPU the allocator's peak, reset before each row, isolates rows
    if clock not in ("wall", "cpu"):
        raise VTPruneError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if memory not in ("subprocess", "inprocess", "cuda", "off") or memory_rows not in ("all", "methods"):
        raise VTPruneError(f"memory must be auto/subprocess/inprocess/off and memory_rows all/methods, got {memory!r}, {memory_rows!r}")
    if clock == "cpu" and device.type == "cuda":
        clock = "wall"
    sfx = "_cpu" if clock == "cpu" else ""

    grid = list(_method_grid(methods, budgets))
    n_probe = 1 + 2 * len(grid)
    if progress:
        progress(total=n_probe, desc="probing rows")

    rows: list[dict] = []
    skipped: list[dict] = []

    def new_row(kind, method, keep, params, spec, report, sched, kv_lens, kv_total, scoring, multi=False):
        fl = F.prefill_flops(dims, sched, scoring)
        return {
            "kind": kind,
            "method": method,
            "keep": keep,
            "params": params,
            "spec": spec,
            "multi_stage": multi,
            "visual_tokens": sched.visual[0] if sched.visual else available,
            "mean_visual_tokens": sum(sched.visual) / len(sched.visual) if sched.visual else float(available),
            "tokens_per_layer": list(sched.visual),
            "llm_tokens_per_layer": list(sched.llm),
            "vision_tokens_per_layer": sched.vision_counts(),
            "vision_tiles": sched.tiles,
            "schedule": sched.as_dict(),
            "kv_lengths": kv_lens,
            "kv_bytes": kv_total,
            "kv_bytes_analytic": F.kv_bytes(dims, sched.kv, elsize),
            "flops": fl,
            "flops_field": F.field_flops(dims, sched.llm),
            "flops_decode": F.decode_flops(dims, sched.kv),
            "scoring_source": "analytic" if scoring is not None else None,
            "samples": {k: [] for k in SAMPLE_KEYS},
            "peak_bytes": None,
            "error": None,
        }

    # 1) probes: each row once, untimed, with the recorder (the method's schedule -> its oracle)
    _, sched0, kv0, kvb0 = _probe(model, inputs, None, available, n_layers, family)
    rows.append(new_row("unpruned", "unpruned", None, {}, None, None, sched0, kv0, kvb0, 0))
    if progress:
        progress()
    from .. import registry

    for name, params, keep in grid:
        spec = {"method": name, "params": params}
        try:
            m = registry.build(name, **params)
            m.check_model(family, 1)
        except VTPruneError as e:
            skipped.append({"method": name, "keep": keep, "reason": str(e).split(";")[0]})
            if progress:
                progress(2)
            continue
        try:
            report, sched, kv_lens, kv_total = _probe(model, inputs, spec, available, n_layers, family)
            pr_m = registry.build(name, **params)
            multi = bool(pr_m.vision_stage_layers(dims.v_layers, feature_layer)) or bool(pr_m.llm_stages(family, n_layers))
            scoring = F.scoring_flops(pr_m, config, sched, family)
            mrow = new_row("method", name, keep, params, spec, report, sched, kv_lens, kv_total, scoring, multi)
            if progress:
                progress()
            plan = plan_oracle(pr_m, report, sched, geometry, family, n_layers)
            ospec = {"oracle": plan}
            _, osched, okv, okvb = _probe(model, inputs, ospec, available, n_layers, family)
            orow = new_row("oracle", name, keep, params, ospec, None, osched, okv, okvb, 0, multi)
            ok = osched.vision_counts() == sched.vision_counts() and osched.llm == sched.llm and okv == kv_lens and osched.visual == sched.visual
            mrow["oracle_ok"] = orow["oracle_ok"] = ok
            if not ok:
                log(f"warning: the oracle of {name}@{keep} does not replay its schedule exactly")
            if scoring is None:  # no formula: measure it (flop counter, method minus its oracle)
                diff = _count_flops(model, inputs, spec) - _count_flops(model, inputs, ospec)
                mrow["flops"] = F.prefill_flops(dims, sched, max(0, diff))
                mrow["scoring_source"] = "flop_counter"
            if progress:
                progress()
        except Exception as e:  # a broken method must not take the whole bench down
            skipped.append({"method": name, "keep": keep, "reason": f"{type(e).__name__}: {e}"})
            log(f"warning: {name}@{keep} skipped: {type(e).__name__}: {e}")
            if progress:
                progress(2)
            continue
        rows += [mrow, orow]

    if flop_counter:
        for r in rows:
            r["flops_counted"] = _count_flops(model, inputs, r["spec"])

    # 2) timed rounds, interleaved; method/oracle order alternates between rounds
    clk = Clock(device)
    timer = TowerTimer(model, device)
    if progress:
        progress(total=(warmup + repeats) * len(rows), desc="timed rounds")
    try:
        for rnd in range(warmup + repeats):
            order, i = [], 0
            while i < len(rows):
                if rnd % 2 and rows[i]["kind"] == "method" and i + 1 < len(rows) and rows[i + 1]["kind"] == "oracle":
                    order += [i + 1, i]
                    i += 2
                else:
                    order.append(i)
                    i += 1
            for i in order:
                r = rows[i]
                if r["error"]:
                    if progress:
                        progress()
                    continue
                try:
                    pr = patch_row(model, r["spec"])
                    try:
                        s = run_sample(model, inputs, decode_tokens, clk, timer)
                    finally:
                        if pr is not None:
                            pr.unpatch()
                except Exception as e:
                    r["error"] = f"{type(e).__name__}: {e}"
                    log(f"warning: {r['method']}@{r['keep']} ({r['kind']}) failed: {r['error']}")
                else:
                    if rnd >= warmup:
                        for k in SAMPLE_KEYS:
                            r["samples"][k].append(s.get(k))
                if progress:
                    progress()
    finally:
        timer.remove()

    # 3) peak memory, one row at a time
    snapshot = None
    if memory != "off":
        if progress:
            progress(total=len(rows), desc=f"peak memory ({memory})")
        try:
            if memory == "subprocess":
                fd, snapshot = tempfile.mkstemp(suffix=".pt", prefix="vtprune-bench-")
                os.close(fd)
                save_snapshot(model, inputs, snapshot)
            for r in rows:
                if r["error"] or (memory_rows == "methods" and r["kind"] == "oracle"):
                    if progress:
                        progress()
                    continue
                try:
                    if memory == "subprocess":
                        r["peak_bytes"] = subprocess_peak(snapshot, r["spec"], decode_tokens, torch.get_num_threads())
                    else:
                        pr = patch_row(model, r["spec"])  # every row already ran in the timed rounds
                        try:
                            fn = lambda: run_sample(model, inputs, decode_tokens)  # noqa: E731
                            r["peak_bytes"] = cuda_peak_delta(fn, device) if memory == "cuda" else cpu_peak_delta(fn)
                        finally:
                            if pr is not None:
                                pr.unpatch()
                except Exception as e:
                    log(f"warning: memory of {r['method']}@{r['keep']} ({r['kind']}) not measured: {type(e).__name__}: {e}")
                if progress:
                    progress()
        finally:
            if snapshot and os.path.exists(snapshot):
                os.unlink(snapshot)

    # 4) summaries and ratios
    base = rows[0]
    for r in rows:
        r["prefill_s"] = _stats(r["samples"]["prefill" + sfx])
        r["vision_s"] = _stats(r["samples"]["vision" + sfx])
        r["decode_s_per_token"] = _stats(r["samples"]["decode" + sfx])
        r["speedup"] = _paired(base["samples"]["prefill" + sfx], r["samples"]["prefill" + sfx])
    pairs = {}
    for r in rows:
        if r["kind"] in ("method", "oracle"):
            pairs.setdefault((r["method"], r["keep"]), {})[r["kind"]] = r
    for pair in pairs.values():
        m, o = pair.get("method"), pair.get("oracle")
        if m and o:
            ratio = _paired(m["samples"]["prefill" + sfx], o["samples"]["prefill" + sfx])
            m["vs_oracle"] = ratio
            m["overhead"] = None if ratio is None else ratio - 1
            m["oracle_speedup"] = o["speedup"]
            m["decode_vs_oracle"] = _paired(m["samples"]["decode" + sfx], o["samples"]["decode" + sfx])
    for r in rows:
        spec = r.pop("spec", None)
        if r["kind"] == "oracle":
            r["plan"] = spec["oracle"]

    result = {
        "label": label,
        "family": family,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "image": "x".join(str(int(x)) for x in inputs["pixel_values"].shape[-2:][::-1]) if geometry.image_size is None else f"{geometry.image_size[1]}x{geometry.image_size[0]}",
        "available": available,
        "text_tokens": text_tokens,
        "budgets": budgets,
        "repeats": repeats,
        "warmup": warmup,
        "decode_tokens": decode_tokens,
        "memory": memory,
        "clock": clock,
        "dims": dataclasses.asdict(dims),
        "rows": rows,
        "skipped": skipped,
    }
    if tower:
        result["tower"] = bench_tower(model, inputs, methods, repeats, warmup, progress=progress, clock=clock)
    result["targets"] = check_targets(result)
    return result


# --- the tower alone ----------------------------------------------------------------------------------------
def bench_tower(model, inputs, methods, repeats: int = 5, warmup: int = 1, progress=None, clock: str = "wall") -> dict:
    """The vision tower alone: as LLaVA calls it (SDPA, every layer), vtprune's plain run to the
    depth a method needs, the same with that method's CLS-row hooks, and the eager tower with
    `output_attentions=True`."""
    from .. import api, registry
    from ..patches.clip import ClsCapture

    device = next(model.parameters()).device
    adapter = api._adapter(model)
    pixels = adapter.split_pixels(inputs["pixel_values"], inputs.get("image_sizes"))[0]
    tower = adapter.tower
    idxs = adapter.hidden_indices()
    f = adapter.feature_layer()
    nl = tower.num_layers
    hf = model.model.vision_tower
    vcfg = hf.config

    def hf_sdpa():
        hf(pixels, output_hidden_states=True)

    def hf_eager():
        old = vcfg._attn_implementation
        vcfg._attn_implementation = "eager"
        try:
            hf(pixels, output_hidden_states=True, output_attentions=True)
        finally:
            vcfg._attn_implementation = old

    fns = {"hf sdpa (as LLaVA calls it)": hf_sdpa, "hf eager + output_attentions": hf_eager}
    captures, plain_of = {}, {}
    for name in methods:
        try:
            cls = registry.get(name)
            m = registry.build(name, **({"keep": 64} if cls.needs_budget else {}))
            m.check_model(adapter.family, 1)
            layers = m.cls_layers(nl, f)
        except VTPruneError:
            continue
        if not layers:
            continue
        depth = max(max(idxs), max(layers) + 1)
        plain = f"vtprune tower, {depth} layers"
        if plain not in fns:
            fns[plain] = lambda d=depth: tower.run(pixels, idxs, run_until=d)
        cap = ClsCapture(tower, layers)
        captures[name] = cap

        def scored(cap=cap, d=depth):
            cap.reset()
            cap.active = True
            try:
                tower.run(pixels, idxs, run_until=d)
            finally:
                cap.active = False
            cap.collect()

        key = f"{plain} + CLS rows of {name} ({','.join(map(str, layers))})"
        fns[key] = scored
        plain_of[key] = (plain, name)
    clk = Clock(device)
    times = {k: [] for k in fns}
    if progress:
        progress(total=(warmup + repeats) * len(fns), desc="tower alone")
    try:
        with torch.no_grad():
            for rnd in range(warmup + repeats):
                for k, fn in fns.items():
                    clk.start()
                    fn()
                    wall, cpu = clk.stop()
                    if rnd >= warmup:
                        times[k].append(cpu if clock == "cpu" and cpu is not None else wall)
                    if progress:
                        progress()
    finally:
        for cap in captures.values():
            cap.remove()
    rows = {k: {**_stats(v), "samples": v} for k, v in times.items()}
    hf_key = "hf sdpa (as LLaVA calls it)"
    ratios = {"eager + output_attentions / sdpa": _paired(times["hf eager + output_attentions"], times[hf_key])}
    scored = {}
    for key, (plain, name) in plain_of.items():
        scored[name] = {"row": key, "vs_plain_same_depth": _paired(times[key], times[plain]), "vs_hf_sdpa": _paired(times[key], times[hf_key])}
    return {"tiles": int(pixels.shape[0]), "clock": clock, "rows": rows, "ratios": ratios, "scored": scored}


# --- targets ------------------------------------------------------------------------------------------------
def check_targets(result: dict) -> list[dict]:
    """The issue's targets for this shape, each with its measured value and whether it holds."""
    out = []
    rows = result["rows"]
    base = rows[0]
    for r in rows:
        if r["kind"] != "method" or r.get("overhead") is None:
            continue
        lim = OVERHEAD_LIMITS["multi" if r["multi_stage"] else "single"]
        out.append({"target": f"scoring overhead <= {lim:.0%} of the oracle's prefill", "method": r["method"], "keep": r["keep"], "value": r["overhead"], "ok": r["overhead"] <= lim})
        if result["family"] == "llava" and r["keep"] == 64 and r.get("oracle_speedup") and r.get("speedup"):
            share = r["speedup"] / r["oracle_speedup"]
            out.append({"target": f"speedup at 64 tokens >= {SPEEDUP_SHARE:.0%} of the oracle's", "method": r["method"], "keep": 64, "value": share, "ok": share >= SPEEDUP_SHARE})
    if base.get("peak_bytes"):  # None: not measured; 0: no growth seen (in-process RSS reusing freed memory)
        for r in rows:
            if r["kind"] == "method" and r.get("peak_bytes") is not None:
                out.append({"target": "peak memory <= the unpruned model's", "method": r["method"], "keep": r["keep"], "value": r["peak_bytes"] / max(base["peak_bytes"], 1), "ok": r["peak_bytes"] <= base["peak_bytes"]})
    tw = result.get("tower")
    if tw:
        for name, s in tw["scored"].items():
            if s["vs_plain_same_depth"] is not None:
                out.append({"target": f"CLS-scored tower <= {TOWER_LIMIT}x the plain SDPA tower", "method": name, "keep": None, "value": s["vs_plain_same_depth"], "ok": s["vs_plain_same_depth"] <= TOWER_LIMIT})
        e = tw["ratios"].get("eager + output_attentions / sdpa")
        if e is not None:
            out.append({"target": "reference: eager tower with output_attentions vs SDPA (about 2x expected)", "method": "eager", "keep": None, "value": e, "ok": None})
    return out


# --- output -------------------------------------------------------------------------------------------------
def _ms(s: dict | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median'] * 1e3:.1f} [{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}]"


def _x(v, fmt="{:.2f}x") -> str:
    return "-" if v is None else fmt.format(v)


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_result(res: dict) -> str:
    head = (
        f"{res['label']}: {res['family']}, {res['dtype']} on {res['device']}, image {res['image']}, {res['available']} visual + "
        f"{res['text_tokens']} text tokens; median [min-max] of {res['repeats']} after {res['warmup']} warm-up round(s); "
        f"decode = {res['decode_tokens']} greedy tokens; memory: {res['memory']}; clock: {res['clock']}"
    )
    cols = ["row", "keep", "vis L0", "vis mean", "tower ms", "prefill ms", "decode ms/tok", "peak MB", "KV MB", "GFLOPs", "field GF", "speedup", "vs oracle"]
    table = []
    for r in res["rows"]:
        name = r["method"] if r["kind"] != "oracle" else "  oracle"
        gfl = r["flops"]["total"] / 1e9
        table.append([
            name,
            "-" if r["keep"] is None else str(r["keep"]),
            str(r["visual_tokens"]),
            f"{r['mean_visual_tokens']:.1f}",
            "-" if r["vision_s"]["median"] is None else f"{r['vision_s']['median'] * 1e3:.1f}",
            _ms(r["prefill_s"]),
            "-" if r["decode_s_per_token"]["median"] is None else f"{r['decode_s_per_token']['median'] * 1e3:.1f}",
            _mb(r["peak_bytes"]),
            _mb(r["kv_bytes"]),
            f"{gfl:.1f}",
            f"{r['flops_field'] / 1e9:.1f}",
            _x(r.get("speedup")),
            _x(r.get("vs_oracle")) if r["kind"] == "method" else "",
        ])
        if r.get("error"):
            table[-1][5] = "failed"
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    lines = [head, "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    for t in table:
        lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(t, widths))))
    lines.append("  GFLOPs: vtprune's count (tower + projector + LLM + LM head + scoring); field GF: the field's sum over LLM layers of 4nd^2+2n^2d+2ndm")
    if res["memory"] == "inprocess":
        lines.append("  peak MB in-process on CPU: RSS growth only; memory freed by earlier rows is reused, so it understates (use --memory subprocess)")
    for s in res["skipped"]:
        lines.append(f"  skipped {s['method']}" + (f"@{s['keep']}" if s["keep"] is not None else "") + f": {s['reason']}")
    tw = res.get("tower")
    if tw:
        lines.append(f"  vision tower alone ({tw['tiles']} tile(s)), median [min-max] ms:")
        for k, s in tw["rows"].items():
            lines.append(f"    {k:58s} {_ms(s)}")
        for name, s in tw["scored"].items():
            lines.append(f"    CLS rows of {name}: {_x(s['vs_plain_same_depth'])} the plain tower of the same depth, {_x(s['vs_hf_sdpa'])} LLaVA's SDPA tower")
        lines.append(f"    eager + output_attentions: {_x(tw['ratios']['eager + output_attentions / sdpa'])} the SDPA tower")
    if res.get("targets"):
        lines.append("  targets:")
        for t in res["targets"]:
            who = t["method"] + (f"@{t['keep']}" if t.get("keep") is not None else "")
            mark = {True: "ok  ", False: "MISS", None: "info"}[t["ok"]]
            val = f"{t['value']:+.1%}" if "overhead" in t["target"] else f"{t['value']:.2f}"
            lines.append(f"    {mark} {who:18s} {t['target']}: {val}")
    return "\n".join(lines)


CSV_FIELDS = [
    "shape", "family", "dtype", "device", "method", "kind", "keep", "visual_tokens", "mean_visual_tokens",
    "vision_ms", "prefill_ms", "prefill_ms_min", "prefill_ms_max", "decode_ms_per_token", "decode_ms_min", "decode_ms_max",
    "peak_mb", "kv_mb", "kv_mb_analytic", "gflops", "gflops_vision", "gflops_projector", "gflops_llm", "gflops_lm_head",
    "gflops_scoring", "scoring_source", "gflops_field", "gflops_decode_token", "speedup", "oracle_speedup", "vs_oracle",
    "overhead_pct", "oracle_ok", "tokens_per_layer", "vision_tokens_per_layer", "error",
]


def csv_rows(results: list[dict]):
    def ms(s, k="median"):
        return None if not s or s.get(k) is None else round(s[k] * 1e3, 3)

    for res in results:
        for r in res["rows"]:
            fl = r["flops"]
            yield {
                "shape": res["label"], "family": res["family"], "dtype": res["dtype"], "device": res["device"],
                "method": r["method"], "kind": r["kind"], "keep": r["keep"], "visual_tokens": r["visual_tokens"],
                "mean_visual_tokens": round(r["mean_visual_tokens"], 2), "vision_ms": ms(r["vision_s"]),
                "prefill_ms": ms(r["prefill_s"]), "prefill_ms_min": ms(r["prefill_s"], "min"), "prefill_ms_max": ms(r["prefill_s"], "max"),
                "decode_ms_per_token": ms(r["decode_s_per_token"]), "decode_ms_min": ms(r["decode_s_per_token"], "min"),
                "decode_ms_max": ms(r["decode_s_per_token"], "max"),
                "peak_mb": None if r["peak_bytes"] is None else round(r["peak_bytes"] / 2**20, 2),
                "kv_mb": round(r["kv_bytes"] / 2**20, 3), "kv_mb_analytic": round(r["kv_bytes_analytic"] / 2**20, 3),
                "gflops": round(fl["total"] / 1e9, 3), "gflops_vision": round(fl["vision"] / 1e9, 3),
                "gflops_projector": round(fl["projector"] / 1e9, 3), "gflops_llm": round(fl["llm"] / 1e9, 3),
                "gflops_lm_head": round(fl["lm_head"] / 1e9, 3),
                "gflops_scoring": None if fl["scoring"] is None else round(fl["scoring"] / 1e9, 6),
                "scoring_source": r.get("scoring_source"), "gflops_field": round(r["flops_field"] / 1e9, 3),
                "gflops_decode_token": round(r["flops_decode"] / 1e9, 4),
                "speedup": r.get("speedup"), "oracle_speedup": r.get("oracle_speedup"), "vs_oracle": r.get("vs_oracle"),
                "overhead_pct": None if r.get("overhead") is None else round(100 * r["overhead"], 2),
                "oracle_ok": r.get("oracle_ok"), "tokens_per_layer": ";".join(map(str, r["tokens_per_layer"])),
                "vision_tokens_per_layer": ";".join(map(str, r["vision_tokens_per_layer"])), "error": r.get("error"),
            }


def write_csv(results: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in csv_rows(results):
            w.writerow(row)


PLOT_HINT = "plot skipped: matplotlib is not installed (pip install 'vtprune[plot]')"


def write_plot(results: list[dict], path: str) -> str | None:
    """Speedup and scoring overhead vs kept tokens, one line per method, one column per shape.
    Returns None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_HINT
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 7), squeeze=False)
    for c, res in enumerate(results):
        ax_s, ax_o = axes[0][c], axes[1][c]
        by = {}
        for r in res["rows"]:
            if r["kind"] == "method" and r.get("speedup") is not None:
                x = r["keep"] if r["keep"] is not None else r["mean_visual_tokens"]
                by.setdefault(r["method"], []).append((x, r["speedup"], r.get("oracle_speedup"), r.get("overhead")))
        for i, (name, pts) in enumerate(sorted(by.items())):
            pts.sort()
            colour = f"C{i % 10}"
            xs = [p[0] for p in pts]
            ax_s.plot(xs, [p[1] for p in pts], "o-", color=colour, label=name)
            if all(p[2] is not None for p in pts):
                ax_s.plot(xs, [p[2] for p in pts], "x:", color=colour, alpha=0.6)
            ov = [(p[0], 100 * p[3]) for p in pts if p[3] is not None]
            if ov:
                ax_o.plot([p[0] for p in ov], [p[1] for p in ov], "o-", color=colour, label=name)
        ax_s.axhline(1.0, color="grey", lw=0.8)
        for lim, style in ((5, "--"), (10, ":")):
            ax_o.axhline(lim, color="grey", lw=0.8, ls=style)
        ax_o.axhline(0, color="black", lw=0.5)
        ax_s.set_title(f"{res['label']} ({res['dtype']}, {res['device']})", fontsize=9)
        ax_s.set_ylabel("prefill speedup vs unpruned (dotted: oracle)")
        ax_o.set_ylabel("scoring overhead vs oracle (%)")
        ax_o.set_xlabel("kept visual tokens per image")
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def machine_info(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu" not in info:
                    info["cpu"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and "cpu_flags" not in info:
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()
    return info


def write_outputs(results: list[dict], meta: dict, out_dir: str, plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json"), "csv": os.path.join(out_dir, "bench.csv")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    write_csv(results, paths["csv"])
    if plot:
        why = write_plot(results, os.path.join(out_dir, "bench.png"))
        if why is None:
            paths["plot"] = os.path.join(out_dir, "bench.png")
        else:
            paths["plot_skipped"] = why
    return paths


# --- loading shapes -------------------------------------------------------------------------------------------
def load(name: str, dtype, device: str):
    """(model, processor, label): built-in shapes are built directly on the device (seconds on a GPU)."""
    from .shapes import SHAPES, build_shape, load_model

    if name in SHAPES and name not in ("tiny", "tiny-next") and device != "cpu":
        with torch.device(device):
            model, proc = build_shape(name, dtype=dtype)
        return model.eval(), proc, f"random-weight {name} shape"
    model, proc, label = load_model(name, dtype=dtype, device=None if device == "cpu" else device)
    return model.to(device=device, dtype=dtype).eval(), proc, label


class LoadSampler:
    """Samples the 1-minute load average every `every` seconds in a daemon thread (a shared
    machine's load belongs next to its figures). `summary()` -> {min, median, max, samples}."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._th = None
        if hasattr(os, "getloadavg"):
            self._th = threading.Thread(target=self._loop, daemon=True)
            self._th.start()

    def _loop(self):
        while True:
            self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(self.every):
                return

    def summary(self) -> dict | None:
        xs = list(self.samples)
        if not xs:
            return None
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "every_s": self.every, "samples": xs}

    def stop(self) -> None:
        self._stop.set()


class _Progress:
    """A tqdm bar per phase: `progress(total=n)` starts a phase, `progress(k)` advances it."""

    def __init__(self, desc: str, tqdm=None):
        self.desc, self.tqdm, self.bar = desc, tqdm, None

    def __call__(self, n: int = 1, total: int | None = None, desc: str = "") -> None:
        if self.tqdm is None:
            return
        if total is not None:
            self.close()
            self.bar = self.tqdm(total=total, desc=f"{self.desc}: {desc}" if desc else self.desc, file=sys.stderr, leave=False)
        elif self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- CLI ------------------------------------------------------------------------------------------------------
def _ints(s: str | None):
    return None if not s else [int(x) for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="llava-0.5b", help="comma list of built-in shapes (tiny, tiny-next, llava-0.5b, llava-next-0.5b, llava-1.5-7b, llava-next-7b) or checkpoint names/paths")
    p.add_argument("--methods", default="all", help="comma list of methods, or 'all' (every registered method but none)")
    p.add_argument("--keep", default=None, help="comma list of visual-token budgets per image (default 192,128,64 for LLaVA-1.5)")
    p.add_argument("--keep-next", default=None, help="budgets for LLaVA-NeXT shapes (default 640,320,160; --keep applies when this is not given)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (every row once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (each row also runs once untimed to record its schedule)")
    p.add_argument("--decode-tokens", type=int, default=8, help="greedy tokens decoded after each prefill (0: prefill only)")
    p.add_argument("--memory", default="auto", choices=["auto", "subprocess", "inprocess", "off"], help="peak memory per row: auto = its own subprocess on CPU, allocator peak reset on GPU")
    p.add_argument("--memory-rows", default="all", choices=["all", "methods"], help="rows whose peak memory is measured: all, or the unpruned row and the methods (not their oracles)")
    p.add_argument("--no-tower", action="store_true", help="skip the vision-tower-alone table")
    p.add_argument("--flop-counter", action="store_true", help="also count every row's FLOPs with torch.utils.flop_counter (slow; a check)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="times and ratios from wall time (default) or process CPU time (CPU only: steadier on a shared machine, use with --threads 1)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU (CPUs without AVX-512-BF16/AMX run bf16 several times slower)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--image", default=None, help="an image file (default: a synthetic 336x336 image; 672x672 for LLaVA-NeXT)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--out", default="vtprune-bench", help="folder for bench.json, bench.csv and bench.png")
    p.add_argument("--json", default=None, help="also write the JSON to this file")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)


def run(
    shapes="llava-0.5b",
    methods=None,
    keep=None,
    keep_next=None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    out: str | None = "vtprune-bench",
    plot: bool = True,
    image=None,
    question: str = QUESTION,
    show: bool = True,
    command: str | None = None,
    json_path: str | None = None,
    **options,
) -> list[dict]:
    """The Python form of `vtprune bench`: benchmark each shape (or checkpoint) in turn, print its
    table, and write bench.json / bench.csv / bench.png to `out` after every shape (None: no files).
    `keep` / `keep_next`: budgets for LLaVA-1.5 / LLaVA-NeXT models (lists; defaults per family);
    other keyword options go to `bench_model` (repeats, warmup, decode_tokens, memory, tower,
    flop_counter, clock); `json_path`: also write the JSON there. Returns the per-shape result dicts.

        from vtprune.eval.bench import run
        results = run("llava-0.5b", ["vtc-cls", "flowcut"], keep=[64], repeats=3, clock="cpu")
    """
    from .. import registry

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    if isinstance(shapes, str):
        shapes = [s.strip() for s in shapes.split(",") if s.strip()]
    if methods is None or methods == "all":
        methods = default_methods()
    else:
        methods = [registry.get(m).name for m in ([x.strip() for x in methods.split(",") if x.strip()] if isinstance(methods, str) else methods)]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    meta = machine_info(device)
    meta.update({"command": command or f"vtprune.eval.bench.run({shapes!r}, ...)", "dtype": dtype_name, "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    results = []
    loadavg = LoadSampler()
    for shape in shapes:
        t0 = time.perf_counter()
        print(f"[{shape}] building/loading ...", file=sys.stderr, flush=True)
        model, proc, label = load(shape, tdtype, device)
        print(f"[{shape}] ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        from ..patches.llava import check_supported

        family = check_supported(model)
        budgets = (keep_next or keep) if family == "llava_next" else keep
        bar = _Progress(shape, tqdm)
        try:
            res = bench_model(
                model,
                proc,
                methods,
                budgets,
                image=image,
                question=question,
                label=shape if label.startswith("random-weight") or shape == label else f"{shape} ({label})",
                progress=bar,
                **options,
            )
        finally:
            bar.close()
        res["seconds"] = time.perf_counter() - t0
        if show:
            print(format_result(res), flush=True)
        results.append(res)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if hasattr(os, "getloadavg"):
            meta["load_average_end"] = os.getloadavg()
            meta["load_average_during"] = loadavg.summary()  # 1-minute load average, sampled every 15 s
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
        if out:  # after every shape: a run cut short keeps what it measured
            paths = write_outputs(results, meta, out, plot=plot)
            if show and shape == shapes[-1]:
                for k, v in paths.items():
                    print(f"{k}: {v}" if k != "plot_skipped" else v, file=sys.stderr)
    loadavg.stop()
    return results


def main(args) -> int:
    if getattr(args, "memory_worker", None):
        return _memory_worker(args.memory_worker)
    if args.threads:
        torch.set_num_threads(args.threads)
    image = None
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else sys.argv[1:]
    results = run(
        args.shapes,
        None if args.methods.strip() == "all" else args.methods,
        _ints(args.keep),
        _ints(args.keep_next),
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        plot=not args.no_plot,
        image=image,
        question=args.question,
        command="vtprune bench " + " ".join(argv),
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=args.decode_tokens,
        memory=args.memory,
        memory_rows=args.memory_rows,
        tower=not args.no_tower,
        flop_counter=args.flop_counter,
        clock=args.clock,
        json_path=args.json,
    )
    return 0 if results else 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
