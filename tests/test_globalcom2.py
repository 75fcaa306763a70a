"""GlobalCom²: the official selection and packing on every golden case (../shared/golden/globalcom2),
the ratio arithmetic, the keep/keep_ratio conversion, policies, batches with every AnyRes grid,
the refusal of LLaVA-1.5, errors, half precision."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

import vtprune
from vtprune.errors import VTPruneError
from vtprune.methods.globalcom2 import GlobalCom2, crop_ratios, crop_region_sums
from vtprune.patches import anyres
from vtprune.patches.anyres import NEWLINE
from vtprune.testing import llava_around_tower, make_image, make_inputs, tiny_llava_next

from .conftest import GOLDEN, golden_dir
from .helpers import _assert_batch_equals_single, _batch

CASES = sorted(p.name for p in (GOLDEN / "globalcom2").glob("case_*")) or ["case_missing"]
GRID_SIZES = [(224, 224), (300, 150), (150, 300), (336, 112), (112, 336)]  # PIL (W, H) on the small model
GRIDS = [(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)]


# --- golden cases ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _golden(case):
    d = golden_dir("globalcom2") / case
    params = json.loads((d / "params.json").read_text())
    expected = json.loads((d / "expected.json").read_text())
    tower_cfg = json.loads((d / "config.json").read_text())
    weights = load_file(str(d / "model.safetensors"))
    pixels = load_file(str(d / "pixel_values.safetensors"))["pixel_values"].float()
    scores = load_file(str(d / "expected_scores.safetensors"))
    model, tok = llava_around_tower(tower_cfg, weights, next_=True)
    size = (params["orig_height"], params["orig_width"])
    geom = anyres.next_geometry(size, model.config.image_grid_pinpoints, 336, 14)
    text = tok("USER: describe ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id] + [model.config.image_token_id] * geom.stock_count() + text])
    inputs = {"input_ids": ids, "pixel_values": pixels[None], "image_sizes": torch.tensor([size])}
    return model, inputs, params, expected, scores, geom


def _run(case, **params):
    model, inputs, *_ = _golden(case)
    seen = []
    with vtprune.pruned(model, "globalcom2", **params) as pr:
        select = pr.method.select

        def spy(image):
            sel = select(image)
            seen.append((image, sel))
            return sel

        pr.method.select = spy
        with torch.no_grad():
            out = model(**inputs)
    return pr.last, seen, out.logits.shape[1], pr.method


def _ids(seq):
    return [NEWLINE if e[0] == "newline" else e[1] * 576 + e[2] for e in seq]


def _check_thumbnail_order(got, exp, s_global):
    """Same set; the order is descending score, pairs closer than 5e-6 interchangeable (README)."""
    assert sorted(got) == sorted(exp)
    s = s_global[torch.tensor(got)]
    assert bool((s[:-1] >= s[1:] - 5e-6).all())


@pytest.mark.parametrize("case", CASES)
def test_golden_official(case):
    model, inputs, params, exp, scores, geom = _golden(case)
    rep, seen, length, method = _run(case, official=True, retention_ratio=params["retention_ratio_R"])
    (ctx, sel), = seen
    # scores: last-layer pre-softmax CLS logits, head mean, CLS column dropped
    logits = scores["cls_logits_layer23_headmean"]
    assert method.params()["score_layer"] is None and sorted(ctx.cls_logits) == [23]
    torch.testing.assert_close(method._logits(ctx), logits, atol=2e-6, rtol=0)
    sig = method._signals(ctx)
    torch.testing.assert_close(sig.sigma_sums, torch.tensor(exp["crop_region_score_sums"], dtype=torch.float64), atol=1e-4, rtol=0)
    ratios = crop_ratios(sig.sigma_sums, params["retention_ratio_R"], params["temperature"])
    torch.testing.assert_close(ratios, torch.tensor(exp["crop_retention_ratios"], dtype=torch.float64), atol=1e-6, rtol=0)
    # the valid region, per-crop counts, per-crop score vectors
    assert sig.canvas.ranges == (tuple(exp["valid_canvas_rows"]), tuple(exp["valid_canvas_cols"]))
    for j, crop in enumerate(exp["crops"]):
        nv = crop["num_valid_tokens"]
        assert sig.valid[j].numel() == nv
        for key, mine in (("local", sig.local), ("global", sig.glob), ("combined", sig.combined)):
            torch.testing.assert_close(mine[j], scores[f"{key}_scores_valid_order"][j, :nv], atol=2e-6, rtol=0)
        assert bool(torch.isnan(scores["combined_scores_valid_order"][j, nv:]).all())
        # kept tokens: exactly, as true positions and as valid-list indices
        assert len(sel.kept[j + 1]) == crop["k"] == int(nv * crop["retention_ratio"])
        assert sel.kept[j + 1].tolist() == crop["kept_true_positions_sorted"]
        pos = {int(v): i for i, v in enumerate(sig.valid[j])}
        assert sorted(pos[t] for t in crop["kept_true_positions_sorted"]) == crop["kept_valid_list_indices_sorted"]
    # thumbnail: int(576R) tokens, emitted by descending score
    k_g = exp["thumbnail_k"]
    assert k_g == int(576 * params["retention_ratio_R"])
    slots = sel.slots.tolist()
    _check_thumbnail_order(slots[:k_g], exp["thumbnail_kept_in_output_order"], logits[0])
    # the official packing: valid-index placement, a newline after every canvas row (padding included)
    want = _ids(exp["output_sequence_official"])
    assert slots[k_g:] == want[k_g:]
    assert rep.num_visual_tokens == [exp["output_len_official"]]
    assert slots.count(NEWLINE) == exp["num_newlines_official"] == 24 * geom.rows
    assert rep.budget == [k_g + sum(c["k"] for c in exp["crops"])]
    assert length == inputs["input_ids"].shape[1] - geom.stock_count() + exp["output_len_official"]
    if case == "case_1":  # no padding: the placement quirk is harmless
        assert exp["output_sequence_official"] == exp["output_sequence_corrected_positions"]


@pytest.mark.parametrize("case", CASES)
def test_golden_corrected_and_default(case):
    model, inputs, params, exp, scores, geom = _golden(case)
    R = params["retention_ratio_R"]
    logits = scores["cls_logits_layer23_headmean"][0]
    k_g = exp["thumbnail_k"]
    corrected = _ids(exp["output_sequence_corrected_positions"])
    rep, seen, _, _ = _run(case, official=True, placement="true", retention_ratio=R)
    (_, sel), = seen
    slots = sel.slots.tolist()
    _check_thumbnail_order(slots[:k_g], corrected[:k_g], logits)
    assert slots[k_g:] == corrected[k_g:]
    # vtprune's default: true positions, one newline per unpadded row (stock), transformers' rounding
    rep, seen, _, method = _run(case, retention_ratio=R)
    (_, sel), = seen
    assert method.params()["newline"] == "all-rows" and method.params()["placement"] == "true"
    assert sel.slots is None and sel.newline == "all-rows"
    got = anyres.layout(geom, sel.kept, sel.newline, sel.base_order).slots.tolist()
    r0, r1 = exp["valid_canvas_rows"]
    want, row = [], 0
    for e in corrected:  # keep only the newlines of unpadded rows
        if e == NEWLINE:
            if r0 <= row < r1:
                want.append(e)
            row += 1
        else:
            want.append(e)
    _check_thumbnail_order(got[:k_g], want[:k_g], logits)
    assert got[k_g:] == want[k_g:]
    assert rep.num_visual_tokens == [len(want)]
    assert want.count(NEWLINE) == geom.valid_h
    assert [k.tolist() for k in rep.kept[0][1:]] == [c["kept_true_positions_sorted"] for c in exp["crops"]]


def test_golden_padding_official_differs():
    """Case 2 (row padding): the valid-index placement moves tokens to the wrong rows."""
    _, seen_off, _, _ = _run("case_2", official=True)
    _, seen_fix, _, _ = _run("case_2", official=True, placement="true")
    off, fix = seen_off[0][1].slots, seen_fix[0][1].slots
    assert sorted(off.tolist()) == sorted(fix.tolist()) and not torch.equal(off, fix)


def test_golden_keep_converts_to_ratio():
    rep_r, _, _, _ = _run("case_2", retention_ratio=0.25)
    n = rep_r.num_visual_tokens[0]
    rep_k, _, _, _ = _run("case_2", keep=n)
    assert rep_k.num_visual_tokens == [n] and rep_k.budget == [n]
    assert all(torch.equal(a, b) for a, b in zip(rep_k.kept[0], rep_r.kept[0]))
    for k in (n - 1, 200, 60, 45):
        rep, _, _, _ = _run("case_2", keep=k)
        assert k - 6 <= rep.num_visual_tokens[0] <= k
    rep, _, _, _ = _run("case_2", keep=20)  # below the 38 unpadded rows' newlines: nothing but newlines fits
    assert rep.num_visual_tokens == [38]


# --- ratio arithmetic ------------------------------------------------------------------------------------------
def test_ratio_arithmetic():
    s = torch.zeros(576)
    s.view(24, 24)[:12, 12:] = 1.0  # only the top-right tile scores
    sums = crop_region_sums(s, 24, 24, 2, 2)
    assert sums.dtype == torch.float64 and sums.tolist() == [0.0, 144.0, 0.0, 0.0]
    r = crop_ratios(sums, 0.25, 10.0)
    assert abs(float(r.sum()) - 4 * 0.25) < 1e-9 and int(r.argmax()) == 1
    assert float(crop_ratios(sums, 0.9, 10.0)[1]) == 1.0  # the <= 1 clip
    assert crop_ratios(sums, 0.9, 10.0)[0] < 0.9
    # 3x1 grid: bands of 8 rows; 1x3: bands of 8 columns
    assert crop_region_sums(torch.arange(576.0), 24, 24, 3, 1).tolist() == [
        float(torch.arange(576.0).view(24, 24)[a : a + 8].sum()) for a in (0, 8, 16)
    ]
    assert crop_region_sums(torch.ones(576), 24, 24, 1, 3).tolist() == [192.0] * 3
    # remainder rows/cols go to the last band (8x8 grid on 3 rows: 2, 2, 4 rows)
    assert crop_region_sums(torch.ones(64), 8, 8, 3, 1).tolist() == [16.0, 16.0, 32.0]


# --- errors -------------------------------------------------------------------------------------------------------
def test_llava15_refused(llava):
    model, _ = llava
    with pytest.raises(VTPruneError, match="needs LLaVA-NeXT.*LlavaNextForConditionalGeneration.*'hired'"):
        vtprune.patch(model, "globalcom2")
    assert vtprune.get_pruner(model) is None
    assert vtprune.methods()[vtprune.methods().names().index("globalcom2")].families == ("llava_next",)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"retention_ratio": 0.25, "keep": 100}, "not both"),
        ({"retention_ratio": 0.25, "keep_ratio": 0.3}, "keep_ratio= .*not both"),
        ({"retention_ratio": 0.0}, r"\(0, 1\]"),
        ({"retention_ratio": 2}, r"\(0, 1\]"),
        ({"temperature": 0}, "positive"),
        ({"temperature": float("inf")}, "positive"),
        ({"alpha": 1.5}, r"\[0, 1\]"),
        ({"score_layer": -2}, "non-negative"),
        ({"newline": "every-row"}, "newline must be one of"),
        ({"placement": "fake"}, "placement must be one of"),
        ({"base_order": "random"}, "base_order must be one of"),
        ({"unpad_rule": "ceil"}, "unpad_rule must be one of"),
        ({"keep_ratio": 1.5}, r"\(0, 1\]"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(VTPruneError, match=match):
        GlobalCom2(**params)


def test_official_refuses_batches(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(224, 224), (300, 150)])
    with pytest.raises(VTPruneError, match="batch element 0.*one image at a time"):
        with vtprune.pruned(model, "globalcom2", official=True), torch.no_grad():
            model(**inputs)
    with vtprune.pruned(model, "globalcom2", official=True) as pr, torch.no_grad():
        model(**_batch(proc, [(300, 150)]))
    assert pr.last.num_visual_tokens[0] > 0
    with pytest.raises(VTPruneError, match="score_layer=24 does not exist"):
        vtprune.patch(model, "globalcom2", score_layer=24)


# --- policies, official vs default ----------------------------------------------------------------------------
def test_official_vs_default_with_padding(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(260, 170)])  # wide image on the 2x2 grid: padding rows
    g = anyres.next_geometry(inputs["image_sizes"][0], model.config.image_grid_pinpoints, 112, 14)
    assert (g.rows, g.cols) == (2, 2) and g.valid_h < 16
    reps = {}
    for name, params in {"default": {}, "official": {"official": True}}.items():
        with vtprune.pruned(model, "globalcom2", **params) as pr, torch.no_grad():
            model(**inputs)
        reps[name] = pr.last
    d, o = reps["default"], reps["official"]
    assert d.params["retention_ratio"] == 0.25 and o.params["newline"] == "padded-rows"
    # same kept tokens (the unpad rules agree here), different packing: 16 newlines vs one per unpadded row
    assert all(torch.equal(a, b) for a, b in zip(d.kept[0], o.kept[0]))
    patches = sum(len(k) for k in d.kept[0])
    assert d.budget == o.budget == [patches]
    assert d.num_visual_tokens == [patches + g.valid_h]
    assert o.num_visual_tokens == [patches + 16]
    # raster thumbnail order and kept-rows newlines are options
    with vtprune.pruned(model, "globalcom2", base_order="raster", newline="kept-rows") as pr, torch.no_grad():
        model(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(d.kept[0], pr.last.kept[0]))
    assert patches < pr.last.num_visual_tokens[0] <= patches + g.valid_h


def test_unpad_rule_matters_where_rounding_differs():
    """396x704 on the 2x2 grid: transformers keeps canvas rows 10..37, the original LLaVA rule 11..36."""
    from vtprune.methods.base import ImageContext
    from vtprune.patches.anyres_official import CropCanvas

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    g = anyres.next_geometry((396, 704), pins, 336, 14)
    assert CropCanvas(g, rule="hf").ranges == (g.row_range, g.col_range) == ((10, 38), (0, 48))
    assert CropCanvas(g, rule="int").ranges == ((11, 37), (0, 48))
    logits = torch.randn(5, 16, 577, generator=torch.Generator().manual_seed(0))

    def run(**params):
        m = GlobalCom2(**params)
        ctx = ImageContext(0, g, m.budget(g.stock_count()), g.stock_count(), {23: logits}, torch.zeros(5, 576, 8), 0)
        return m.select(ctx), m._signals(ctx)

    (off, sig_off), (hf, sig_hf) = run(official=True), run(official=True, unpad_rule="hf")
    assert [v.numel() for v in sig_off.valid] == [13 * 24] * 4 and [v.numel() for v in sig_hf.valid] == [14 * 24] * 4
    rows_off = {int(r) for p in range(1, 5) for r in g.canvas_rc(torch.full_like(off.kept[p], p), off.kept[p])[0]}
    assert rows_off <= set(range(11, 37))
    assert off.slots.tolist().count(NEWLINE) == hf.slots.tolist().count(NEWLINE) == 48
    assert not torch.equal(off.slots, hf.slots)


def test_keep_ratio_every_policy(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(224, 224), (260, 170)])
    for newline in ("all-rows", "kept-rows", "none", "padded-rows"):
        with vtprune.pruned(model, "globalcom2", keep_ratio=0.3, newline=newline) as pr, torch.no_grad():
            model(**inputs)
        rep = pr.last
        assert rep.budget == [int(0.3 * a) for a in rep.available]
        assert all(b - 8 <= n <= b for n, b in zip(rep.num_visual_tokens, rep.budget))


# --- batches: every grid, left padding ----------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"keep_ratio": 0.3}, {"placement": "valid-index", "newline": "padded-rows"}], ids=["R", "keep_ratio", "quirks"])
def test_batch_every_grid_equals_single(llava_next, params):
    model, proc = llava_next
    qs = ["What is red?", "How many shapes?", "Where is the star?", "Is it blue?", "Count the circles in the picture please."]
    sizes = GRID_SIZES if params else [(260, 170)] + GRID_SIZES[1:]
    inputs = make_inputs(proc, [make_image(50 + i, s) for i, s in enumerate(sizes)], qs, padding_side="left")
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must be left-padded"
    with vtprune.pruned(model, "globalcom2", **params) as pr, torch.no_grad():
        model(**inputs)
    assert pr.last.grids == GRIDS
    _assert_batch_equals_single(model, inputs, [1] * 5, "globalcom2", params)


# --- half precision ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model, proc = tiny_llava_next("small", dtype=dtype)
    inputs = _batch(proc, [(224, 224), (112, 336)])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with vtprune.pruned(model, "globalcom2") as pr, torch.no_grad():
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert not torch.isnan(out).any() and gen.shape[0] == 2
    assert pr.last.scores[0][0].dtype == torch.float32 and torch.isfinite(pr.last.scores[0][0]).all()
    assert all(n > b for n, b in zip(pr.last.num_visual_tokens, pr.last.budget))  # newlines on top of R's patches
