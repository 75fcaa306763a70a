"""Vision-side methods on a bare open_clip VisionTransformer (random weights, `open_clip.create_model`).
Needs the `openclip` extra (open_clip_torch, which needs torchvision): CI runs this file in a second
environment; it skips elsewhere."""

import pytest
import torch

import vtprune


def _hooks(m):
    return {n: (tuple(x._forward_hooks), tuple(x._forward_pre_hooks)) for n, x in m.named_modules()}


open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (the `openclip` extra; CI runs these in a second environment)")


@pytest.fixture(scope="module")
def oc_visual():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return model.eval()


@pytest.mark.parametrize("method,params", [("vtc-cls", {"keep": 16, "start_layer": 8}), ("flowcut", {"keep": 16}), ("random", {"keep": 12}), ("pool", {"keep": 9})])
def test_open_clip_tower(oc_visual, method, params):
    visual = oc_visual.visual
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = visual(px)
    hooks = _hooks(visual)
    with vtprune.pruned(visual, method, **params) as pr, torch.no_grad():
        visual.output_tokens = True
        try:
            pooled, tokens = visual(px)
        finally:
            visual.output_tokens = False
        emb = oc_visual.encode_image(px)
    k = pr.last.num_visual_tokens[0]
    assert tokens.shape[:2] == (2, k) and pooled.shape == ref.shape and emb.shape == ref.shape
    assert _hooks(visual) == hooks and "forward" not in visual.__dict__
    with torch.no_grad():
        assert torch.equal(visual(px), ref), "unpatched again"


def test_open_clip_keep_all_identity(oc_visual):
    visual = oc_visual.visual
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = visual(px)
    for method in ["vtc-cls", "flowcut"]:
        with vtprune.pruned(visual, method, keep=10**6, **({"start_layer": 8} if method == "vtc-cls" else {})), torch.no_grad():
            out = visual(px)
        assert torch.equal(out, ref), method
