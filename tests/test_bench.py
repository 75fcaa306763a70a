"""`vtprune bench`: analytic FLOPs against torch's flop counter, KV bytes against the real cache, the
oracle replaying every registered method's schedule, and a smoke run of the command (no timing
assertions: times on a shared CI machine mean nothing)."""

import csv
import json
import sys

import pytest
import torch

import vtprune
from vtprune import cli, registry
from vtprune.errors import VTPruneError
from vtprune.eval import bench as B
from vtprune.eval import flops as F

from .helpers import one_thread  # noqa: F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def llava_small():
    from vtprune.testing import tiny_llava

    return tiny_llava("small")  # the real depths, 64 patches per image: fast under the flop counter


def _setup(model, proc):
    from vtprune.patches.llava import check_supported

    family = check_supported(model)
    inputs = B.make_inputs(proc, family, torch.device("cpu"), torch.float32)
    available = int((inputs["input_ids"] == model.config.image_token_id).sum())
    adapter = vtprune.api._adapter(model)
    geometry = adapter.split_pixels(inputs["pixel_values"], inputs.get("image_sizes"))[1][0]
    return family, inputs, available, geometry, F.ModelDims.from_config(model.config)


def _params(name, keep):
    return {"keep": keep} if registry.get(name).needs_budget else {}


def _method_and_oracle(model, inputs, family, available, geometry, dims, name, keep):
    spec = {"method": name, "params": _params(name, keep)}
    report, sched, kv_lens, kv_bytes = B._probe(model, inputs, spec, available, dims.layers, family)
    method = registry.build(name, **spec["params"])
    plan = B.plan_oracle(method, report, sched, geometry, family, dims.layers)
    _, osched, okv_lens, okv_bytes = B._probe(model, inputs, {"oracle": plan}, available, dims.layers, family)
    return spec, method, sched, (kv_lens, kv_bytes), plan, osched, (okv_lens, okv_bytes)


@pytest.mark.parametrize(
    "fixture,methods,keep",
    [
        ("llava_small", ["vtc-cls", "pool", "flowcut", "hired"], 16),
        ("llava_next", ["vtc-cls", "flowcut", "hired", "globalcom2"], 60),
    ],
)
def test_flops_match_the_flop_counter(fixture, methods, keep, request):
    """Our count of every matmul (tower at its real per-layer counts, projector, LLM with GQA and
    the gated MLP, LM head, and the scoring) equals torch.utils.flop_counter's, exactly."""
    model, proc = request.getfixturevalue(fixture)
    family, inputs, available, geometry, dims = _setup(model, proc)
    _, sched, _, _ = B._probe(model, inputs, None, available, dims.layers, family)
    assert F.prefill_flops(dims, sched)["total"] == B._count_flops(model, inputs, None)
    assert sched.vision_counts() == [dims.patches + 1] * dims.v_layers  # transformers runs the whole tower
    for name in methods:
        spec, method, sched, _, plan, osched, _ = _method_and_oracle(model, inputs, family, available, geometry, dims, name, keep)
        scoring = F.scoring_flops(method, model.config, sched, family)
        assert scoring is not None and (scoring > 0) == (name != "pool"), name
        counted = B._count_flops(model, inputs, spec)
        counted_oracle = B._count_flops(model, inputs, {"oracle": plan})
        assert F.prefill_flops(dims, sched, scoring)["total"] == counted, name
        assert F.prefill_flops(dims, osched)["total"] == counted_oracle, name  # the oracle scores nothing
        if name != "pool":  # pool re-projects its merged tokens: counted in the projector, not as scoring
            assert counted - counted_oracle == scoring, name


def _counted_per_layer(model, inputs, spec, prefix, n):
    """torch's flop counter per module: the FLOPs inside each of `prefix`.0 .. `prefix`.n-1."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    pr = B.patch_row(model, spec)
    try:
        fc = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fc:
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        if pr is not None:
            pr.unpatch()
    counts = fc.get_flop_counts()
    out = [0] * n
    for key, ops in counts.items():
        head, _, idx = key.rpartition(".")
        if head.endswith(prefix) and idx.isdigit():
            out[int(idx)] = sum(ops.values())
    return out


def test_flops_per_layer_match_the_flop_counter(llava_small):
    """Layer by layer: every decoder layer at its own token count (in-LLM cuts: fastv after layer 1,
    mustdrop's four stages) and every tower layer equal torch's count inside that module; the only
    extra FLOPs inside a tower layer are the CLS-row scoring of the layers a method scores at."""
    model, proc = llava_small
    family, inputs, available, geometry, dims = _setup(model, proc)
    for name in (None, "fastv", "mustdrop"):
        spec = None if name is None else {"method": name, "params": {"keep": 32}}
        _, sched, _, _ = B._probe(model, inputs, spec, available, dims.layers, family)
        ours = F.prefill_flops(dims, sched)
        llm = _counted_per_layer(model, inputs, spec, "language_model.layers", dims.layers)
        vis = _counted_per_layer(model, inputs, spec, "encoder.layers", dims.v_layers)
        assert ours["llm_layers"] == llm, name
        if name is not None:
            assert len(set(sched.llm)) > 1, name  # the LLM really shortened part-way
        scored = set() if name is None else set(registry.build(name, keep=32).cls_layers(dims.v_layers, F._feature_layer(model.config)))
        for i, (a, b) in enumerate(zip(ours["vision_layers"], vis)):
            if i in scored:
                assert b - a == sum(F.cls_row(dims, n, t) for t, n in sched.vision[i]), (name, i)
            else:
                assert a == b, (name, i)


def test_flops_of_the_field_formula_and_a_worked_example():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vtprune.eval.shapes import _CLIP_L, _LLM_7B

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_CLIP_L), text_config=LlamaConfig(**_LLM_7B), vision_feature_layer=-2)
    dims = F.ModelDims.from_config(cfg)
    n, d, m = 616, 4096, 11008
    assert F.field_flops(dims, [n] * 32) == 32 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    full, pruned = F.worked_example(cfg, text=40, budgets=(576, 64))
    assert full["visual"] == 576 and pruned["visual"] == 64
    assert full["scoring"] == 0 and pruned["scoring"] == 3 * 2 * 577 * 1024
    # LLaVA-1.5-7B: about 8.5 TFLOPs unpruned (our count) vs the field formula's 3.2 T
    assert 8.0e12 < full["total"] < 9.0e12 and 3.0e12 < full["field"] < 3.4e12
    assert pruned["total"] < full["total"] / 4
    assert F.format_flops(full["total"]).endswith("T")


def test_oracle_and_kv_bytes_for_every_registered_method(llava_small, llava_next):
    """For every registered method (new ones included): the oracle replays the method's schedule —
    the same tokens entering every tower and decoder layer and the same KV cache — and the KV bytes
    computed from the schedule equal the bytes in the real cache."""
    seen = 0
    for model, proc, keep in ((*llava_small, 16), (*llava_next, 60)):
        family, inputs, available, geometry, dims = _setup(model, proc)
        _, sched, kv_lens, kv_bytes = B._probe(model, inputs, None, available, dims.layers, family)
        assert F.kv_bytes(dims, sched.kv, 4) == kv_bytes and sched.kv == kv_lens
        for info in vtprune.methods():
            try:
                m = registry.build(info.name, **_params(info.name, keep))
                m.check_model(family, 1)
            except VTPruneError:
                continue  # e.g. globalcom2 on LLaVA-1.5
            spec, method, sched, (kv_lens, kv_bytes), plan, osched, (okv_lens, okv_bytes) = _method_and_oracle(
                model, inputs, family, available, geometry, dims, info.name, keep
            )
            assert sched.kv == kv_lens and F.kv_bytes(dims, sched.kv, 4) == kv_bytes, info.name
            assert osched.vision_counts() == sched.vision_counts(), info.name
            assert osched.llm == sched.llm and osched.visual == sched.visual, info.name
            assert okv_lens == kv_lens and okv_bytes == kv_bytes, info.name
            json.dumps(plan)  # plans travel to memory workers as JSON
            seen += 1
    assert seen >= 8


def test_cpu_peak_delta_sees_an_allocation():
    if not __import__("os").path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    held = torch.zeros(8 * 2**20)  # 32 MB allocated before: not part of the delta
    delta = B.cpu_peak_delta(lambda: torch.ones(16 * 2**20).sum())  # 64 MB inside
    assert 48 * 2**20 < delta < 256 * 2**20
    del held


def test_snapshot_rebuilds_the_same_model(llava_small, tmp_path):
    model, proc = llava_small
    family, inputs, *_ = _setup(model, proc)
    path = str(tmp_path / "snap.pt")
    B.save_snapshot(model, inputs, path)
    clone, inputs2 = B.load_snapshot(path)
    with torch.no_grad():
        a = model(**inputs, logits_to_keep=1).logits
        b = clone(**inputs2, logits_to_keep=1).logits
    assert torch.equal(a, b)


def test_memory_worker_in_a_subprocess(llava_small, tmp_path):
    model, proc = llava_small
    family, inputs, *_ = _setup(model, proc)
    path = str(tmp_path / "snap.pt")
    B.save_snapshot(model, inputs, path)
    peak = B.subprocess_peak(path, {"method": "vtc-cls", "params": {"keep": 16}}, decode_tokens=1, threads=1, timeout=300)
    assert peak is not None and peak > 0


def test_bench_command_writes_json_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "--shapes", "tiny", "--methods", "vtc-cls", "--keep", "64", "--repeats", "1", "--warmup", "0"]
    argv += ["--decode-tokens", "1", "--memory", "inprocess", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "oracle" in captured.out and "vs oracle" in captured.out and "targets:" in captured.out
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["torch"] == torch.__version__ and "vtprune bench" in data["meta"]["command"]
    (res,) = data["results"]
    rows = res["rows"]
    assert [(r["kind"], r["method"]) for r in rows] == [("unpruned", "unpruned"), ("method", "vtc-cls"), ("oracle", "vtc-cls")]
    assert rows[0]["visual_tokens"] == 576 and rows[1]["visual_tokens"] == rows[2]["visual_tokens"] == 64
    assert rows[1]["tokens_per_layer"] == [64] * 16 and rows[1]["oracle_ok"] is True
    assert rows[1]["kv_bytes"] == rows[1]["kv_bytes_analytic"] < rows[0]["kv_bytes"]
    assert rows[1]["flops"]["total"] < rows[0]["flops"]["total"] and rows[1]["flops"]["scoring"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[1]["vs_oracle"] > 0
    assert all(len(r["samples"]["prefill"]) == 1 and r["samples"]["decode"][0] > 0 for r in rows)
    assert "vtc-cls" in res["tower"]["scored"] and res["tower"]["ratios"]["eager + output_attentions / sdpa"] > 0
    assert any(t["target"].startswith("scoring overhead") for t in res["targets"])
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["kind"] for r in table] == ["unpruned", "method", "oracle"] and table[1]["keep"] == "64"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert B.PLOT_HINT in captured.err and not (out / "bench.png").exists()
    else:
        assert (out / "bench.png").stat().st_size > 0


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert B.write_plot([], str(tmp_path / "p.png")) == B.PLOT_HINT
    assert "pip install 'vtprune[plot]'" in B.PLOT_HINT


def test_bench_rejects_an_unknown_method(capsys):
    assert cli.main(["bench", "--shapes", "tiny", "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
