"""`none`: the unpruned model, run through the same hooks and shrinking path (the baseline row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import register
from .base import ImageContext, Method, Selection


@register("none")
@dataclass
class NoPruning(Method):
    """No pruning: every visual token reaches the LLM (the baseline in sweeps and comparisons)."""

    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "clip", "open_clip")
    summary: ClassVar[str] = "no pruning; the unpruned baseline through the same code path"
    has_official: ClassVar[bool] = False
    needs_budget: ClassVar[bool] = False

    def budget(self, available: int) -> int:
        return available

    def select(self, image: ImageContext) -> Selection:  # pragma: no cover - budget >= available always
        return Selection(kept=image.geometry.full_selection(), newline="all-rows")
