"""`flowcut`: FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models", NeurIPS 2025; code TungChintao/FlowCut @ a2ecd247).

Stage 1, inside the CLIP encoder (real shortening: later layers run on the kept tokens only). At
every layer `l` while more than `K` patches remain, from the layer's own q/k/v projections (hooks;
the tower keeps SDPA), in float32:
- attention share `a`: the CLS query's attention probabilities (softmax over all keys, head mean),
  CLS column dropped;
- semantic share `s`: softmax over all tokens of the raw per-head dot products `v_cls . v_j` (no
  scaling), head mean, CLS column dropped;
- density `rho`: L1 norm over the head dimension of the head-averaged value vector;
- layer score `S = (a / sum a + s / sum s) * rho`, cumulative `C = S` at layer 0, then
  `C = 0.5 C + 0.5 S`.
At layers `l` with `r = f - l - 1` even and >= 0 (1, 3, ..., 21 for CLIP-L, `f` the feature layer 22)
it drops `round((N - K) / sqrt(r) * (1 - (H / ln N)^2))` patches (`H` the entropy of the
renormalised attention share, `N` the current patch count; at `r = 0` everything down to `K`),
keeping the top cumulative scores in raster order. The LLM reads the feature layer's output of the
pruned sequence (CLS removed).

Budgets. LLaVA-1.5: `keep` = K patches reach the LLM. LLaVA-NeXT (the paper's `target_num` T =
`keep`): each tile (base image and every crop) keeps `keep // 2` patches in the tower; the packed
image (base, then the crops' kept patches in canvas raster order) enters the LLM, and at the output
of decoder layer 1 the visual tokens are cut to `keep` by the last prompt token's attention:
relation = head-mean softmax over the visual tokens of `q_last . K_vis / sqrt(d)` (RoPE applied;
GQA keys repeated as attention does), semantic = head-mean softmax of `v_last . V_vis / sqrt(d)`,
density = L1 over d of the head-mean visual values, score = `(rel/sum + sem/sum) * density`, top
`keep` in order. Layers 0-1 keep the full prompt in the KV cache, later layers the cut one; positions
after the cut are contiguous (official; `position_mode="original"` keeps the original ones).
`pruner.last.stages` reports the layer-1 cut, `tokens_per_layer` the counts (`mean_tokens` is the
layer average).

Deviations from the official code (`official=True` restores each):
- Batch coupling: the official code takes the max drop count over everything in its tower batch,
  so an image's schedule depends on its batch neighbours. vtprune shares the count only across the
  tiles of one image (identical for a single image; on LLaVA-NeXT the official code also runs one
  image's tiles as one batch). `official=True` couples all images of a LLaVA-1.5 batch.
- Newlines on LLaVA-NeXT: the official code drops every `image_newline` of the crop canvas. vtprune
  keeps one after every canvas row that keeps a patch (`newline="kept-rows"`, counted as visual
  tokens, scored by the layer-1 stage like any other visual token); `official=True` gives "none".
- Entropy: `0 * ln 0` is taken as 0 (the official code gets NaN when a probability underflows in
  fp16); scores are float32 on fp16/bf16 models.
- Left padding: supported in the LLM stage (the official code raises); the official FlashAttention-2
  batch bug (q/k/v layout flipped on every other sample) is not reproduced.
- Unpadding uses transformers' rounding rule (the official code uses `int()`; rare one-row
  differences on odd aspect ratios).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import VTPruneError
from ..patches import anyres
from ..patches.decoder import LLMStage, StageContext
from ..registry import register
from .base import ImageContext, Method, Selection


def layer_signals(q_cls: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float):
    """FlowCut's per-layer quantities from raw projections (float32): attention share `a`
    [B, n-1] (head-mean CLS probabilities, CLS column dropped), layer score `S` [B, n-1]."""
    B, n, D = k.shape
    d = D // heads
    q = q_cls.float().reshape(B, heads, d)
    kk = k.float().reshape(B, n, heads, d)
    vv = v.float().reshape(B, n, heads, d)
    probs = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, kk) * scale, dim=-1)
    a = probs.mean(1)[:, 1:]
    sim = torch.einsum("bhd,bnhd->bhn", vv[:, 0], vv)  # raw v_cls . v_j, no scaling
    s = torch.softmax(sim, dim=-1).mean(1)[:, 1:]
    rho = vv.mean(2).abs().sum(-1)[:, 1:]
    S = (a / a.sum(-1, keepdim=True) + s / s.sum(-1, keepdim=True)) * rho
    return a, S


def drop_count(a: torch.Tensor, K: int, r: int) -> torch.Tensor:
    """Per image, the adaptive number of patches to drop at a pruning layer with `r` remaining
    pruning layers (float, before rounding): (N - K) / sqrt(r) * (1 - (H / ln N)^2)."""
    N = a.shape[-1]
    p = a / a.sum(-1, keepdim=True)
    ent = -torch.special.xlogy(p, p).sum(-1)
    ratio = ent / math.log(N)
    return (N - K) / math.sqrt(r) * (1 - ratio**2)


def llm_scores(q_last, k_vis, v_last, v_vis, kv_groups: int, scaling: float) -> torch.Tensor:
    """FlowCut's layer-1 score of V visual tokens (float32): q_last [Hq, d], k_vis [Hkv, V, d],
    v_last [Hkv, d], v_vis [Hkv, V, d] (q/k after RoPE)."""
    q = q_last.float()
    k = k_vis.float().repeat_interleave(kv_groups, dim=0)
    rel = torch.softmax(torch.einsum("hd,hvd->hv", q, k) * scaling, dim=-1).mean(0)
    d = v_vis.shape[-1]
    vv = v_vis.float()
    sem = torch.softmax(torch.einsum("hd,hvd->hv", v_last.float(), vv) / math.sqrt(d), dim=-1).mean(0)
    dens = vv.mean(0).abs().sum(-1)
    return (rel / rel.sum() + sem / sem.sum()) * dens


@dataclass
class _TowerState:
    K: int
    f: int
    ids: torch.Tensor  # [tiles, patches now] original patch id of each row
    groups: list[list[int]]  # tiles sharing a drop count
    C: torch.Tensor | None = None
    trace: list | None = None


class _LayerOneCut(LLMStage):
    def __init__(self, layer: int):
        self.layer = layer

    def select(self, ctx: StageContext):
        out = []
        for (b, cols), T in zip(ctx.images, ctx.budgets):
            V = cols.numel()
            if V <= T:
                out.append(None)
                continue
            last = int(ctx.last[b])
            score = llm_scores(ctx.q[b, :, last], ctx.k[b][:, cols], ctx.v[b, :, last], ctx.v[b][:, cols], ctx.num_kv_groups, ctx.scaling)
            out.append(torch.sort(torch.topk(score, T).indices).values.cpu())
        return out


@register("flowcut")
@dataclass
class FlowCut(Method):
    """FlowCut: information-flow pruning inside the CLIP encoder (+ a layer-1 cut on LLaVA-NeXT)."""

    newline: str | None = None
    llm_layer: int = 1
    trace: bool = False

    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "clip", "open_clip")
    summary: ClassVar[str] = "FlowCut: information-flow pruning inside the vision tower (+ LLM layer-1 cut on NeXT)"
    POLICIES: ClassVar[dict] = {
        "position_mode": ("compact", "compact"),
        "newline": ("kept-rows", "none"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.newline is not None and self.newline not in anyres.NEWLINE_POLICIES:
            raise VTPruneError(f"flowcut: newline must be one of {anyres.NEWLINE_POLICIES}, got {self.newline!r}")
        if isinstance(self.llm_layer, bool) or not isinstance(self.llm_layer, int) or self.llm_layer < 0:
            raise VTPruneError(f"flowcut: llm_layer must be a non-negative int (official: 1), got {self.llm_layer!r}")
        self.last_trace = None

    # --- budgets -----------------------------------------------------------------------------------------
    def tile_budget(self, geometry, budget: int) -> int:
        """Patches each tile keeps in the tower: `keep` (LLaVA-1.5), `keep // 2` (LLaVA-NeXT)."""
        k = budget // 2 if geometry.has_crops else budget
        return max(1, min(k, geometry.patches))

    # --- stage 1: inside the tower ---------------------------------------------------------------------
    def vision_stage_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        if feature_layer < 2:
            raise VTPruneError(f"flowcut needs a feature layer >= 2 (got {feature_layer}); its schedule prunes at layers 1, 3, ..., f-1")
        return list(range(0, feature_layer))

    def vision_prunes(self, geometry, budget: int) -> bool:
        return budget < geometry.stock_count() and self.tile_budget(geometry, budget) < geometry.patches

    def vision_groups(self, tiles_per_image: list[int]) -> list[list[int]]:
        if self.official and all(n == 1 for n in tiles_per_image):
            return [list(range(len(tiles_per_image)))]  # the official LLaVA-1.5 path couples its whole batch
        return [[i] for i in range(len(tiles_per_image))]

    def vision_begin(self, geometries, budgets, tiles_per_image, feature_layer: int, num_layers: int):
        ks = {self.tile_budget(g, b) if b < g.stock_count() else g.patches for g, b in zip(geometries, budgets)}
        if len(ks) != 1:
            raise VTPruneError(
                "flowcut official=True couples a batch of images and needs one budget for all of them; use keep= (not "
                "keep_ratio with different image sizes) or drop official=True"
            )
        K = ks.pop()
        tiles = sum(tiles_per_image)
        P = geometries[0].patches
        groups, s = [], 0
        for n in tiles_per_image:
            groups.append(list(range(s, s + n)))
            s += n
        if self.official:
            groups = [list(range(tiles))]
        ids = torch.arange(P)[None].expand(tiles, P).clone()
        return _TowerState(K=K, f=feature_layer, ids=ids, groups=groups, trace=[] if self.trace else None)

    def vision_step(self, state: _TowerState, layer: int, hidden: torch.Tensor, qkv: dict, attn) -> torch.Tensor:
        n = hidden.shape[1]
        K = state.K
        if n <= K + 1 or not qkv:
            return hidden
        scale = getattr(attn, "scale", None) or attn.head_dim**-0.5
        a, S = layer_signals(qkv["q"], qkv["k"], qkv["v"], attn.num_heads, scale)
        state.C = S if state.C is None else 0.5 * state.C + 0.5 * S
        r = state.f - layer - 1
        if r < 0 or r % 2:
            return hidden
        if r > 0:
            raw = drop_count(a, K, r)
            drop = torch.zeros(hidden.shape[0], dtype=torch.long)
            for g in state.groups:
                drop[g] = int(torch.round(raw[g].max()))
        else:
            drop = torch.full((hidden.shape[0],), n, dtype=torch.long)
        keep_total = torch.clamp(n - drop, min=K + 1)
        m = int(keep_total[0])
        if not bool((keep_total == m).all()):  # pragma: no cover - groups run separately unless official
            raise VTPruneError("flowcut: tiles of one tower run must keep the same count")
        sel = torch.sort(torch.topk(state.C, m - 1, dim=-1).indices, dim=-1).values
        dev = hidden.device
        patches = torch.gather(hidden[:, 1:], 1, sel.to(dev)[..., None].expand(-1, -1, hidden.shape[-1]))
        hidden = torch.cat([hidden[:, :1], patches], dim=1)
        state.C = torch.gather(state.C, 1, sel)
        state.ids = torch.gather(state.ids, 1, sel.cpu())
        if state.trace is not None:
            state.trace.append({"layer": layer, "remaining": r, "dropped_requested": drop.tolist(), "tokens_after": m, "kept_patch_ids": state.ids.tolist()})
        return hidden

    def vision_kept(self, state: _TowerState) -> list[torch.Tensor]:
        if state.trace is not None:
            self.last_trace = state.trace
        return [row.clone() for row in state.ids]

    # --- between tower and LLM ---------------------------------------------------------------------------
    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        kept = image.tile_ids if image.tile_ids is not None else g.full_selection()
        kept = [torch.sort(k.cpu()).values for k in kept]
        newline = self.policy("newline") if g.has_crops else "none"
        return Selection(kept=kept, newline=newline)

    # --- stage 2: inside the LLM (LLaVA-NeXT) ------------------------------------------------------------
    def llm_stages(self, family: str, num_layers: int) -> list:
        if family != "llava_next":
            return []
        if self.llm_layer >= num_layers - 1:
            raise VTPruneError(f"flowcut: llm_layer={self.llm_layer} needs a decoder with more than {self.llm_layer + 1} layers")
        return [_LayerOneCut(self.llm_layer)]
