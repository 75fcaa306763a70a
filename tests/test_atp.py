"""ATP (training-free adaptation of ATP-LLaVA): the threshold rules, the lattice, the rails, newline
handling on LLaVA-NeXT, generation against the by-hand reference (Llama and Qwen2 tiny LLMs), batches,
cache lengths, calibration, half precision and errors."""

import dataclasses

import pytest
import torch

import vtprune
from vtprune.methods.atp import ATP, calibrate, otsu_threshold, rule_keep
from vtprune.patches import anyres
from vtprune.testing import SPECS, make_image, make_inputs, tiny_llava

from .helpers import _assert_batch_equals_single
from .test_fastv import generate_and_compare


@pytest.fixture(scope="module")
def llava_qwen2_small():
    return tiny_llava(dataclasses.replace(SPECS["small"], text_model="qwen2"))


# --- the rules --------------------------------------------------------------------------------------------
def test_mass_rule():
    S = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    assert rule_keep(S, "mass", 0.7).tolist() == [False, True, False, True, False]  # 0.4 + 0.3 reaches 0.7
    assert rule_keep(S, "mass", 0.71).tolist() == [False, True, False, True, True]
    assert rule_keep(S, "mass", 1.0).all() and not rule_keep(S, "mass", 0.0).any()


def test_zscore_and_otsu_rules():
    S = torch.tensor([1.0, 1.1, 0.9, 5.0, 5.2, 1.05])
    mean, std = S.mean(), S.std(unbiased=False)
    assert rule_keep(S, "zscore", 0.0).tolist() == (S > mean).tolist()
    assert rule_keep(S, "zscore", -0.5).tolist() == (S > mean - 0.5 * std).tolist()
    assert otsu_threshold(S) == 5.0
    assert rule_keep(S, "otsu", None).tolist() == [False, False, False, True, True, False]
    assert rule_keep(torch.ones(4), "otsu", None).all(), "flat scores: nothing to split"


# --- end to end ---------------------------------------------------------------------------------------------
def atp_chooser(mass, strides, grid, alpha=0.5, min_keep=16):
    """The training-free ATP module written out on the reference's eager attention."""
    state = {}

    def choose(s, P, vis, T):
        orig = state.setdefault("orig", torch.arange(vis.numel()))
        rows = torch.arange(int(vis.max()) + 1, T)
        sc = P[rows][:, vis].mean(0)
        A = P[vis][:, vis]
        n = vis.numel()
        ss = A.sum(0) / torch.arange(n, 0, -1)
        S = alpha * sc / sc.sum() + (1 - alpha) * ss / ss.sum()
        order = torch.sort(S, descending=True, stable=True).indices
        cum = torch.cumsum(S[order].double(), 0) / S.sum()
        m = int((cum < mass[s]).sum()) + 1
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:m]] = True
        r, c = orig // grid, orig % grid
        keep |= (r % strides[s] == 0) & (c % strides[s] == 0)
        if int(keep.sum()) < min_keep:
            keep[order[~keep[order]][: min_keep - int(keep.sum())]] = True
        kept = torch.nonzero(keep).flatten()
        state["orig"] = orig[kept]
        return kept

    return choose


@pytest.mark.parametrize("position_mode", ["original", "compact"])
def test_generate_equals_reference_llama(llava, position_mode):
    model, proc = llava
    inputs = make_inputs(proc, make_image(4), "Which side is the star on?")
    rep, surv = generate_and_compare(model, inputs, "atp", {"position_mode": position_mode}, lambda pr: atp_chooser((0.9, 0.85, 0.8, 0.75), (2, 3, 4, 6), 24))
    assert len(rep.stages[0]) == 4 and rep.tokens_per_layer[0][-1] < 576


def test_generate_equals_reference_qwen2(llava_qwen2_small):
    model, proc = llava_qwen2_small
    inputs = make_inputs(proc, make_image(5, (112, 112)), "Is there a blue square?")
    params = {"mass_schedule": (0.7, 0.6, 0.5, 0.4), "min_keep": 4}
    rep, surv = generate_and_compare(model, inputs, "atp", params, lambda pr: atp_chooser((0.7, 0.6, 0.5, 0.4), (2, 3, 4, 6), 8, min_keep=4))
    assert len(rep.stages[0]) >= 2


def test_cache_lengths_and_positions(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    with vtprune.pruned(model, "atp") as pr, torch.no_grad():
        out = model(**inputs, use_cache=True)
    rep = pr.last
    L = model.config.text_config.num_hidden_layers
    V = rep.tokens_per_layer[0]
    text = inputs["input_ids"].shape[1] - 576
    assert [out.cache.get_seq_length(j) for j in range(L)] == [text + V[j] for j in range(L)]
    assert V[:3] == [576] * 3 and V[2] > V[3] >= V[7] >= V[11] > V[15]
    assert rep.num_visual_tokens == [576] and rep.budget == [576]
    assert pr.method.policy("position_mode") == "original"


def test_lattice_and_rails(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(2), "How many circles are there in the image?")
    # the rule keeps nothing: exactly the stride-2 lattice survives the first module
    with vtprune.pruned(model, "atp", mass_schedule=(0.0, 0.0, 0.0, 0.0), min_keep=0) as pr, torch.no_grad():
        model(**inputs)
    ids = torch.arange(576)
    lattice = ids[((ids // 24) % 2 == 0) & ((ids % 24) % 2 == 0)]
    stages = pr.last.stages[0]
    assert torch.equal(stages[0].surviving, lattice)
    final = ids[((ids // 24) % 12 == 0) & ((ids % 24) % 12 == 0)]
    assert torch.equal(stages[-1].surviving, final), "strides 2, 3, 4, 6 on the survivors: lcm 12 at the end"
    # without the lattice the min_keep rail keeps the top-scored tokens
    with vtprune.pruned(model, "atp", mass_schedule=(0.0, 0.0, 0.0, 0.0), sap=False, min_keep=10, trace=True) as pr, torch.no_grad():
        model(**inputs)
    assert pr.last.tokens_per_layer[0][-1] == 10
    S = pr.method.last_trace[0][0]["S"]
    assert torch.equal(pr.last.stages[0][0].surviving, torch.sort(torch.topk(S, 10).indices).values)
    # max_keep caps every module by score
    with vtprune.pruned(model, "atp", max_keep=50) as pr, torch.no_grad():
        model(**inputs)
    assert max(pr.last.tokens_per_layer[0][3:]) == 50


def test_scores_match_trace_definitions(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(2), "What is red?")
    for norm in ("reach", "all"):
        with vtprune.pruned(model, "atp", self_norm=norm, alpha=0.3, trace=True) as pr, torch.no_grad():
            model(**inputs)
        t = pr.method.last_trace[0][0]
        S = 0.3 * t["S_cross"] / t["S_cross"].sum() + 0.7 * t["S_self"] / t["S_self"].sum()
        torch.testing.assert_close(t["S"], S)
        assert t["param"] == pytest.approx(0.9)
    with vtprune.pruned(model, "atp", sink_factor=3.0, trace=True) as pr, torch.no_grad():
        model(**inputs)
    t = pr.method.last_trace[0][0]
    sinks = t["S_self"] > 3.0 * t["S_self"].median()
    assert torch.equal(t["sinks"], sinks)
    assert bool(sinks.any()) and set(torch.nonzero(sinks).flatten().tolist()) <= set(pr.last.stages[0][0].surviving.tolist())


def test_next_newlines_follow_their_row(llava_next):
    model, proc = llava_next
    inputs = make_inputs(proc, make_image(15, (300, 150)), "What is red?")
    with vtprune.pruned(model, "atp", mass_schedule=(0.5, 0.4, 0.3, 0.2), sap=False, min_keep=4) as pr, torch.no_grad():
        model(**inputs)
    rep = pr.last
    V = rep.available[0]
    assert rep.num_visual_tokens == [V]
    from vtprune.patches.anyres import next_geometry

    vc = model.config.vision_config
    g = next_geometry(inputs["image_sizes"][0], model.config.image_grid_pinpoints, vc.image_size, vc.patch_size)
    lay = anyres.layout(g, g.full_selection(), "all-rows")
    slots = lay.slots
    assert slots.numel() == V
    for st in rep.stages[0]:
        kept = set(st.surviving.tolist())
        row_tokens = []
        for j, sid in enumerate(slots.tolist()):
            if sid == anyres.NEWLINE:
                assert (j in kept) == any(x in kept for x in row_tokens), f"layer {st.layer}: newline {j} and its row disagree"
                row_tokens = []
            elif sid >= g.patches:
                row_tokens.append(j)
    first = set(rep.stages[0][0].surviving.tolist())
    newlines = [j for j, sid in enumerate(slots.tolist()) if sid == anyres.NEWLINE]
    assert any(j in first for j in newlines), "some rows survive with their newline"
    assert not all(j in first for j in newlines), "some rows are dropped with their newline"


def test_batch_left_padding_equals_single(llava, llava_next):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(7), make_image(8)], ["What is red?", "How many circles are there in the image?"], padding_side="left")
    assert bool((inputs["attention_mask"] == 0).any())
    _assert_batch_equals_single(model, inputs, [1, 1], "atp", {})
    model, proc = llava_next
    inputs = make_inputs(proc, [make_image(11, (224, 224)), make_image(12, (300, 150))], ["What is red?", "Where is the star?"])
    _assert_batch_equals_single(model, inputs, [1, 1], "atp", {"rule": "zscore"})


def test_batch_qwen2(llava_qwen2_small):
    model, proc = llava_qwen2_small
    inputs = make_inputs(proc, [make_image(9, (112, 112)), make_image(10, (112, 112))], ["What is red?", "How many circles are there in the image?"])
    _assert_batch_equals_single(model, inputs, [1, 1], "atp", {"rule": "otsu", "min_keep": 4})


def test_calibrate_hits_target():
    model, proc = tiny_llava("small")
    calib = [make_inputs(proc, make_image(20 + i, (112, 112)), q) for i, q in enumerate(["What is red?", "Where is the star?"])]
    target = 36
    params = {"min_keep": 2, "sap": False}
    method = calibrate(model, calib, keep=target, iters=12, **params)
    assert isinstance(method, ATP) and method.shift != 0 and not method.sap
    vals = []
    with vtprune.pruned(model, method) as pr, torch.no_grad():
        for x in calib:
            model(**x)
            vals.extend(pr.last.mean_tokens)
    assert abs(sum(vals) / len(vals) - target) <= 0.05 * target


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_nan(dtype):
    model, proc = tiny_llava("small", dtype=dtype)
    inputs = make_inputs(proc, make_image(6, (112, 112)), "What is red?")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with vtprune.pruned(model, "atp", min_keep=4, trace=True) as pr, torch.no_grad():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(out.logits).all()
    assert pr.last.stages[0], "something was pruned"
    assert all(torch.isfinite(t["S"]).all() for t in pr.method.last_trace[0])
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_no_eager_attention(llava, monkeypatch):
    from .helpers import assert_no_eager

    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    rep = assert_no_eager(model, inputs, monkeypatch, "atp", {})
    assert rep.stages[0], "the in-LLM stage pruned something"


def test_errors(llava):
    model, _ = llava
    E = vtprune.VTPruneError
    with pytest.raises(E, match="training-free adaptation: drop official=True"):
        vtprune.patch(model, "atp", official=True)
    with pytest.raises(E, match=r"atp.calibrate\(model, inputs, keep=144\)"):
        vtprune.patch(model, "atp", keep=64)
    with pytest.raises(E, match="takes no keep="):
        vtprune.patch(model, "atp", keep_ratio=0.5)
    with pytest.raises(E, match="rule must be one of"):
        vtprune.patch(model, "atp", rule="median")
    with pytest.raises(E, match="mass_schedule needs one value per module"):
        vtprune.patch(model, "atp", atp_layers=(2, 6), mass_schedule=(0.9, 0.8, 0.7))
    with pytest.raises(E, match="otsu"):
        vtprune.patch(model, "atp", rule="otsu", shift=0.1)
    with pytest.raises(E, match="pass atp_layers= with layers below 15"):
        vtprune.patch(model, "atp", atp_layers=(2, 6, 10, 15))
    with pytest.raises(E, match="alpha"):
        vtprune.patch(model, "atp", alpha=2)
