"""`random`: a seeded uniform random subset of the visual tokens — the floor any method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patches import anyres
from ..registry import register
from ..errors import VTPruneError
from .base import ImageContext, Method, Selection


@register("random")
@dataclass
class RandomPrune(Method):
    """Keep a uniform random subset of each image's patches (seeded, reproducible).

    The random stream of an image is seeded by `seed` and a hash of the image's own pixels, so an
    image keeps the same patches whatever its position in a batch. LLaVA-NeXT: one draw over the
    valid patches of the base and all crops, packed in the stock order with a newline after every
    canvas row that keeps a token (`newline="kept-rows"`, counted in the budget; or "none").
    """

    seed: int = 0
    newline: str | None = None

    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "clip", "open_clip")
    summary: ClassVar[str] = "uniform random subset per image (seeded baseline)"
    has_official: ClassVar[bool] = False
    POLICIES: ClassVar[dict] = {"position_mode": ("compact", "compact"), "newline": ("kept-rows", None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.newline is not None and self.newline not in anyres.NEWLINE_POLICIES:
            raise VTPruneError(f"random: newline must be one of {anyres.NEWLINE_POLICIES}, got {self.newline!r}")

    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        gen = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(image.key)) % (1 << 62))
        ids = g.valid_ids()
        order = ids[torch.randperm(ids.numel(), generator=gen)]
        newline = self.policy("newline")
        return Selection(kept=anyres.fill(g, order, image.budget, newline), newline=newline)
