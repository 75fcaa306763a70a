"""HF CLIP vision tower: running it layer by layer, and capturing CLS attention rows with hooks.

The CLS row of a layer's attention is recomputed from the outputs of that attention module
instance's own `q_proj` / `k_proj` (forward hooks), in float32: the tower keeps running with
whatever attention implementation it has (SDPA, Flash, ...), and no attention matrix is ever
materialised. Hooks are per module instance and removed by `remove()`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError


class VisionTower:
    """A CLIP-style tower: `embeddings` -> `pre_layrnorm` -> `encoder.layers` (CLS first)."""

    def __init__(self, tower: nn.Module):
        enc = getattr(tower, "vision_model", tower)  # transformers 4.x kept a `vision_model` wrapper
        ok = all(hasattr(enc, a) for a in ("embeddings", "pre_layrnorm", "encoder")) and hasattr(enc.encoder, "layers")
        if ok:
            attn = getattr(enc.encoder.layers[0], "self_attn", None)
            ok = attn is not None and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "head_dim"))
        if not ok:
            raise UnsupportedModelError(
                f"vtprune needs a CLIP vision tower (CLIPVisionModel: embeddings, pre_layrnorm, encoder.layers with "
                f"self_attn.q_proj/k_proj); this model's tower is {type(tower).__name__}"
            )
        self.module = enc
        self.layers = enc.encoder.layers
        self.config = getattr(tower, "config", getattr(enc, "config", None))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def run(self, pixel_values: torch.Tensor, hidden_indices: list[int], on_layer=None, run_until: int | None = None) -> dict[int, torch.Tensor]:
        """Hidden states by index (0 = embeddings after pre-LN, k = output of layer k-1), running only
        the layers needed (up to `run_until` layers when a signal is read past the feature layer).
        `on_layer(i, h) -> h` may replace a layer's output (in-tower pruning)."""
        last = max(hidden_indices) if run_until is None else max(run_until, max(hidden_indices))
        h = self.module.pre_layrnorm(self.module.embeddings(pixel_values))
        out = {0: h} if 0 in hidden_indices else {}
        for i, layer in enumerate(self.layers[:last]):
            h = layer(h, None)
            if on_layer is not None:
                h = on_layer(i, h)
            if i + 1 in hidden_indices:
                out[i + 1] = h
        return out


class ClsCapture:
    """Forward hooks on `q_proj`/`k_proj` of chosen layers that record the CLS query's pre-softmax
    attention logits over all keys, `[batch, heads, tokens]` in float32, while `active`."""

    def __init__(self, tower: VisionTower, layers: list[int]):
        self.logits: dict[int, torch.Tensor] = {}
        self.active = False
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self.handles = []
        self.layers = sorted(set(layers))
        for l in self.layers:
            attn = tower.layers[l].self_attn
            self.handles.append(attn.q_proj.register_forward_hook(self._hook(l, attn, "q")))
            self.handles.append(attn.k_proj.register_forward_hook(self._hook(l, attn, "k")))

    def _hook(self, layer: int, attn: nn.Module, kind: str):
        def hook(module, args, output):
            if not self.active:
                return None
            slot = self._pending.setdefault(layer, {})
            slot[kind] = output[:, 0] if kind == "q" else output
            if "q" in slot and "k" in slot:
                self.logits[layer] = cls_logits(slot.pop("q"), slot.pop("k"), attn)
            return None

        return hook

    def reset(self) -> None:
        self.logits = {}
        self._pending = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def cls_logits(q_cls: torch.Tensor, k: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """CLS query row of `q k^T * scale` per head, float32: q_cls [B, D], k [B, n, D] -> [B, H, n]."""
    b, n, _ = k.shape
    heads, dim = attn.num_heads, attn.head_dim
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or dim**-0.5
    q = q_cls.float().reshape(b, heads, dim)
    kk = k.float().reshape(b, n, heads, dim)
    return torch.einsum("bhd,bnhd->bhn", q, kk) * scale
