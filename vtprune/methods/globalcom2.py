"""`globalcom2`: GlobalCom² (Liu et al., "Compression with Global Guidance: Towards Training-free
High-Resolution MLLMs Acceleration", AAAI 2026, arXiv 2501.05179; code xuyang-liu16/GlobalCom2 @
96b2d00, a fork of the original LLaVA repo).

LLaVA-NeXT only: the thumbnail (base image) is the "commander" that steers how hard each crop is
compressed. Acts between the vision tower and the LLM. Signal: the CLS query's **pre-softmax**
attention logits `q.k/sqrt(d)` at the **last** encoder layer (`score_layer`, None = 23 for CLIP-L —
not the feature layer 22), **averaged** over heads, CLS column dropped; recomputed in float32 from
q/k hooks (the tower keeps SDPA/Flash).

1. Thumbnail: keep the `int(576*R)` tokens with the largest thumbnail logits `s_G`, emitted in
   descending score order (official).
2. Crop ratios: the base grid is tiled spatially into the crop layout (`ph = 24 // rows`,
   `pw = 24 // cols`, the last band takes the remainder); `S_c` = sum of `s_G` over crop c's tile
   (float64); `sigma = softmax((S - max S) / temperature)` (+1e-8 in the denominator);
   `r_c = min(1, R * (1 + sigma_c - mean(sigma)))`.
3. Crop scores: `L_j` = crop j's own logits over its unpadded patches; `G_j` = `s_G` resized
   bilinearly (`align_corners=False`) to the unpadded canvas and cut into the crops' tiles;
   `z_j = 2 * (alpha * G_j/|G_j| + (1 - alpha) * L_j/|L_j|)` (L2 norms over the crop's valid
   tokens; alpha = 0.5 gives the official `L/|L| + G/|G|` bit for bit). Keep the top
   `int(N_j * r_j)` of crop j, `N_j` = its unpadded patch count.
4. Packing: thumbnail tokens, then the crop canvas row by row with newlines (see below).

Knobs under their official names: `retention_ratio` R (0.25, the repo's constant; 0.75/0.5/0.1 also
reported), `temperature` (10), `alpha` (0.5, the paper's global/local weight). Budgets in vtprune's
terms are converted to R:

- `keep` (visual tokens reaching the LLM per image, newlines included): the largest R whose packed
  output (thumbnail + crops + the newlines the policy emits) fits in `keep`. Every per-partition
  count only grows with R, so this is a bisection over R (in [0, 2], where every ratio has reached
  its clip); `temperature` and `alpha` apply unchanged. A `keep` below the newlines the policy always
  emits ("all-rows": one per unpadded row; "padded-rows") leaves only those newlines — use
  `newline="kept-rows"` or "none" for such budgets.
- `keep_ratio`: `keep = max(1, int(keep_ratio * available))` of the image's unpruned count
  (newlines included), then as `keep`.
- `retention_ratio` and `keep`/`keep_ratio` are exclusive; with neither, `retention_ratio=0.25`.
  In R mode `pruner.last.budget` reports the patch tokens R gives the image (`int(576R) + sum_j
  int(N_j r_j)`, newlines excluded, as in the paper's "<= R*2880"); `num_visual_tokens` adds the
  newlines.

Deviations from the official code (`official=True` restores each; finer knobs still override):

- `placement="true"`: a kept crop token is placed at its real grid position. The official code
  writes it at its index in the crop's list of *unpadded* tokens, read as a grid position: with
  padding (e.g. a wide image whose crops keep 19 of 24 rows) tokens land in the wrong rows and
  columns — content right, order and row grouping wrong. `official`: "valid-index".
- `newline="all-rows"`: one `image_newline` after every unpadded canvas row, as stock LLaVA-NeXT.
  The official code appends one to every canvas row, padding rows included (`24*rows`), even where
  the row is empty. `official`: "padded-rows". Also "kept-rows" and "none".
- `unpad_rule="hf"`: the unpadded region rounds like transformers (`int(round(x, 7))`, matching the
  processor); the original LLaVA code uses plain `int(x)` on (W, H) (`official`: "int"). Rarely one
  row/column apart.
- Batches: the official code reads the thumbnail scores at index 0 of the whole concatenated batch
  (its eval asserts batch size 1). vtprune uses each image's own thumbnail; `official=True` raises
  when more than one image is pruned in one call.
- `base_order="score"` (default and official) keeps the official descending-score thumbnail order;
  "raster" is a vtprune option (ascending patch index).
- Reported crop scores (`pruner.last.scores`) are `z_j` at the unpadded positions and NaN on padding;
  the thumbnail's are its logits `s_G`.
- LLaVA-1.5 is refused: the method is defined for crops (the official non-AnyRes path crashes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import VTPruneError
from ..patches import anyres
from ..patches.anyres_official import PACK_NEWLINES, UNPAD_RULES, CropCanvas, pack
from ..registry import register
from .base import ImageContext, Method, Selection

DEFAULT_R = 0.25
PLACEMENTS = ("true", "valid-index")
BASE_ORDERS = ("score", "raster")


def crop_region_sums(s_global: torch.Tensor, grid_h: int, grid_w: int, rows: int, cols: int) -> torch.Tensor:
    """float64 [rows*cols]: the thumbnail scores summed over each crop's tile of the base grid."""
    ph, pw = max(grid_h // rows, 1), max(grid_w // cols, 1)
    i = torch.clamp(torch.arange(grid_h) // ph, max=rows - 1)
    j = torch.clamp(torch.arange(grid_w) // pw, max=cols - 1)
    crop = (i[:, None] * cols + j[None, :]).reshape(-1)
    return torch.zeros(rows * cols, dtype=torch.float64).index_add_(0, crop, s_global.reshape(-1).double().cpu())


def crop_ratios(sums: torch.Tensor, R: float, temperature: float) -> torch.Tensor:
    """float64 retention ratio per crop: min(1, R * (1 + softmax(sums / T) - mean))."""
    e = torch.exp((sums - sums.max()) / temperature)
    sigma = e / (e.sum() + 1e-8)
    return torch.clamp(R * (1 + sigma - sigma.mean()), max=1.0)


@dataclass
class _Signals:
    s_global: torch.Tensor  # [patches] thumbnail logits
    canvas: CropCanvas | None
    sigma_sums: torch.Tensor | None  # [crops] region sums
    valid: list[torch.Tensor]  # per crop: local raster indices of its unpadded patches
    local: list[torch.Tensor]  # per crop: its own logits at valid positions
    glob: list[torch.Tensor]  # per crop: resized thumbnail logits at valid positions
    combined: list[torch.Tensor]  # per crop: z
    order: list[torch.Tensor]  # per crop: positions into `valid`, best first
    base_order: torch.Tensor  # thumbnail patches, best first


@register("globalcom2")
@dataclass
class GlobalCom2(Method):
    """GlobalCom²: the thumbnail's CLS logits set per-crop retention ratios and guide the per-crop
    ranking; LLaVA-NeXT only."""

    retention_ratio: float | None = None
    temperature: float = 10.0
    alpha: float = 0.5
    score_layer: int | None = None
    newline: str | None = None
    placement: str | None = None
    base_order: str | None = None
    unpad_rule: str | None = None

    summary: ClassVar[str] = (
        "GlobalCom²: thumbnail top-k; per-crop ratios and rankings guided by the thumbnail's last-layer CLS logits (LLaVA-NeXT)"
    )
    families: ClassVar[tuple[str, ...]] = ("llava_next",)
    POLICIES: ClassVar[dict[str, tuple[Any, Any]]] = {
        "position_mode": ("compact", "compact"),
        "newline": ("all-rows", "padded-rows"),
        "placement": ("true", "valid-index"),
        "base_order": ("score", "score"),
        "unpad_rule": ("hf", "int"),
    }

    def __post_init__(self) -> None:
        if self.retention_ratio is not None and (self.keep is not None or self.keep_ratio is not None):
            given = "keep" if self.keep is not None else "keep_ratio"
            raise VTPruneError(
                f"globalcom2: give either retention_ratio= (GlobalCom²'s own R) or {given}= (vtprune's per-image "
                "budget, converted to R), not both"
            )
        super().__post_init__()
        R = self.retention_ratio
        if R is not None and (isinstance(R, bool) or not isinstance(R, (int, float)) or not (0 < R <= 1)):
            raise VTPruneError(f"globalcom2: retention_ratio must be in (0, 1] (paper: 0.75, 0.5, 0.25, 0.1), got {R!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise VTPruneError(f"globalcom2: temperature must be a positive number (paper: 10, robust over 5-20), got {t!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a <= 1):
            raise VTPruneError(f"globalcom2: alpha (weight of the thumbnail score) must be in [0, 1] (paper: 0.5), got {a!r}")
        s = self.score_layer
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise VTPruneError(f"globalcom2: score_layer must be a non-negative int or None (the last layer, 23 for CLIP-L), got {s!r}")
        checks = (("newline", PACK_NEWLINES), ("placement", PLACEMENTS), ("base_order", BASE_ORDERS), ("unpad_rule", UNPAD_RULES))
        for name, allowed in checks:
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise VTPruneError(f"globalcom2: {name} must be one of {allowed}, got {v!r}")

    # --- parameters ---------------------------------------------------------------------------------
    def _has_own_budget(self) -> bool:
        return True

    def ratio(self) -> float | None:
        """The effective retention_ratio R (None when keep/keep_ratio drive the budget)."""
        if self.retention_ratio is not None:
            return float(self.retention_ratio)
        return DEFAULT_R if self.keep is None and self.keep_ratio is None else None

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["retention_ratio"] = self.ratio()
        return out

    def needs_selection(self, available: int, budget: int) -> bool:
        # R's token count depends on the grid and the scores, which only `select` sees (even R = 1
        # compresses the crops whose ratio is below the mean): always select; the image's report
        # budget is set there.
        return self.ratio() is not None or super().needs_selection(available, budget)

    # --- what the method needs ------------------------------------------------------------------------
    def cls_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        layer = num_layers - 1 if self.score_layer is None else self.score_layer
        if layer >= num_layers:
            raise VTPruneError(f"globalcom2: score_layer={layer} does not exist in this {num_layers}-layer tower; use a layer < {num_layers}")
        self._layer = layer
        return [layer]

    def check_model(self, family: str, batch_images: int) -> None:
        if family == "llava":
            raise VTPruneError(
                "globalcom2 needs LLaVA-NeXT (AnyRes): the thumbnail steers the compression of the high-resolution crops, "
                "and LLaVA-1.5 has no crops; use a LlavaNextForConditionalGeneration model, or for LLaVA-1.5 a "
                "single-image method such as 'hired' or 'vtc-cls'"
            )
        super().check_model(family, batch_images)

    def select_batch(self, images: list[ImageContext]) -> list[Selection]:
        if self.official and len(images) > 1:
            raise VTPruneError(
                "globalcom2 official=True: the official code takes the thumbnail of batch element 0 for every image "
                "(its eval runs batch size 1); run one image at a time or drop official=True (vtprune uses each "
                "image's own thumbnail)"
            )
        return [self.select(im) for im in images]

    # --- scoring --------------------------------------------------------------------------------------
    def _logits(self, image: ImageContext) -> torch.Tensor:
        layer = getattr(self, "_layer", None)
        if layer is None or layer not in image.cls_logits:
            layer = self.score_layer if self.score_layer is not None else max(image.cls_logits)
        return image.cls_logits[layer].float().mean(dim=1)[:, 1:].cpu()  # [partitions, patches]

    def _signals(self, image: ImageContext) -> _Signals:
        g = image.geometry
        logits = self._logits(image)
        s_g = logits[0]
        base_order = torch.argsort(s_g, descending=True, stable=True)
        if not g.has_crops:
            return _Signals(s_g, None, None, [], [], [], [], [], base_order)
        canvas = CropCanvas(g, transposed=False, rule=self.policy("unpad_rule"))
        sums = crop_region_sums(s_g, g.grid_h, g.grid_w, g.rows, g.cols)
        (r0, r1), (c0, c1) = canvas.ranges
        resized = None
        if r1 > r0 and c1 > c0:
            resized = F.interpolate(s_g.view(1, 1, g.grid_h, g.grid_w), size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False)[0, 0]
        valid, local, glob, comb, order = [], [], [], [], []
        a = float(self.alpha)
        for p in range(1, g.num_partitions):
            v = canvas.crop_valid_indices(p)
            (lr0, lr1), (lc0, lc1) = canvas.crop_valid(p)
            br, bc = canvas.block(p)
            L = logits[p][v]
            if v.numel():
                top, left = br * g.grid_h + lr0 - r0, bc * g.grid_w + lc0 - c0
                G = resized[top : top + (lr1 - lr0), left : left + (lc1 - lc0)].reshape(-1)
                z = 2 * (a * F.normalize(G, dim=0) + (1 - a) * F.normalize(L, dim=0))
            else:
                G, z = L.clone(), L.clone()
            valid.append(v)
            local.append(L)
            glob.append(G)
            comb.append(z)
            order.append(torch.argsort(z, descending=True, stable=True))
        return _Signals(s_g, canvas, sums, valid, local, glob, comb, order, base_order)

    def _report_scores(self, g, sig: _Signals) -> list[torch.Tensor]:
        out = [sig.s_global.clone()]
        for v, z in zip(sig.valid, sig.combined):
            s = torch.full((g.patches,), float("nan"))
            s[v] = z
            out.append(s)
        return out

    def score(self, image: ImageContext) -> list[torch.Tensor]:
        return self._report_scores(image.geometry, self._signals(image))

    # --- selection ------------------------------------------------------------------------------------
    def _choose(self, g, sig: _Signals, R: float):
        """Per-partition kept indices, thumbnail emission order and packed slots at ratio R."""
        P = g.patches
        k_g = min(int(P * R), P)
        base = sig.base_order[:k_g]
        if self.policy("base_order") == "raster":
            base = torch.sort(base).values
        kept = [torch.sort(base).values]
        ratios = crop_ratios(sig.sigma_sums, R, float(self.temperature))
        ids, rs, cs = [], [], []
        valid_index = self.policy("placement") == "valid-index"
        for j, p in enumerate(range(1, g.num_partitions)):
            v = sig.valid[j]
            k = min(int(v.numel() * float(ratios[j])), v.numel())
            pick = sig.order[j][:k]  # positions in the crop's list of unpadded patches
            true = v[pick]
            kept.append(torch.sort(true).values)
            pos = pick if valid_index else true
            r, c = sig.canvas.rc(torch.full_like(pos, p), pos)
            ids.append(p * P + true)
            rs.append(r)
            cs.append(c)
        slots = pack(sig.canvas, base, torch.cat(ids), torch.cat(rs), torch.cat(cs), self.policy("newline"), clip_to_valid=False)
        n_patch = sum(int(k.numel()) for k in kept)
        return kept, base, slots, n_patch

    def _stock_packing(self) -> bool:
        return (
            self.policy("placement") == "true"
            and self.policy("unpad_rule") == "hf"
            and self.policy("newline") in anyres.NEWLINE_POLICIES
        )

    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        sig = self._signals(image)
        scores = self._report_scores(g, sig)
        R = self.ratio()
        if not g.has_crops:  # a single-partition AnyRes grid (custom pinpoints): the thumbnail only
            if R is not None:
                k = min(int(g.patches * R), g.patches)
                image.budget = k
            else:
                k = max(0, min(image.budget - (1 if g.base_newline else 0), g.patches))
            base = sig.base_order[:k]
            if self.policy("base_order") == "raster":
                base = torch.sort(base).values
            return Selection(kept=[torch.sort(base).values], scores=scores, newline="none", base_order=base)
        if R is not None:
            kept, base, slots, n_patch = self._choose(g, sig, R)
            image.budget = n_patch
        else:
            lo, hi = 0.0, 2.0  # at R = 2 every crop ratio has reached its clip at 1
            kept, base, slots, _ = self._choose(g, sig, hi)
            if len(slots) > image.budget:
                kept, base, slots, _ = self._choose(g, sig, lo)
                for _ in range(60):
                    mid = (lo + hi) / 2
                    if not lo < mid < hi:
                        break
                    cand = self._choose(g, sig, mid)
                    if len(cand[2]) <= image.budget:
                        lo, (kept, base, slots, _) = mid, cand
                    else:
                        hi = mid
        if self._stock_packing():
            return Selection(kept=kept, scores=scores, newline=self.policy("newline"), base_order=base)
        return Selection(kept=kept, scores=scores, slots=slots)


__all__ = ["GlobalCom2", "crop_region_sums", "crop_ratios"]
