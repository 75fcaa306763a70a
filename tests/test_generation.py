"""Real shrinking and correct generation: pruned greedy decoding equals an independently built
reference (exactly K placeholders, kept features as inputs_embeds to the unpatched model, an
uncached greedy loop), for every pre-LLM method, both position modes, LLaVA-1.5 and LLaVA-NeXT."""

import pytest
import torch

import vtprune
from vtprune.testing import make_image, make_inputs

from .reference import greedy_reference, reference_features

N_NEW = 6
PRUNING = [("vtc-cls", {}), ("random", {"seed": 3}), ("pool", {})]


def _run(model, inputs, method, params, position_mode):
    with vtprune.pruned(model, method, position_mode=position_mode, **params) as pr:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
            cache_len = model(**inputs, use_cache=True).cache.get_seq_length()
    return out, pr.last, cache_len


@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("method,params", PRUNING)
def test_llava_generation_equals_reference(llava, method, params, position_mode):
    model, proc = llava
    inputs = make_inputs(proc, make_image(5), "What colour is the circle?")
    out, rep, cache_len = _run(model, inputs, method, dict(params, keep=48), position_mode)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :T], inputs["input_ids"]), "generate must return the caller's prompt first"
    assert rep.num_visual_tokens == [48]
    assert cache_len == T - 576 + 48, "the KV cache after prefill must be text + kept long"
    feats, pos, _ = reference_features(model, rep, 0, inputs["pixel_values"])
    ref = greedy_reference(model, inputs["input_ids"], feats, pos, N_NEW, position_mode)
    assert out[0, T:].tolist() == ref


@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("method,params", PRUNING)
@pytest.mark.parametrize("size", [(224, 224), (300, 180), (112, 336)])
def test_llava_next_generation_equals_reference(llava_next, method, params, position_mode, size):
    model, proc = llava_next
    inputs = make_inputs(proc, make_image(7, size), "Which side is the star on?")
    out, rep, cache_len = _run(model, inputs, method, dict(params, keep=60), position_mode)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :T], inputs["input_ids"])
    n = rep.num_visual_tokens[0]
    assert n <= 60 and (method == "pool" or n == 60), rep.summary()
    assert cache_len == T - rep.available[0] + n
    feats, pos, _ = reference_features(model, rep, 0, inputs["pixel_values"], inputs["image_sizes"])
    assert feats.shape[0] == n, "the reference re-derived a different layout from pruner.last.kept"
    ref = greedy_reference(model, inputs["input_ids"], feats, pos, N_NEW, position_mode)
    assert out[0, T:].tolist() == ref


def test_forward_labels_keep_their_meaning(llava):
    """model(**inputs, labels=...) computes the loss over the same text tokens."""
    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    with vtprune.pruned(model, "vtc-cls", keep=32) as pr, torch.no_grad():
        out = model(**inputs, labels=labels)
    rep = pr.last
    # reference: the same shrunk prompt through the unpatched model, labels on the same text tokens
    feats, pos, _ = reference_features(model, rep, 0, inputs["pixel_values"])
    ids = inputs["input_ids"][0]
    ph = (ids == model.config.image_token_id).nonzero()[:, 0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[ph[32:]] = False
    emb = model.get_input_embeddings()(ids[keep][None]).masked_scatter((ids[keep] == model.config.image_token_id)[None, :, None], feats)
    with torch.no_grad():
        ref = model(inputs_embeds=emb, labels=labels[:, keep])
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] == int(keep.sum())
    # the alignment map of the report points at the same text tokens
    assert torch.equal(rep.input_keep[0], keep)
    text_pos = (~(ids == model.config.image_token_id)).nonzero()[:, 0]
    torch.testing.assert_close(out.logits[0, rep.new_index[0, text_pos]], ref.logits[0, torch.cumsum(keep.long(), 0)[text_pos] - 1])


def test_static_cache_is_supported(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(1), make_image(2)], ["What is red?", "How many squares are there?"])
    with vtprune.pruned(model, "vtc-cls", keep=40), torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
        b = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, cache_implementation="static")
    assert torch.equal(a, b)


def test_generate_dict_output_and_multiple_sequences(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(3), "What is red?")
    T = inputs["input_ids"].shape[1]
    with vtprune.pruned(model, "random", keep=20), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert torch.equal(out.sequences[:, :T], inputs["input_ids"])
    assert len(out.scores) == 3
    assert beams.shape[0] == 2 and torch.equal(beams[:, :T], inputs["input_ids"].expand(2, -1))
