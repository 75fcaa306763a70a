"""FastV: the layer-K cut in the LLM (selection, KV cache, positions, generate, batches), checked against
an uncached layer-by-layer reference built here without vtprune's hooks. The reference helpers
(`by_hand_generate`, `eager_probs`) are shared with test_mustdrop.py and test_atp.py."""

import dataclasses

import pytest
import torch

import vtprune
from vtprune.testing import SPECS, make_image, make_inputs, tiny_llava

from .helpers import _assert_batch_equals_single


# --- an independent reference: uncached, layer by layer, eager attention computed here ---------------------
def capture_llm_input(model, store):
    """Record (inputs_embeds, position_ids) of every prefill call of the language model."""

    def hook(m, a, kw):
        e = kw.get("inputs_embeds")
        if e is not None and e.shape[1] > 1:
            store.append((e.detach().clone(), kw.get("position_ids")))

    return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def eager_probs(layer, h, cos_sin):
    """Head-mean softmax attention [T, T] of a decoder layer on hidden states h [1, T, D] (causal,
    float32), from its own projections, written out by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    T, d = h.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    return torch.softmax(logits, -1).mean(1)[0]


def by_hand_generate(model, embeds, positions, stages, choose, n_new, position_mode, evict=()):
    """Batch-1 greedy decoding without cache and without vtprune hooks. The full sequence (prompt +
    generated tokens) runs through the decoder layers by hand at every step; after each layer in
    `stages` the prompt's visual tokens are cut to `choose(stage_index, probs, vis, T_now)` (positions
    kept among the current visual columns `vis`; probs = eager head-mean attention [T_now, T_now] of
    that layer over the current prompt). Generated tokens see, at layers in `evict`, only the prompt
    tokens that survive every stage, and get the position of the unpruned continuation minus the
    prompt tokens removed below them ("compact") or the unpruned one ("original").
    Returns (tokens, per-step logits [n_new, vocab], per-stage kept visual indices into the LLM input's
    visual segment). `vis0`: the visual columns of the LLM input."""
    lm = model.model.language_model
    T = embeds.shape[1]
    pos0 = torch.arange(T)[None] if positions is None else positions
    vis0 = stages["vis"]
    layers = stages["layers"]
    tokens, all_logits, plan = [], [], None
    gen_emb = embeds[:, :0]
    with torch.no_grad():
        for step in range(n_new):
            t = gen_emb.shape[1]
            # prompt part: columns of the original prompt still present, their positions
            pk = torch.arange(T)
            pp = pos0[0].clone()
            vis = vis0.clone()
            h = torch.cat([embeds, gen_emb], 1)
            kept_stages = [] if plan is None else None
            for j, layer in enumerate(lm.layers):
                # which prompt columns this layer's generated tokens see, and how many were removed below
                if plan is not None and j in evict:
                    final = plan["final"]
                    seen = torch.isin(pk, final)
                    removed = T - final.numel()
                else:
                    seen = torch.ones(pk.numel(), dtype=torch.bool)
                    removed = T - pk.numel()
                base = int(pos0[0, -1]) + 1
                gpos = torch.arange(t) + base - (removed if position_mode == "compact" else 0)
                pos = torch.cat([pp, gpos])[None]
                n = pk.numel() + t
                mask = torch.ones(n, n, dtype=torch.bool).tril()
                mask[pk.numel() :, : pk.numel()] &= seen[None, :]
                cos_sin = lm.rotary_emb(h, pos)
                if j in layers:
                    s = layers.index(j)
                    if plan is None:
                        P = eager_probs(layer, h[:, : pk.numel()], tuple(x[:, : pk.numel()] for x in cos_sin))
                        keep_vis = choose(s, P, vis, pk.numel())
                        kept_stages.append(keep_vis)
                    else:
                        keep_vis = plan["stages"][s]
                h = layer(h, attention_mask=mask[None, None], position_ids=pos, position_embeddings=cos_sin, cache=None, use_cache=False)
                if j in layers:
                    drop = torch.zeros(pk.numel(), dtype=torch.bool)
                    drop[vis] = True
                    drop[vis[keep_vis]] = False
                    rows = torch.cat([torch.nonzero(~drop).flatten(), pk.numel() + torch.arange(t)])
                    h = h[:, rows]
                    newcol = torch.cumsum((~drop).long(), 0) - 1
                    vis = newcol[vis[keep_vis]]
                    pk = pk[~drop]
                    pp = pp[~drop] - torch.cumsum(drop.long(), 0)[~drop] if position_mode == "compact" else pp[~drop]
            if plan is None:
                plan = {"stages": kept_stages, "final": pk.clone()}
            logits = model.lm_head(lm.norm(h))[0, -1]
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            all_logits.append(logits)
            gen_emb = torch.cat([gen_emb, model.get_input_embeddings()(torch.tensor([[nxt]])).to(embeds.dtype)], 1)
    # per-stage survivors as indices into the LLM input's visual segment
    surv, idx = [], torch.arange(vis0.numel())
    for k in plan["stages"]:
        idx = idx[k]
        surv.append(idx.clone())
    return tokens, torch.stack(all_logits), surv


def generate_and_compare(model, inputs, method, params, choose_factory, n_new=5, evict=()):
    """Run vtprune's greedy generate, then the by-hand reference from the same LLM input; compare
    tokens, logits and per-stage survivors. `choose_factory(pruner)` builds the reference's chooser."""
    seen = []
    hook = capture_llm_input(model, seen)
    try:
        with vtprune.pruned(model, method, **params) as pr, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, return_dict_in_generate=True, output_logits=True)
            rep = pr.last
            choose = choose_factory(pr)
            layers = [s.layer for s in pr._decoder.stages]
            mode = pr.method.policy("position_mode")
    finally:
        hook.remove()
    embeds, positions = seen[0]
    ids = inputs["input_ids"][0]
    img = torch.nonzero(ids == model.config.image_token_id).flatten()
    V = rep.num_visual_tokens[0]
    vis = img[0] + torch.arange(V)  # the visual run of the shrunk prompt starts where the image did
    toks, logits, surv = by_hand_generate(model, embeds, positions, {"vis": vis, "layers": layers}, choose, n_new, mode, evict)
    got = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert got == toks
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], logits, atol=1e-4, rtol=0)
    # every stage where the reference cut something is reported with the same survivors, and only those
    rep_stages = {st.layer: st.surviving for st in rep.stages[0]}
    prev = V
    for l, s in zip(layers, surv):
        if s.numel() < prev:
            assert l in rep_stages and torch.equal(rep_stages[l], s), f"stage after layer {l}: survivors differ from the reference"
        else:
            assert l not in rep_stages
        prev = s.numel()
    return rep, surv


def fastv_chooser(R):
    def choose(s, P, vis, T):
        score = P[T - 1, vis]
        if vis.numel() <= R:
            return torch.arange(vis.numel())
        return torch.sort(torch.topk(score, R).indices).values

    return choose


@pytest.fixture(scope="module")
def llava_qwen2_small():
    return tiny_llava(dataclasses.replace(SPECS["small"], text_model="qwen2"))


# --- the cut ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_cache_lengths_and_report(llava, k):
    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    R = 100
    with vtprune.pruned(model, "fastv", keep=R, k=k) as pr, torch.no_grad():
        out = model(**inputs, use_cache=True)
    rep = pr.last
    L = model.config.text_config.num_hidden_layers
    text = inputs["input_ids"].shape[1] - 576
    assert rep.num_visual_tokens == [576] and rep.budget == [R]
    assert rep.tokens_per_layer[0] == [576] * k + [R] * (L - k)
    assert rep.mean_tokens[0] == pytest.approx((k * 576 + (L - k) * R) / L)
    assert [s.layer for s in rep.stages[0]] == [k - 1]
    lens = [out.cache.get_seq_length(i) for i in range(L)]
    assert lens == [text + 576] * k + [text + R] * (L - k), "layers 0..K-1 keep the full prompt, later layers the cut one"
    assert out.logits.shape[1] == text + R


def test_selection_is_top_last_token_attention(llava):
    """The survivors are the top-R of the last prompt token's head-mean attention at layer K-1,
    recomputed here by hand from the layer's input hidden states (eager, all keys)."""
    model, proc = llava
    inputs = make_inputs(proc, make_image(3), "How many circles are there in the image?")
    R = 50
    lm = model.model.language_model
    captured = {}

    def grab(m, a, kw):
        captured.setdefault("h", (a[0] if a else kw["hidden_states"]).clone())
        captured.setdefault("cs", kw["position_embeddings"])

    hook = lm.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtprune.pruned(model, "fastv", keep=R) as pr, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    with torch.no_grad():
        P = eager_probs(lm.layers[1], captured["h"], captured["cs"])
    img = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    score = P[-1, img]
    expected = torch.sort(torch.topk(score, R).indices).values
    top = torch.sort(score, descending=True).values
    assert float(top[R - 1] - top[R]) > 1e-6, "test needs a clear top-R boundary"
    assert torch.equal(pr.last.stages[0][0].surviving, expected)


@pytest.mark.parametrize("position_mode", ["original", "compact"])
def test_generate_equals_reference_llama(llava, position_mode):
    model, proc = llava
    inputs = make_inputs(proc, make_image(4), "Which side is the star on?")
    generate_and_compare(model, inputs, "fastv", {"keep": 64, "position_mode": position_mode}, lambda pr: fastv_chooser(64))


@pytest.mark.parametrize("position_mode", ["original", "compact"])
def test_generate_equals_reference_qwen2(llava_qwen2_small, position_mode):
    model, proc = llava_qwen2_small
    inputs = make_inputs(proc, make_image(5, (112, 112)), "Is there a blue square?")
    generate_and_compare(model, inputs, "fastv", {"keep": 20, "k": 3, "position_mode": position_mode}, lambda pr: fastv_chooser(20))


def test_default_positions_are_original():
    from vtprune.methods.fastv import FastV

    assert FastV(keep=4).policy("position_mode") == "original"
    assert FastV(keep=4, official=True).policy("position_mode") == "original"


def test_batch_left_padding_equals_single(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(7), make_image(8)], ["What is red?", "How many circles are there in the image?"], padding_side="left")
    assert bool((inputs["attention_mask"] == 0).any())
    _assert_batch_equals_single(model, inputs, [1, 1], "fastv", {"keep": 64})
    _assert_batch_equals_single(model, inputs, [1, 1], "fastv", {"keep_ratio": 0.25, "position_mode": "compact"})


def test_batch_qwen2_and_next(llava_qwen2_small, llava_next):
    model, proc = llava_qwen2_small
    inputs = make_inputs(proc, [make_image(9, (112, 112)), make_image(10, (112, 112))], ["What is red?", "How many circles are there in the image?"])
    _assert_batch_equals_single(model, inputs, [1, 1], "fastv", {"keep": 16})
    model, proc = llava_next
    inputs = make_inputs(proc, [make_image(11, (224, 224)), make_image(12, (300, 150))], ["What is red?", "Where is the star?"])
    _assert_batch_equals_single(model, inputs, [1, 1], "fastv", {"keep": 60})


def test_next_newlines_compete(llava_next):
    model, proc = llava_next
    inputs = make_inputs(proc, make_image(13, (300, 150)), "What is red?")
    with vtprune.pruned(model, "fastv", keep=40) as pr, torch.no_grad():
        out = model(**inputs, use_cache=True)
    rep = pr.last
    V = rep.available[0]
    assert rep.num_visual_tokens == [V], "every visual token (newlines included) enters the LLM"
    L = model.config.text_config.num_hidden_layers
    assert rep.tokens_per_layer[0] == [V, V] + [40] * (L - 2)
    text = inputs["input_ids"].shape[1] - V
    assert out.cache.get_seq_length(0) == text + V and out.cache.get_seq_length(L - 1) == text + 40


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_nan(dtype):
    model, proc = tiny_llava("small", dtype=dtype)
    inputs = make_inputs(proc, make_image(6, (112, 112)), "What is red?")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with vtprune.pruned(model, "fastv", keep=16) as pr, torch.no_grad():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(out.logits).all()
    assert pr.last.tokens_per_layer[0][-1] == 16
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_no_eager_attention(llava, monkeypatch):
    from .helpers import assert_no_eager

    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    rep = assert_no_eager(model, inputs, monkeypatch, "fastv", {"keep": 32})
    assert rep.stages[0], "the in-LLM stage pruned something"


def test_errors(llava):
    model, proc = llava
    with pytest.raises(vtprune.VTPruneError, match="give a budget"):
        vtprune.patch(model, "fastv")
    with pytest.raises(vtprune.VTPruneError, match="k must be an int >= 1"):
        vtprune.patch(model, "fastv", keep=8, k=0)
    with pytest.raises(vtprune.VTPruneError, match="use k < 16"):
        vtprune.patch(model, "fastv", keep=8, k=16)
    inputs = make_inputs(proc, [make_image(1), make_image(2)], ["What is red?", "Where?"])
    with vtprune.pruned(model, "fastv", keep=8, official=True):
        with pytest.raises(vtprune.VTPruneError, match="run one image at a time or drop official=True"):
            model(**inputs)
    single = make_inputs(proc, make_image(1), "What is red?")
    with vtprune.pruned(model, "fastv", keep=8, official=True) as pr, torch.no_grad():
        model(**single)
    assert pr.last.tokens_per_layer[0][-1] == 8
