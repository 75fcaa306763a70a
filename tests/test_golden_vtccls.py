"""VTC-CLS reproduces the official selection exactly on every golden case (../shared/golden/vtccls)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vtprune
from vtprune.testing import llava_around_tower

from .conftest import GOLDEN, golden_dir

CASES = sorted(p.name for p in (GOLDEN / "vtccls").glob("case_*")) or ["case_missing"]


def _prompt(tok, image_token_id, n):
    text = tok("USER: describe ASSISTANT:", add_special_tokens=False)["input_ids"]
    return torch.tensor([[tok.bos_token_id] + [image_token_id] * n + text])


@pytest.mark.parametrize("case", CASES)
def test_vtccls_golden(case):
    root = golden_dir("vtccls")
    d = root / case
    params = json.loads((d / "params.json").read_text())
    tower_cfg = json.loads((d / "tower_config.json").read_text())
    weights = load_file(str((d / params["tower_weights"]).resolve()))
    pixels = load_file(str(d / "inputs.safetensors"))["pixel_values"].float()
    exp = load_file(str(d / "expected.safetensors"))

    model, tok = llava_around_tower(tower_cfg, weights)
    grid = tower_cfg["image_size"] // tower_cfg["patch_size"]
    ids = _prompt(tok, model.config.image_token_id, grid * grid)
    seen = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: seen.setdefault("pre", a[0]))
    try:
        with vtprune.pruned(model, "vtc-cls", keep=params["keep_patches"], start_layer=params["start_layer"], official=True) as pr:
            with torch.no_grad():
                out = model(input_ids=ids, pixel_values=pixels)
    finally:
        hook.remove()
    rep = pr.last
    kept = rep.kept[0][0]
    assert kept.dtype == torch.long
    assert torch.equal(kept, exp["keep_indices"][0]), "kept indices differ from the official VTC-CLS selection"
    torch.testing.assert_close(rep.scores[0][0], exp["cls_score"], atol=1e-6, rtol=0)
    feats = seen["pre"][0, kept]
    torch.testing.assert_close(feats, exp["features"][0], atol=1e-4, rtol=1e-4)
    assert rep.num_visual_tokens == [params["keep_patches"]]
    assert out.logits.shape[1] == ids.shape[1] - grid * grid + params["keep_patches"]
