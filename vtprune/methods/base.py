"""The Method base class: a small dataclass of parameters plus pure selection logic.

A method never touches a model. The core gives it, per image, an `ImageContext` (geometry, budget,
captured signals, features) and gets back a `Selection` (kept patches per partition, optional merge
groups and scores, newline and ordering policy). Parameters common to every method:

- `keep`: visual tokens that reach the LLM per image (LLaVA-NeXT: across base and crops, newlines
  included where the layout emits them); `keep_ratio`: a fraction in (0, 1] of that image's own
  unpruned count (`floor(ratio * count)`, at least 1). Exactly one of them (or a method's official
  budget knob) must be given; `keep` >= the unpruned count means no pruning.
- `official`: set every policy knob to the official code's value (finer knobs still override).
- `position_mode`: "compact" (contiguous renumbering) or "original" (kept tokens keep the
  positions they had in the unpruned sequence).

Policy knobs default to `None` and are resolved with `policy(name)`: the explicit value if given,
else the official value when `official=True`, else vtprune's default (`POLICIES[name]`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import VTPruneError
from ..patches.anyres import ImageGeometry

POSITION_MODES = ("compact", "original")


@dataclass
class ImageContext:
    """What a method sees of one image."""

    index: int  # image number in the batch
    geometry: ImageGeometry
    budget: int  # visual tokens allowed to reach the LLM
    available: int  # unpruned count
    cls_logits: dict[int, torch.Tensor]  # layer -> [partitions, heads, tokens] pre-softmax CLS row (fp32, CLS at 0)
    features: torch.Tensor  # [partitions, rows, D] pre-projector patch features (CLS removed)
    key: int  # a stable per-image key (hash of its pixels): seeds that must not depend on batch position
    tile_ids: list[torch.Tensor] | None = None  # after an in-tower stage: the patch id of each feature row, per partition
    tile_sources: list[list[torch.Tensor]] | None = None  # after an in-tower merge: per partition, per row, the merged patch ids

    def cls_probs(self, layer: int) -> torch.Tensor:
        """[partitions, heads, patches]: softmax over all keys (CLS included), CLS column dropped."""
        return torch.softmax(self.cls_logits[layer], dim=-1)[..., 1:]


@dataclass
class Selection:
    """A method's answer for one image.

    - `kept[p]`: sorted ascending local indices of partition p that reach the LLM.
    - `groups[p][j]`: the image-level ids merged into kept token j (None = no merging).
    - `scores[p]`: per-patch scores for reports (None: the core asks `Method.score`).
    - `newline`, `base_order`: how the core packs `kept` (see anyres.layout).
    - `slots`: an explicit emission order instead (image-level ids, anyres.NEWLINE for a newline) for
      methods whose official packing differs from the stock order; `kept` is then derived from it.
    - `sources[p][j]`: for tokens merged *before* selection (in the tower), the image-level ids merged
      into kept token j of partition p — reported in `pruner.last.sources` only (the core does not
      merge again; `groups` is for merging that the core performs).
    """

    kept: list[torch.Tensor]
    groups: list[list[torch.Tensor]] | None = None
    scores: list[torch.Tensor] | None = None
    newline: str = "kept-rows"
    base_order: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    sources: list[list[torch.Tensor]] | None = None


@dataclass
class Method:
    keep: int | None = None
    keep_ratio: float | None = None
    official: bool = False
    position_mode: str | None = None

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    has_official: ClassVar[bool] = True
    needs_budget: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next")
    # policy knob -> (vtprune default, official value)
    POLICIES: ClassVar[dict[str, tuple[Any, Any]]] = {"position_mode": ("compact", "compact")}

    def __post_init__(self) -> None:
        if self.keep is not None and self.keep_ratio is not None:
            raise VTPruneError(f"{self.name}: give keep= or keep_ratio=, not both")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep <= 0:
                raise VTPruneError(f"{self.name}: keep must be a positive int (visual tokens per image), got {self.keep!r}")
        if self.keep_ratio is not None:
            if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or not (0 < self.keep_ratio <= 1):
                raise VTPruneError(
                    f"{self.name}: keep_ratio must be in (0, 1] (a fraction of the image's visual tokens), got {self.keep_ratio!r}"
                )
        if self.needs_budget and self.keep is None and self.keep_ratio is None and not self._has_own_budget():
            raise VTPruneError(f"{self.name}: give a budget, e.g. keep=64 or keep_ratio=0.25")
        if self.official and not self.has_official:
            raise VTPruneError(f"{self.name} has no official implementation to reproduce; drop official=True")
        if self.position_mode is not None and self.position_mode not in POSITION_MODES:
            raise VTPruneError(f"{self.name}: position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")

    @classmethod
    def keep_all_params(cls) -> dict[str, Any]:
        """Parameters under which the method keeps every visual token (the keep-all identity setting)."""
        return {"keep": 10**9} if cls.needs_budget else {}

    def _has_own_budget(self) -> bool:
        """Methods with an official budget knob (e.g. HiRED token_budget_rate) override this."""
        return False

    # --- parameters ---------------------------------------------------------------------------------
    def policy(self, name: str):
        value = getattr(self, name)
        if value is not None:
            return value
        default, official = self.POLICIES[name]
        return official if self.official else default

    def params(self) -> dict[str, Any]:
        """Every parameter with its resolved value (policies resolved)."""
        out = {}
        for f in dataclasses.fields(self):
            out[f.name] = self.policy(f.name) if f.name in self.POLICIES else getattr(self, f.name)
        return out

    def budget(self, available: int) -> int:
        """Visual tokens allowed for an image whose unpruned count is `available` (`available` when the
        method sets its own budget in `select`, see `needs_selection`)."""
        if self.keep is not None:
            return int(self.keep)
        if self.keep_ratio is not None:
            return max(1, int(self.keep_ratio * available))
        return available

    def needs_selection(self, available: int, budget: int) -> bool:
        """Whether `select` (and an in-tower stage) runs for an image: by default when its budget is below
        its unpruned count. Methods whose budget is only known inside `select` (HiRED's and GlobalCom²'s
        ratios, MustDrop's thresholds, ATP) return True there and set `image.budget` in `select`."""
        return budget < available

    # --- what the method needs ------------------------------------------------------------------------
    def cls_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        """Vision encoder layers whose CLS attention row the method reads (0-based)."""
        return []

    def check_model(self, family: str, batch_images: int) -> None:
        """Raise for a model family or batch the method cannot serve."""
        if family not in self.families:
            raise VTPruneError(f"{self.name} is not defined for {family} models; it supports {', '.join(self.families)}")

    # --- the stage inside the vision tower (optional) -----------------------------------------------
    def vision_stage_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        """Vision layers after which `vision_step` runs (their q/k/v projections are captured)."""
        return []

    def vision_prunes(self, geometry, budget: int) -> bool:
        """Whether the in-tower stage removes anything for this image (else the tower runs unchanged)."""
        return False

    def vision_groups(self, tiles_per_image: list[int]) -> list[list[int]]:
        """Images whose tiles run through the tower together (they may share a schedule).
        Default: each image alone, so nothing depends on batch neighbours."""
        return [[i] for i in range(len(tiles_per_image))]

    def vision_begin(self, geometries, budgets, tiles_per_image, feature_layer: int, num_layers: int):
        """Per-run state of the in-tower stage for the images of one group."""
        raise NotImplementedError

    def vision_step(self, state, layer: int, hidden: torch.Tensor, qkv: dict, attn) -> torch.Tensor:
        """After vision layer `layer`: the (possibly shortened) hidden states, CLS first."""
        return hidden

    def vision_kept(self, state) -> list[torch.Tensor]:
        """Per tile of the run, the patch id of each remaining row (a merged row: its representative)."""
        raise NotImplementedError

    def vision_sources(self, state) -> list[list[torch.Tensor]] | None:
        """Per tile, per remaining row, the patch ids merged into it (None: nothing was merged)."""
        return None

    # --- the stage inside the LLM (optional) ---------------------------------------------------------
    def llm_stages(self, family: str, num_layers: int) -> list:
        """In-LLM stages (vtprune.patches.decoder.LLMStage) for this model family."""
        return []

    def llm_evict_layers(self, family: str, num_layers: int) -> list[int]:
        """Decoder layers whose KV cache keeps, at the end of prefill, only the visual tokens that
        survived every stage (MustDrop's output-aware cache); default none."""
        return []

    # --- the stage between vision tower and LLM -----------------------------------------------------
    def score(self, image: ImageContext) -> list[torch.Tensor] | None:
        """Per-partition scores over patches, for reports and heat maps (None if the method has none)."""
        return None

    def select(self, image: ImageContext) -> Selection:
        raise NotImplementedError

    def select_batch(self, images: list[ImageContext]) -> list[Selection]:
        """Selections for every image of a batch; by default image by image (nothing shared)."""
        return [self.select(im) for im in images]
