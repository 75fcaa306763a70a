"""The lmms-eval model `vtprune` and the offline task (issue 7).

Needs lmms-eval (`pip install --no-deps lmms-eval==0.7.3` plus its runtime dependencies, see
docs/EVAL.md); skipped with a message when it is not installed. The subprocess runs use
`python -m lmms_eval` itself, and check the results files: the CLI exits 0 even when an
evaluation fails.
"""

import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NO_LMMS = 'lmms-eval is not installed: pip install -e ".[eval]" && pip install --no-deps lmms-eval==0.7.3 (docs/EVAL.md)'
if os.environ.get("CI") and importlib.util.find_spec("lmms_eval") is None:
    # CI installs lmms-eval: there, a missing install is a broken CI setup, not a reason to skip
    pytest.fail(f"CI is set but {NO_LMMS}", pytrace=False)
pytest.importorskip("lmms_eval", reason=NO_LMMS)

import vtprune  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from vtprune.errors import VTPruneError  # noqa: E402
from vtprune.eval.lmms import GenerationFailed, VTPrune  # noqa: E402
from vtprune.eval.tasks import TASKS_DIR  # noqa: E402
from vtprune.eval.tasks import scenes as scenes_task  # noqa: E402
from vtprune.eval.tasks import shapes as shapes_task  # noqa: E402
from vtprune.testing import make_image, tiny_llava, tiny_llava_next  # noqa: E402

from .helpers import one_thread  # noqa: E402, F401  (autouse: one torch thread)

ROOT = Path(__file__).resolve().parents[1]


def offline_env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def small():
    return tiny_llava("small")


@pytest.fixture(scope="module")
def small_next():
    return tiny_llava_next("small")


def _requests(kind, items, task="t", split="test"):
    """lmms-eval Instances over docs {"image": PIL}: items are (doc_id, context, continuation or gen_kwargs)."""
    out = []
    for i, (doc_id, context, third) in enumerate(items):
        args = (context, third, lambda d: [d["image"]], doc_id, task, split)
        out.append(Instance(request_type=kind, arguments=args, idx=i, metadata={"task": task, "doc_id": doc_id, "repeats": 1}))
    return out


DOCS = [{"image": make_image(30, (112, 112))}, {"image": make_image(31, (160, 96))}, {"image": make_image(32, (90, 140))}]


# --- registration ---------------------------------------------------------------------------------


def test_plugin_resolves_through_lmms_eval_registry():
    from lmms_eval.models import get_model, get_model_manifest, list_available_models

    assert "vtprune" in list_available_models()
    assert get_model("vtprune") is VTPrune
    manifest = get_model_manifest("vtprune")
    assert manifest.simple_class_path == "vtprune.eval.lmms.VTPrune" and manifest.chat_class_path is None
    eps = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "vtprune"]
    assert eps and eps[0].value == "vtprune.eval.lmms:MANIFEST", "reinstall vtprune (pip install -e .) to register the entry point"


def test_offline_tasks_register_through_include_path():
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)
    assert {"vtprune_shapes", "vtprune_shapes_mc", "vtprune_scenes", "vtprune_scenes_next"} <= set(tm.all_tasks)
    out = subprocess.run([sys.executable, "-m", "vtprune.eval.tasks"], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == TASKS_DIR


def test_offline_task_data_and_scoring():
    shipped = [json.loads(line) for line in shapes_task.DATA_FILE.read_text().splitlines()]
    assert shipped == json.loads(json.dumps(shapes_task.build_docs())), "shapes.jsonl is stale: python -m vtprune.eval.tasks.shapes"
    assert len(shipped) == 54 and {d["question_kind"] for d in shipped[:6]} == {"colour", "shape", "count"}
    for d in shipped:
        assert d["answer"] in d["choices"] and shapes_task.doc_to_target_index(d) == d["choices"].index(d["answer"])
    img = shapes_task.doc_to_visual(shipped[0])[0]
    assert img.size == (shipped[0]["width"], shipped[0]["height"])
    assert shapes_task.doc_to_visual(shipped[0])[0].tobytes() == img.tobytes()  # deterministic
    doc = {"answer": "2"}
    assert shapes_task.process_results(doc, ["Two."]) == {"exact_match": 1.0}
    assert shapes_task.process_results(doc, ["2 circles"]) == {"exact_match": 0.0}
    assert shapes_task.process_results({"answer": "circle"}, ["The circle\nmore"]) == {"exact_match": 1.0}
    assert shapes_task.doc_to_text(shipped[0], {"pre_prompt": "Q: ", "post_prompt": "!"}) == "Q: " + shipped[0]["question"] + "!"


def test_scenes_task_data_matches_the_scene_generator():
    from vtprune import scenes as S

    for task, (variant, n) in scenes_task.TASKS.items():
        shipped = [json.loads(line) for line in scenes_task.data_file(task).read_text().splitlines()]
        assert shipped == json.loads(json.dumps(scenes_task.build_docs(task))), f"{task}.jsonl is stale: python -m vtprune.eval.tasks.scenes"
        assert {d["type"] for d in shipped} == set(S.QUESTION_TYPES)
        assert {d["scene"] for d in shipped} == set(range(n))  # every test scene is asked about
    doc = next(json.loads(line) for line in scenes_task.data_file("vtprune_scenes_next").read_text().splitlines())
    scene = S.scenes("test", doc["n_scenes"], doc["variant"])[doc["scene"]]
    img = scenes_task.doc_to_visual(doc)[0]
    assert img.size == (scene.width, scene.height) and img.tobytes() == scene.render().tobytes()
    asked = {q.text: q.answer for i, q in S.eval_questions(S.scenes("test", doc["n_scenes"], doc["variant"])) if i == doc["scene"]}
    assert asked[doc["question"]] == doc["answer"]
    assert scenes_task.process_results({"answer": "3"}, ["Three."]) == {"exact_match": 1.0}
    assert scenes_task.process_results({"answer": "left"}, ["right"]) == {"exact_match": 0.0}


# --- model arguments ------------------------------------------------------------------------------


def test_model_arguments_are_validated_before_loading(small):
    m, p = small
    with pytest.raises(VTPruneError, match="vtc-cls has no parameter 'kep'.*Model arguments of the vtprune"):
        VTPrune(model=m, processor=p, method="vtc-cls", kep=64)
    with pytest.raises(VTPruneError, match="unknown method"):
        VTPrune(model=m, processor=p, method="nope")
    with pytest.raises(VTPruneError, match="batch_size=auto"):
        VTPrune(model=m, processor=p, batch_size="auto")
    with pytest.raises(VTPruneError, match="fixed_grid is a LLaVA-NeXT"):
        VTPrune(model=m, processor=p, fixed_grid=672)
    with pytest.raises(VTPruneError, match="fixed_grid must be"):
        VTPrune(model=m, processor=p, fixed_grid="big")
    with pytest.raises(VTPruneError, match="chat_template must be"):
        VTPrune(model=m, processor=p, chat_template="nonsense")
    hooks = dict(m._forward_hooks)
    with pytest.raises(VTPruneError, match="globalcom2 needs LLaVA-NeXT"):
        VTPrune(model=m, processor=p, method="globalcom2", keep=16)
    assert vtprune.get_pruner(m) is None and dict(m._forward_hooks) == hooks


def test_create_from_arg_string_loads_the_offline_model_and_patches_it():
    lm = VTPrune.create_from_arg_string("method=vtc-cls,keep=16,do_pad=true,official=false", {"batch_size": 3, "device": "cpu"})
    try:
        assert lm.batch_size == 3 and lm.do_pad is True
        assert lm.method == "vtc-cls" and lm.method_params["keep"] == 16 and "position_mode" in lm.method_params
        assert vtprune.get_pruner(lm.model) is not None
        lm.set_method("none")
        assert vtprune.get_pruner(lm.model) is None and lm.method_params == {}
    finally:
        lm.close()


def test_the_offline_model_is_the_trained_one_when_vtprune_trained_has_it(small, monkeypatch):
    """load_offline_model takes vtprune.trained.load("llava15") when that module is installed and
    its weights are available, and falls back to the random tiny model otherwise."""
    import types

    from vtprune.eval import lmms as plugin

    calls = []
    fake = types.ModuleType("vtprune.trained")
    fake.available = lambda variant: calls.append(("available", variant)) or have
    fake.load = lambda variant="llava15", dtype=None, device=None: calls.append(("load", variant, dtype, device)) or small
    monkeypatch.setitem(sys.modules, "vtprune.trained", fake)
    have = True
    model, proc, label = plugin.load_offline_model(torch.float32, "cpu")
    assert model is small[0] and proc is small[1] and "trained" in label
    assert calls == [("available", "llava15"), ("load", "llava15", torch.float32, "cpu")]
    have = False
    model, _, label = plugin.load_offline_model(None, "cpu")
    assert model is not small[0] and "random" in label
    monkeypatch.setitem(sys.modules, "vtprune.trained", types.ModuleType("vtprune.trained"))  # no API yet
    assert "random" in plugin.load_offline_model(None, "cpu")[2]
    monkeypatch.setitem(sys.modules, "vtprune.trained", None)  # not installed at all
    assert "random" in plugin.load_offline_model(None, "cpu")[2]


@pytest.mark.parametrize("build", [tiny_llava, tiny_llava_next], ids=["llava", "llava_next"])
def test_checkpoints_load_from_a_path_and_answer(build, tmp_path):
    m, p = build("small")
    m.save_pretrained(tmp_path)
    p.save_pretrained(tmp_path)
    lm = VTPrune.create_from_arg_string(f"pretrained={tmp_path},method=pool,keep=16,dtype=float32", {"batch_size": 2, "device": "cpu"})
    try:
        assert lm.family == ("llava_next" if build is tiny_llava_next else "llava") and lm.model.dtype == torch.float32
        lm.task_dict = {"t": {"test": DOCS}}
        out = lm.generate_until(_requests("generate_until", [(0, "What colour?", {"max_new_tokens": 2}), (1, "Shapes?", {"max_new_tokens": 2})]))
        assert len(out) == 2 and all(isinstance(t, str) for t in out)
        assert all(r["visual_tokens"] < r["available_tokens"] for r in lm._pending)
    finally:
        lm.close()


def test_prompts_follow_the_processor_template_or_vicuna(small):
    m, p = small
    lm = VTPrune(model=m, processor=p)
    try:
        assert lm._prompt("What colour?", 1) == "USER: <image>\nWhat colour? ASSISTANT:"
        assert lm._prompt("<image>\nWhat colour?", 1) == "USER: <image>\nWhat colour? ASSISTANT:"
        lm.chat_template = "vicuna_v1"
        assert lm._prompt("Hi?", 1).startswith("A chat between a curious user") and lm._prompt("Hi?", 1).endswith("USER: <image>\nHi? ASSISTANT:")
    finally:
        lm.close()


def test_do_pad_and_fixed_grid_preprocessing(small, small_next):
    m, p = small
    lm = VTPrune(model=m, processor=p, do_pad=True)
    try:
        img = lm._prepare_image(make_image(1, (120, 60)))
        assert img.size == (120, 120) and img.getpixel((0, 0)) == lm._pad_colour
        assert lm._prepare_image(make_image(1, (80, 80))).size == (80, 80)
    finally:
        lm.close()
    m, p = small_next
    lm = VTPrune(model=m, processor=p, fixed_grid="224x224", batch_size=2)
    try:
        reqs = _requests("generate_until", [(0, "What colour?", {"max_new_tokens": 1}), (1, "What colour?", {"max_new_tokens": 1})])
        lm.task_dict = {"t": {"test": DOCS}}
        lm.generate_until(reqs)
        counts = {r["available_tokens"] for r in lm._pending}
        assert len(counts) == 1, f"a fixed grid gives every image the same token count, got {counts}"
    finally:
        lm.close()


# --- loglikelihood --------------------------------------------------------------------------------


def _by_hand(lm, image, context, continuation) -> float:
    """Sum of the continuation's log-probabilities from one unpadded patched forward, read without
    any of vtprune's index maps: pruning removes visual tokens only, so the caller's last L tokens
    (the continuation) are still the last L positions, and the L logits before them predict them."""
    prompt = lm._prompt(context, 1)
    tok = lm.tokenizer
    L = len(tok(prompt + continuation)["input_ids"]) - len(tok(prompt)["input_ids"])
    assert L >= 1
    inputs = lm.processor(images=[image], text=[prompt + continuation], return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0].float()
    rep = vtprune.get_pruner(lm.model).last
    ids = inputs["input_ids"][0]
    T, Tout = ids.shape[0], logits.shape[0]
    assert rep.num_visual_tokens[0] < rep.available[0] and Tout < T, "the prompt was not shrunk"
    logp = torch.log_softmax(logits[Tout - L - 1 : Tout - 1], -1)
    return float(logp.gather(-1, ids[T - L :, None]).sum())


@pytest.mark.parametrize("family,method,params", [("llava", "vtc-cls", {"keep": 16}), ("llava_next", "flowcut", {"keep": 32})])
def test_loglikelihood_on_a_pruned_model_equals_the_patched_forward_by_hand(small, small_next, family, method, params):
    m, p = small if family == "llava" else small_next
    lm = VTPrune(model=m, processor=p, method=method, batch_size=2, **params)
    try:
        lm.task_dict = {"t": {"test": DOCS}}
        items = [(0, "What colour is the circle?", " red"), (1, "How many shapes?", " three shapes"), (2, "Is it blue?", " no")]
        got = lm.loglikelihood_pairs(_requests("loglikelihood", items))
        for (doc_id, ctx, cont), (nll, greedy) in zip(items, got):
            assert isinstance(greedy, bool)
            assert -nll == pytest.approx(_by_hand(lm, DOCS[doc_id]["image"], ctx, cont), abs=2e-4)
        if method == "flowcut":
            assert vtprune.get_pruner(m).last.output_index is not None, "the in-LLM cut (output_index) was not exercised"
        # what lmms-eval receives: pairs that survive its output handling (0.7.3 stringifies bare tuples)
        from lmms_eval.api.instance import unwrap_generation_output

        wrapped = lm.loglikelihood(_requests("loglikelihood", items[:1]))
        assert unwrap_generation_output(wrapped[0])[0] == pytest.approx(got[0])
    finally:
        lm.close()


def test_loglikelihood_keep_all_equals_the_unpruned_model(small):
    m, p = small
    items = [(0, "What colour is the circle?", " red"), (1, "How many shapes?", " three")]
    lm = VTPrune(model=m, processor=p, batch_size=2)
    try:
        lm.task_dict = {"t": {"test": DOCS}}
        plain = lm.loglikelihood_pairs(_requests("loglikelihood", items))
        lm.set_method("vtc-cls", keep=10**9)
        full = lm.loglikelihood_pairs(_requests("loglikelihood", items))
        lm.set_method("vtc-cls", keep=8)
        pruned = lm.loglikelihood_pairs(_requests("loglikelihood", items))
    finally:
        lm.close()
    for a, b in zip(plain, full):
        assert a[0] == pytest.approx(b[0], abs=1e-4)
    assert any(abs(a[0] - c[0]) > 1e-3 for a, c in zip(plain, pruned))


# --- generation -----------------------------------------------------------------------------------


def test_generate_batch_equals_single_and_records_stats(small_next):
    m, p = small_next
    lm = VTPrune(model=m, processor=p, method="vtc-cls", keep=24)
    try:
        lm.task_dict = {"t": {"test": DOCS}}
        gen = {"max_new_tokens": 4, "until": ["\n"], "temperature": 0, "do_sample": False}
        items = [(i, q, dict(gen)) for i, q in enumerate(["What colour?", "How many circles are there in the picture?", "Is there a square?"])]
        single = lm.generate_until(_requests("generate_until", items))
        lm.batch_size_per_gpu = 2
        batched = lm.generate_until(_requests("generate_until", items))
        assert batched == single
        assert len(lm._pending) == 6
        lm.clean()  # flushes the records (and, with keep_loaded False, frees the model)
        s = lm.summary()
        assert s["method"] == "vtc-cls" and s["samples"] == 6
        assert 0 < s["tasks"]["t"]["mean_visual_tokens"] < s["tasks"]["t"]["mean_available_tokens"]
        assert s["mean_prefill_s"] > 0
    finally:
        lm.close()


def test_a_generation_error_surfaces_through_simple_evaluate(small, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    m, p = small
    lm = VTPrune(model=m, processor=p, method="pool", keep=16)
    lm.keep_loaded, lm.show_progress = True, False

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(m.model.language_model, "forward", boom)
    tm = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False, model_name="vtprune")
    try:
        with pytest.raises(GenerationFailed, match=r"generation failed \(method pool\) for task/doc vtprune_shapes/\d.*simulated"):
            simple_evaluate(model=lm, tasks=["vtprune_shapes"], limit=2, task_manager=tm, verbosity="ERROR", gen_kwargs="max_new_tokens=2")
    finally:
        lm.close()


def test_local_copies_of_standard_tasks_run_through_overlay_yamls(small, tmp_path):
    """The recipes of vtprune/eval/tasks/LOCAL_DATASETS.md on stand-ins with the real columns:
    POPE from parquet files, GQA from save_to_disk folders with its process_docs replaced."""
    import datasets
    import lmms_eval
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    builtin = Path(lmms_eval.__file__).parent / "tasks"
    tasks_dir = tmp_path / "local_tasks"
    tasks_dir.mkdir()
    # POPE, parquet form
    rows = [{"question_id": str(i), "question": "Is there a red circle?", "answer": "yes" if i % 2 else "no", "category": "adversarial", "image": make_image(i, (120, 90))} for i in range(4)]
    data = tmp_path / "POPE" / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(data / "test-00000-of-00001.parquet"))
    (tasks_dir / "pope_local.yaml").write_text(f"include: {builtin}/pope/pope.yaml\ntask: pope_local\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {data}/test-*.parquet\n")
    # GQA, save_to_disk form, images joined by a local process_docs
    questions = [{"id": str(i), "imageId": f"img{i % 2}", "question": "What colour is the circle?", "answer": "red", "fullAnswer": "The circle is red."} for i in range(3)]
    images = [{"id": f"img{j}", "image": make_image(40 + j, (100, 120))} for j in range(2)]
    datasets.DatasetDict({"testdev": datasets.Dataset.from_list(questions)}).save_to_disk(str(tmp_path / "gqa_instructions"))
    datasets.DatasetDict({"testdev": datasets.Dataset.from_list(images).cast_column("image", datasets.Image())}).save_to_disk(str(tmp_path / "gqa_images"))
    (tasks_dir / "gqa_local.yaml").write_text(
        f"include: {builtin}/gqa/gqa.yaml\ntask: gqa_local\ndataset_path: {tmp_path / 'gqa_instructions'}\ndataset_name: null\n"
        "dataset_kwargs:\n  load_from_disk: true\nprocess_docs: !function gqa_local_utils.process_docs\n"
    )
    (tasks_dir / "gqa_local_utils.py").write_text(
        "import datasets\n\n\ndef process_docs(dataset):\n"
        f"    images = datasets.load_from_disk({str(tmp_path / 'gqa_images')!r})['testdev']\n"
        "    by_id = {row['id']: row['image'] for row in images}\n"
        "    return dataset.map(lambda doc: {'image': by_id[doc['imageId']]})\n"
    )
    m, p = small
    lm = VTPrune(model=m, processor=p, batch_size=2)
    lm.keep_loaded, lm.show_progress = True, False
    try:
        tm = TaskManager("WARNING", include_path=str(tasks_dir), include_defaults=False, model_name="vtprune")
        res = simple_evaluate(model=lm, tasks=["pope_local", "gqa_local"], limit=4, task_manager=tm, verbosity="ERROR", gen_kwargs="max_new_tokens=2")
    finally:
        lm.close()
    assert res["n-samples"]["pope_local"]["effective"] == 4 and res["n-samples"]["gqa_local"]["effective"] == 3
    assert "pope_accuracy,none" in res["results"]["pope_local"] and "exact_match,none" in res["results"]["gqa_local"]
    assert res["throughput"]["avg_vtprune_visual_tokens"] == pytest.approx(64)


# --- the CLI --------------------------------------------------------------------------------------


def _results(folder: Path):
    files = glob.glob(str(folder / "*" / "*_results.json"))
    return json.loads(Path(files[0]).read_text()) if files else None


def _answers(folder: Path) -> dict:
    files = glob.glob(str(folder / "*" / "*_samples_*.jsonl"))
    assert files, f"no samples file under {folder}"
    out = {}
    for line in Path(files[0]).read_text().splitlines():
        d = json.loads(line)
        out[d["doc_id"]] = d["filtered_resps"]
    return out


def _cli_model() -> str:
    """The model of the CLI runs: the trained offline model where vtprune.trained has it (its
    answers mean something, so batch 1 == batch 2 is a real check), else the random tiny one."""
    from vtprune.eval.lmms import offline_model_is_trained

    return "offline" if offline_model_is_trained() else "tiny-small"


CLI_MODEL = _cli_model()
CLI_ARGS = f"pretrained={CLI_MODEL},method=vtc-cls,keep=16"
CLI_TASK = "vtprune_scenes" if CLI_MODEL == "offline" else "vtprune_shapes"  # the trained model's own questions


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """One `python -m lmms_eval --config` process running three evaluations of the offline task
    (4 samples): batch 1, batch 2, and one whose generation fails (max_new_tokens=-1)."""
    tmp = tmp_path_factory.mktemp("lmms_cli")
    common = {
        "model": "vtprune",
        "model_args": CLI_ARGS,
        "tasks": CLI_TASK,
        "include_path": str(TASKS_DIR),
        "limit": 4,
        "log_samples": True,
    }
    runs = [
        dict(common, batch_size=1, gen_kwargs="max_new_tokens=3", output_path=str(tmp / "b1")),
        dict(common, batch_size=2, gen_kwargs="max_new_tokens=3", output_path=str(tmp / "b2")),
        dict(common, batch_size=2, gen_kwargs="max_new_tokens=-1", output_path=str(tmp / "bad")),
    ]
    config = tmp / "runs.json"  # JSON is YAML
    config.write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--config", str(config)], capture_output=True, text=True, env=offline_env(tmp), cwd=tmp, timeout=900)
    return tmp, proc


def test_cli_runs_the_offline_task_and_records_method_tokens_and_prefill(cli_runs):
    tmp, proc = cli_runs
    log = proc.stdout + proc.stderr
    for name in ("b1", "b2"):
        res = _results(tmp / name)
        assert res is not None, f"no results file for {name} (the CLI exits {proc.returncode} either way):\n{log[-4000:]}"
        assert res["n-samples"][CLI_TASK]["effective"] == 4
        assert "exact_match,none" in res["results"][CLI_TASK]
        assert "method=vtc-cls" in res["config"]["model_args"] and "keep=16" in res["config"]["model_args"]
        thr = res["throughput"]
        assert thr["avg_vtprune_visual_tokens"] == pytest.approx(16) and thr["avg_vtprune_available_tokens"] > 16
        if CLI_MODEL == "tiny-small":
            assert thr["avg_vtprune_available_tokens"] == pytest.approx(64)
        assert thr["avg_vtprune_prefill_s"] > 0
    assert "vtprune: method=vtc-cls" in log


def test_cli_batch_1_and_batch_2_give_the_same_answers(cli_runs):
    """Left-padded batches answer as single samples do (on the trained offline model where it is
    installed; the random tiny model's answers are degenerate strings, a weaker check)."""
    tmp, _ = cli_runs
    a1, a2 = _answers(tmp / "b1"), _answers(tmp / "b2")
    assert sorted(a1) == [0, 1, 2, 3] and a1 == a2


def test_cli_a_failed_generation_is_an_error_not_an_empty_answer(cli_runs):
    tmp, proc = cli_runs
    log = proc.stdout + proc.stderr
    assert _results(tmp / "bad") is None, "a run whose generation raised must not produce a results file"
    assert "GenerationFailed" in log and "max_new_tokens" in log and "Error during evaluation" in log


def test_accelerate_launch_two_processes_on_cpu(cli_runs, tmp_path):
    """Data parallel: each rank loads and patches its own copy, lmms-eval shards the documents and
    gathers them; the vtprune records of both ranks reach rank 0's results file. On a machine
    without GPUs accelerate needs --multi_gpu (which runs torchrun with gloo); --cpu would start
    only one process."""
    import shutil

    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    out = tmp_path / "dp"
    cmd = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
        "-m", "lmms_eval", "--model", "vtprune", "--model_args", CLI_ARGS,
        "--tasks", CLI_TASK, "--include_path", str(TASKS_DIR), "--limit", "4", "--batch_size", "1",
        "--gen_kwargs", "max_new_tokens=3", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(tmp_path), cwd=tmp_path, timeout=900)
    log = proc.stdout + proc.stderr
    assert "Running on rank 1" in log, f"the second process did not run:\n{log[-4000:]}"
    res = _results(out)
    assert res is not None, f"no results file:\n{log[-4000:]}"
    assert res["n-samples"][CLI_TASK]["effective"] == 4
    assert "samples=4 " in log, "rank 0 should report the records of both ranks"
    assert res["throughput"]["avg_vtprune_visual_tokens"] == pytest.approx(16)
    assert _answers(out) == _answers(cli_runs[0] / "b1")
