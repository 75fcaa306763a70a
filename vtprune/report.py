"""`pruner.last`: what the most recent prefill did, image by image.

Images are numbered in batch order (a sample with two images contributes two entries;
`sample_of[i]` maps image `i` back to its sample). Per image `i` and partition `p` (0 = base
image; for LLaVA-NeXT 1.. = the crops in row-major grid order):

- `kept[i][p]`: 1-D `torch.long`, ascending, 0-based raster indices over that partition's patch
  grid (24x24 for CLIP-L/336), CLS excluded: the patches whose tokens reach the LLM. For merging
  methods, each merged token's representative index.
- `sources[i][p]`: `None` for pure selection; for merging methods a list aligned with
  `kept[i][p]` whose `j`-th entry is a 1-D `torch.long` of the *image-level* patch ids merged into
  that token (image-level id = `partition * patches_per_partition + index`; for LLaVA-1.5 it is
  the patch index).
- `scores[i][p]`: float scores over the partition's patches where the method has them (heat maps).
- `stages[i]`: in-LLM pruning stages, a list of `Stage(layer, surviving)`.
- `num_visual_tokens[i]`: visual tokens entering the LLM's first decoder layer (newlines included
  where the layout has them); `available[i]`: the unpruned count; `budget[i]`: what was asked.
- `tokens_per_layer[i]`: visual tokens entering each decoder layer; `mean_tokens[i]` their mean,
  the figure that compares across methods.
- `input_keep`: bool `[batch, original_length]`, which positions of the caller's sequence reach
  the LLM; `new_index`: long `[batch, original_length]`, their position in the shrunk sequence
  (-1 where removed). Use them to align logits with the caller's tokens. Methods that also prune
  inside the LLM set `output_index` `[batch, llm_input_length]`: where each LLM input position ends
  up in the output (logits) sequence, -1 if dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


class Stage(NamedTuple):
    """An in-LLM pruning stage: after decoder layer `layer`, the visual tokens in `surviving` remain
    (indices into the visual segment as it entered the LLM)."""

    layer: int
    surviving: torch.Tensor


@dataclass
class Report:
    method: str
    params: dict[str, Any]
    kept: list[list[torch.Tensor]] = field(default_factory=list)
    sources: list[list[list[torch.Tensor]] | None] = field(default_factory=list)
    scores: list[list[torch.Tensor] | None] = field(default_factory=list)
    stages: list[list[Stage]] = field(default_factory=list)
    num_visual_tokens: list[int] = field(default_factory=list)
    available: list[int] = field(default_factory=list)
    budget: list[int] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    sample_of: list[int] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    geometries: list = field(default_factory=list)  # per image: the ImageGeometry (partitions, canvas, unpadding)
    input_keep: torch.Tensor | None = None
    new_index: torch.Tensor | None = None
    output_index: torch.Tensor | None = None
    position_mode: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.num_visual_tokens)

    @property
    def mean_tokens(self) -> list[float]:
        """Per image: visual tokens entering each decoder layer, averaged over layers."""
        return [sum(c) / len(c) if c else 0.0 for c in self.tokens_per_layer]

    @property
    def mean_visual_tokens(self) -> float:
        """Mean over images of `mean_tokens` (0 when no image was seen)."""
        m = self.mean_tokens
        return sum(m) / len(m) if m else 0.0

    def summary(self) -> str:
        if not self.num_images:
            return f"{self.method}: no image in the last prefill (ran unpruned)"
        parts = [
            f"image {i} (sample {self.sample_of[i]}): {self.num_visual_tokens[i]}/{self.available[i]} visual tokens"
            + (f", mean over layers {self.mean_tokens[i]:.1f}" if self.stages and self.stages[i] else "")
            for i in range(self.num_images)
        ]
        return f"{self.method}: " + "; ".join(parts)

    def __repr__(self) -> str:  # compact: tensors are long
        return f"Report({self.summary()})"
