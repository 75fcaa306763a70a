"""FlowCut reproduces the official code on every golden case: the vision-encoder stage
(../shared/golden/flowcut: kept indices exact, features atol 1e-4, per-step trace) and the LLM
layer-1 score (../shared/golden/flowcut_llm_stage: kept indices exact)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vtprune
from vtprune.methods.flowcut import llm_scores
from vtprune.testing import llava_around_tower

from .conftest import GOLDEN, golden_dir

VISION = sorted(p.name for p in (GOLDEN / "flowcut").glob("case_*")) or ["case_missing"]
LLM = sorted(p.name for p in (GOLDEN / "flowcut_llm_stage").glob("case_*")) or ["case_missing"]


def _case(case):
    d = golden_dir("flowcut") / case
    params = json.loads((d / "params.json").read_text())
    model, tok = llava_around_tower(json.loads((d / "tower_config.json").read_text()), load_file(str((d / params["tower_weights"]).resolve())))
    pixels = load_file(str(d / "inputs.safetensors"))["pixel_values"].float()
    return d, params, model, tok, pixels


def _prompts(tok, image_token_id, B, n=576):
    text = tok("USER: describe ASSISTANT:", add_special_tokens=False)["input_ids"]
    return torch.tensor([[tok.bos_token_id] + [image_token_id] * n + text] * B)


def _run(model, tok, pixels, params, **kw):
    seen = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        with vtprune.pruned(model, "flowcut", keep=params["keep_patches"], trace=True, **kw) as pr, torch.no_grad():
            model(input_ids=_prompts(tok, model.config.image_token_id, pixels.shape[0]), pixel_values=pixels)
    finally:
        hook.remove()
    return pr, torch.cat(seen, 0)


@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize("case", VISION)
def test_flowcut_vision_golden(case, official):
    d, params, model, tok, pixels = _case(case)
    exp = load_file(str(d / "expected.safetensors"))
    trace = json.loads((d / "expected.json").read_text())
    B = pixels.shape[0]
    if B > 1 and not official:
        pytest.skip("batch cases are the official cross-image coupling (see test_flowcut_default_decouples_batch)")
    pr, feats = _run(model, tok, pixels, params, official=official)
    rep = pr.last
    for b in range(B):
        assert torch.equal(rep.kept[b][0], exp["keep_indices"][b]), f"image {b}: kept indices differ"
    torch.testing.assert_close(feats, exp["features"], atol=1e-4, rtol=1e-4)
    steps = pr.method.last_trace
    want = trace["stage_trace"]
    assert [s["layer"] for s in steps] == [s["layer"] for s in want]
    for got, ref in zip(steps, want):
        assert got["tokens_after"] == ref["tokens_after"], f"layer {ref['layer']}"
        if ref["remaining"] > 0:
            assert max(got["dropped_requested"]) == ref["dropped_requested"], f"layer {ref['layer']}"
    assert rep.num_visual_tokens == [params["keep_patches"]] * B


def test_flowcut_default_decouples_batch():
    """By default each image of a batch gets its own schedule: equal to running it alone."""
    case = [c for c in VISION if c != "case_missing"]
    if not case:
        golden_dir("flowcut")
    d, params, model, tok, pixels = _case("case_5")
    pr, _ = _run(model, tok, pixels, params)
    batch = [k[0] for k in pr.last.kept]
    for b in range(pixels.shape[0]):
        single, _ = _run(model, tok, pixels[b : b + 1], params)
        assert torch.equal(batch[b], single.last.kept[0][0])
    exp = load_file(str(d / "expected.safetensors"))["keep_indices"]
    assert any(not torch.equal(batch[b], exp[b]) for b in range(pixels.shape[0])), "the golden batch case must show the coupling"


@pytest.mark.parametrize("case", LLM)
def test_flowcut_llm_stage_golden(case):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    d = golden_dir("flowcut_llm_stage") / case
    params = json.loads((d / "params.json").read_text())
    w = {k: v.float() for k, v in load_file(str(d / "attn_layer.safetensors")).items()}
    inp = load_file(str(d / "inputs.safetensors"))
    exp = load_file(str(d / "expected.safetensors"))["keep_indices"]
    cfg = LlamaConfig(**{k: v for k, v in params["llama_config"].items() if k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "rope_theta", "head_dim", "max_position_embeddings")})
    x, pos = inp["hidden_states"].float(), inp["position_ids"]
    B, S, _ = x.shape
    H = cfg.num_attention_heads
    hd = cfg.hidden_size // H
    q = (x @ w["q_proj.weight"].T).view(B, S, H, hd).transpose(1, 2)
    k = (x @ w["k_proj.weight"].T).view(B, S, H, hd).transpose(1, 2)
    v = (x @ w["v_proj.weight"].T).view(B, S, H, hd).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    rows = []
    samples = params["samples"] if "samples" in params else [params]
    for b, smp in enumerate(samples):
        start, V, L = smp["visual_token_pos"], smp["visual_token_num"], smp["seq_len"]
        if V <= params["target_num"]:
            continue
        cols = torch.arange(start, start + V)
        score = llm_scores(q[b, :, L - 1], k[b][:, cols], v[b, :, L - 1], v[b][:, cols], 1, hd**-0.5)
        rows.append(torch.sort(torch.topk(score, params["target_num"]).indices).values)
    assert torch.equal(torch.stack(rows), exp)
