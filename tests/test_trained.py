"""vtprune.trained: the training recipe writes HF LLaVA / LLaVA-NeXT models that load offline from their
own files and that every method prunes; shipped weights (none yet, see docs/TRAINED.md) are held to
their documented accuracy."""

import os

import pytest
import torch

import vtprune
from vtprune import scenes as S
from vtprune import trained
from vtprune.testing import make_inputs
from vtprune.trained import train

ANSWERS = {"colour": set(S.COLOURS), "presence": {"yes", "no"}, "count": {str(i) for i in range(S.MAX_COUNT + 1)}, "side": {"left", "right"}}
# The bar shipped weights must clear on a fixed sample of the test split (docs/TRAINED.md: the target is
# 85 % overall on the full split; the answer prior is about 35 %).
MIN_SHIPPED_ACC = 0.80
SMOKE = ["--seed", "0", "--threads", "1", "--scenes-a", "6", "--val-a", "3", "--steps-a1", "2", "--batch-a1", "8", "--steps-a2", "2", "--batch-a2", "2", "--steps-a3", "1", "--batch-a3", "2", "--steps-b", "2", "--batch-b", "2", "--cache-b", "4", "--val-b", "2", "--eval-every", "2"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A two-step run of the real recipe for both variants (the plumbing, not the accuracy)."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("trained")
    try:
        train.main(["--variant", "llava15", "--out", str(root / "llava15"), *SMOKE])
        train.main(["--variant", "llava_next", "--init", str(root / "llava15"), "--out", str(root / "llava_next"), *SMOKE])
    finally:
        torch.set_num_threads(threads)
    return root


def _answers(model, processor, images, questions):
    inputs = make_inputs(processor, images, questions)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return [S.normalize(a) for a in processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)], inputs, out


def test_unknown_variant_and_missing_weights_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="llava15, llava_next"):
        trained.load("llava-9000")
    assert not trained.available("llava15", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python -m vtprune.trained.train --variant llava15"):
        trained.load("llava15", directory=tmp_path)


@pytest.mark.parametrize("variant", trained.VARIANTS)
def test_recipe_output_loads_offline_from_its_files(recipe, variant, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    d = recipe / variant
    assert trained.available(variant, d) and (d / "model.safetensors").stat().st_size <= 25 * 2**20
    model, processor = trained.load(variant, directory=d)
    cls = "LlavaNextForConditionalGeneration" if variant == "llava_next" else "LlavaForConditionalGeneration"
    assert type(model).__name__ == cls and not model.training
    vc = model.config.vision_config
    assert (vc.num_hidden_layers, vc.patch_size, vc.image_size) == (24, 14, 336)  # the methods' default layers apply
    assert model.config.text_config.num_hidden_layers == 16
    assert processor.tokenizer.padding_side == "left"
    # every word of every question is in the vocabulary (no <unk>)
    unk = processor.tokenizer.unk_token_id
    for q in {q.text for _, q in S.eval_questions(S.scenes("test", 10, variant))}:
        assert unk not in processor.tokenizer(q)["input_ids"], q


def test_llava15_keep_all_equals_unpatched_and_pruning_runs(recipe):
    model, processor = trained.load("llava15", directory=recipe / "llava15")
    sc = S.scenes("test", 2, "llava15")
    items = S.eval_questions(sc, types=("colour",))
    images, qs = [sc[i].render() for i, _ in items], [q.text for _, q in items]
    base, inputs, out = _answers(model, processor, images, qs)
    with torch.no_grad():
        ref = model(**inputs).logits
    with vtprune.pruned(model, "vtc-cls", keep=576) as pruner:
        with torch.no_grad():
            same = model(**inputs).logits
            out2 = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert pruner.last.num_visual_tokens == [576] * len(items)
    assert torch.equal(ref, same) and torch.equal(out, out2)
    for name in ("vtc-cls", "flowcut", "random", "pool"):
        with vtprune.pruned(model, name, keep=64) as pruner:
            _, _, out3 = _answers(model, processor, images, qs)
            assert pruner.last.num_visual_tokens == [64] * len(items)
        assert torch.equal(out3[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # unpatched again


def test_llava_next_uses_two_crops_and_prunes(recipe):
    model, processor = trained.load("llava_next", directory=recipe / "llava_next")
    sc = S.scenes("test", 2, "llava_next")
    items = S.eval_questions(sc, types=("colour", "side"))[:2]
    images, qs = [sc[i].render() for i, _ in items], [q.text for _, q in items]
    with vtprune.pruned(model, "none") as pruner:
        _answers(model, processor, images, qs)
        # a 672x336 / 336x672 scene is the base image plus two 336 crops (+ newline tokens)
        assert all(n in (1752, 1776) for n in pruner.last.num_visual_tokens), pruner.last.num_visual_tokens
    for name, kw in (("hired", {"keep_ratio": 0.2}), ("globalcom2", {"keep_ratio": 0.25})):
        with vtprune.pruned(model, name, **kw) as pruner:
            _answers(model, processor, images, qs)
            assert all(n < a for n, a in zip(pruner.last.num_visual_tokens, pruner.last.available))


@pytest.mark.parametrize("variant", trained.VARIANTS)
def test_shipped_weights_answer_test_questions(variant):
    if not trained.available(variant):
        pytest.skip(f"no trained {variant} weights ship yet (docs/TRAINED.md); this guards them once they do")
    model, processor = trained.load(variant)
    assert trained.path(variant).is_relative_to(os.path.dirname(vtprune.__file__))
    sc = S.scenes("test", 8, variant)
    items = S.eval_questions(sc)
    preds, _, _ = _answers(model, processor, [sc[i].render() for i, _ in items], [q.text for _, q in items])
    acc = sum(p == q.answer for p, (_, q) in zip(preds, items)) / len(items)
    assert acc >= MIN_SHIPPED_ACC, (acc, list(zip(preds, [q.answer for _, q in items])))
    assert all(p in ANSWERS[q.type] for p, (_, q) in zip(preds, items))


def _tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**train.VISION)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tower = CLIPVisionModel(cfg).eval()
    train.init_tower(tower)
    return tower


def test_stage_a_forward_on_patch_subsets_equals_the_hf_forward():
    """Stage A trains on windows and crops through `tower_forward`; on the whole grid it must be the
    HF forward (after some training-like perturbation, so the zero residual branches are not trivial)."""
    tower = _tower()
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
        pix = torch.randn(2, 3, 336, 336)
        ref = tower(pixel_values=pix, output_hidden_states=True).hidden_states
        mine = train.tower_forward(tower, pix, torch.arange(576)[None].expand(2, -1))
        assert len(mine) == len(ref) == 25
        for r, m in zip(ref, mine):
            torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-5)
        # a crop is the same computation as a whole image whose other patches are absent
        ids = torch.tensor([y * 24 + x for y in range(3, 8) for x in range(10, 15)])
        crop = train.tower_forward(tower, pix[:, :, 42:112, 140:210], ids[None].expand(2, -1), 2)
        emb = tower.embeddings.patch_embedding(pix).flatten(2).transpose(1, 2)[:, ids]
        torch.testing.assert_close(crop[0][:, 1:], tower.pre_layrnorm(torch.cat([tower.embeddings.class_embedding.expand(2, 1, -1), emb + tower.embeddings.position_embedding(ids + 1)], 1))[:, 1:])


def test_stage_a_initialisation_is_identity_with_neighbour_heads():
    """Zero residual branches (the 24 layers start as the identity) and, in the first LOCAL_LAYERS
    layers, heads whose CLS-free attention at initialisation sits on the intended neighbour."""
    tower = _tower()
    pix = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        hs = tower(pixel_values=pix, output_hidden_states=True).hidden_states
        for h in hs[1:]:
            torch.testing.assert_close(h, hs[0])
        layer = tower.encoder.layers[0]
        x = layer.layer_norm1(hs[0])
        q = layer.self_attn.q_proj(x).view(1, 577, 4, -1).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(1, 577, 4, -1).transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) * layer.self_attn.scale).softmax(-1)[0]
    for h, (oy, ox) in enumerate(train.OFFSETS[0]):
        target = [att[h, 1 + y * 24 + x, 1 + (y + oy) * 24 + x + ox].item() for y in range(2, 22) for x in range(2, 22)]
        assert sum(target) / len(target) > 0.5, (h, oy, ox)
        assert att[h, 1:, 1:].argmax(-1).reshape(24, 24)[12, 12].item() == (12 + oy) * 24 + 12 + ox


def test_stage_b_curriculum_keeps_every_object_patch():
    import random

    import numpy as np

    masks = [np.zeros(576, bool), np.zeros(576, bool)]
    masks[1][[5, 77, 300]] = True
    keep = train.curriculum_keep(masks, [0, 1], 0.0, random.Random(0))
    assert keep[0].dtype == torch.long and keep[0].numel() == 0  # an image can lose every token
    assert keep[1].tolist() == [5, 77, 300]
    some = train.curriculum_keep(masks, [1], 0.5, random.Random(0))[0].tolist()
    assert {5, 77, 300} <= set(some) and 150 < len(some) < 430 and some == sorted(some)
    assert train.curriculum_keep(masks, [0, 1], 1.0, random.Random(0)) is None
