"""`pool`: spatial average pooling of the patch grid down to the budget — a strong, score-free baseline.

The patch grid (LLaVA-1.5: 24x24) is divided into `h x w` adaptive windows (PyTorch's
adaptive-pooling boundaries) with `h*w <= keep` and the aspect ratio of the grid kept within a
factor 2; each window's pre-projector features are averaged into one token, which then goes through
the projector. Each pooled token is reported in `kept` by its window's centre patch and in
`sources` by the whole window.

LLaVA-NeXT: the base image and the valid (unpadded) crop canvas are pooled separately; the budget
is split between them in proportion to their unpruned token counts, and the pooled canvas keeps one
newline per pooled row (counted in `keep`), like the stock layout. Windows of the canvas may span
two crops; `sources` then lists patches of both (image-level ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import register
from .base import ImageContext, Method, Selection


def pooled_shape(H: int, W: int, budget: int, per_row: int = 0) -> tuple[int, int]:
    """(h, w) with h*w + per_row*h <= budget, maximal token count, aspect within 2x of H/W
    (closest aspect among equals); falls back to any aspect if none fits."""
    best, best_key = (1, 1), None
    for strict in (True, False):
        for h in range(1, H + 1):
            w = min(W, (budget - per_row * h) // h)
            if w < 1:
                break
            distort = abs(math.log((h / w) / (H / W)))
            if strict and distort > math.log(2) + 1e-9:
                continue
            key = (h * w, -distort)
            if best_key is None or key > best_key:
                best, best_key = (h, w), key
        if best_key is not None:
            return best
    return best


def windows(n: int, m: int) -> list[tuple[int, int]]:
    """PyTorch adaptive pooling boundaries of n cells into m windows."""
    return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


@register("pool")
@dataclass
class Pool(Method):
    """Average-pool the patch grid to at most `keep` tokens (adaptive windows, aspect kept)."""

    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "clip", "open_clip")
    summary: ClassVar[str] = "spatial average pooling of the patch grid to the budget (baseline)"
    has_official: ClassVar[bool] = False

    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        k = image.budget
        if not g.has_crops:
            rep, groups = self._pool(g.grid_h, g.grid_w, k, lambda r, c: r * g.grid_w + c)
            kept, grp = _per_partition(g, rep, groups)
            return Selection(kept=kept, groups=grp, newline="none")
        kb = max(1, min(k - 2, round(k * g.base_len / image.available)))
        kc = k - kb
        rep_b, grp_b = self._pool(g.grid_h, g.grid_w, kb, lambda r, c: r * g.grid_w + c)
        (r0, _), (c0, _) = g.row_range, g.col_range

        def canvas_id(r, c):
            return int(g.canvas_to_id(torch.tensor(r0 + r), torch.tensor(c0 + c)))

        rep_c, grp_c = self._pool(g.valid_h, g.valid_w, kc, canvas_id, per_row=1)
        kept, grp = _per_partition(g, rep_b + rep_c, grp_b + grp_c)
        return Selection(kept=kept, groups=grp, newline="kept-rows")

    @staticmethod
    def _pool(H, W, budget, to_id, per_row: int = 0):
        """Representatives and groups (image-level ids) of an adaptive h x w pooling of an H x W grid."""
        if budget < 1 + per_row:
            return [], []
        h, w = pooled_shape(H, W, budget, per_row)
        reps, groups = [], []
        for rs, re in windows(H, h):
            for cs, ce in windows(W, w):
                reps.append(to_id((rs + re - 1) // 2, (cs + ce - 1) // 2))
                groups.append(torch.tensor([to_id(r, c) for r in range(rs, re) for c in range(cs, ce)], dtype=torch.long))
        return reps, groups


def _per_partition(g, reps, groups):
    P = g.patches
    kept, grp = [], []
    for p in range(g.num_partitions):
        pairs = sorted((r - p * P, gr) for r, gr in zip(reps, groups) if r // P == p)
        kept.append(torch.tensor([a for a, _ in pairs], dtype=torch.long))
        grp.append([b for _, b in pairs])
    return kept, grp
