"""`hired`: HiRED (Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models", AAAI 2025, arXiv 2408.10945; code hasanar1f/HiRED @ 502d6dd,
a transformers 4.42 fork).

Acts between the vision tower and the LLM, on LLaVA-NeXT's base image and crops (and, in the paper's
single-image variant, on LLaVA-1.5). Signal: the CLS query's attention probabilities (softmax over
all 577 keys, CLS column dropped, **summed** over heads), recomputed in float32 from q/k hooks (the
tower keeps SDPA/Flash), at two encoder layers:

- `init_layer` (0): the base image's map splits the crop budget. Its top `int(576*(1-alpha))`
  tokens are marked; the 576-vector is cut, in raster order, into `rows*cols` contiguous chunks,
  chunk i belonging to crop i; crop i gets `min(trunc(float32(c_i / sum c) * sub_total), 576)`
  where c_i counts the marked tokens of chunk i.
- `final_layer` (None = the feature layer, 22 for CLIP-L with `vision_feature_layer=-2`): plain top-k
  inside every partition, kept tokens in raster order.

Budget (official arithmetic, truncations included): `total = int(n*576*token_budget_rate)` over the
`n = 1 + rows*cols` partitions, `base_k = min(int(total*alpha), 576)`,
`sub_total = min(total - base_k, (n-1)*576)`. The flooring remainder is not redistributed and kept
tokens that fall in the padding are dropped when the canvas is unpadded, so fewer than `total`
tokens may reach the LLM. `token_budget_rate=1` skips the selection (every patch, as the official
code does). LLaVA-1.5: top `min(576, int(576*token_budget_rate))`, no allocation.

Knobs: `token_budget_rate` (0.2, the paper's main setting; 0.4 also reported) and `alpha` (0.5)
under their official names. Budgets in vtprune's own terms are converted:

- `keep` (visual tokens reaching the LLM per image, newlines included): HiRED's `total` is set to
  the largest value whose packed output (with the chosen newline and grid policies) fits in `keep`
  — the packed count only grows with `total`, so this is a search over `total`, equivalent to
  `token_budget_rate = total / (n*576)`; `alpha` still splits it. LLaVA-1.5: top `min(keep, 576)`.
  (With `newline="all-rows"` a `keep` below the number of unpadded rows leaves only the newlines.)
- `keep_ratio`: `keep = max(1, int(keep_ratio * available))` of the image's unpruned count
  (newlines included), then as `keep`.
- `token_budget_rate` and `keep`/`keep_ratio` are exclusive. With neither, `token_budget_rate=0.2`.
  In rate mode `pruner.last.budget` reports HiRED's `total` (patch tokens; newlines the layout emits
  come on top, as in the paper's "fraction of n*576").

Deviations from the official code (`official=True` restores each; finer knobs still override):

- `newline="kept-rows"` (default): one `image_newline` after every canvas row that keeps a token,
  as the model was trained with newlines (also "all-rows": every unpadded row, stock style). The
  official forward passes no newline at all — even its "full" rate-1.0 baseline is newline-free —
  `official` gives `newline="none"`.
- `grid="corrected"`: crops stitched on the real `rows x cols` grid. The fork inherits the
  transformers <= 4.43 width/height swap (fixed upstream in PR #32314): non-square grids (1x2, 2x1,
  1x3, 3x1) are stitched as `cols x rows` and unpadded with the wrong aspect, which garbles the
  order and drops many kept crop tokens. `official` gives `grid="transposed"`.
- `unpad_rule="hf"`: unpadding rounds like transformers (`int(round(x, 7))`, matching the
  processor's counts); the fork uses plain `int(x)` (`official`: "int"). Rarely one row/column apart.
- Batches: every image is scored and budgeted on its own. The LLaVA-1.5 patch of the official code
  reads batch element 0 only; `official=True` on LLaVA-1.5 raises at batch > 1.
- Not deviations but worth knowing: layer 22 is the feature layer, not the literal last layer (the
  paper's `l_final = 22`); the crop split uses *counts* of marked tokens in raster *bands* of the base
  grid (the code), not attention sums over the spatially covering region (the paper, Eq. 1); both
  follow the code. `alpha` must be < 1 (the official code divides by zero there).
- Tiny towers whose patch count is not divisible by `rows*cols` (e.g. 8x8 patches on 3 crops): the
  chunks follow `torch.tensor_split` (the first ones one longer); the official reshape would fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import VTPruneError
from ..patches import anyres
from ..patches.anyres_official import UNPAD_RULES, CropCanvas, pack
from ..registry import register
from .base import ImageContext, Method, Selection

DEFAULT_RATE = 0.2
GRIDS = ("corrected", "transposed")


def marked_counts(init_scores: torch.Tensor, alpha: float, n_crops: int) -> torch.Tensor:
    """Per crop, how many of the base image's top-`int(N*(1-alpha))` layer-`init` tokens fall in its
    contiguous raster chunk of the base grid (int64, `n_crops` entries)."""
    N = init_scores.numel()
    marked = torch.zeros(N, dtype=torch.long)
    m = int(N * (1 - alpha))
    if m > 0:
        marked[torch.topk(init_scores.float().cpu(), min(m, N)).indices] = 1
    return torch.stack([c.sum() for c in torch.tensor_split(marked, n_crops)])


def allocation(total: int, alpha: float, n_crops: int, N: int, counts: torch.Tensor) -> tuple[int, int, list[int]]:
    """HiRED's split of `total` tokens: (base_k, sub_total, per-crop budgets), exactly as the official
    code computes it (float32 ratio times `sub_total`, truncated, clamped at N; no redistribution)."""
    base_k = min(int(total * alpha), N)
    sub_total = min(total - base_k, n_crops * N)
    if sub_total <= 0 or n_crops == 0:
        return base_k, max(sub_total, 0), [0] * n_crops
    c = counts.to(torch.float32)
    ratio = c / c.sum()
    ks = torch.clamp((ratio * sub_total).to(torch.long), max=N)
    return base_k, sub_total, [int(k) for k in ks]


@register("hired")
@dataclass
class HiRED(Method):
    """HiRED: layer-0 CLS attention of the base image splits the budget over crops, layer-22 CLS
    attention picks the top-k inside every partition."""

    token_budget_rate: float | None = None
    alpha: float = 0.5
    init_layer: int = 0
    final_layer: int | None = None
    newline: str | None = None
    grid: str | None = None
    unpad_rule: str | None = None

    summary: ClassVar[str] = (
        "HiRED: budget split over crops by the base image's layer-0 CLS attention, top-k per partition by layer-22 CLS attention"
    )
    POLICIES: ClassVar[dict[str, tuple[Any, Any]]] = {
        "position_mode": ("compact", "compact"),
        "newline": ("kept-rows", "none"),
        "grid": ("corrected", "transposed"),
        "unpad_rule": ("hf", "int"),
    }

    def __post_init__(self) -> None:
        if self.token_budget_rate is not None and (self.keep is not None or self.keep_ratio is not None):
            given = "keep" if self.keep is not None else "keep_ratio"
            raise VTPruneError(
                f"hired: give either token_budget_rate= (HiRED's own budget, a fraction of n*576 patch tokens) or "
                f"{given}= (vtprune's per-image budget, converted to HiRED's), not both"
            )
        super().__post_init__()
        r = self.token_budget_rate
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 < r <= 1)):
            raise VTPruneError(f"hired: token_budget_rate must be in (0, 1] (fraction of the n*576 patch tokens; paper: 0.2, 0.4), got {r!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a < 1):
            raise VTPruneError(
                f"hired: alpha must be in [0, 1) (share of the budget for the base image; paper: 0.5; 1 leaves the crops "
                f"no marked tokens and divides by zero), got {a!r}"
            )
        for name in ("init_layer", "final_layer"):
            v = getattr(self, name)
            if v is None and name == "final_layer":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise VTPruneError(f"hired: {name} must be a non-negative int (paper: init 0, final 22 = the feature layer), got {v!r}")
        checks = (("newline", anyres.NEWLINE_POLICIES), ("grid", GRIDS), ("unpad_rule", UNPAD_RULES))
        for name, allowed in checks:
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise VTPruneError(f"hired: {name} must be one of {allowed}, got {v!r}")

    # --- parameters ---------------------------------------------------------------------------------
    def _has_own_budget(self) -> bool:
        return True

    def rate(self) -> float | None:
        """The effective token_budget_rate (None when keep/keep_ratio drive the budget)."""
        if self.token_budget_rate is not None:
            return float(self.token_budget_rate)
        return DEFAULT_RATE if self.keep is None and self.keep_ratio is None else None

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["token_budget_rate"] = self.rate()
        return out

    def _stock_packing(self) -> bool:
        return self.policy("grid") == "corrected" and self.policy("unpad_rule") == "hf" and self.policy("newline") != "none"

    def needs_selection(self, available: int, budget: int) -> bool:
        rate = self.rate()
        if rate is None:
            return super().needs_selection(available, budget)
        # rate >= 1 in the stock packing keeps everything in the stock layout; otherwise HiRED's own
        # budget depends on the partition count, which only `select` sees (the image's report budget is
        # set there to HiRED's total).
        return not (rate >= 1 and self._stock_packing())

    # --- what the method needs ------------------------------------------------------------------------
    def cls_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        final = feature_layer if self.final_layer is None else self.final_layer
        for name, v in (("init_layer", self.init_layer), ("final_layer", final)):
            if v >= num_layers:
                raise VTPruneError(f"hired: {name}={v} does not exist in this {num_layers}-layer tower; use a layer < {num_layers}")
        self._final = final
        return sorted({self.init_layer, final})

    def check_model(self, family: str, batch_images: int) -> None:
        super().check_model(family, batch_images)
        if self.official and family == "llava" and batch_images > 1:
            raise VTPruneError(
                "hired official=True: the official LLaVA-1.5 code reads batch element 0 only; run one image at a time "
                "or drop official=True (vtprune scores every image on its own)"
            )

    def _final_layer(self, image: ImageContext) -> int:
        final = self.final_layer if self.final_layer is not None else getattr(self, "_final", None)
        if final is None:  # not patched through vtprune.patch: the highest captured layer
            final = max(image.cls_logits)
        return final

    # --- scoring and selection ------------------------------------------------------------------------
    def score(self, image: ImageContext) -> list[torch.Tensor]:
        s = image.cls_probs(self._final_layer(image)).sum(dim=1).float().cpu()  # [partitions, patches]: head sum
        return list(s)

    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        scores = self.score(image)
        P = g.patches
        rate = self.rate()
        order = [torch.argsort(s, descending=True, stable=True) for s in scores]
        if not g.has_crops:
            if rate is not None:
                k = min(int(P * rate), P)
                image.budget = k
            else:
                k = max(0, min(image.budget - (1 if g.base_newline else 0), P))
            return Selection(kept=[torch.sort(order[0][:k]).values], scores=scores, newline="none")

        n_crops = g.rows * g.cols
        n = 1 + n_crops
        init = image.cls_probs(self.init_layer)[0].sum(dim=0).float().cpu()
        counts = marked_counts(init, float(self.alpha), n_crops)

        def choose(total: int):
            base_k, _, ks = allocation(total, float(self.alpha), n_crops, P, counts)
            kept = [torch.sort(order[0][:base_k]).values] + [torch.sort(order[p][: ks[p - 1]]).values for p in range(1, n)]
            return kept, self._slots(g, kept)

        if rate is not None and rate >= 1:  # the official code skips HiRED: every patch, HiRED's packer
            kept = [torch.arange(P) for _ in range(n)]
            slots = self._slots(g, kept)
            image.budget = n * P
        elif rate is not None:
            total = int(n * P * rate)
            image.budget = total
            kept, slots = choose(total)
        else:
            lo, hi = 0, n * P  # largest total whose packed length fits the budget
            kept, slots = choose(hi)
            if len(slots) > image.budget:
                kept, slots = choose(lo)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    k_mid, s_mid = choose(mid)
                    if len(s_mid) <= image.budget:
                        lo, kept, slots = mid, k_mid, s_mid
                    else:
                        hi = mid
        if self._stock_packing():
            return Selection(kept=kept, scores=scores, newline=self.policy("newline"))
        return Selection(kept=kept, scores=scores, slots=slots)

    def _slots(self, g, kept: list[torch.Tensor]) -> torch.Tensor:
        """The packed order under this method's grid / unpad / newline policies (HiRED's packer: base
        tokens in raster order, then the unpadded crop canvas row by row, kept tokens only)."""
        canvas = CropCanvas(g, transposed=self.policy("grid") == "transposed", rule=self.policy("unpad_rule"))
        parts = torch.cat([torch.full_like(kept[p], p) for p in range(1, len(kept))])
        idx = torch.cat(kept[1:])
        r, c = canvas.rc(parts, idx)
        return pack(canvas, kept[0], parts * g.patches + idx, r, c, self.policy("newline"))


__all__ = ["HiRED", "allocation", "marked_counts"]
