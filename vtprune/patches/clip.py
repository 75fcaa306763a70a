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

    # --- what the signal capture needs from a tower ------------------------------------------------------
    def attention(self, layer: int):
        """The layer's attention module (exposes num_heads, head_dim, scale)."""
        return self.layers[layer].self_attn

    def hook_projections(self, layer: int, kinds, fn) -> list:
        """Call `fn(kind, output)` with the layer's q/k/v projection outputs ([B, n, D]) as they are
        computed; returns the hook handles."""
        attn = self.layers[layer].self_attn
        handles = []
        for kind in kinds:
            proj = getattr(attn, f"{kind}_proj")
            handles.append(proj.register_forward_hook(lambda m, a, o, kind=kind: fn(kind, o)))
        return handles


class ClsCapture:
    """Forward hooks on the attention projections of chosen layers, active only while `active`:

    - `layers` (CLS layers): record the CLS query's pre-softmax attention logits over all keys,
      `logits[layer]` = `[batch, heads, tokens]` float32 (tower runs of one call are concatenated
      along the batch; shorter token axes are padded with -inf);
    - `qkv_layers`: keep the layer's raw projection outputs (`q` CLS row `[B, D]`, `k`, `v`
      `[B, n, D]`) in `current[layer]` for an in-tower stage to consume right after the layer.
    """

    def __init__(self, tower: VisionTower, layers: list[int], qkv_layers: list[int] = ()):
        self.logits: dict[int, torch.Tensor] = {}
        self.current: dict[int, dict[str, torch.Tensor]] = {}
        self.active = False
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._runs: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        self.layers = sorted(set(layers))
        self.qkv_layers = sorted(set(qkv_layers))
        self.attn = {}
        for l in sorted(set(self.layers) | set(self.qkv_layers)):
            attn = tower.attention(l)
            self.attn[l] = attn
            kinds = ("q", "k", "v") if l in self.qkv_layers else ("q", "k")
            self.handles.extend(tower.hook_projections(l, kinds, self._hook(l, attn)))

    def _hook(self, layer: int, attn):
        def hook(kind, output):
            if not self.active:
                return None
            value = output[:, 0] if kind == "q" else output
            if layer in self.qkv_layers:
                self.current.setdefault(layer, {})[kind] = value
            if layer in self.layers:
                slot = self._pending.setdefault(layer, {})
                slot[kind] = value
                if "q" in slot and "k" in slot:
                    self._runs.setdefault(layer, []).append(cls_logits(slot.pop("q"), slot.pop("k"), attn))
                    self.logits.pop(layer, None)
            return None

        return hook

    def collect(self) -> dict[int, torch.Tensor]:
        """CLS logits of every tower run since `reset()`, concatenated along the batch."""
        for layer, runs in self._runs.items():
            if layer in self.logits:
                continue
            n = max(r.shape[-1] for r in runs)
            runs = [torch.nn.functional.pad(r, (0, n - r.shape[-1]), value=float("-inf")) for r in runs]
            self.logits[layer] = torch.cat(runs, 0)
        return self.logits

    def pop(self, layer: int) -> dict[str, torch.Tensor]:
        return self.current.pop(layer, {})

    def reset(self) -> None:
        self.logits = {}
        self.current = {}
        self._pending = {}
        self._runs = {}

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


class VisionRun:
    """One tower run over the tiles of a group of images (see `run_vision`)."""

    def __init__(self, images, slices, hidden, ids, sources, logits):
        self.images, self.slices, self.hidden = images, slices, hidden
        self._ids, self._sources, self._logits = ids, sources, logits

    def tile_ids(self, start: int, n: int):
        return None if self._ids is None else [self._ids[start + p] for p in range(n)]

    def tile_sources(self, start: int, n: int):
        return None if self._sources is None else [self._sources[start + p] for p in range(n)]

    def logits(self, start: int, n: int) -> dict:
        return {layer: v[start : start + n] for layer, v in self._logits.items()}


def run_vision(tower: VisionTower, method, capture: ClsCapture | None, pixels, geoms, budgets, parts, idxs, feature_layer) -> list[VisionRun]:
    """Run the tower over every image's tiles with the method's in-tower stage (if it prunes for
    any image): one run per group of images (`method.vision_groups`), else one run for the batch.
    Signals are captured per run, so nothing leaks between groups."""
    stage_layers = method.vision_stage_layers(tower.num_layers, feature_layer)
    in_tower = bool(stage_layers) and any(method.vision_prunes(g, b) for g, b in zip(geoms, budgets))
    groups = method.vision_groups(parts) if in_tower else [list(range(len(parts)))]
    starts = [sum(parts[:i]) for i in range(len(parts))]
    run_until = max(idxs)
    if capture is not None:
        run_until = max([run_until] + [l + 1 for l in capture.layers])
    runs = []
    for grp in groups:
        rows = torch.cat([torch.arange(starts[i], starts[i] + parts[i]) for i in grp])
        tiles = pixels if len(groups) == 1 else pixels[rows.to(pixels.device)]
        state = method.vision_begin([geoms[i] for i in grp], [budgets[i] for i in grp], [parts[i] for i in grp], feature_layer, tower.num_layers) if in_tower else None

        def on_layer(layer, h, state=state):
            if layer in capture.qkv_layers:
                return method.vision_step(state, layer, h, capture.pop(layer), capture.attn[layer])
            return h

        if capture is not None:
            capture.reset()
            capture.active = True
        try:
            hidden = tower.run(tiles, idxs, on_layer if in_tower else None, run_until=run_until)
        finally:
            if capture is not None:
                capture.active = False
        logits = dict(capture.collect()) if capture is not None else {}
        slices, s = [], 0
        for i in grp:
            slices.append((s, parts[i]))
            s += parts[i]
        ids = method.vision_kept(state) if in_tower else None
        srcs = method.vision_sources(state) if in_tower else None
        runs.append(VisionRun(list(grp), slices, hidden, ids, srcs, logits))
    return runs
