"""`vtprune sweep`: methods x budgets x tasks through lmms-eval, on one loaded model, resumable.

    vtprune sweep --model llava-hf/llava-1.5-7b-hf --methods vtc-cls,flowcut,random,pool \\
        --keep 64,128,192 --tasks mme,pope --batch-size 8 --output sweeps/llava15

The model is loaded once; each combination patches it, runs lmms-eval's `simple_evaluate` on one
task and unpatches it. The unpruned baseline (`method none`, the unpatched model) runs first, in
the same run, on every task. Output folder:

- `results.csv`: one row per (method, budget, task, metric) with the score, the baseline's score,
  the ratio, realized mean visual tokens per sample, mean prefill time, samples and seconds;
- `table.md`: the same as Markdown tables, relative to the baseline;
- `plot.png`: score vs kept visual tokens per method and task (needs matplotlib);
- `runs/`: lmms-eval's results and the per-sample answers of every combination;
- `sweep.json`: the settings the folder was produced with.

Rerunning the command skips finished combinations (so an interrupted sweep resumes, and a sweep
can be extended with more methods, budgets or tasks); rerunning with different settings (model,
model arguments, limit, batch size, generation arguments) is refused unless `--restart` is given.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import VTPruneError

DEFAULT_KEEP = "64,128,192"
DEFAULT_TASKS = "vtprune_scenes"
# the `eval` extra's packages, then lmms-eval without its dependencies (they pull a torchvision that breaks the CPU torch)
INSTALL_HINT = 'pip install accelerate loguru sacrebleu evaluate datasets tenacity pytablewriter "filelock<4" matplotlib && pip install --no-deps lmms-eval==0.7.3'
FIELDS = [
    "method",
    "method_params",
    "budget",
    "keep",
    "keep_ratio",
    "task",
    "metric",
    "score",
    "stderr",
    "baseline",
    "relative",
    "mean_visual_tokens",
    "mean_tokens",
    "available_tokens",
    "prefill_ms",
    "samples",
    "seconds",
    "resolved_params",
]


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="HF LLaVA-1.5/NeXT checkpoint name or path, or a built-in model (tiny, tiny-next, ...); default: the offline model")
    p.add_argument("--model-args", default="", help="more vtprune model arguments, k=v,... (dtype, device, device_map, attn_implementation, do_pad, fixed_grid, chat_template, ...)")
    p.add_argument("--methods", default=None, help="comma-separated; extra parameters as name:k=v:k=v (default: every method that supports the model and takes the budgets, random and pool included)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", default=None, help=f"comma-separated visual tokens per image (default {DEFAULT_KEEP})")
    budget.add_argument("--keep-ratio", default=None, help="comma-separated fractions of each image's visual tokens")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated lmms-eval tasks (default {DEFAULT_TASKS}: the offline task on the trained model's test scenes, shipped with vtprune; vtprune_scenes_next has the LLaVA-NeXT scenes)")
    p.add_argument("--include-path", action="append", default=[], help="extra folder of lmms-eval task YAMLs (repeatable); vtprune's own tasks are always included")
    p.add_argument("--limit", type=float, default=None, help="samples per task (a fraction if < 1); for quick checks, not for reported numbers")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gen-kwargs", default=None, help="generation arguments for every task, k=v,... (e.g. max_new_tokens=16)")
    p.add_argument("--output", default="vtprune-sweep", help="output folder (default ./vtprune-sweep)")
    p.add_argument("--restart", action="store_true", help="discard the folder's previous results instead of resuming")
    p.add_argument("--verbosity", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="lmms-eval's log level")


# --- parsing ---------------------------------------------------------------------------------------


def _value(text: str):
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_kv(text: str, sep: str = ",", what: str = "argument") -> dict:
    out = {}
    for part in (text or "").split(sep):
        if not part.strip():
            continue
        if "=" not in part:
            raise VTPruneError(f"{what} {part!r} is not of the form key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = _value(v)
    return out


def parse_methods(text: str) -> list[tuple[str, dict]]:
    """`vtc-cls,flowcut:official=true` -> [("vtc-cls", {}), ("flowcut", {"official": True})]."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        name, *rest = item.strip().split(":")
        params = parse_kv(":".join(rest), sep=":", what=f"parameter of {name}")
        for k in ("keep", "keep_ratio"):
            if k in params:
                raise VTPruneError(f"give budgets with --keep / --keep-ratio, not inside --methods ({name}:{k}=...)")
        out.append((name.strip(), params))
    if not out:
        raise VTPruneError("--methods is empty")
    return out


def parse_budgets(args) -> tuple[str, list]:
    if args.keep_ratio is not None:
        values = [_value(v) for v in args.keep_ratio.split(",") if v.strip()]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1):
                raise VTPruneError(f"--keep-ratio values must be in (0, 1], got {v!r}")
        return "keep_ratio", values
    values = [_value(v) for v in (args.keep or DEFAULT_KEEP).split(",") if v.strip()]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise VTPruneError(f"--keep values must be positive integers, got {v!r}")
    if not values:
        raise VTPruneError("--keep is empty")
    return "keep", values


@dataclass(frozen=True)
class Combo:
    method: str
    params: tuple  # ((k, v), ...) sorted, budget excluded
    budget_kind: str  # "keep" | "keep_ratio" | "" (the baseline)
    budget: object
    task: str

    @property
    def label(self) -> str:
        if not self.params:
            return self.method
        return f"{self.method}({', '.join(f'{k}={v}' for k, v in self.params)})"

    @property
    def budget_label(self) -> str:
        return f"{self.budget_kind}={self.budget}" if self.budget_kind else ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.label, self.budget_label, self.task)

    @property
    def is_baseline(self) -> bool:
        return self.method == "none"

    def patch_params(self) -> dict:
        p = dict(self.params)
        if self.budget_kind:
            p[self.budget_kind] = self.budget
        return p

    @property
    def slug(self) -> str:
        text = "__".join(x for x in (self.label, self.budget_label, self.task) if x)
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def plan(methods: list[tuple[str, dict]], budget_kind: str, budgets: list, tasks: list[str]) -> list[Combo]:
    """The baseline on every task first, then methods x budgets x tasks."""
    combos = [Combo("none", (), "", None, t) for t in tasks]
    for name, params in methods:
        for b in budgets:
            for t in tasks:
                combos.append(Combo(name, tuple(sorted(params.items())), budget_kind, b, t))
    return combos


# --- results ---------------------------------------------------------------------------------------


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def metric_rows(results: dict, task: str) -> list[tuple[str, float, float | None]]:
    """(metric, score, stderr) for every numeric metric lmms-eval reported for `task` (and its
    subtasks, named `subtask/metric`)."""
    out = []
    for entry, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key.split(",")[0]:
                continue
            score = _num(value)
            if score is None:
                continue
            name, _, filt = key.partition(",")
            stderr = _num(metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr"))
            metric = name if entry == task else f"{entry}/{name}"
            if filt and filt != "none":
                metric += f",{filt}"
            out.append((metric, score, stderr))
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rewrite results.csv (atomically), with each score's ratio to the baseline of its task."""
    base = {(r["task"], r["metric"]): _num(r["score"]) for r in rows if r["method"] == "none"}
    for r in rows:
        b = base.get((r["task"], r["metric"]))
        s = _num(r["score"])
        r["baseline"] = "" if b is None else f"{b:.6g}"
        r["relative"] = f"{s / b:.6g}" if (b not in (None, 0) and s is not None) else ""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _fmt(x, digits=4) -> str:
    v = _num(x)
    if v is None:
        return "–"
    return f"{v:.{digits}g}"


def _row_label(r: dict) -> str:
    label = "unpruned" if r["method"] == "none" else r["method"] + (f"({_params_text(r['method_params'])})" if _params_text(r["method_params"]) else "")
    return label


def _params_text(js: str) -> str:
    try:
        p = json.loads(js or "{}")
    except json.JSONDecodeError:
        return js
    return ", ".join(f"{k}={v}" for k, v in p.items())


def _primary(rows: list[dict]) -> dict[str, str]:
    """Each task's first metric (the order lmms-eval reports them in)."""
    out: dict[str, str] = {}
    for r in rows:
        out.setdefault(r["task"], r["metric"])
    return out


def _groups(rows: list[dict]) -> list[tuple[str, str, dict]]:
    """(label, budget, {(task, metric): row}) in first-seen order, baseline first."""
    seen: dict[tuple[str, str], dict] = {}
    for r in sorted(rows, key=lambda r: r["method"] != "none"):
        seen.setdefault((_row_label(r), r["budget"]), {})[(r["task"], r["metric"])] = r
    return [(label, budget, cells) for (label, budget), cells in seen.items()]


def markdown(rows: list[dict], header: str = "") -> str:
    """A summary table (primary metric per task, as % of the unpruned baseline, and their mean)
    and one detailed table per task."""
    if not rows:
        return "No finished combinations yet.\n"
    primary = _primary(rows)
    tasks = list(primary)
    lines = [header] if header else []
    lines += [
        "## Summary",
        "",
        "Score (% of the unpruned baseline measured in the same run) on each task's first metric; "
        "tokens are the realized mean visual tokens per sample (averaged over LLM layers).",
        "",
    ]
    head = ["method", "budget", "tokens", "prefill (ms)"] + [f"{t} ({primary[t]})" for t in tasks] + ["mean %"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, budget, cells in _groups(rows):
        picked = [cells.get((t, primary[t])) for t in tasks]
        present = [r for r in picked if r is not None]
        tokens = sum(_num(r["mean_tokens"]) or 0 for r in present) / max(len(present), 1)
        prefill = sum(_num(r["prefill_ms"]) or 0 for r in present) / max(len(present), 1)
        rels = [_num(r["relative"]) for r in present if _num(r["relative"]) is not None]
        out = [label, budget or "–", f"{tokens:.1f}", f"{prefill:.1f}"]
        for r in picked:
            if r is None:
                out.append("–")
            else:
                rel = _num(r["relative"])
                out.append(_fmt(r["score"]) + (f" ({100 * rel:.1f}%)" if rel is not None else ""))
        out.append(f"{100 * sum(rels) / len(rels):.1f}" if rels else "–")
        lines.append("| " + " | ".join(out) + " |")
    for t in tasks:
        metrics = list(dict.fromkeys(r["metric"] for r in rows if r["task"] == t))
        lines += ["", f"## {t}", ""]
        head = ["method", "budget", "tokens", "of", "prefill (ms)", "samples"] + metrics
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for label, budget, cells in _groups([r for r in rows if r["task"] == t]):
            first = next(iter(cells.values()))
            out = [label, budget or "–", _fmt(first["mean_tokens"], 4), _fmt(first["available_tokens"], 4), _fmt(first["prefill_ms"], 4), str(first["samples"])]
            for m in metrics:
                r = cells.get((t, m))
                if r is None:
                    out.append("–")
                    continue
                rel = _num(r["relative"])
                out.append(_fmt(r["score"]) + (f" ({100 * rel:.1f}%)" if rel is not None and r["method"] != "none" else ""))
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> str | None:
    """Score vs realized kept tokens, one panel per task (first metric), one line per method, the
    baseline as a dashed line. Returns None when matplotlib is missing (and says why)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn (pip install matplotlib, or vtprune[plot])"
    primary = _primary(rows)
    tasks = list(primary)
    if not tasks:
        return "nothing to plot yet"
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        sel = [r for r in rows if r["task"] == t and r["metric"] == primary[t]]
        lines: dict[str, list] = {}
        for r in sel:
            if r["method"] == "none":
                b = _num(r["score"])
                ax.axhline(b, color="black", linestyle="--", linewidth=1, label="unpruned")
                ax.plot([_num(r["mean_tokens"])], [b], marker="*", color="black", markersize=10, linestyle="none")
                continue
            lines.setdefault(_row_label(r), []).append((_num(r["mean_tokens"]), _num(r["score"])))
        for label, pts in lines.items():
            pts = sorted(p for p in pts if p[0] is not None and p[1] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        xs = sorted({_num(r["mean_tokens"]) for r in sel if _num(r["mean_tokens"])})
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("visual tokens per sample (mean over LLM layers)")
        ax.set_ylabel(primary[t])
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --- the run ---------------------------------------------------------------------------------------


def _fingerprint(args, model_args: dict) -> dict:
    from .. import __version__

    return {
        "model": args.model or "offline",
        "model_args": model_args,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "gen_kwargs": parse_kv(args.gen_kwargs or "", what="--gen-kwargs argument"),
        "vtprune": __version__,
    }


def _prepare_output(out: Path, fingerprint: dict, restart: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "sweep.json"
    doc = {"settings": fingerprint}
    if restart:
        for name in ("results.csv", "table.md", "plot.png"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "runs", ignore_errors=True)
    elif meta.exists():
        old = json.loads(meta.read_text())
        old_fp = old.get("settings", old)
        if old_fp != fingerprint:
            diff = ", ".join(f"{k}: {old_fp.get(k)!r} -> {fingerprint.get(k)!r}" for k in fingerprint if old_fp.get(k) != fingerprint.get(k))
            raise VTPruneError(
                f"{out} holds a sweep run with other settings ({diff}); its scores would not be comparable. "
                "Use another --output, or --restart to discard it"
            )
        if "model_label" in old:
            doc["model_label"] = old["model_label"]  # checked by _check_model once the model is loaded
    (out / "runs").mkdir(exist_ok=True)
    meta.write_text(json.dumps(doc, indent=2, default=str))


def _check_model(out: Path, label: str) -> None:
    """The loaded model must be the one the folder's results came from: `--model` names it, except
    for the default offline model, which is the trained one once `vtprune.trained` has it and the
    random tiny one before (the same command, different models)."""
    meta = out / "sweep.json"
    doc = json.loads(meta.read_text()) if meta.exists() else {}
    old = doc.get("model_label")
    if old is not None and old != label and read_rows(out / "results.csv"):
        raise VTPruneError(
            f"{out} holds results of another model ({old!r}; now {label!r}); its scores would not be comparable. "
            "Use another --output, or --restart to discard it"
        )
    doc["model_label"] = label
    meta.write_text(json.dumps(doc, indent=2, default=str))


def _limit(x):
    if x is None:
        return None
    return int(x) if float(x).is_integer() and x >= 1 else float(x)


def _quiet_lmms_eval(level: str) -> None:
    from loguru import logger

    def keep(record) -> bool:  # the sweep passes --gen-kwargs on purpose; don't warn once per combination
        return "generation_kwargs specified through cli" not in record["message"]

    logger.remove()
    logger.add(sys.stderr, level=level, filter=keep)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def _task_manager(tasks: list[str], include: list[str], verbosity: str):
    """lmms-eval's TaskManager over vtprune's tasks (+ --include-path); the built-in task index
    (about 2000 YAMLs, slow to scan) is added only when a task is not found there."""
    from lmms_eval.tasks import TaskManager

    from .lmms import MODEL_ID
    from .tasks import TASKS_DIR

    paths = [str(TASKS_DIR)] + [str(Path(p).resolve()) for p in include]
    tm = TaskManager(verbosity, include_path=paths, include_defaults=False, model_name=MODEL_ID)
    if not all(t in tm.all_tasks for t in tasks):
        tm = TaskManager(verbosity, include_path=paths, include_defaults=True, model_name=MODEL_ID)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise VTPruneError(f"lmms-eval knows no task {', '.join(map(repr, missing))}; check the name (python -m lmms_eval --tasks list) or add its folder with --include-path")
    return tm


def _init_distributed() -> bool:
    """Under `accelerate launch` / torchrun (WORLD_SIZE > 1): set up the process group as
    lmms-eval's own CLI does, so that its evaluator shards documents and gathers results."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    import datetime

    import torch.distributed as dist
    from accelerate import Accelerator, InitProcessGroupKwargs

    if not dist.is_initialized():
        Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=24))])
    if not dist.is_initialized():  # pragma: no cover - accelerate did not create a group
        dist.init_process_group(backend="nccl" if _cuda() else "gloo")
    return True


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _default_methods(family: str, budget_kind: str, budgets: list) -> tuple[list[tuple[str, dict]], list[str]]:
    """Every registered method that supports `family` and takes the budgets, and (name, why) of
    those left out (e.g. methods that choose their own token counts)."""
    from .. import registry

    chosen, skipped = [], []
    for m in registry.methods():
        if m.name == "none" or family not in m.families:
            continue
        try:
            for b in budgets:
                registry.build(m.name, **{budget_kind: b})
        except VTPruneError as e:
            skipped.append(f"{m.name} ({e})")
            continue
        chosen.append((m.name, {}))
    return chosen, skipped


def _validate(methods, budget_kind, budgets) -> None:
    from .. import registry

    for name, params in methods:
        registry.build(name, **params, **{budget_kind: budgets[0]})


def _save_run(out: Path, combo: Combo, results: dict, summary: dict) -> None:
    samples = results.pop("samples", None) or {}
    doc = {"vtprune": {"method": combo.method, "params": summary.get("params", {}), "budget": combo.budget_label, **{k: v for k, v in summary.items() if k not in ("method", "params")}}, **results}
    (out / "runs" / f"{combo.slug}.json").write_text(json.dumps(doc, indent=2, default=str))
    with open(out / "runs" / f"{combo.slug}_samples.jsonl", "w", encoding="utf-8") as f:
        for task, items in samples.items():
            for s in items:
                rec = {"task": task, "doc_id": s.get("doc_id"), "target": s.get("target"), "resps": s.get("resps"), "filtered_resps": s.get("filtered_resps")}
                f.write(json.dumps(rec, default=str) + "\n")


def _rows_for(combo: Combo, results: dict, summary: dict, seconds: float) -> list[dict]:
    stats = summary["tasks"].get(combo.task) or summary  # group tasks: the stats of all their subtasks
    rows = []
    for metric, score, stderr in metric_rows(results, combo.task):
        rows.append(
            {
                "method": combo.method,
                "method_params": json.dumps(dict(combo.params), default=str),
                "budget": combo.budget_label,
                "keep": combo.budget if combo.budget_kind == "keep" else "",
                "keep_ratio": combo.budget if combo.budget_kind == "keep_ratio" else "",
                "task": combo.task,
                "metric": metric,
                "score": f"{score:.6g}",
                "stderr": "" if stderr is None else f"{stderr:.4g}",
                "mean_visual_tokens": f"{stats['mean_visual_tokens']:.2f}",
                "mean_tokens": f"{stats['mean_tokens']:.2f}",
                "available_tokens": f"{stats['mean_available_tokens']:.2f}",
                "prefill_ms": f"{1000 * stats['mean_prefill_s']:.2f}",
                "samples": str(stats["samples"]),
                "seconds": f"{seconds:.1f}",
                "resolved_params": json.dumps(summary.get("params", {}), default=str),
            }
        )
    if not rows:
        raise VTPruneError(f"lmms-eval reported no numeric metric for {combo.task}; nothing to record")
    return rows


def _row_key(r: dict) -> tuple[str, str, str]:
    label = r["method"] + (f"({_params_text(r['method_params'])})" if _params_text(r["method_params"]) else "")
    return (label, r["budget"], r["task"])


def main(args) -> int:
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        print(f"error: vtprune sweep runs lmms-eval, which is not installed; install it with:\n  {INSTALL_HINT}", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise VTPruneError("--tasks is empty")
    if args.batch_size < 1:
        raise VTPruneError("--batch-size must be >= 1")
    budget_kind, budgets = parse_budgets(args)
    methods = parse_methods(args.methods) if args.methods else None
    if methods:
        _validate(methods, budget_kind, budgets)  # before anything slow
    model_args = parse_kv(args.model_args, what="--model-args argument")
    for k, option in (("pretrained", "--model"), ("method", "--methods"), ("batch_size", "--batch-size"), ("keep", "--keep"), ("keep_ratio", "--keep-ratio")):
        if k in model_args:
            raise VTPruneError(f"--model-args cannot set {k}; use {option}")
    out = Path(args.output)
    distributed = _init_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        _prepare_output(out, _fingerprint(args, model_args), args.restart)
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank reads the finished combinations after rank 0 prepared the folder
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    done = {_row_key(r) for r in rows}

    _quiet_lmms_eval(args.verbosity)
    from lmms_eval.evaluator import simple_evaluate
    from tqdm import tqdm

    from .lmms import VTPrune

    tm = _task_manager(tasks, args.include_path, args.verbosity)
    lm = VTPrune(pretrained=args.model, batch_size=args.batch_size, **model_args)
    lm.keep_loaded, lm.show_progress = True, False
    main_rank = lm.rank == 0
    if main_rank:
        try:
            _check_model(out, lm.label)
        except BaseException:
            lm.close()
            raise
    if methods is None:
        methods, skipped = _default_methods(lm.family, budget_kind, budgets)
        if skipped and main_rank:
            print("default methods: left out " + "; ".join(skipped), file=sys.stderr)
    for name, _ in methods:
        from .. import registry

        if lm.family not in registry.get(name).families:
            raise VTPruneError(f"{name} does not support {lm.family} models; drop it from --methods")
    _validate(methods, budget_kind, budgets)
    combos = plan(methods, budget_kind, budgets, tasks)
    todo = [c for c in combos if c.key not in done]
    if main_rank:
        print(f"model: {lm.label} ({lm.family}); {len(combos)} combinations, {len(combos) - len(todo)} already done in {out}", file=sys.stderr)
    bar = tqdm(total=len(combos), initial=len(combos) - len(todo), desc="sweep", unit="run", disable=not main_rank, file=sys.stderr)
    limit = _limit(args.limit)
    try:
        for combo in todo:
            bar.set_postfix_str(f"{combo.label} {combo.budget_label} {combo.task}".strip())
            lm.set_method(combo.method, **combo.patch_params())
            lm.reset_stats()
            t0 = time.perf_counter()
            results = simple_evaluate(
                model=lm,
                tasks=[combo.task],
                limit=limit,
                task_manager=tm,
                gen_kwargs=args.gen_kwargs,
                verbosity=args.verbosity,
                log_samples=True,
                bootstrap_iters=1000,
                distributed_executor_backend="torchrun" if distributed else "accelerate",
            )
            seconds = time.perf_counter() - t0
            if main_rank and results is not None:
                summary = lm.summary()
                new_rows = _rows_for(combo, results, summary, seconds)
                _save_run(out, combo, results, summary)
                rows.extend(new_rows)
                write_rows(csv_path, rows)
            bar.update(1)
    finally:
        bar.close()
        lm.close()  # unpatched, timing hook removed
    if not main_rank:
        return 0
    write_rows(csv_path, rows)
    header = f"# vtprune sweep: {lm.label}\n\nSettings: {json.dumps(_fingerprint(args, model_args), default=str)}\n"
    note = plot(rows, out / "plot.png")
    table = markdown(rows, header)
    if note:
        table += f"\n_{note}._\n"
    (out / "table.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {csv_path}, {out / 'table.md'}" + ("" if note else f", {out / 'plot.png'}"), file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    return 0


__all__ = ["add_arguments", "main", "plan", "Combo", "parse_methods", "parse_kv", "markdown", "metric_rows", "write_rows", "read_rows"]
