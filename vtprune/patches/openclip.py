"""open_clip's `VisionTransformer`, run block by block with the same interface as `VisionTower`.

open_clip's blocks use `nn.MultiheadAttention` with one packed input projection, so there is no
q/k/v submodule to hook. A forward pre-hook on each needed block's `attn` module recomputes, from
the normalised input it receives and the module's own `in_proj_weight`, only what the capture asks
for: the CLS query row (one row) and the keys (and values for in-tower methods). The attention
itself still runs unchanged (its fused / SDPA path), so outputs are bit-identical when nothing is
pruned; the price is one extra key (and value) projection per scored layer.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError


def is_open_clip_visual(module) -> bool:
    return type(module).__name__ == "VisionTransformer" and hasattr(module, "transformer") and hasattr(module, "conv1") and hasattr(module, "_embeds")


class OpenClipTower:
    def __init__(self, visual: nn.Module):
        if not is_open_clip_visual(visual):
            raise UnsupportedModelError(f"expected an open_clip VisionTransformer, got {type(visual).__name__}")
        blocks = visual.transformer.resblocks
        attn = getattr(blocks[0], "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or getattr(attn, "in_proj_weight", None) is None:
            raise UnsupportedModelError("vtprune supports open_clip VisionTransformers whose blocks use nn.MultiheadAttention with a packed in_proj")
        self.module = visual
        self.layers = blocks
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        ps = visual.conv1.kernel_size
        self.patch_size = ps[0] if isinstance(ps, tuple) else ps

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def run(self, pixel_values, hidden_indices, on_layer=None, run_until=None):
        last = max(hidden_indices) if run_until is None else max(run_until, max(hidden_indices))
        h = self.module._embeds(pixel_values)
        out = {0: h} if 0 in hidden_indices else {}
        for i, block in enumerate(self.layers[:last]):
            if self.batch_first:
                h = block(h, attn_mask=None)
            else:
                h = block(h.transpose(0, 1), attn_mask=None).transpose(0, 1)
            if on_layer is not None:
                h = on_layer(i, h)
            if i + 1 in hidden_indices:
                out[i + 1] = h
        return out

    def attention(self, layer: int):
        attn = self.layers[layer].attn
        d = attn.embed_dim // attn.num_heads
        return SimpleNamespace(num_heads=attn.num_heads, head_dim=d, scale=d**-0.5)

    def hook_projections(self, layer: int, kinds, fn) -> list:
        attn = self.layers[layer].attn
        D = attn.embed_dim
        w, b = attn.in_proj_weight, attn.in_proj_bias
        where = {"q": 0, "k": 1, "v": 2}
        batch_first = self.batch_first

        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["query"]
            if not batch_first:
                x = x.transpose(0, 1)
            for kind in kinds:
                j = where[kind]
                wj = w[j * D : (j + 1) * D]
                bj = b[j * D : (j + 1) * D] if b is not None else None
                fn(kind, F.linear(x[:, :1] if kind == "q" else x, wj, bj))
            return None

        return [attn.register_forward_pre_hook(pre, with_kwargs=True)]

    def grid(self, pixel_values) -> tuple[int, int]:
        return pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size

    def finish(self, x: torch.Tensor):
        """The module's own output from the final tokens: pooled (+ tokens) as its forward returns."""
        v = self.module
        pooled, tokens = v._pool(x)
        if getattr(v, "proj", None) is not None:
            pooled = pooled @ v.proj
        if getattr(v, "output_tokens", False):
            return pooled, tokens
        return pooled
