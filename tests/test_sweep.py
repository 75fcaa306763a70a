"""`vtprune sweep` (issue 7): parsing, the plan, the tables, and an end-to-end run on the tiny model
with an interruption, a resume and an extension. The end-to-end tests need lmms-eval and are
skipped with a message when it is not installed; the rest run without it."""

import csv
import importlib.util
import json
import os
import sys

import pytest

from vtprune import cli
from vtprune.errors import VTPruneError
from vtprune.eval import sweep

from .helpers import one_thread  # noqa: F401  (autouse: one torch thread)

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
NO_LMMS = 'lmms-eval is not installed: pip install -e ".[eval]" && pip install --no-deps lmms-eval==0.7.3 (docs/EVAL.md)'
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason=NO_LMMS)
if os.environ.get("CI") and not HAS_LMMS:
    # CI installs lmms-eval: there, a missing install is a broken CI setup, not a reason to skip
    pytest.fail(f"CI is set but {NO_LMMS}", pytrace=False)


def _args(*argv):
    return cli.build_parser().parse_args(["sweep", *argv])


# --- without lmms-eval ------------------------------------------------------------------------------


def test_sweep_is_a_cli_subcommand_with_the_documented_options():
    a = _args("--methods", "random,pool", "--keep", "64,128", "--tasks", "mme,pope", "--limit", "8", "--batch-size", "4", "--output", "x")
    assert a.func is sweep.main and a.batch_size == 4 and a.limit == 8 and a.output == "x"
    with pytest.raises(SystemExit):
        _args("--keep", "64", "--keep-ratio", "0.5")


def test_methods_budgets_and_plan():
    assert sweep.parse_methods("vtc-cls, flowcut:official=true:llm_layer=2") == [("vtc-cls", {}), ("flowcut", {"official": True, "llm_layer": 2})]
    with pytest.raises(VTPruneError, match="--keep"):
        sweep.parse_methods("random:keep=3")
    assert sweep.parse_budgets(_args()) == ("keep", [64, 128, 192])
    assert sweep.parse_budgets(_args("--keep-ratio", "0.25,0.5")) == ("keep_ratio", [0.25, 0.5])
    with pytest.raises(VTPruneError):
        sweep.parse_budgets(_args("--keep", "0"))
    with pytest.raises(VTPruneError):
        sweep.parse_budgets(_args("--keep-ratio", "2"))
    combos = sweep.plan([("random", {}), ("flowcut", {"official": True})], "keep", [64, 128], ["a", "b"])
    assert [c.key for c in combos[:2]] == [("none", "", "a"), ("none", "", "b")]
    assert len(combos) == 2 + 2 * 2 * 2 and len({c.key for c in combos}) == len(combos)
    fc = combos[-1]
    assert fc.label == "flowcut(official=True)" and fc.budget_label == "keep=128" and fc.patch_params() == {"official": True, "keep": 128}
    assert sweep.parse_kv("do_pad=true,dtype=bfloat16,fixed_grid=672x672") == {"do_pad": True, "dtype": "bfloat16", "fixed_grid": "672x672"}


def test_default_methods_include_random_and_pool_and_only_methods_taking_the_budget():
    from vtprune import registry

    for family in ("llava", "llava_next"):
        chosen, skipped = sweep._default_methods(family, "keep", [64, 128])
        names = [m for m, _ in chosen]
        assert {"random", "pool"} <= set(names) and "none" not in names
        for name in names:
            assert family in registry.get(name).families
            registry.build(name, keep=64)
        for entry in skipped:
            assert entry.split(" ")[0] not in names
    assert "globalcom2" not in [m for m, _ in sweep._default_methods("llava", "keep", [64])[0]]


def _fake(score, task="t", extra=None):
    return {"results": {task: {"alias": task, "acc,none": score, "acc_stderr,none": 0.1, "acc_stderr_clt,none": 0.1, "note,none": "N/A", **(extra or {})}}}


def test_metric_rows_relative_scores_and_markdown(tmp_path):
    assert sweep.metric_rows(_fake(0.5), "t") == [("acc", 0.5, 0.1)]
    grouped = {"results": {"g": {"alias": "g"}, "sub": {"alias": "sub", "score,none": 3.0}}}
    assert sweep.metric_rows(grouped, "g") == [("sub/score", 3.0, None)]
    summary = {"params": {"keep": 8}, "tasks": {"t": {"mean_visual_tokens": 8.0, "mean_tokens": 8.0, "mean_available_tokens": 64.0, "mean_prefill_s": 0.01, "samples": 4}}}
    base = sweep.Combo("none", (), "", None, "t")
    pruned = sweep.Combo("random", (), "keep", 8, "t")
    rows = sweep._rows_for(base, _fake(0.8), dict(summary, params={}), 1.0) + sweep._rows_for(pruned, _fake(0.4), summary, 1.0)
    path = tmp_path / "results.csv"
    sweep.write_rows(path, rows)
    back = sweep.read_rows(path)
    assert [r["relative"] for r in back] == ["1", "0.5"] and back[1]["baseline"] == "0.8"
    assert {sweep._row_key(r) for r in back} == {base.key, pruned.key}
    md = sweep.markdown(back)
    assert "| unpruned | – |" in md and "0.4 (50.0%)" in md and "## t" in md


def test_plot_says_so_when_matplotlib_is_missing(tmp_path, monkeypatch):
    rows = [{"method": "none", "method_params": "{}", "budget": "", "task": "t", "metric": "acc", "score": "1", "mean_tokens": "64", "relative": "1"}]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = sweep.plot(rows, tmp_path / "plot.png")
    assert "matplotlib is not installed" in note and not (tmp_path / "plot.png").exists()


def test_sweep_without_lmms_eval_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    assert cli.main(["sweep", "--output", str(tmp_path / "o")]) == 2
    assert "pip install --no-deps lmms-eval==0.7.3" in capsys.readouterr().err


# --- end to end on the tiny model ------------------------------------------------------------------


@needs_lmms
def test_bad_methods_fail_before_anything_runs(tmp_path, capsys):
    assert cli.main(["sweep", "--methods", "random:colour=red", "--output", str(tmp_path / "o")]) == 2
    assert "random has no parameter 'colour'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@needs_lmms
def test_sweep_end_to_end_with_interruption_resume_and_extension(tmp_path, monkeypatch, capsys):
    import lmms_eval.evaluator

    from vtprune.eval.lmms import VTPrune

    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "tiny-small", "--methods", "random,pool", "--keep", "16", "--tasks", "vtprune_shapes,vtprune_shapes_mc",
            "--limit", "2", "--batch-size", "2", "--gen-kwargs", "max_new_tokens=2", "--output", str(out)]  # fmt: skip
    real = lmms_eval.evaluator.simple_evaluate
    calls, loads = [], []
    real_load = VTPrune._load

    def counting(*a, **k):
        calls.append(k["tasks"][0])
        if len(calls) == fail_at:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", counting)
    monkeypatch.setattr(VTPrune, "_load", staticmethod(lambda *a: loads.append(a) or real_load(*a)))

    fail_at = 4  # dies in the 4th of 6 combinations
    with pytest.raises(RuntimeError, match="interrupted"):
        cli.main(argv)
    assert len(sweep.read_rows(out / "results.csv")) == 3

    calls.clear()
    fail_at = 0
    assert cli.main(argv) == 0
    assert len(calls) == 3, "the finished combinations must be skipped"
    err = capsys.readouterr().err
    assert "3 already done" in err and "sweep" in err  # the progress bar
    assert len(loads) == 2, "one model load per command, none per combination"

    rows = sweep.read_rows(out / "results.csv")
    assert [(r["method"], r["budget"], r["task"]) for r in rows][:2] == [("none", "", "vtprune_shapes"), ("none", "", "vtprune_shapes_mc")]
    assert {(r["method"], r["task"]) for r in rows} == {(m, t) for m in ("none", "random", "pool") for t in ("vtprune_shapes", "vtprune_shapes_mc")}
    for r in rows:
        base = next(b for b in rows if b["method"] == "none" and b["task"] == r["task"])
        assert r["baseline"] == base["score"]
        assert float(r["available_tokens"]) == 64 and float(r["mean_visual_tokens"]) == (64 if r["method"] == "none" else 16)
        assert float(r["prefill_ms"]) > 0 and int(r["samples"]) > 0
        if r["method"] != "none":
            assert json.loads(r["resolved_params"])["keep"] == 16
    run = json.loads((out / "runs" / "random__keep=16__vtprune_shapes.json").read_text())
    assert run["vtprune"]["method"] == "random" and run["vtprune"]["mean_visual_tokens"] == 16 and "results" in run
    assert (out / "runs" / "random__keep=16__vtprune_shapes_samples.jsonl").read_text().count("\n") == 2
    table = (out / "table.md").read_text()
    assert "| unpruned |" in table and "| random | keep=16 |" in table and "## vtprune_shapes_mc" in table
    if importlib.util.find_spec("matplotlib"):
        assert (out / "plot.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in table

    calls.clear()
    assert cli.main(argv) == 0 and calls == []
    ext = list(argv)
    ext[ext.index("--keep") + 1] = "16,8"
    assert cli.main(ext) == 0
    assert len(calls) == 4  # only keep=8 for two methods x two tasks
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 10

    changed = list(argv)
    changed[changed.index("--limit") + 1] = "3"
    assert cli.main(changed) == 2
    assert "other settings" in capsys.readouterr().err

    # the same command on another model (the default offline model becomes the trained one once
    # vtprune.trained has it) is refused too
    meta = json.loads((out / "sweep.json").read_text())
    assert "tiny-small" in meta["model_label"]
    (out / "sweep.json").write_text(json.dumps(dict(meta, model_label="another model")))
    calls.clear()
    assert cli.main(argv) == 2 and calls == []
    assert "another model" in capsys.readouterr().err


@needs_lmms
def test_sweep_under_accelerate_launch_two_processes(tmp_path):
    """Each rank loads and patches its copy, lmms-eval shards the documents, rank 0 writes."""
    import shutil
    import subprocess

    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    out = tmp_path / "dp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"), WANDB_MODE="disabled")
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(28500 + os.getpid() % 1000), "-m", "vtprune.cli", "sweep", "--model", "tiny-small", "--methods", "random",
           "--keep", "16", "--tasks", "vtprune_shapes", "--limit", "4", "--gen-kwargs", "max_new_tokens=2", "--output", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = sweep.read_rows(out / "results.csv")
    assert [(r["method"], r["samples"], float(r["mean_visual_tokens"])) for r in rows] == [("none", "4", 64.0), ("random", "4", 16.0)]
