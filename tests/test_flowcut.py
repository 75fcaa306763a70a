"""FlowCut end to end: the in-tower stage on tiny LLaVA models, and on LLaVA-NeXT the layer-1 cut in
the LLM (KV cache, masks, positions, generate, batches), checked against an uncached layer-by-layer
reference built without vtprune's hooks."""

import pytest
import torch

import vtprune
from vtprune.methods.flowcut import llm_scores
from vtprune.testing import make_image, make_inputs, tiny_llava

from .helpers import _assert_batch_equals_single
from .reference import llm_by_hand


def _embeds_hook(model, store):
    """Record (inputs_embeds, position_ids) of every prefill call of the language model."""
    lm = model.model.language_model

    def hook(m, a, kw):
        if kw.get("inputs_embeds") is not None and kw["inputs_embeds"].shape[1] > 1:
            store.append((kw["inputs_embeds"], kw.get("position_ids")))

    return lm.register_forward_pre_hook(hook, with_kwargs=True)


def test_llava_tower_really_shortens(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(2), "What is red?")
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for layer in model.model.vision_tower.encoder.layers]
    try:
        with vtprune.pruned(model, "flowcut", keep=64) as pr, torch.no_grad():
            out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    # tokens entering each layer: pruning after layers 1, 3, ..., 21
    assert lengths[0] == lengths[1] == 577 and lengths[2] < 577 and lengths[22] == 65
    assert all(a >= b for a, b in zip(lengths, lengths[1:])), "later layers run on fewer tokens"
    assert all(lengths[i] == lengths[i + 1] for i in range(2, 22, 2)), "only odd layers prune"
    assert len(lengths) == 23, "the tower stops at the feature layer"
    assert pr.last.num_visual_tokens == [64]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 576 + 64
    assert pr.last.tokens_per_layer[0] == [64] * model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_next_layer_one_cut_equals_reference(llava_next, position_mode):
    model, proc = llava_next
    inputs = make_inputs(proc, make_image(4, (224, 224)), "Which side is the star on?")
    T = 40
    seen = []
    hook = _embeds_hook(model, seen)
    try:
        with vtprune.pruned(model, "flowcut", keep=T, position_mode=position_mode) as pr, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            cache = model(**inputs, use_cache=True).cache
    finally:
        hook.remove()
    rep = pr.last
    V = rep.num_visual_tokens[0]
    assert V > T, "the tower stage keeps keep//2 per tile, more than keep in total"
    n_layers = model.config.text_config.num_hidden_layers
    assert rep.tokens_per_layer[0] == [V, V] + [T] * (n_layers - 2)
    assert rep.mean_tokens[0] == pytest.approx((2 * V + (n_layers - 2) * T) / n_layers)
    (stage,) = rep.stages[0]
    assert stage.layer == 1 and stage.surviving.numel() == T and torch.equal(stage.surviving, torch.sort(stage.surviving).values)
    text = inputs["input_ids"].shape[1] - rep.available[0]
    lens = [cache.get_seq_length(i) for i in range(n_layers)]
    assert lens == [text + V] * 2 + [text + T] * (n_layers - 2), "layers 0-1 keep the full prompt, later layers the cut one"
    # reference: the same LLM input, layer by layer, scored by hand, uncached greedy loop
    embeds, positions = seen[0]
    if positions is None:
        positions = torch.arange(embeds.shape[1])[None]
    ids = inputs["input_ids"][0]
    img = torch.nonzero(ids == model.config.image_token_id).flatten()
    vis_cols = img[0] + torch.arange(V)  # the visual run of the shrunk prompt starts where the image did
    tokens, keep_cols = [], None
    emb = embeds
    with torch.no_grad():
        for step in range(5):
            logits, kc = llm_by_hand(model, emb, cut_layer=1, keep_cols=keep_cols, position_mode=position_mode, score_fn=llm_scores, vis_cols=vis_cols, budget=T, positions=positions)
            if keep_cols is None:
                keep_cols = kc
                assert torch.equal(vis_cols[stage.surviving], torch.tensor([c for c in kc.tolist() if c in set(vis_cols.tolist())]))
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            emb = torch.cat([emb, model.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
            keep_cols = torch.cat([keep_cols, torch.tensor([emb.shape[1] - 1])])
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == tokens


def test_next_batch_equals_single(llava_next):
    model, proc = llava_next
    sizes = [(224, 224), (300, 150), (112, 336)]
    inputs = make_inputs(proc, [make_image(40 + i, s) for i, s in enumerate(sizes)], ["What is red?", "How many shapes are there in total?", "Where?"])
    assert bool((inputs["attention_mask"] == 0).any())
    _assert_batch_equals_single(model, inputs, [1, 1, 1], "flowcut", {"keep": 48})


def test_next_official_drops_newlines(llava_next):
    model, proc = llava_next
    inputs = make_inputs(proc, make_image(5, (300, 150)), "What is red?")
    with vtprune.pruned(model, "flowcut", keep=48, official=True) as pr, torch.no_grad():
        model(**inputs)
    off = pr.last
    with vtprune.pruned(model, "flowcut", keep=48) as pr, torch.no_grad():
        model(**inputs)
    dft = pr.last
    kept = sum(k.numel() for k in off.kept[0])
    assert off.num_visual_tokens[0] == kept, "official: no newline tokens"
    assert dft.num_visual_tokens[0] > sum(k.numel() for k in dft.kept[0]), "default: a newline per kept canvas row"
    assert all(torch.equal(a, b) for a, b in zip(off.kept[0], dft.kept[0])), "the tower stage is the same"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_nan(dtype):
    model, proc = tiny_llava("small", dtype=dtype)
    inputs = make_inputs(proc, make_image(6, (112, 112)), "What is red?")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with vtprune.pruned(model, "flowcut", keep=16) as pr, torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    assert pr.last.num_visual_tokens == [16]
    assert pr.last.kept[0][0].numel() == 16


def test_flowcut_errors(llava):
    model, _ = llava
    with pytest.raises(vtprune.VTPruneError, match="newline must be one of"):
        vtprune.patch(model, "flowcut", keep=8, newline="maybe")
    with pytest.raises(vtprune.VTPruneError, match="give a budget"):
        vtprune.patch(model, "flowcut")
