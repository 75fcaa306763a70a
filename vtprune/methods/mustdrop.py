"""`mustdrop`: MustDrop (Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal
Large Language Model", arXiv 2411.10803; code liuting20/MustDrop @ 909afa5).

Three stages, all training-free:

(a) Vision encoding, inside the CLIP tower. On the output of encoder layer 0 the patch grid is cut
    into non-overlapping `window x window` tiles (3x3: 64 tiles on 24x24, row-major; a grid that the
    window does not divide leaves its last rows/columns out of every tile). A tile's score is the mean
    cosine similarity of its tokens over all ordered pairs of distinct tokens (72 pairs for 3x3).
    `r` = the number of tiles scoring >= `merge_thr` (0.8), the minimum over the tiles of one image
    (LLaVA-NeXT: base image and crops share r); each tile of the run merges its own top-r tiles
    into one token, the plain mean of the tile's tokens. Layers 1.. run on the shorter sequence
    `[CLS, merged tokens by descending tile score, unmerged patches ascending]`. The *key set* is
    the top `ceil(key_rate * N')` tokens (key_rate 0.08, N' = tokens after the merge) by the
    head-mean attention probability of the CLS query at encoder layer `key_layer` (the last one,
    23), per tile.
(b) Prefill, after decoder layers `llm_layers` (2, 6, 10, 14). From that layer's own q/k (RoPE
    applied, float32, softmax over all keys with the causal and padding masks), A[t, v] = head-mean
    attention of every text token after the image (the question and the assistant template) to each
    current visual token v of the image. v is dropped iff `sum_t A[t,v] < global_thr * sum_{t,v} A`
    AND `max_t A[t,v] < individual_thr`; the key set is always kept; survivors keep their order.
(c) Decoding: at the end of the prefill the KV caches of layers `llm_layers[0] .. llm_layers[-1]`
    keep only the visual tokens that survived every stage ("output-aware" cache): layers before the
    first cut keep everything, every later layer holds the final survivors. No score while decoding.

Budget (`keep`): MustDrop's budgets are layer-averaged visual-token counts reached by tuning the
two thresholds, not caps.
- LLaVA-1.5 and `keep` in {192, 128, 64}: the official thresholds of the TextVQA scripts
  (global_thr, individual_thr) = (0.001, 0.001), (0.0012, 0.001), (0.011, 0.01); the realized
  average is data-dependent (as in the paper).
- `global_thr=` and `individual_thr=` given (no `keep`): those thresholds, any model.
- Any other `keep` (and every `keep_ratio`, and LLaVA-NeXT, or `use_presets=False`): the *count
  rule*. With N0 the image's visual tokens entering the LLM (after the merge), K the key-set tokens
  among them and w_s the number of decoder layers each count is seen by (tokens entering layer j),
  the counts after the stages are `n_s = max(K, round(N0 * rho**s))`, rho in [0, 1] solved by
  bisection so that the layer average `(w_0 N0 + sum_s w_s n_s) / L` equals `keep` (the last count
  absorbs the rounding). Each stage keeps the key set plus the `n_s - K` other tokens ranked by
  `max(G_v / (g * sum G), M_v / i)` (G = column sums, M = column maxima of A; (g, i) the preset
  nearest to `keep`): the dual filter with both thresholds scaled by one factor per stage so that
  exactly `n_s` tokens survive. The realized average (`pruner.last.mean_tokens`) is within
  `0.5 * w_last / L` tokens of `keep` (w_last = layers after the last cut; 0.27 tokens for 32
  layers) whenever `keep` lies between its floor `(w_0 N0 + (L - w_0) K) / L` and N0; below the
  floor the key set alone is kept (and a warning says so), at or above N0 (the merge alone already
  reached the budget) nothing more is dropped. `keep` >= the unpruned count disables MustDrop.
- Keep-all setting: `merge_thr=inf` (no tile merges) with `global_thr=0, individual_thr=0` (nothing
  is dropped); the hooks still run and the output equals the unpatched model.
`pruner.last.tokens_per_layer` counts the visual tokens entering each decoder layer; the official
code's "equivalent token number" counts the stage layer itself with the later count (a slight
undercount); `mean_tokens` is vtprune's figure.

Order and positions: by default (`order="raster"`) a merged token takes the slot of its tile's
bottom-right patch (LLaVA-NeXT crops: the tile's last patch inside the unpadded area) and the image
enters the LLM in raster order; `order="official"` (official=True) keeps the tower's order, merged
tokens first by descending tile score, then the unmerged patches. `pruner.last.kept` reports each
merged token by that representative patch, `sources` by the whole tile. Positions: "compact"
(official and default): renumbered after every cut; during decoding each layer places the new
token at its own cache length + step (layers before the first cut: the full prompt length; every
other layer: the final prompt length), as the official code does. "original" keeps positions.

KV cache after prefill (text = non-visual prompt tokens, V_0 = visual tokens entering the LLM,
V_4 = final survivors): layers 0..llm_layers[0]-1 hold `text + V_0`, every later layer holds
`text + V_4` (with `evict=False`: each layer the tokens that entered it).

LLaVA-NeXT: the merge runs per tile on the crops and the base image (shared r per image), merged
tokens sit at their representative slot, and the stock packing (unpadding, one newline per canvas
row, `newline="all-rows"`) runs on the result; newlines are visual tokens of the image block and go
through the filter like the others (the official code has none: it switches LLaVA-NeXT to a flat,
unpadded, newline-free layout, which vtprune does not reproduce). Key tokens outside the unpadded
area never reach the LLM and are left out of the key set.

Deviations from the official code (`official=True` restores what can be restored):
- Batches: the official prefill reads batch element 0 and passes no attention mask; vtprune filters
  every sample with its own rows and mask (left/right padding), and merges each image with its own r.
  `official=True` raises at more than one image per call.
- Order: raster by default (see above); `official=True` gives the official merged-first order
  (LLaVA-NeXT: for the base image; crops follow the canvas packing).
- The official code hard-codes 32 decoder layers and layer 23 of the tower; vtprune uses the model's
  layer counts (`key_layer` defaults to the last tower layer, eviction covers the stage layers).
- A key set reduced to one token crashes the official code (a 0-d index); vtprune keeps 1-D indices.
- The official code switches every layer after the first cut to materialised attention; vtprune
  recomputes the needed rows from q/k in hooks (numerically the same, up to rounding).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import VTPruneError
from ..patches import anyres
from ..patches.decoder import LLMStage, StageContext
from ..registry import register
from .base import ImageContext, Method, Selection
from .fastv import attention_rows, check_layer_count, text_rows_after

# budget label -> (global_thr, individual_thr), LLaVA-1.5-7B TextVQA scripts
PRESETS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}
ORDERS = ("raster", "official")


# --- stage (a): the window merge ------------------------------------------------------------------------
def window_tiles(grid_h: int, grid_w: int, window: int) -> torch.Tensor:
    """[tiles, window*window] patch ids of the non-overlapping windows, tiles row-major, tokens
    row-major inside a tile; rows/columns beyond the last full window are in no tile."""
    nh, nw = grid_h // window, grid_w // window
    a = torch.arange(nh)[:, None, None, None] * window + torch.arange(window)[None, None, :, None]
    b = torch.arange(nw)[None, :, None, None] * window + torch.arange(window)[None, None, None, :]
    ids = a * grid_w + b  # [nh, nw, window, window]
    return ids.reshape(nh * nw, window * window)


def window_scores(patches: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity (ordered pairs of distinct tokens) of every tile, float32:
    patches [B, N, C], tiles [W, n] -> [B, W]."""
    x = patches.float()[:, tiles.to(patches.device)]  # [B, W, n, C]
    n = tiles.shape[1]
    if n < 2:
        return torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    sim = u @ u.transpose(-1, -2)
    off = sim.sum((-1, -2)) - torch.diagonal(sim, dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))


@dataclass
class MergeResult:
    hidden: torch.Tensor  # [B, 1 + N - r*(n-1), C]: CLS, merged (by descending score), unmerged ascending
    r: int
    scores: torch.Tensor  # [B, W]
    order: torch.Tensor  # [B, r] merged tiles, best first
    rows: list[list[torch.Tensor]]  # per image, per output row (CLS excluded): the patch ids behind it (ascending)


def window_merge(hidden: torch.Tensor, grid_h: int, grid_w: int, window: int = 3, threshold: float = 0.8) -> MergeResult:
    """MustDrop's merge of a batch of `[CLS, patches]` sequences; r is the minimum over the batch of
    the number of tiles scoring >= threshold, and each sequence merges its own top-r tiles."""
    B, n1, C = hidden.shape
    N = n1 - 1
    if N != grid_h * grid_w:
        raise VTPruneError(f"mustdrop: the merge expects {grid_h * grid_w} patches, got {N}")
    tiles = window_tiles(grid_h, grid_w, window)
    patches = hidden[:, 1:]
    if tiles.numel() == 0:
        scores = torch.zeros(B, 0)
        return MergeResult(hidden, 0, scores, torch.zeros(B, 0, dtype=torch.long), [[torch.tensor([j]) for j in range(N)] for _ in range(B)])
    scores = window_scores(patches, tiles).cpu()
    r = int((scores >= threshold).sum(-1).min())
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :r]
    outs, rows = [], []
    for b in range(B):
        chosen = tiles[order[b]]  # [r, n]
        merged = patches[b][chosen.to(hidden.device)].mean(1) if r else patches[b][:0]
        in_tile = torch.zeros(N, dtype=torch.bool)
        in_tile[chosen.flatten()] = True
        rest = torch.nonzero(~in_tile).flatten()
        outs.append(torch.cat([hidden[b, :1], merged.to(hidden.dtype), patches[b][rest.to(hidden.device)]], 0))
        rows.append([torch.sort(t).values for t in chosen] + [rest[j : j + 1] for j in range(rest.numel())])
    return MergeResult(torch.stack(outs, 0), r, scores, order, rows)


# --- stage (b): the dual-attention filter -------------------------------------------------------------------
def dual_filter(A: torch.Tensor, keys: torch.Tensor, global_thr: float, individual_thr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A [text rows, V] head-mean probabilities; returns (kept by the filter, kept incl. the key set),
    both ascending positions in 0..V-1."""
    V = A.shape[1]
    G = A.sum(0)
    M = A.max(0).values if A.shape[0] else torch.zeros(V, dtype=A.dtype, device=A.device)
    drop = (G < global_thr * G.sum()) & (M < individual_thr)
    by_filter = torch.nonzero(~drop).flatten().cpu()
    keep = ~drop.cpu()
    keep[keys.cpu()] = True
    return by_filter, torch.nonzero(keep).flatten()


def count_schedule(n0: int, floor: int, target: float, weights: list[int]) -> list[int]:
    """Counts after each stage for the count rule: n_s = max(floor, round(n0 * rho**s)), rho solved so
    that the layer average (weights[0] * n0 + sum_s weights[s] * n_s) / sum(weights) hits `target`;
    the last stage absorbs the rounding. Floor when unreachable, n0 when target >= n0."""
    S = len(weights) - 1
    L = sum(weights)
    floor = max(1, min(floor, n0))
    if target >= n0:
        return [n0] * S

    def avg(counts):
        return (weights[0] * n0 + sum(w * c for w, c in zip(weights[1:], counts))) / L

    def cont(rho):
        return [max(float(floor), n0 * rho**s) for s in range(1, S + 1)]

    if avg([floor] * S) >= target:
        return [floor] * S
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if avg(cont(mid)) < target:
            lo = mid
        else:
            hi = mid
    counts = [int(round(c)) for c in cont(0.5 * (lo + hi))]
    rest = target * L - weights[0] * n0 - sum(w * c for w, c in zip(weights[1:-1], counts[:-1]))
    prev = counts[-2] if S > 1 else n0
    counts[-1] = int(min(prev, max(floor, round(rest / weights[-1]))))
    return counts


@dataclass
class _Plan:
    """What the LLM stages need of one image (set at selection time, consumed by the prefill)."""

    keys: torch.Tensor  # key-set positions among the image's visual tokens as they enter the LLM
    thresholds: tuple[float, float] | None  # threshold mode: (global_thr, individual_thr)
    target: float | None = None  # count mode: layer-averaged target
    ratio: tuple[float, float] = (0.001, 0.001)  # count mode: (g, i) of the nearest preset
    counts: list[int] | None = None


class _DualFilterStage(LLMStage):
    def __init__(self, method: "MustDrop", layer: int, index: int, weights: list[int]):
        self.method = method
        self.layer = layer
        self.index = index
        self.weights = weights

    def select(self, ctx: StageContext):
        m = self.method
        if self.index == 0:
            m._run = dict(m._pending)
            m._pending = {}
            if m.trace:
                m.last_trace = {"vision": m._vision_trace, "stages": []}
        out, trace = [], []
        for i, (b, cols) in enumerate(ctx.images):
            plan = m._run.get(i)
            V = cols.numel()
            if plan is None or V == 0:
                out.append(None)
                continue
            rows = text_rows_after(ctx, b, cols)
            A = attention_rows(ctx, b, rows)[:, cols.to(ctx.mask2d.device)] if rows.numel() else torch.zeros(0, V)
            keys = plan.keys
            if plan.thresholds is not None:
                by_filter, keep = dual_filter(A, keys, *plan.thresholds)
            else:
                if plan.counts is None:
                    plan.counts = count_schedule(V, int(keys.numel()), plan.target, self.weights)
                n = plan.counts[self.index]
                keep = _rank_keep(A, keys, n, plan.ratio)
                by_filter = keep
            if m.trace:
                trace.append({"image": i, "layer": self.layer, "A": A.detach().cpu(), "kept_by_filter": by_filter, "vis_keep": keep, "keys_in": keys.clone(), "counts": plan.counts})
            if keep.numel() == V:
                out.append(None)
                continue
            plan.keys = torch.searchsorted(keep, keys.cpu())
            out.append(keep)
        if m.trace and m.last_trace is not None:
            m.last_trace["stages"].append(trace)
        return out


def _rank_keep(A: torch.Tensor, keys: torch.Tensor, n: int, ratio: tuple[float, float]) -> torch.Tensor:
    """Count rule: the key set plus the top (n - |keys|) other tokens by max(G/(g sum G), M/i)."""
    V = A.shape[1]
    if n >= V:
        return torch.arange(V)
    g, i = ratio
    if A.shape[0]:
        G = A.sum(0)
        total = G.sum().clamp_min(torch.finfo(torch.float32).tiny)
        score = torch.maximum(G / (g * total), A.max(0).values / i).cpu()
    else:
        score = torch.zeros(V)
    is_key = torch.zeros(V, dtype=torch.bool)
    is_key[keys.cpu()] = True
    score = score.masked_fill(is_key, float("inf"))
    order = torch.sort(score, descending=True, stable=True).indices
    take = max(n, int(is_key.sum()))
    return torch.sort(order[:take]).values


# --- the method ---------------------------------------------------------------------------------------------
@dataclass
class _TowerState:
    enabled: bool
    grid: tuple[int, int]
    valid: list[torch.Tensor]  # per tile: bool [patches] inside the unpadded area
    ids: list[torch.Tensor] | None = None
    sources: list[list[torch.Tensor]] | None = None
    trace: dict = field(default_factory=dict)


@register("mustdrop")
@dataclass
class MustDrop(Method):
    """MustDrop: window merge in the tower, dual-attention filtering after layers 2/6/10/14, cache eviction."""

    global_thr: float | None = None
    individual_thr: float | None = None
    merge_thr: float = 0.8
    window: int = 3
    key_rate: float = 0.08
    key_layer: int | None = None
    llm_layers: tuple = (2, 6, 10, 14)
    evict: bool = True
    use_presets: bool = True
    order: str | None = None
    trace: bool = False

    summary: ClassVar[str] = "MustDrop: 3x3 window merge in the tower, dual-attention filter after LLM layers 2/6/10/14, KV eviction"
    POLICIES: ClassVar[dict] = {
        "position_mode": ("compact", "compact"),
        "order": ("raster", "official"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.global_thr is None) != (self.individual_thr is None):
            raise VTPruneError("mustdrop: give both global_thr= and individual_thr= (official 192-token setting: 0.001 and 0.001), or neither")
        if self.global_thr is not None:
            if self.keep is not None or self.keep_ratio is not None:
                raise VTPruneError(
                    "mustdrop: give either the thresholds (global_thr=, individual_thr=) or a budget (keep= / keep_ratio=), not "
                    "both; keep=192/128/64 selects the official thresholds by itself"
                )
            for name in ("global_thr", "individual_thr"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                    raise VTPruneError(f"mustdrop: {name} must be a number >= 0 (official: 0.001 .. 0.011), got {v!r}")
        if isinstance(self.merge_thr, bool) or not isinstance(self.merge_thr, (int, float)) or math.isnan(self.merge_thr):
            raise VTPruneError(f"mustdrop: merge_thr must be a number (official 0.8; inf disables the merge), got {self.merge_thr!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise VTPruneError(f"mustdrop: window must be an int >= 2 (official: 3), got {self.window!r}")
        if isinstance(self.key_rate, bool) or not isinstance(self.key_rate, (int, float)) or not 0 <= self.key_rate <= 1:
            raise VTPruneError(f"mustdrop: key_rate must be in [0, 1] (official: 0.08), got {self.key_rate!r}")
        layers = tuple(self.llm_layers) if isinstance(self.llm_layers, (list, tuple)) else None
        if not layers or any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers) or list(layers) != sorted(set(layers)):
            raise VTPruneError(f"mustdrop: llm_layers must be increasing non-negative layer indices (official: (2, 6, 10, 14)), got {self.llm_layers!r}")
        self.llm_layers = layers
        if self.order is not None and self.order not in ORDERS:
            raise VTPruneError(f"mustdrop: order must be one of {ORDERS}, got {self.order!r}")
        self._pending: dict[int, _Plan] = {}
        self._run: dict[int, _Plan] = {}
        self._family: str | None = None
        self._num_layers: int | None = None
        self._vision_trace: list = []
        self.last_trace = None

    @classmethod
    def keep_all_params(cls) -> dict[str, Any]:
        return {"merge_thr": math.inf, "global_thr": 0.0, "individual_thr": 0.0}

    def _has_own_budget(self) -> bool:
        return self.global_thr is not None

    # --- budgets ------------------------------------------------------------------------------------------
    def _thresholds_for(self, budget: int) -> tuple[float, float] | None:
        if self.global_thr is not None:
            return float(self.global_thr), float(self.individual_thr)
        if self.use_presets and self.keep is not None and self._family in (None, "llava") and int(self.keep) in PRESETS:
            return PRESETS[int(self.keep)]
        return None

    def needs_selection(self, available: int, budget: int) -> bool:
        # threshold mode: always select (the report shows `available`)
        return self.global_thr is not None or super().needs_selection(available, budget)

    def _merges(self) -> bool:
        return self.merge_thr <= 1

    # --- what the method needs ----------------------------------------------------------------------------
    def _key_layer(self, num_layers: int) -> int:
        kl = num_layers - 1 if self.key_layer is None else self.key_layer
        if not 0 <= kl < num_layers:
            raise VTPruneError(f"mustdrop: key_layer={kl} does not exist in this {num_layers}-layer tower; use 0..{num_layers - 1} (official: the last)")
        return kl

    def cls_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        return [self._key_layer(num_layers)] if self.key_rate > 0 else []

    def check_model(self, family: str, batch_images: int) -> None:
        super().check_model(family, batch_images)
        if self.official and batch_images > 1:
            raise VTPruneError(
                "mustdrop official=True reproduces the batch-1 official code (batch element 0, no attention mask); run one "
                "image at a time or drop official=True (vtprune filters every sample on its own)"
            )
        self._family = family
        self._pending = {}  # a new prefill starts
        self._vision_trace = []

    # --- stage (a): in the tower --------------------------------------------------------------------------
    def vision_stage_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        return [0] if self._merges() else []

    def vision_prunes(self, geometry, budget: int) -> bool:
        return self._merges() and self.needs_selection(geometry.stock_count(), budget)

    def vision_begin(self, geometries, budgets, tiles_per_image, feature_layer: int, num_layers: int):
        g0 = geometries[0]
        enabled = all(self.needs_selection(g.stock_count(), b) for g, b in zip(geometries, budgets))
        valid = []
        for g, n in zip(geometries, tiles_per_image):
            valid.extend(g.valid_mask(p) for p in range(n))
        return _TowerState(enabled=enabled, grid=(g0.grid_h, g0.grid_w), valid=valid)

    def vision_step(self, state: _TowerState, layer: int, hidden: torch.Tensor, qkv: dict, attn) -> torch.Tensor:
        if layer != 0 or not state.enabled:
            return hidden
        gh, gw = state.grid
        res = window_merge(hidden, gh, gw, self.window, float(self.merge_thr))
        ids, sources = [], []
        for t, rows in enumerate(res.rows):
            valid = state.valid[t]
            reps = []
            for src in rows:
                inside = src[valid[src]]
                reps.append(int(inside[-1]) if inside.numel() else int(src[-1]))
            ids.append(torch.tensor(reps, dtype=torch.long))
            sources.append(rows)
        state.ids, state.sources = ids, sources
        state.trace = {"r": res.r, "scores": res.scores, "order": res.order}
        return res.hidden

    def vision_kept(self, state: _TowerState) -> list[torch.Tensor]:
        if state.ids is None:  # this image keeps everything (budget >= its unpruned count)
            P = state.grid[0] * state.grid[1]
            return [torch.arange(P) for _ in state.valid]
        if self.trace:
            self._vision_trace.append(state.trace)
        return [i.clone() for i in state.ids]

    def vision_sources(self, state: _TowerState):
        return state.sources

    # --- between tower and LLM ----------------------------------------------------------------------------
    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        P = g.patches
        n_parts = g.num_partitions
        if image.tile_ids is not None:
            rows_ids = [t.cpu() for t in image.tile_ids]
            rows_src = [[s.cpu() for s in srcs] for srcs in image.tile_sources] if image.tile_sources is not None else None
        else:
            rows_ids = [torch.arange(P) for _ in range(n_parts)]
            rows_src = None
        kept = [torch.sort(r).values for r in rows_ids]
        merged_any = rows_src is not None and any(s.numel() > 1 for srcs in rows_src for s in srcs)
        sources = None
        if merged_any:
            sources = []
            for p in range(n_parts):
                by_id = {int(i): s + p * P for i, s in zip(rows_ids[p].tolist(), rows_src[p])}
                sources.append([by_id[int(i)] for i in kept[p].tolist()])
        base_order = rows_ids[0] if self.policy("order") == "official" else None
        newline = "all-rows"
        lay = anyres.layout(g, kept, newline, base_order)
        # key set: per tile, top ceil(key_rate * N') rows by the head-mean CLS attention of key_layer
        key_ids, key_rows = [], []
        if self.key_rate > 0:
            layer = self._key_layer_from(image)
            probs = image.cls_logits[layer]
            for p in range(n_parts):
                n = rows_ids[p].numel()
                s = torch.softmax(probs[p, :, : n + 1].float(), dim=-1)[:, 1:].mean(0).cpu()
                k = math.ceil(self.key_rate * n)
                top = torch.topk(s, k).indices
                key_rows.append(top)
                key_ids.append(rows_ids[p][top] + p * P)
        slot_of = {int(sid): j for j, sid in enumerate(lay.slots.tolist()) if sid != anyres.NEWLINE}
        keys = sorted({slot_of[int(x)] for ids in key_ids for x in ids.tolist() if int(x) in slot_of})
        keys = torch.tensor(keys, dtype=torch.long)
        thr = self._thresholds_for(image.budget)
        if thr is not None:
            plan = _Plan(keys=keys, thresholds=thr)
            if self.global_thr is not None:
                image.budget = image.available
        else:
            target = float(image.budget)
            near = min(PRESETS, key=lambda b: (abs(b - target), b))
            plan = _Plan(keys=keys, thresholds=None, target=target, ratio=PRESETS[near])
            floor_tokens = keys.numel()
            self._warn_if_unreachable(len(lay), floor_tokens, target)
        self._pending[image.index] = plan
        if self.trace:
            self._vision_trace.append({"image": image.index, "key_rows": key_rows, "key_ids": key_ids, "key_positions": keys.clone()})
        return Selection(kept=kept, newline=newline, base_order=base_order, sources=sources)

    def _key_layer_from(self, image: ImageContext) -> int:
        if self.key_layer is not None:
            return self.key_layer
        return max(image.cls_logits)

    def _warn_if_unreachable(self, n0: int, keys: int, target: float) -> None:
        L = self._num_layers
        if L is None or target >= n0:
            return
        w0 = self.llm_layers[0] + 1
        floor = (w0 * n0 + (L - w0) * max(1, keys)) / L
        if target < floor * 0.95:
            warnings.warn(
                f"mustdrop: keep={target:g} is below this image's floor of {floor:.1f} layer-averaged tokens ({n0} tokens "
                f"enter the LLM, {keys} key tokens are protected); the key set alone is kept after layer "
                f"{self.llm_layers[0]}. Use a larger keep, a smaller key_rate, or an earlier first cut (llm_layers=)",
                stacklevel=2,
            )

    # --- stages (b) and (c): in the LLM -------------------------------------------------------------------
    def llm_stages(self, family: str, num_layers: int) -> list:
        check_layer_count("mustdrop", self.llm_layers, num_layers, "llm_layers")
        self._num_layers = num_layers
        layers = list(self.llm_layers)
        weights = [layers[0] + 1] + [b - a for a, b in zip(layers, layers[1:])] + [num_layers - 1 - layers[-1]]
        return [_DualFilterStage(self, l, s, weights) for s, l in enumerate(layers)]

    def llm_evict_layers(self, family: str, num_layers: int) -> list[int]:
        if not self.evict:
            return []
        return list(range(self.llm_layers[0], self.llm_layers[-1] + 1))
