"""The in-LLM dropping machinery with a toy two-stage method: per-stage cuts, per-layer KV cache
lengths (with and without end-of-prefill eviction), reports, batches, Qwen2-style configs."""

from dataclasses import dataclass

import pytest
import torch

import vtprune
from vtprune.methods.base import Method, Selection
from vtprune.patches.decoder import LLMStage
from vtprune.testing import make_image, make_inputs

from .helpers import _assert_batch_equals_single


class KeepFirstHalf(LLMStage):
    def __init__(self, layer):
        self.layer = layer

    def select(self, ctx):
        return [torch.arange((cols.numel() + 1) // 2) for _, cols in ctx.images]


@dataclass
class TwoStage(Method):
    """Toy method: keep every token before the LLM, then halve the visual tokens after layers 2 and 5."""

    evict: bool = False
    needs_budget = False
    has_official = False
    name = "two-stage"

    def budget(self, available):
        return available

    def select(self, image):  # pragma: no cover - never called (budget == available)
        return Selection(kept=image.geometry.full_selection())

    def llm_stages(self, family, num_layers):
        return [KeepFirstHalf(2), KeepFirstHalf(5)]

    def llm_evict_layers(self, family, num_layers):
        return list(range(2, 6)) if self.evict else []


@pytest.mark.parametrize("evict", [False, True])
def test_two_stages_cache_and_report(llava, evict):
    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    with vtprune.pruned(model, TwoStage(evict=evict)) as pr, torch.no_grad():
        out = model(**inputs, use_cache=True)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    rep = pr.last
    n_layers = model.config.text_config.num_hidden_layers
    assert rep.tokens_per_layer[0] == [576] * 3 + [288] * 3 + [144] * (n_layers - 6)
    assert [s.layer for s in rep.stages[0]] == [2, 5]
    assert torch.equal(rep.stages[0][1].surviving, torch.arange(144))
    text = inputs["input_ids"].shape[1] - 576
    lens = [out.cache.get_seq_length(i) for i in range(n_layers)]
    if evict:
        assert lens == [text + 576] * 2 + [text + 144] * (n_layers - 2)
    else:
        assert lens == [text + 576] * 3 + [text + 288] * 3 + [text + 144] * (n_layers - 6)
    assert out.logits.shape[1] == text + 144
    out_index = rep.output_index[0]
    assert int((out_index >= 0).sum()) == text + 144
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("evict", [False, True])
def test_two_stages_batch_equals_single(llava, evict):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(2), make_image(3)], ["What is red?", "How many circles are there in the image?"])
    _assert_batch_equals_single(model, inputs, [1, 1], TwoStage(evict=evict), {})


def test_static_cache_is_refused_for_in_llm_methods(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(1), "What is red?")
    with vtprune.pruned(model, TwoStage()):
        with pytest.raises(vtprune.UnsupportedSettingError, match="DynamicCache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.fixture(scope="module")
def llava_qwen2():
    import dataclasses

    from vtprune.testing import SPECS, tiny_llava

    return tiny_llava(dataclasses.replace(SPECS["small"], text_model="qwen2"))


def test_qwen2_language_model(llava_qwen2):
    model, proc = llava_qwen2
    inputs = make_inputs(proc, [make_image(2, (112, 112)), make_image(3, (112, 112))], ["What is red?", "How many circles are there in the image?"])
    _assert_batch_equals_single(model, inputs, [1, 1], TwoStage(evict=True), {})
    with vtprune.pruned(model, TwoStage()) as pr, torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert pr.last.tokens_per_layer[0][-1] == 16 and out.cache.get_seq_length(15) < out.cache.get_seq_length(0)
