"""The core contract: keep-all identity, batches, fast attention kept, reversibility, independence."""

import copy

import pytest
import torch

import vtprune
from vtprune import registry
from vtprune.testing import make_image, make_inputs

from .helpers import _assert_batch_equals_single, _batch, _hooks, assert_no_eager

METHODS = vtprune.methods().names()
KEEP_ALL = {m: registry.get(m).keep_all_params() for m in METHODS}
KEEP_ALL_RATIO = {m: ({"keep_ratio": 1.0} if "keep" in KEEP_ALL[m] else KEEP_ALL[m]) for m in METHODS}


# --- keep-all identity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [KEEP_ALL, KEEP_ALL_RATIO], ids=["keep", "keep_ratio"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_keep_all_is_identity(request, family, method, params):
    if family not in registry.get(method).families:
        pytest.skip(f"{method} is not defined for {family}")
    model, proc = request.getfixturevalue(family)
    sizes = [(336, 336), (336, 336)] if family == "llava" else [(224, 224), (300, 180)]
    inputs = _batch(proc, sizes)
    with torch.no_grad():
        ref = model(**inputs).logits
        gen_ref = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with vtprune.pruned(model, method, **params[method]) as pr:
        with torch.no_grad():
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert pr.last.num_visual_tokens == pr.last.available
        if method == "vtc-cls":  # the scoring hooks still ran although nothing was pruned
            assert sorted(pr._capture.logits) == [20, 21, 22]
            assert all(s is not None for s in pr.last.scores)
    assert torch.equal(out, ref), "keep-all logits must equal the unpatched model bit for bit"
    assert torch.equal(gen, gen_ref), "keep-all greedy tokens must equal the unpatched model"


def test_keep_all_identity_full_size_next(llava_next_full):
    model, proc = llava_next_full
    inputs = _batch(proc, [(672, 672), (500, 300)])
    with torch.no_grad():
        ref = model(**inputs).logits
    with vtprune.pruned(model, "vtc-cls", keep=10**6) as pr, torch.no_grad():
        out = model(**inputs).logits
    assert pr.last.available == [2928, int((inputs["input_ids"][1] == model.config.image_token_id).sum())]
    assert torch.equal(out, ref)


# --- batches -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("vtc-cls", {"keep": 64}), ("random", {"keep_ratio": 0.2}), ("pool", {"keep": 36}), ("none", {})])
def test_llava_batch_equals_single(llava, method, params):
    model, proc = llava
    imgs = [make_image(21), [make_image(22), make_image(23)], make_image(24)]
    qs = ["What is red?", "Compare the two pictures: which one has more circles?", "Is there a square?"]
    inputs = make_inputs(proc, imgs, qs, padding_side="left")
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must be left-padded"
    _assert_batch_equals_single(model, inputs, [1, 2, 1], method, params)


@pytest.mark.parametrize("method,params", [("vtc-cls", {"keep": 80}), ("random", {"keep_ratio": 0.3}), ("pool", {"keep": 50})])
def test_llava_next_batch_equals_single(llava_next, method, params):
    model, proc = llava_next
    sizes = [(224, 224), (300, 150), (112, 336)]  # grids 2x2, 1x2, 3x1
    inputs = make_inputs(proc, [make_image(30 + i, s) for i, s in enumerate(sizes)], ["What is red?", "How many shapes?", "Where is the star?"])
    _assert_batch_equals_single(model, inputs, [1, 1, 1], method, params)


def test_batch_budget_is_per_image(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(224, 224), (300, 150)])
    with vtprune.pruned(model, "vtc-cls", keep_ratio=0.25) as pr, torch.no_grad():
        model(**inputs)
    rep = pr.last
    assert rep.budget == [int(0.25 * a) for a in rep.available]
    assert rep.num_visual_tokens == rep.budget
    assert [len(t) for t in rep.tokens_per_layer] == [model.config.text_config.num_hidden_layers] * 2
    assert rep.mean_tokens == [float(n) for n in rep.num_visual_tokens]


# --- fast attention kept ---------------------------------------------------------------------------------
def test_no_eager_attention(llava, monkeypatch):
    model, proc = llava
    rep = assert_no_eager(model, _batch(proc, [(336, 336)]), monkeypatch, "vtc-cls", {"keep": 32})
    assert rep.num_visual_tokens == [32]


# --- reversibility and independence -----------------------------------------------------------------------
def test_unpatch_restores_exactly(llava):
    model, proc = llava
    inputs = _batch(proc, [(336, 336)])
    with torch.no_grad():
        ref = model(**inputs).logits
    hooks, attrs = _hooks(model), dict(model.__dict__)
    params = {k: v for k, v in model.state_dict().items()}
    for method in ["vtc-cls", "random", "pool"]:
        pr = vtprune.patch(model, method, keep=20)
        assert "forward" in model.__dict__ and vtprune.get_pruner(model) is pr
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] < ref.shape[1]
        pr.unpatch()
        pr.unpatch()  # idempotent
        assert _hooks(model) == hooks, "hooks left in the module tree"
        assert model.__dict__.keys() == attrs.keys() and all(model.__dict__[k] is attrs[k] for k in attrs)
        assert all(model.state_dict()[k] is v or torch.equal(model.state_dict()[k], v) for k, v in params.items())
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
    assert vtprune.unpatch(model) is False


def test_context_manager_restores_on_error(llava):
    model, proc = llava
    hooks = _hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.pruned(model, "vtc-cls", keep=10):
            raise RuntimeError("boom")
    assert _hooks(model) == hooks and "forward" not in model.__dict__


def test_repatch_replaces_previous_method(llava):
    model, proc = llava
    hooks = _hooks(model)
    inputs = _batch(proc, [(336, 336)])
    first = vtprune.patch(model, "vtc-cls", keep=16)
    second = vtprune.patch(model, "random", keep=24)
    assert not first.active and second.active
    with torch.no_grad():
        model(**inputs)
    assert second.last.num_visual_tokens == [24] and first.last is None
    second.unpatch()
    assert _hooks(model) == hooks and "forward" not in model.__dict__


def test_two_models_are_independent(llava):
    model_a, proc = llava
    model_b = copy.deepcopy(model_a)
    model_b.config = model_a.config  # share the config object too
    inputs = _batch(proc, [(336, 336)])
    with torch.no_grad():
        ref = model_b(**inputs).logits
    with vtprune.pruned(model_a, "vtc-cls", keep=8) as pr:
        with torch.no_grad():
            out_b = model_b(**inputs).logits
            out_a = model_a(**inputs).logits
        assert vtprune.get_pruner(model_b) is None
        assert pr.last.num_visual_tokens == [8]
        with vtprune.pruned(model_b, "random", keep=100) as pr_b, torch.no_grad():
            model_b(**inputs)
        assert pr.last.num_visual_tokens == [8] and pr_b.last.num_visual_tokens == [100]
    assert torch.equal(out_b, ref) and out_a.shape[1] == ref.shape[1] - 576 + 8
    assert model_a.config._attn_implementation == "sdpa"


def test_text_only_prompt_runs_unpruned(llava):
    model, proc = llava
    ids = proc.tokenizer(["USER: hello there ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=4, do_sample=False)
    with vtprune.pruned(model, "vtc-cls", keep=8) as pr, torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        logits = model(**ids).logits
    assert torch.equal(out, ref)
    assert pr.last.num_images == 0 and logits.shape[1] == ids["input_ids"].shape[1]


def test_inputs_embeds_prompt(llava):
    """A prompt given as inputs_embeds (placeholders found by embedding equality) is pruned too."""
    model, proc = llava
    inputs = _batch(proc, [(336, 336)])
    emb = model.get_input_embeddings()(inputs["input_ids"])
    with vtprune.pruned(model, "vtc-cls", keep=24) as pr, torch.no_grad():
        a = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        b = model(inputs_embeds=emb, pixel_values=inputs["pixel_values"]).logits
    assert pr.last.num_visual_tokens == [24]
    torch.testing.assert_close(a, b)


def test_report_contract(llava_next):
    model, proc = llava_next
    inputs = _batch(proc, [(224, 224), (300, 150)])
    with vtprune.pruned(model, "vtc-cls", keep=40) as pr, torch.no_grad():
        model(**inputs)
    rep = pr.last
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert rep.num_images == 2 and rep.sample_of == [0, 1]
    for i in range(2):
        rows, cols = rep.grids[i]
        assert len(rep.kept[i]) == 1 + rows * cols
        for p, kp in enumerate(rep.kept[i]):
            assert kp.dtype == torch.long and kp.dim() == 1
            assert torch.equal(kp, torch.sort(kp).values) and (kp.numel() == 0 or (kp.min() >= 0 and kp.max() < grid * grid))
            assert rep.scores[i][p].shape == (grid * grid,)
        assert rep.sources[i] is None
    assert rep.input_keep.shape == inputs["input_ids"].shape


# --- when select runs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params,selects,budget",
    [
        ("vtc-cls", {"keep": 576}, False, 576),  # a budget at the unpruned count: the stock layout, no selection
        ("vtc-cls", {"keep": 64}, True, 64),
        ("hired", {}, True, int(576 * 0.2)),  # rate mode: HiRED's own budget, set in select
        ("hired", {"token_budget_rate": 1.0}, False, 576),  # rate 1 in the stock packing keeps everything
        ("mustdrop", {"global_thr": 0.01, "individual_thr": 0.01}, True, 576),  # threshold mode reports `available`
        ("atp", {}, True, 576),  # nothing dropped before the LLM; select records the table its stages use
    ],
)
def test_selection_runs_when_the_method_needs_it(llava, method, params, selects, budget):
    model, proc = llava
    inputs = _batch(proc, [(336, 336)])
    with vtprune.pruned(model, method, **params) as pr, torch.no_grad():
        calls = []
        real = pr.method.select_batch
        pr.method.select_batch = lambda images: calls.append(len(images)) or real(images)
        model(**inputs)
    assert calls == ([1] if selects else [])
    assert pr.last.budget == [budget]
