"""Vision-side methods on bare towers: transformers' CLIPVisionModel and open_clip's VisionTransformer.
The tower returns the pruned sequence (CLS + kept patches) and pruner.last reports what was kept."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vtprune
from vtprune.testing import tiny_clip_tower

from .conftest import golden_dir

TOWER_METHODS = [("vtc-cls", {"keep": 64}), ("flowcut", {"keep": 64}), ("random", {"keep": 50}), ("pool", {"keep": 36})]


@pytest.fixture(scope="module")
def tower():
    return tiny_clip_tower()


def _hooks(m):
    return {n: (tuple(x._forward_hooks), tuple(x._forward_pre_hooks)) for n, x in m.named_modules()}


@pytest.mark.parametrize("method,params", TOWER_METHODS)
def test_hf_tower_returns_pruned_sequence(tower, method, params):
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    hooks = _hooks(tower)
    with vtprune.pruned(tower, method, **params) as pr, torch.no_grad():
        out = tower(pixel_values=px)
        single = [tower(pixel_values=px[i : i + 1]).last_hidden_state for i in range(2)]
    k = pr.last.num_visual_tokens[0]
    assert out.last_hidden_state.shape == (2, 1 + k, tower.config.hidden_size)
    assert out.pooler_output.shape == (2, tower.config.hidden_size)
    assert pr.last.kept[0][0].dtype == torch.long and pr.last.kept[0][0].numel() == k
    for i in range(2):
        torch.testing.assert_close(out.last_hidden_state[i], single[i][0], atol=1e-4, rtol=0)
    assert _hooks(tower) == hooks and "forward" not in tower.__dict__


def test_hf_tower_selection_gathers_the_unpruned_output(tower):
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tower(pixel_values=px)
    with vtprune.pruned(tower, "vtc-cls", keep=32) as pr, torch.no_grad():
        out = tower(pixel_values=px)
    kept = pr.last.kept[0][0]
    assert torch.equal(out.last_hidden_state[0, 0], ref.last_hidden_state[0, 0])
    assert torch.equal(out.last_hidden_state[0, 1:], ref.last_hidden_state[0, 1 + kept])
    assert torch.equal(out.pooler_output, ref.pooler_output), "selection after the tower leaves CLS untouched"


def test_hf_tower_flowcut_shortens_inside(tower):
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    with vtprune.pruned(tower, "flowcut", keep=64) as pr, torch.no_grad():
        out = tower(pixel_values=px, output_hidden_states=True)
    per_layer = pr.last.tokens_per_layer[0]
    assert per_layer[0] == 576 and per_layer[-1] == 64 and len(per_layer) == 24
    assert [h.shape[1] for h in out.hidden_states][-1] == 65


def test_hf_tower_keep_all_identity(tower):
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tower(pixel_values=px, output_hidden_states=True)
    for method in ["none", "vtc-cls", "flowcut", "random", "pool"]:
        with vtprune.pruned(tower, method, **({} if method == "none" else {"keep": 10**6})), torch.no_grad():
            out = tower(pixel_values=px, output_hidden_states=True)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state), method
        assert torch.equal(out.pooler_output, ref.pooler_output), method
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states)), method


def test_hf_tower_flowcut_golden():
    """The bare tower path reproduces the official FlowCut selection (golden case 2)."""
    d = golden_dir("flowcut") / "case_2"
    params = json.loads((d / "params.json").read_text())
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**{k: v for k, v in json.loads((d / "tower_config.json").read_text()).items() if k != "model_type"})
    tower = CLIPVisionModel(cfg).eval()
    state = {k.removeprefix("vision_model."): v.float() for k, v in load_file(str((d / params["tower_weights"]).resolve())).items()}
    tower.load_state_dict(state, strict=False)
    px = load_file(str(d / "inputs.safetensors"))["pixel_values"].float()
    exp = load_file(str(d / "expected.safetensors"))
    with vtprune.pruned(tower, "flowcut", keep=params["keep_patches"]) as pr, torch.no_grad():
        out = tower(pixel_values=px, output_hidden_states=True)
    assert torch.equal(pr.last.kept[0][0], exp["keep_indices"][0])
    torch.testing.assert_close(out.hidden_states[-2][0, 1:], exp["features"][0], atol=1e-4, rtol=1e-4)


def test_unsupported_towers():
    from transformers import CLIPConfig, CLIPModel, SiglipVisionConfig, SiglipVisionModel

    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14))
    with pytest.raises(vtprune.UnsupportedModelError, match="CLIPVisionModel and open_clip's VisionTransformer"):
        vtprune.patch(siglip, "vtc-cls", keep=2)
    clip = CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}, vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}))
    with pytest.raises(vtprune.UnsupportedModelError, match=r"clip_model.vision_model"):
        vtprune.patch(clip, "vtc-cls", keep=2)
    pr = vtprune.patch(clip.vision_model, "vtc-cls", keep=2, start_layer=1)
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=torch.randn(1, 3, 28, 28))
    pr.unpatch()
    assert pr.last.num_visual_tokens == [2] and emb.pooler_output.shape[-1] == clip.config.projection_dim
    with pytest.raises(vtprune.VTPruneError, match="not defined for clip"):
        vtprune.patch(tiny_clip_tower("small"), "hired", keep=8)
