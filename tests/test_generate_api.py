"""generate() / forward() stay drop-ins: positional arguments, max_length, inferred masks, caches
passed with pixels, manual decode loops, deep copies, streamers, padding sides, packed positions."""

import copy

import pytest
import torch
from transformers import GenerationConfig

import vtprune
from vtprune.patches import sequence
from vtprune.testing import make_image, make_inputs

from .helpers import _assert_batch_equals_single


def _one(proc, seed=1, q="What is red?"):
    return make_inputs(proc, make_image(seed), q)


def test_positional_generate_arguments(llava):
    model, proc = llava
    inputs = _one(proc)
    cfg = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    with vtprune.pruned(model, "vtc-cls", keep=16), torch.no_grad():
        a = model.generate(inputs["input_ids"], cfg, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
        b = model.generate(input_ids=inputs["input_ids"], generation_config=cfg, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    assert torch.equal(a, b) and a.shape[1] == inputs["input_ids"].shape[1] + 3


def test_max_length_counts_the_callers_prompt(llava):
    model, proc = llava
    inputs = _one(proc)
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = model.generate(**inputs, max_length=T + 3, do_sample=False)
    with vtprune.pruned(model, "random", keep=8), torch.no_grad():
        out = model.generate(**inputs, max_length=T + 3, do_sample=False)
        out_min = model.generate(**inputs, max_new_tokens=6, min_length=T + 5, do_sample=False)
    assert out.shape == ref.shape == (1, T + 3)
    assert out_min.shape[1] >= T + 5


def test_generate_without_attention_mask_infers_padding(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(1), make_image(2)], ["What is red?", "How many circles are there in this picture?"])
    assert bool((inputs["attention_mask"] == 0).any())
    no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with vtprune.pruned(model, "vtc-cls", keep=20), torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        b = model.generate(**no_mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_cache_passed_with_pixels(llava, position_mode):
    """A text prefix already in the cache, then the image prompt: keep-all equals the unpatched model."""
    model, proc = llava
    inputs = _one(proc)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    with torch.no_grad():
        pre = model(input_ids=ids[:, :first], attention_mask=am[:, :first], use_cache=True).cache
        ref = model(input_ids=ids[:, first:], pixel_values=inputs["pixel_values"], attention_mask=am, cache=copy.deepcopy(pre)).logits
        with vtprune.pruned(model, "vtc-cls", keep=10**6, position_mode=position_mode):
            out = model(input_ids=ids[:, first:], pixel_values=inputs["pixel_values"], attention_mask=am, cache=copy.deepcopy(pre)).logits
            out2 = model(input_ids=ids[:, first:], pixel_values=inputs["pixel_values"], cache=copy.deepcopy(pre)).logits
        with vtprune.pruned(model, "vtc-cls", keep=24) as pr:
            small = model(input_ids=ids[:, first:], pixel_values=inputs["pixel_values"], attention_mask=am, cache=copy.deepcopy(pre))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out2, ref, atol=1e-5, rtol=0)
    assert small.logits.shape[1] == ids.shape[1] - first - 576 + 24 and pr.last.num_visual_tokens == [24]
    assert small.cache.get_seq_length() == first + ids.shape[1] - first - 576 + 24


@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_manual_decode_loop_equals_generate(llava, position_mode):
    model, proc = llava
    inputs = _one(proc, 3)
    with vtprune.pruned(model, "vtc-cls", keep=32, position_mode=position_mode), torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
        out = model(**inputs, use_cache=True)
        cache, am = out.cache, inputs["attention_mask"]
        toks = [int(out.logits[0, -1].argmax())]
        for _ in range(3):
            am = torch.cat([am, torch.ones(1, 1, dtype=am.dtype)], 1)  # the caller's mask counts the original prompt
            out = model(input_ids=torch.tensor([[toks[-1]]]), attention_mask=am, cache=cache, use_cache=True)
            cache = out.cache
            toks.append(int(out.logits[0, -1].argmax()))
    assert toks == ref


def test_deepcopy_gives_an_unpatched_copy(llava):
    model, proc = llava
    inputs = _one(proc)
    with vtprune.pruned(model, "vtc-cls", keep=8) as pr:
        with pytest.warns(UserWarning, match="the copy is unpatched"):
            clone = copy.deepcopy(model)
        assert pr.active and vtprune.get_pruner(clone) is None and "forward" not in clone.__dict__
        with torch.no_grad():
            for p in clone.parameters():
                p.add_(0.01)
            a = model(**inputs).logits
            b = clone(**inputs).logits
    assert a.shape[1] == inputs["input_ids"].shape[1] - 576 + 8
    assert b.shape[1] == inputs["input_ids"].shape[1], "the copy runs its own (unpatched) forward with its own weights"
    del clone


def test_streamer_sees_the_callers_prompt(llava):
    model, proc = llava
    inputs = _one(proc)
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            seen.append(None)

    with vtprune.pruned(model, "random", keep=8), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, streamer=Streamer())
    assert torch.equal(seen[0], inputs["input_ids"]) and seen[-1] is None and len(seen) == 4


def test_beams_and_sampling_at_batch_two(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(1), make_image(2)], ["What is red?", "How many circles are there?"])
    T = inputs["input_ids"].shape[1]
    with vtprune.pruned(model, "vtc-cls", keep=16), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 4
    assert torch.equal(out[:, :T], inputs["input_ids"].repeat_interleave(2, 0))


def test_right_padding_batch_equals_single(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(5), make_image(6)], ["What is red?", "How many circles are there in the image?"], padding_side="right")
    assert bool((inputs["attention_mask"][:, -1] == 0).any())
    with vtprune.pruned(model, "vtc-cls", keep=24) as pr, torch.no_grad():
        out = model(**inputs).logits
        rows = []
        for b in range(2):
            m = inputs["attention_mask"][b].bool()
            single = model(input_ids=inputs["input_ids"][b : b + 1, m], attention_mask=inputs["attention_mask"][b : b + 1, m], pixel_values=inputs["pixel_values"][b : b + 1]).logits
            rows.append(single)
    for b in range(2):
        n = rows[b].shape[1]
        torch.testing.assert_close(out[b, :n], rows[b][0], atol=1e-4, rtol=0)


def test_original_positions_batch_equals_single(llava):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(7), [make_image(8), make_image(9)]], ["What is red?", "Which of the two pictures has more squares?"])
    _assert_batch_equals_single(model, inputs, [1, 2], "vtc-cls", {"keep": 30, "position_mode": "original"})


def test_packed_positions_restart_per_sequence():
    """Caller position_ids with a reset (packed sequences): compact renumbering restarts at each one."""
    image = torch.tensor([[False, True, True, True, False, False, True, True, False]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    ids = torch.arange(9)[None]
    out = sequence.shrink(image, [3, 2], [torch.tensor([0]), torch.tensor([0])], input_ids=ids, position_ids=pos, mode="forward")
    assert out.input_ids.tolist() == [[0, 1, 4, 5, 6, 8]]
    assert out.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
