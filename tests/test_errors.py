"""Every bad input gets a clear error naming the fix, and nothing is left half-patched."""

import pytest
import torch

import vtprune
from vtprune import UnsupportedModelError, UnsupportedSettingError, VTPruneError
from vtprune.testing import make_image, make_inputs, tiny_clip_tower


def _hooks(model):
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


_BEFORE = {}


def _clean(model):
    """No vtprune attribute or hook left (transformers installs output-capture hooks of its own lazily)."""
    hooks = _hooks(model)
    before = _BEFORE.setdefault(id(model), hooks)
    return "forward" not in model.__dict__ and "generate" not in model.__dict__ and vtprune.get_pruner(model) is None and hooks == before


@pytest.fixture(autouse=True)
def _snapshot(request):
    for name in ("llava", "llava_next"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)[0]
            _BEFORE[id(model)] = _hooks(model)


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("nope", {"keep": 8}, r"unknown method 'nope'; known methods: .*vtc-cls"),
        ("vtc-cls", {"keep": 0}, r"keep must be a positive int"),
        ("vtc-cls", {"keep": -3}, r"keep must be a positive int"),
        ("vtc-cls", {"keep": 2.5}, r"keep must be a positive int"),
        ("vtc-cls", {"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
        ("vtc-cls", {"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
        ("vtc-cls", {"keep": 8, "keep_ratio": 0.5}, r"not both"),
        ("vtc-cls", {}, r"give a budget, e.g. keep=64"),
        ("vtc-cls", {"keep": 8, "layer": 3}, r"no parameter 'layer'; its parameters are: .*start_layer"),
        ("vtc-cls", {"keep": 8, "start_layer": 23}, r"start_layer=23 is after the feature layer 22.*start_layer <= 22"),
        ("vtc-cls", {"keep": 8, "anyres_split": "thirds"}, r"anyres_split must be one of"),
        ("vtc-cls", {"keep": 8, "position_mode": "shifted"}, r"position_mode must be one of \('compact', 'original'\)"),
        ("random", {"keep": 8, "official": True}, r"no official implementation"),
        ("pool", {"keep": 8, "official": True}, r"no official implementation"),
        ("random", {"keep": 8, "newline": "sometimes"}, r"newline must be one of"),
    ],
)
def test_bad_parameters(llava, method, params, match):
    model, _ = llava
    with pytest.raises(VTPruneError, match=match):
        vtprune.patch(model, method, **params)
    assert _clean(model)


def test_failed_repatch_leaves_previous_method_in_place(llava):
    model, _ = llava
    pr = vtprune.patch(model, "random", keep=8)
    try:
        with pytest.raises(VTPruneError):
            vtprune.patch(model, "vtc-cls", keep=8, start_layer=40)
        assert pr.active and vtprune.get_pruner(model) is pr
    finally:
        pr.unpatch()
    assert _clean(model)


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="supported: LlavaForConditionalGeneration .*LlavaNextForConditionalGeneration.*CLIPVisionModel"):
        vtprune.patch(llm, "vtc-cls", keep=8)
    with pytest.raises(UnsupportedModelError, match="cannot patch Linear"):
        vtprune.patch(torch.nn.Linear(2, 2), "random", keep=8)
    assert "forward" not in llm.__dict__
    tiny_clip_tower  # bare CLIP towers are supported: see test_towers.py


def test_compiled_model_is_refused(llava):
    model, _ = llava
    compiled = torch.compile(model)
    with pytest.raises(UnsupportedModelError, match=r"patch the model first and compile afterwards"):
        vtprune.patch(compiled, "vtc-cls", keep=8)
    model.forward = torch.compile(model.forward)
    try:
        with pytest.raises(UnsupportedSettingError, match="patch the model before compiling"):
            vtprune.patch(model, "vtc-cls", keep=8)
    finally:
        del model.forward
    assert _clean(model)


def test_image_without_placeholders(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(0), "What is red?")
    ids = proc.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
    with vtprune.pruned(model, "vtc-cls", keep=8):
        with pytest.raises(VTPruneError, match=r"no image placeholder tokens; put '<image>' in the text"):
            model.generate(**ids, pixel_values=inputs["pixel_values"], max_new_tokens=2)


def test_placeholder_count_mismatch(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(0), "What is red?")
    ids = inputs["input_ids"][:, 5:]  # cut some placeholders off
    with vtprune.pruned(model, "vtc-cls", keep=8):
        with pytest.raises(VTPruneError, match=r"image placeholder tokens but the images give 576 visual tokens.*model's own processor"):
            model(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_official_vtccls_refuses_batches_and_next(llava, llava_next):
    model, proc = llava
    inputs = make_inputs(proc, [make_image(0), make_image(1)], ["a?", "b?"])
    with vtprune.pruned(model, "vtc-cls", keep=8, official=True):
        with pytest.raises(VTPruneError, match="batch-1 only"):
            model(**inputs)
    with pytest.raises(VTPruneError, match="LLaVA-1.5 only"):
        vtprune.patch(llava_next[0], "vtc-cls", keep=8, official=True)
    assert _clean(model) and _clean(llava_next[0])


def test_four_d_mask_is_refused(llava):
    model, proc = llava
    inputs = make_inputs(proc, make_image(0), "What is red?")
    T = inputs["input_ids"].shape[1]
    with vtprune.pruned(model, "random", keep=8):
        with pytest.raises(UnsupportedSettingError, match="2-D attention_mask"):
            model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=torch.ones(1, 1, T, T))


def test_methods_listing():
    listing = vtprune.methods()
    names = listing.names()
    assert {"none", "random", "pool", "vtc-cls"} <= set(names)
    vtc = next(m for m in listing if m.name == "vtc-cls")
    assert vtc.params["start_layer"] == 20 and vtc.official
    assert "start_layer=20" in str(listing)
