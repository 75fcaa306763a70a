"""`vtc-cls`: VTC-CLS (Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient
MLLMs", arXiv 2412.05819; code THU-MIG/VTC-CLS @ e41ac9b).

One-shot selection between the vision tower and the projector. Score of each patch = the CLS
query's attention probability to it (softmax over all keys, CLS column dropped, not renormalised,
mean over heads), summed over encoder layers `start_layer` .. the feature layer (22 for CLIP-L with
`vision_feature_layer=-2`). Keep the top `keep` patches in raster order; features are the usual
feature-layer outputs of the unpruned tower (no merging). Positions: contiguous (official).

Defaults: `start_layer=20` (the paper's 3-layer ensemble; the official eval CLI default is 16).
Scores are recomputed from q/k hooks in float32 — the tower keeps SDPA/Flash.

Deviations from the official code (undone by `official=True` where they exist):
- The official code is batch-1 only: at batch > 1 its "drop the batch dim" step is a no-op and the
  head mean averages over the batch. vtprune scores every image on its own (default and official);
  `official=True` raises at batch > 1 instead of reproducing the bug.
- LLaVA-NeXT is not supported by the official code ("VTC-CLS (vtprune AnyRes extension)"): the
  per-image budget is spent over the base image and all crops together. `anyres_split="global"`
  (default) ranks every valid patch of every partition by its score (comparable: each partition's
  CLS row sums to <= 1 per layer); "half" gives the base image `keep // 2` and the crops the rest
  (FlowCut's split). Packing keeps the stock order (base, then the crop canvas in raster order) with
  one newline after every canvas row that keeps a token (`newline="kept-rows"`; "all-rows" or
  "none" also available); newlines count in `keep`. `official=True` on LLaVA-NeXT raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import VTPruneError
from ..patches import anyres
from ..registry import register
from .base import ImageContext, Method, Selection

SPLITS = ("global", "half")


@register("vtc-cls")
@dataclass
class VTCCLS(Method):
    """VTC-CLS: top-k patches by CLS attention summed over layers start_layer..feature layer."""

    start_layer: int = 20
    anyres_split: str | None = None
    newline: str | None = None

    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "clip", "open_clip")
    summary: ClassVar[str] = "VTC-CLS: CLS-attention ensemble (layers start_layer..22), top-k before the projector"
    POLICIES: ClassVar[dict] = {
        "position_mode": ("compact", "compact"),
        "anyres_split": ("global", "global"),
        "newline": ("kept-rows", "kept-rows"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise VTPruneError(f"vtc-cls: start_layer must be a non-negative int (paper: 20), got {self.start_layer!r}")
        if self.anyres_split is not None and self.anyres_split not in SPLITS:
            raise VTPruneError(f"vtc-cls: anyres_split must be one of {SPLITS}, got {self.anyres_split!r}")
        if self.newline is not None and self.newline not in anyres.NEWLINE_POLICIES:
            raise VTPruneError(f"vtc-cls: newline must be one of {anyres.NEWLINE_POLICIES}, got {self.newline!r}")

    def cls_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        if self.start_layer > feature_layer:
            raise VTPruneError(
                f"vtc-cls: start_layer={self.start_layer} is after the feature layer {feature_layer} of this "
                f"{num_layers}-layer tower; use start_layer <= {feature_layer}"
            )
        return list(range(self.start_layer, feature_layer + 1))

    def check_model(self, family: str, batch_images: int) -> None:
        super().check_model(family, batch_images)
        if self.official and family != "llava":
            raise VTPruneError("vtc-cls official=True: the official code supports LLaVA-1.5 only; drop official=True for LLaVA-NeXT")
        if self.official and batch_images > 1:
            raise VTPruneError(
                "vtc-cls official=True: the official code is batch-1 only (at batch > 1 it averages over the batch); "
                "run one image at a time or drop official=True"
            )

    def score(self, image: ImageContext) -> list[torch.Tensor]:
        total = None
        for layer in sorted(image.cls_logits):
            s = image.cls_probs(layer).mean(dim=1)  # [partitions, patches]: head mean
            total = s if total is None else total + s
        return list(total)

    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        scores = self.score(image)
        k = image.budget
        if not g.has_crops:
            idx = torch.topk(scores[0], min(k, g.patches)).indices
            return Selection(kept=[torch.sort(idx).values.cpu()], scores=scores, newline="none")
        newline = self.policy("newline")
        ids = g.valid_ids()
        flat = torch.cat(scores).cpu()[ids]
        if self.policy("anyres_split") == "half":
            base = ids < g.patches
            kb = min(k // 2, g.patches)
            top_base = torch.topk(scores[0].cpu(), kb).indices
            crop_ids, crop_scores = ids[~base], flat[~base]
            order = crop_ids[torch.argsort(crop_scores, descending=True, stable=True)]
            kept = anyres.fill(g, order, k - kb, newline)
            kept[0] = torch.sort(top_base).values
        else:
            order = ids[torch.argsort(flat, descending=True, stable=True)]
            kept = anyres.fill(g, order, k, newline)
        return Selection(kept=kept, scores=scores, newline=newline)
