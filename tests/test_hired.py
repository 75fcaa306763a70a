"""HiRED: the official selection and packing on every golden case (../shared/golden/hired), the
allocation arithmetic, the keep/keep_ratio conversion, policies, batches with every AnyRes grid,
the LLaVA-1.5 variant, errors, half precision."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

import vtprune
from vtprune.errors import VTPruneError
from vtprune.methods.hired import HiRED, allocation, marked_counts
from vtprune.patches import anyres
from vtprune.patches.anyres import NEWLINE
from vtprune.patches.anyres_official import CropCanvas, pack, unpad_ranges
from vtprune.testing import llava_around_tower, make_image, make_inputs, tiny_llava_next

from .conftest import GOLDEN, golden_dir
from .helpers import _assert_batch_equals_single, _batch

CASES = sorted(p.name for p in (GOLDEN / "hired").glob("case_*")) or ["case_missing"]
GRID_SIZES = [(224, 224), (300, 150), (150, 300), (336, 112), (112, 336)]  # PIL (W, H) on the small model
GRIDS = [(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)]


# --- golden cases ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _golden(case):
    d = golden_dir("hired") / case
    params = json.loads((d / "params.json").read_text())
    expected = json.loads((d / "expected.json").read_text())
    tower_cfg = json.loads((d / "config.json").read_text())
    weights = load_file(str(d / "model.safetensors"))
    pixels = load_file(str(d / "pixel_values.safetensors"))["pixel_values"].float()
    scores = load_file(str(d / "expected_scores.safetensors"))
    next_ = params["num_partitions"] > 1
    model, tok = llava_around_tower(tower_cfg, weights, next_=next_)
    text = tok("USER: describe ASSISTANT:", add_special_tokens=False)["input_ids"]
    if next_:
        size = (params["orig_height"], params["orig_width"])
        geom = anyres.next_geometry(size, model.config.image_grid_pinpoints, 336, 14)
        inputs = {"pixel_values": pixels[None], "image_sizes": torch.tensor([size])}
    else:
        geom = anyres.llava_geometry(24, 24)
        inputs = {"pixel_values": pixels}
    n = geom.stock_count()
    inputs["input_ids"] = torch.tensor([[tok.bos_token_id] + [model.config.image_token_id] * n + text])
    return model, inputs, params, expected, scores, geom


def _run(case, **params):
    """Run the real model(...) path; returns (report, [(ImageContext, Selection)], logits length)."""
    model, inputs, *_ = _golden(case)
    seen = []
    with vtprune.pruned(model, "hired", **params) as pr:
        select = pr.method.select

        def spy(image):
            sel = select(image)
            seen.append((image, sel))
            return sel

        pr.method.select = spy
        with torch.no_grad():
            out = model(**inputs)
    return pr.last, seen, out.logits.shape[1]


def _ids(seq):
    return [NEWLINE if e[0] == "newline" else e[1] * 576 + e[-1] for e in seq]


def _kept_rows_only(seq):
    """A newline-after-every-row sequence with the newlines of rows that kept nothing removed."""
    out, row_has = [], False
    for e in seq:
        if e == NEWLINE:
            if row_has:
                out.append(e)
            row_has = False
        else:
            out.append(e)
            row_has = e >= 576  # base tokens come before the first crop row
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden_official(case):
    rep, seen, length = _run(case, official=True, token_budget_rate=_golden(case)[2]["token_budget_rate"])
    model, inputs, params, exp, scores, geom = _golden(case)
    (ctx, sel), = seen
    # scores: layer-22 (and layer-0) CLS attention, softmax over 577 keys, CLS dropped, head sum
    torch.testing.assert_close(torch.stack(rep.scores[0]), scores["cls_attn_layer22_headsum"], atol=2e-6, rtol=0)
    assert rep.scores[0][0].dtype == torch.float32
    # kept indices (the official masks) and per-partition budgets, exactly
    assert [k.tolist() for k in sel.kept] == exp["kept_indices"]
    for p, k in enumerate(sel.kept):
        assert torch.equal(scores["keep_mask"][p].nonzero().flatten(), k)
    if params["num_partitions"] == 1:
        assert len(sel.kept[0]) == exp["budget_base"]
        assert rep.kept[0][0].tolist() == [e[1] for e in exp["packed_order"]]
        assert rep.num_visual_tokens == [exp["budget_base"]] == rep.budget
        return
    torch.testing.assert_close(ctx.cls_probs(0).sum(1), scores["cls_attn_layer0_headsum"], atol=2e-6, rtol=0)
    assert [len(k) for k in sel.kept] == [exp["budget_base"]] + exp["budget_per_crop"]
    counts = marked_counts(ctx.cls_probs(0)[0].sum(0), params["alpha"], geom.rows * geom.cols)
    assert counts.tolist() == exp["initial_marked_count_per_chunk"]
    assert int(counts.sum()) == exp["num_initial_marked"]
    base_k, sub, ks = allocation(exp["total_budget"], params["alpha"], geom.rows * geom.cols, 576, counts)
    assert (base_k, sub, ks) == (exp["budget_base"], exp["budget_subimages_total"], exp["budget_per_crop"])
    assert rep.budget == [exp["total_budget"]]
    # the official packing: no newline, the transposed (pre-#32314) canvas for non-square grids
    assert sel.slots.tolist() == _ids(exp["packed_order_official"])
    assert rep.num_visual_tokens == [exp["packed_len_official"]]
    assert length == inputs["input_ids"].shape[1] - geom.stock_count() + exp["packed_len_official"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "case_6"])
@pytest.mark.parametrize(
    "params,key",
    [
        ({"official": True, "newline": "all-rows"}, "packed_order_official_with_newline_option"),
        ({"official": True, "grid": "corrected"}, "packed_order_corrected_grid"),
        ({"official": True, "grid": "corrected", "newline": "all-rows"}, "packed_order_corrected_grid_with_newline_option"),
        ({"newline": "none"}, "packed_order_corrected_grid"),  # vtprune's rounding: equal for these sizes
        ({"newline": "all-rows"}, "packed_order_corrected_grid_with_newline_option"),
        ({}, "kept-rows"),
    ],
)
def test_golden_packing(case, params, key):
    model, inputs, gp, exp, scores, geom = _golden(case)
    rep, seen, _ = _run(case, token_budget_rate=gp["token_budget_rate"], **params)
    (ctx, sel), = seen
    assert [k.tolist() for k in sel.kept] == exp["kept_indices"], "the selection does not depend on the packing"
    if key == "kept-rows":  # the default: a newline after every row that keeps a token
        want = _kept_rows_only(_ids(exp["packed_order_corrected_grid_with_newline_option"]))
        got = anyres.layout(geom, sel.kept, sel.newline, sel.base_order).slots.tolist()
        assert sel.slots is None and sel.newline == "kept-rows"
    else:
        want = _ids(exp[key])
        got = sel.slots.tolist() if sel.slots is not None else anyres.layout(geom, sel.kept, sel.newline).slots.tolist()
    assert got == want
    assert rep.num_visual_tokens == [len(want)], "num_visual_tokens counts the newlines"
    assert rep.num_visual_tokens[0] - sum(len(k) for k in rep.kept[0]) == want.count(NEWLINE)


def test_golden_non_square_official_differs():
    """Case 3 (1x2): the transposed canvas drops kept crop tokens that the corrected grid keeps."""
    rep_off, *_ = _run("case_3", official=True)
    rep_fix, *_ = _run("case_3", official=True, grid="corrected")
    assert rep_off.num_visual_tokens[0] < rep_fix.num_visual_tokens[0]
    assert sum(len(k) for k in rep_off.kept[0][1:]) < sum(len(k) for k in rep_fix.kept[0][1:])
    assert torch.equal(rep_off.kept[0][0], rep_fix.kept[0][0])


def test_golden_keep_converts_to_total():
    """keep = the packed length of a rate run gives the same tokens; one less never overshoots."""
    rep_rate, _, _ = _run("case_1", token_budget_rate=0.2)
    n = rep_rate.num_visual_tokens[0]
    rep_keep, _, _ = _run("case_1", keep=n)
    assert rep_keep.num_visual_tokens == [n]
    assert all(torch.equal(a, b) for a, b in zip(rep_keep.kept[0], rep_rate.kept[0]))
    for k in (n - 1, 300, 49, 10):
        rep, _, _ = _run("case_1", keep=k)
        assert rep.num_visual_tokens[0] <= k and rep.budget == [k]
    rep_ratio, _, _ = _run("case_1", keep_ratio=0.1)
    assert rep_ratio.budget == [292] and 280 <= rep_ratio.num_visual_tokens[0] <= 292


# --- allocation arithmetic ---------------------------------------------------------------------------------
def test_allocation_arithmetic():
    # totals of the spec: rate 0.2 on 5 and 3 partitions, 0.4 and 0.1 on 5
    assert int(5 * 576 * 0.2) == 576 and int(3 * 576 * 0.2) == 345
    assert allocation(345, 0.5, 2, 576, torch.tensor([149, 139]))[:2] == (172, 173)
    assert allocation(1152, 0.5, 4, 576, torch.tensor([72] * 4)) == (576, 576, [144] * 4)
    assert allocation(288, 0.5, 4, 576, torch.tensor([72] * 4)) == (144, 144, [36] * 4)
    # float32 truncation: 71/288 * 288 may come out just below 71
    base, sub, ks = allocation(576, 0.5, 4, 576, torch.tensor([71, 73, 72, 72]))
    c = torch.tensor([71, 73, 72, 72], dtype=torch.float32)
    assert ks == [int(x) for x in (c / c.sum() * 288)]
    # the per-crop clamp at 576 discards the excess, nothing is redistributed
    assert allocation(2880, 0.1, 4, 576, torch.tensor([288, 0, 0, 0])) == (288, 2304, [576, 0, 0, 0])
    # alpha = 0 marks every base token: a uniform split
    assert marked_counts(torch.rand(576), 0.0, 4).tolist() == [144] * 4
    # tiny grids whose patch count is not divisible by the crop count
    assert marked_counts(torch.arange(64.0), 0.5, 3).tolist() == [0, 11, 21]


# --- the packing helper agrees with the stock layout -----------------------------------------------------
@pytest.mark.parametrize("size", [(672, 672), (320, 600), (600, 320), (300, 1000), (1000, 300), (500, 700)])
@pytest.mark.parametrize("newline", ["kept-rows", "all-rows", "none"])
def test_pack_matches_stock_layout(size, newline):
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    g = anyres.next_geometry(size, pins, 336, 14)
    canvas = CropCanvas(g)
    assert canvas.ranges == (g.row_range, g.col_range)
    gen = torch.Generator().manual_seed(sum(size))
    kept = [torch.sort(torch.randperm(576, generator=gen)[: int(torch.randint(0, 300, (1,), generator=gen))]).values for _ in range(g.num_partitions)]
    parts = torch.cat([torch.full_like(kept[p], p) for p in range(1, g.num_partitions)])
    idx = torch.cat(kept[1:])
    r, c = canvas.rc(parts, idx)
    got = pack(canvas, kept[0], parts * 576 + idx, r, c, newline)
    assert torch.equal(got, anyres.layout(g, kept, newline).slots)


def test_transposed_canvas_and_int_rule():
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    g = anyres.next_geometry((320, 600), pins, 336, 14)  # 1x2
    assert (g.rows, g.cols) == (1, 2)
    t = CropCanvas(g, transposed=True, rule="int")
    assert t.shape == (48, 24) and t.ranges == ((18, 30), (0, 24))  # stitched as 2x1, unpadded with the wrong aspect
    r, c = t.rc(torch.tensor([2]), torch.tensor([0]))
    assert (int(r), int(c)) == (24, 0)
    # the two unpad rules differ where int(x) truncates a value that round(x, 7) lifts (198*48/352)
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    assert unpad_ranges((198, 352), (48, 48), "hf") == ((10, 38), (0, 48))
    assert unpad_ranges((198, 352), (48, 48), "int") == ((11, 37), (0, 48))
    assert unpad_image(torch.zeros(1, 48, 48), [198, 352]).shape[1] == 28  # transformers' own rule
    for size in [(320, 600), (600, 320), (700, 540), (560, 700), (300, 1000)]:
        g = anyres.next_geometry(size, pins, 336, 14)
        assert unpad_ranges(size, g.canvas, "hf") == (g.row_range, g.col_range)


# --- policies, official vs default ----------------------------------------------------------------------------
def test_official_vs_default_on_non_square(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(300, 150)])  # 1x2
    with vtprune.pruned(model, "hired") as pr, torch.no_grad():
        model(**inputs)
    default = pr.last
    with vtprune.pruned(model, "hired", official=True) as pr, torch.no_grad():
        model(**inputs)
    official = pr.last
    assert default.grids == [(1, 2)]
    assert default.params["newline"] == "kept-rows" and official.params["newline"] == "none"
    assert official.params["grid"] == "transposed" and default.params["grid"] == "corrected"
    assert default.params["token_budget_rate"] == 0.2
    P = 64
    n = 3
    assert default.budget == official.budget == [int(n * P * 0.2)]
    # same base selection; the transposed canvas loses crop tokens
    assert torch.equal(default.kept[0][0], official.kept[0][0])
    assert sum(len(k) for k in official.kept[0][1:]) < sum(len(k) for k in default.kept[0][1:])
    # official: no newline at all; default: one per canvas row that keeps a token
    assert official.num_visual_tokens[0] == sum(len(k) for k in official.kept[0])
    g = anyres.next_geometry(inputs["image_sizes"][0], model.config.image_grid_pinpoints, 112, 14)
    rows = set()
    for p in range(1, g.num_partitions):
        r, _ = g.canvas_rc(torch.full_like(default.kept[0][p], p), default.kept[0][p])
        rows |= set(r.tolist())
    assert default.num_visual_tokens[0] == sum(len(k) for k in default.kept[0]) + len(rows)


def test_rate_one(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(224, 224)])
    with torch.no_grad():
        ref = model(**inputs).logits
    with vtprune.pruned(model, "hired", token_budget_rate=1.0) as pr, torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref) and pr.last.num_visual_tokens == pr.last.available
    # official: the fork's "full" baseline keeps every patch but drops every newline
    with vtprune.pruned(model, "hired", token_budget_rate=1.0, official=True) as pr, torch.no_grad():
        model(**inputs)
    g = anyres.next_geometry(inputs["image_sizes"][0], model.config.image_grid_pinpoints, 112, 14)
    assert pr.last.num_visual_tokens == [pr.last.available[0] - g.valid_h] == [5 * 64]


def test_keep_ratio_and_newline_policies(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(224, 224), (300, 150)])
    for newline in ("kept-rows", "all-rows", "none"):
        with vtprune.pruned(model, "hired", keep_ratio=0.3, newline=newline) as pr, torch.no_grad():
            model(**inputs)
        rep = pr.last
        assert rep.budget == [int(0.3 * a) for a in rep.available]
        assert all(n <= b for n, b in zip(rep.num_visual_tokens, rep.budget))
        assert all(n >= b - 8 for n, b in zip(rep.num_visual_tokens, rep.budget)), "the conversion should nearly fill the budget"
        patches = [sum(len(k) for k in kept) for kept in rep.kept]
        if newline == "none":
            assert rep.num_visual_tokens == patches
        elif newline == "all-rows":
            assert [n - p for n, p in zip(rep.num_visual_tokens, patches)] == [16, 8]  # every unpadded row


# --- batches: every grid, left padding ----------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"keep": 70}, {"official": True}], ids=["rate", "keep", "official"])
def test_batch_every_grid_equals_single(llava_next, params):
    model, proc = llava_next
    qs = ["What is red?", "How many shapes?", "Where is the star?", "Is it blue?", "Count the circles in the picture please."]
    inputs = make_inputs(proc, [make_image(40 + i, s) for i, s in enumerate(GRID_SIZES)], qs, padding_side="left")
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must be left-padded"
    with vtprune.pruned(model, "hired", **params) as pr, torch.no_grad():
        model(**inputs)
    assert pr.last.grids == GRIDS
    _assert_batch_equals_single(model, inputs, [1] * 5, "hired", params)


# --- LLaVA-1.5 --------------------------------------------------------------------------------------------------
def test_llava15_variant(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(21), [make_image(22), make_image(23)], make_image(24)], ["a?", "b and c?", "d?"])
    with vtprune.pruned(model, "hired") as pr, torch.no_grad():
        model(**inputs)
    assert pr.last.num_visual_tokens == [115] * 4 == pr.last.budget
    scores = pr.last.scores[0][0]
    assert torch.equal(pr.last.kept[0][0], torch.sort(torch.topk(scores, 115).indices).values)
    _assert_batch_equals_single(model, inputs, [1, 2, 1], "hired", {"keep": 50})
    with pytest.raises(VTPruneError, match="batch element 0"):
        with vtprune.pruned(model, "hired", official=True), torch.no_grad():
            model(**inputs)
    single = make_inputs(proc, [make_image(21)], ["a?"])
    with vtprune.pruned(model, "hired", official=True, keep=40) as pr, torch.no_grad():
        model(**single)
    assert pr.last.num_visual_tokens == [40]


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,match",
    [
        ({"token_budget_rate": 0.2, "keep": 64}, "not both"),
        ({"token_budget_rate": 0.2, "keep_ratio": 0.5}, "keep_ratio= .*not both"),
        ({"token_budget_rate": 0.0}, r"\(0, 1\]"),
        ({"token_budget_rate": 1.5}, r"\(0, 1\]"),
        ({"token_budget_rate": True}, r"\(0, 1\]"),
        ({"alpha": 1.0}, r"\[0, 1\)"),
        ({"alpha": -0.1}, r"\[0, 1\)"),
        ({"init_layer": -1}, "non-negative"),
        ({"newline": "padded-rows"}, "newline must be one of"),
        ({"grid": "swapped"}, "grid must be one of"),
        ({"unpad_rule": "round"}, "unpad_rule must be one of"),
        ({"keep": 0}, "positive int"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(VTPruneError, match=match):
        HiRED(**params)


def test_layer_out_of_range(llava_next):
    model, _ = llava_next
    with pytest.raises(VTPruneError, match="final_layer=30 does not exist"):
        vtprune.patch(model, "hired", final_layer=30)
    assert vtprune.get_pruner(model) is None


# --- half precision ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model, proc = tiny_llava_next("small", dtype=dtype)
    inputs = _batch(proc, [(224, 224), (112, 336)])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with vtprune.pruned(model, "hired") as pr, torch.no_grad():
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert not torch.isnan(out).any() and gen.shape[0] == 2
    assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in pr.last.scores[0])
    assert pr.last.budget == [64, 51]
