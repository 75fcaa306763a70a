"""MustDrop: the golden cases of the official code (window merge, full vision tower with key set, LLM
prefill with dual filter and cache eviction), generation against the by-hand reference (Llama and
Qwen2 tiny LLMs), batches, cache lengths, the count rule for arbitrary budgets, order/positions,
half precision and errors."""

import dataclasses
import json
import math

import pytest
import torch

import vtprune
from vtprune.methods.mustdrop import MustDrop, _Plan, count_schedule, window_merge, window_tiles
from vtprune.testing import SPECS, make_image, make_inputs, tiny_llava

from .conftest import golden_dir
from .helpers import _assert_batch_equals_single, assert_no_eager
from .test_fastv import generate_and_compare


def _load(case):
    from safetensors.torch import load_file

    d = golden_dir("mustdrop") / case
    return d, load_file(str(d / "tensors.safetensors")), json.loads((d / "case.json").read_text())


# --- golden cases ------------------------------------------------------------------------------------------
def test_golden_case1_window_merge():
    _, t, case = _load("case_1")
    res = window_merge(t["x"], 24, 24, 3, 0.8)
    assert res.r == case["r"] == 5
    assert ((res.scores >= 0.8).sum(-1)).tolist() == case["n_windows_ge_thr_per_image"]
    torch.testing.assert_close(res.scores, t["aux_window_score"], atol=1e-5, rtol=0)
    assert res.hidden.shape == t["merged"].shape
    torch.testing.assert_close(res.hidden, t["merged"], atol=1e-4, rtol=0)
    for b in range(2):
        groups = [[0]] + [(g + 1).tolist() for g in res.rows[b]]  # token numbering incl. CLS
        assert groups == case["output_groups"][b]
        sizes = [len(g) for g in groups]
        assert sizes == t["size"][b, :, 0].long().tolist()
        src = torch.zeros(len(groups), 577, dtype=torch.uint8)
        for o, g in enumerate(groups):
            src[o, g] = 1
        assert torch.equal(src, t["source"][b])


def test_window_tiles_layout():
    tiles = window_tiles(24, 24, 3)
    assert tiles.shape == (64, 9)
    assert tiles[0].tolist() == [0, 1, 2, 24, 25, 26, 48, 49, 50]
    assert tiles[9].tolist() == [3 * 24 + 3 + k for k in (0, 1, 2)] + [4 * 24 + 3 + k for k in (0, 1, 2)] + [5 * 24 + 3 + k for k in (0, 1, 2)]
    assert window_tiles(8, 8, 3).shape == (4, 9), "rows/columns beyond the last full window are in no tile"


@pytest.fixture(scope="module")
def golden_tower_llava():
    from safetensors.torch import load_file

    from vtprune.testing import llava_around_tower

    d, t, case = _load("case_2")
    cfg = json.loads((d / "tiny_clip_vision" / "config.json").read_text())
    state = load_file(str(d / "tiny_clip_vision" / "model.safetensors"))
    model, tok = llava_around_tower(cfg, state)
    img = model.config.image_token_id
    ids = tok("USER: ")["input_ids"] + [img] * 576 + tok("\nWhat is red? ASSISTANT:")["input_ids"]
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), "pixel_values": t["pixel_values"]}
    return model, inputs, t, case


@pytest.mark.parametrize("order", ["official", "raster"])
def test_golden_case2_vision_tower(golden_tower_llava, order):
    model, inputs, t, case = golden_tower_llava
    seen, llm_in = [], []
    h1 = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    h2 = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: llm_in.append(kw["inputs_embeds"]), with_kwargs=True)
    tower_lengths = []
    h3 = [l.register_forward_pre_hook(lambda m, a: tower_lengths.append(a[0].shape[1])) for l in model.model.vision_tower.encoder.layers]
    try:
        with vtprune.pruned(model, "mustdrop", global_thr=0.0, individual_thr=0.0, order=order, trace=True) as pr, torch.no_grad():
            model(**inputs)
    finally:
        for h in [h1, h2, *h3]:
            h.remove()
    assert tower_lengths == [577] + [433] * 23, "layers 1..23 run on the merged sequence"
    feats = seen[0]
    torch.testing.assert_close(feats, t["image_features"], atol=1e-4, rtol=0)  # tower order = official order
    vt = pr.method.last_trace["vision"]
    assert vt[0]["r"] == case["r"] == 18
    keys = vt[1]["key_rows"][0]
    assert keys.tolist() == t["key_set"][0].tolist(), "key set (order: descending CLS attention) differs"
    assert keys.numel() == case["key_set_size"] == math.ceil(0.08 * 432)
    # merge provenance: the report's sources (kept reported by representative = the tile's bottom-right patch)
    groups = [sorted(x - 1 for x in g) for g in case["output_groups_incl_cls"][1:]]
    rep = pr.last
    assert rep.num_visual_tokens == [432]
    got = sorted(sorted(s.tolist()) for s in rep.sources[0][0])
    assert got == sorted(groups)
    for kid, src in zip(rep.kept[0][0].tolist(), rep.sources[0][0]):
        assert kid == int(src.max()), "a merged token is represented by its bottom-right patch"
    # the LLM's visual run: tower order (official) or raster order of representatives (default)
    reps = torch.tensor([max(g) for g in groups])
    perm = torch.arange(432) if order == "official" else torch.argsort(reps)
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == model.config.image_token_id)[0])
    with torch.no_grad():
        expected = model.model.multi_modal_projector(t["image_features"])[0][perm]
    torch.testing.assert_close(llm_in[0][0, start : start + 432], expected, atol=1e-4, rtol=0)
    # key positions handed to the LLM stage point at the key tokens in the LLM's order
    pos = vt[1]["key_positions"]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(432)
    assert pos.tolist() == sorted(inv[keys].tolist())


def _golden_llama():
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaModel

    d, t, case = _load("case_3")
    raw = json.loads((d / "tiny_llama_config.json").read_text())
    cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("transformers_version", "model_type")})
    cfg._attn_implementation = "sdpa"
    lm = LlamaModel(cfg).eval()
    lm.load_state_dict(load_file(str(d / "tiny_llama_weights.safetensors")), strict=True)
    return lm, t, case


def _run_golden_prefill(lm, t, case, position_mode="compact"):
    from vtprune.patches.decoder import DecoderPruner, PrefillRequest
    from vtprune.report import Report

    m = MustDrop(global_thr=case["global_thr"], individual_thr=case["individual_thr"], trace=True)
    L = case["seq_len"]
    n_layers = lm.config.num_hidden_layers
    dp = DecoderPruner(lm, m.llm_stages("llava", n_layers), position_mode, m.llm_evict_layers("llava", n_layers))
    try:
        m._pending = {0: _Plan(keys=t["key_set_in"].long(), thresholds=(case["global_thr"], case["individual_thr"]))}
        rep = Report("mustdrop", {}, stages=[[]], tokens_per_layer=[[]])
        v0 = case["v_token_start"]
        dp.pending = PrefillRequest([(0, torch.arange(v0, v0 + case["img_seq"]))], [case["img_seq"]], rep)
        with torch.no_grad():
            out = lm(inputs_embeds=t["inputs_embeds"], use_cache=True)
    finally:
        dp.remove()
    assert t["inputs_embeds"].shape[1] == L
    return m, rep, out


def test_golden_case3_prefill_and_cache():
    lm, t, case = _golden_llama()
    m, rep, out = _run_golden_prefill(lm, t, case)
    stages = m.last_trace["stages"]
    for s in range(4):
        tr = stages[s][0]
        assert tr["layer"] == case["pruning_layers"][s]
        assert tr["A"].shape == t[f"stage{s}_A_text_to_vis"].shape
        torch.testing.assert_close(tr["A"], t[f"stage{s}_A_text_to_vis"], atol=1e-4, rtol=0)
        assert tr["kept_by_filter"].tolist() == t[f"stage{s}_kept_by_filter"].tolist()
        assert tr["vis_keep"].tolist() == t[f"stage{s}_vis_keep"].tolist()
    assert t["stage0_kept_by_filter"].numel() < t["stage0_vis_keep"].numel(), "the key set restores a dropped token"
    assert [st.surviving.numel() for st in rep.stages[0]] == case["vision_tokens_after_each_stage"]
    # the sequence index lists of every stage, composed: the final survivors' original positions
    final = torch.nonzero(rep.output_index[0] >= 0).flatten()
    assert final.tolist() == t["final_survivor_orig_pos"].tolist()
    seq = torch.arange(case["seq_len"])
    for s in range(4):
        seq = seq[t[f"stage{s}_seq_index"].long()]
    assert seq.tolist() == final.tolist()
    torch.testing.assert_close(out.last_hidden_state, t["last_hidden_state"], atol=1e-4, rtol=0)
    assert [out.cache.get_seq_length(i) for i in range(32)] == case["cache_len_per_layer"]
    for l in (0, 1, 2, 3, 6, 7, 14, 15, 31):
        torch.testing.assert_close(out.cache.layers[l].keys, t[f"cache_k_layer{l}"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.cache.layers[l].values, t[f"cache_v_layer{l}"], atol=1e-4, rtol=0)
    n0, counts = case["img_seq"], case["vision_tokens_after_each_stage"]
    assert rep.tokens_per_layer[0] == [n0] * 3 + [counts[0]] * 4 + [counts[1]] * 4 + [counts[2]] * 4 + [counts[3]] * 17


def test_golden_case3_original_positions_first_stage():
    lm, t, case = _golden_llama()
    m, rep, out = _run_golden_prefill(lm, t, case, position_mode="original")
    tr = m.last_trace["stages"][0][0]
    assert tr["vis_keep"].tolist() == t["stage0_vis_keep"].tolist(), "stage 0 sees the same attention in both modes"
    torch.testing.assert_close(out.cache.layers[0].keys, t["cache_k_layer0"], atol=1e-4, rtol=0)


# --- generation against the by-hand reference ------------------------------------------------------------
def mustdrop_chooser(pr, g, i):
    keys = [x["key_positions"] for x in pr.method.last_trace["vision"] if "key_positions" in x][0]
    state = {"keys": keys.clone()}

    def choose(s, P, vis, T):
        rows = torch.arange(int(vis.max()) + 1, T)  # every token after the image block
        A = P[rows][:, vis]
        G, M = A.sum(0), A.max(0).values
        keep = ~((G < g * G.sum()) & (M < i))
        keep[state["keys"]] = True
        kept = torch.nonzero(keep).flatten()
        state["keys"] = torch.searchsorted(kept, state["keys"])
        return kept

    return choose


def mustdrop_count_chooser(pr, g, i):
    """The count rule by hand: key set + the top others by max(G / (g sum G), M / i), to the counts
    the report shows after each stage."""
    keys = [x["key_positions"] for x in pr.method.last_trace["vision"] if "key_positions" in x][0]
    tpl = pr.last.tokens_per_layer[0]
    counts = [tpl[l + 1] for l in pr.method.llm_layers]
    state = {"keys": keys.clone()}

    def choose(s, P, vis, T):
        rows = torch.arange(int(vis.max()) + 1, T)
        A = P[rows][:, vis]
        G, M = A.sum(0), A.max(0).values
        score = torch.maximum(G / (g * G.sum()), M / i)
        score[state["keys"]] = float("inf")
        top = torch.sort(score, descending=True, stable=True).indices[: counts[s]]
        kept = torch.sort(top).values
        state["keys"] = torch.searchsorted(kept, state["keys"])
        return kept

    return choose


def test_generate_equals_reference_count_rule(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(6), "What colour is the circle?")
    params = {"keep": 250, "merge_thr": 0.5, "trace": True}
    rep, surv = generate_and_compare(model, inputs, "mustdrop", params, lambda pr: mustdrop_count_chooser(pr, 0.001, 0.001), evict=range(2, 15))
    assert len(rep.stages[0]) == 4 and abs(rep.mean_tokens[0] - 250) <= 1.0


@pytest.fixture(scope="module")
def llava_qwen2_small():
    return tiny_llava(dataclasses.replace(SPECS["small"], text_model="qwen2"))


@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("evict", [True, False])
def test_generate_equals_reference_llama(llava, position_mode, evict):
    model, proc = llava
    inputs = make_inputs(proc, make_image(4), "Which side is the star on?")
    params = {"keep": 192, "merge_thr": 0.5, "trace": True, "position_mode": position_mode, "evict": evict}
    rep, surv = generate_and_compare(model, inputs, "mustdrop", params, lambda pr: mustdrop_chooser(pr, 0.001, 0.001), evict=range(2, 15) if evict else ())
    assert rep.num_visual_tokens[0] < 576, "the tower merged some tiles"
    assert len(rep.stages[0]) >= 3, "several stages cut"


@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_generate_equals_reference_qwen2(llava_qwen2_small, position_mode):
    model, proc = llava_qwen2_small
    inputs = make_inputs(proc, make_image(5, (112, 112)), "Is there a blue square?")
    params = {"global_thr": 0.015, "individual_thr": 0.03, "merge_thr": 0.0, "trace": True, "position_mode": position_mode}
    rep, surv = generate_and_compare(model, inputs, "mustdrop", params, lambda pr: mustdrop_chooser(pr, 0.015, 0.03), evict=range(2, 15))
    assert rep.num_visual_tokens[0] < 64 and len(rep.stages[0]) >= 2


# --- KV cache, reports, budgets --------------------------------------------------------------------------
@pytest.mark.parametrize("evict", [True, False])
def test_cache_lengths_after_prefill(llava, evict):
    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    with vtprune.pruned(model, "mustdrop", keep=192, evict=evict) as pr, torch.no_grad():
        out = model(**inputs, use_cache=True)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    rep = pr.last
    L = model.config.text_config.num_hidden_layers
    V = rep.tokens_per_layer[0]
    assert [s.layer for s in rep.stages[0]] == [2, 6, 10, 14]
    assert V[0] == V[2] > V[3] >= V[7] >= V[11] >= V[15]
    text = inputs["input_ids"].shape[1] - 576
    lens = [out.cache.get_seq_length(i) for i in range(L)]
    if evict:
        assert lens == [text + V[0]] * 2 + [text + V[-1]] * (L - 2), "layers 0-1 keep everything, the others the final survivors"
    else:
        assert lens == [text + V[j] for j in range(L)], "each layer holds the tokens that entered it"
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_presets_are_the_official_thresholds(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(2), "How many circles are there in the image?")
    with vtprune.pruned(model, "mustdrop", keep=192) as pr, torch.no_grad():
        model(**inputs)
    r192 = pr.last
    with vtprune.pruned(model, "mustdrop", global_thr=0.001, individual_thr=0.001) as pr, torch.no_grad():
        model(**inputs)
    rthr = pr.last
    assert r192.tokens_per_layer == rthr.tokens_per_layer
    assert all(torch.equal(x.surviving, y.surviving) for x, y in zip(r192.stages[0], rthr.stages[0]))
    assert r192.budget == [192] and rthr.budget == [576]
    assert MustDrop(keep=128)._thresholds_for(128) == (0.0012, 0.001)


@pytest.mark.parametrize("keep", [160, 200, 260, 400])
def test_count_rule_hits_the_layer_average(llava, keep):
    model, proc = llava
    inputs = make_inputs(proc, make_image(3), "What is red?")
    with vtprune.pruned(model, "mustdrop", keep=keep, merge_thr=0.5) as pr, torch.no_grad():
        model(**inputs)
    rep = pr.last
    assert rep.budget == [keep]
    assert abs(rep.mean_tokens[0] - keep) <= 0.05 * keep
    assert abs(rep.mean_tokens[0] - keep) <= 1.0, "the last stage absorbs the rounding"
    counts = rep.tokens_per_layer[0]
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_count_rule_keep_ratio_and_next(llava, llava_next):
    model, proc = llava
    inputs = make_inputs(proc, make_image(3), "What is red?")
    with vtprune.pruned(model, "mustdrop", keep_ratio=0.4) as pr, torch.no_grad():
        model(**inputs)
    assert pr.last.budget == [230] and abs(pr.last.mean_tokens[0] - 230) <= 0.05 * 230
    with vtprune.pruned(model, "mustdrop", keep=192, use_presets=False) as pr, torch.no_grad():
        model(**inputs)
    assert abs(pr.last.mean_tokens[0] - 192) <= 1.0
    model, proc = llava_next
    inputs = make_inputs(proc, make_image(14, (224, 224)), "What is red?")
    with vtprune.pruned(model, "mustdrop", keep=300) as pr, torch.no_grad():
        model(**inputs)
    rep = pr.last
    assert rep.available[0] > 300 and abs(rep.mean_tokens[0] - 300) <= 0.05 * 300, "NeXT: the count rule (no preset)"


def test_count_rule_floor_warns(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(3), "What is red?")
    with pytest.warns(UserWarning, match="below this image's floor"):
        with vtprune.pruned(model, "mustdrop", keep=100) as pr, torch.no_grad():
            model(**inputs)
    counts = pr.last.tokens_per_layer[0]
    assert counts[3] == counts[-1] == math.ceil(0.08 * 576), "the key set alone is kept"


def test_count_schedule():
    w = [3, 4, 4, 4, 17]  # 32 layers, cuts after 2, 6, 10, 14
    for target in (64, 128, 192, 300):
        c = count_schedule(576, 47, target, w)
        avg = (3 * 576 + sum(a * b for a, b in zip(w[1:], c))) / 32
        assert abs(avg - target) <= 0.5 * 17 / 32 + 1e-9 or c == [47] * 4
        assert all(x >= y for x, y in zip([576] + c, c))
    assert count_schedule(576, 47, 10, w) == [47] * 4
    assert count_schedule(300, 24, 400, w) == [300] * 4


def test_keep_above_available_disables(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(3), "What is red?")
    with torch.no_grad():
        ref = model(**inputs).logits
    with vtprune.pruned(model, "mustdrop", keep=576) as pr, torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref) and pr.last.stages == [[]]


# --- batches, NeXT, order, precision ------------------------------------------------------------------------
def test_batch_left_padding_equals_single(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(7), make_image(8)], ["What is red?", "How many circles are there in the image?"], padding_side="left")
    assert bool((inputs["attention_mask"] == 0).any())
    _assert_batch_equals_single(model, inputs, [1, 1], "mustdrop", {"keep": 192, "merge_thr": 0.5})
    _assert_batch_equals_single(model, inputs, [1, 1], "mustdrop", {"keep": 250, "merge_thr": 0.5, "position_mode": "original"})


def test_batch_qwen2_and_next(llava_qwen2_small, llava_next):
    model, proc = llava_qwen2_small
    inputs = make_inputs(proc, [make_image(9, (112, 112)), make_image(10, (112, 112))], ["What is red?", "How many circles are there in the image?"])
    _assert_batch_equals_single(model, inputs, [1, 1], "mustdrop", {"global_thr": 0.015, "individual_thr": 0.03, "merge_thr": 0.0})
    model, proc = llava_next
    inputs = make_inputs(proc, [make_image(11, (224, 224)), make_image(12, (300, 150))], ["What is red?", "Where is the star?"])
    _assert_batch_equals_single(model, inputs, [1, 1], "mustdrop", {"keep": 120, "merge_thr": 0.0})


def test_next_merge_per_tile_and_packing(llava_next):
    model, proc = llava_next
    inputs = make_inputs(proc, make_image(15, (300, 150)), "What is red?")
    with vtprune.pruned(model, "mustdrop", keep=150, merge_thr=0.0, trace=True) as pr, torch.no_grad():
        model(**inputs)
    rep = pr.last
    r = pr.method.last_trace["vision"][0]["r"]
    assert r > 0
    P = 64
    n_parts = len(rep.kept[0])
    # every tile merged r windows; representatives sit inside the unpadded area; sources are whole tiles
    for p in range(n_parts):
        for kid, src in zip(rep.kept[0][p].tolist(), rep.sources[0][p]):
            assert p * P + kid in src.tolist()
            assert src.numel() in (1, 9)
    assert rep.available[0] > rep.num_visual_tokens[0]
    for kp, count in zip(rep.kept[0][:1], [P - 8 * r]):
        assert kp.numel() == count, "the base image lost 8 rows per merged tile"


def test_official_order_and_batch(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(4), "Which side is the star on?")
    with vtprune.pruned(model, "mustdrop", keep=192, merge_thr=0.5, official=True, trace=True) as pr, torch.no_grad():
        model(**inputs)
    assert pr.method.policy("order") == "official" and pr.method.policy("position_mode") == "compact"
    assert pr.last.num_visual_tokens[0] < 576
    two = make_inputs(proc, [make_image(1), make_image(2)], ["What is red?", "Where?"])
    with vtprune.pruned(model, "mustdrop", keep=192, official=True):
        with pytest.raises(vtprune.VTPruneError, match="run one image at a time or drop official=True"):
            model(**two)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_nan(dtype):
    model, proc = tiny_llava("small", dtype=dtype)
    inputs = make_inputs(proc, make_image(6, (112, 112)), "What is red?")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with vtprune.pruned(model, "mustdrop", keep=24, merge_thr=0.0) as pr, torch.no_grad():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(out.logits).all()
    assert pr.last.num_visual_tokens[0] < 64 and pr.last.stages[0]
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_no_eager_attention(llava, monkeypatch):
    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    rep = assert_no_eager(model, inputs, monkeypatch, "mustdrop", {"keep": 192, "merge_thr": 0.5})
    assert rep.stages[0], "the in-LLM stage pruned something"


def test_errors(llava):
    model, _ = llava
    E = vtprune.VTPruneError
    with pytest.raises(E, match="give a budget"):
        vtprune.patch(model, "mustdrop")
    with pytest.raises(E, match="give both global_thr= and individual_thr="):
        vtprune.patch(model, "mustdrop", global_thr=0.001)
    with pytest.raises(E, match="not both"):
        vtprune.patch(model, "mustdrop", keep=64, global_thr=0.001, individual_thr=0.001)
    with pytest.raises(E, match="llm_layers must be increasing"):
        vtprune.patch(model, "mustdrop", keep=64, llm_layers=(6, 2))
    with pytest.raises(E, match="pass llm_layers= with layers below 15"):
        vtprune.patch(model, "mustdrop", keep=64, llm_layers=(2, 6, 10, 20))
    with pytest.raises(E, match="order must be one of"):
        vtprune.patch(model, "mustdrop", keep=64, order="zigzag")
    with pytest.raises(E, match="key_layer=30 does not exist"):
        vtprune.patch(model, "mustdrop", keep=64, key_layer=30)
    with pytest.raises(E, match="window must be an int >= 2"):
        vtprune.patch(model, "mustdrop", keep=64, window=1)
    with pytest.raises(E, match="key_rate must be in"):
        vtprune.patch(model, "mustdrop", keep=64, key_rate=1.5)
