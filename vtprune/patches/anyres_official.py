"""LLaVA-NeXT packings of the official method code, next to the stock one in `anyres.py`.

Some official implementations pack the crop canvas differently from current transformers, and
their parity modes have to reproduce that exactly. The pieces live here, once, for every method:

- `unpad_ranges`: the unpadded rectangle of a canvas under transformers' rounding rule ("hf",
  `int(round(x, 7))`, what the processor counts) or the plain `int(x)` of the original LLaVA code
  and of forks predating the change ("int"). Both take the original size as (H, W).
- `CropCanvas`: where each crop patch lands on the stitched canvas. `transposed=True` reproduces
  transformers <= 4.43 (before PR #32314), which viewed a `rows x cols` grid as `cols x rows`
  (crop q placed at grid cell (q // rows, q % rows)): non-square grids come out garbled.
- `pack`: an explicit emission order (image-level ids and `anyres.NEWLINE`) from canvas cells and a
  per-row newline rule — "none", "kept-rows", "all-rows" (every unpadded row, as stock) or
  "padded-rows" (every canvas row, padding rows included).

Everything returns CPU `torch.long` tensors of image-level ids (`partition * patches + index`), the
form `Selection.slots` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .anyres import NEWLINE, ImageGeometry

UNPAD_RULES = ("hf", "int")
PACK_NEWLINES = ("none", "kept-rows", "all-rows", "padded-rows")


def unpad_ranges(image_hw, canvas_hw, rule: str = "hf") -> tuple[tuple[int, int], tuple[int, int]]:
    """(row_range, col_range), half-open, of the unpadded area of a `canvas_hw` patch canvas for an
    original image of size `image_hw` = (H, W)."""
    if rule not in UNPAD_RULES:
        raise ValueError(f"unpad rule must be one of {UNPAD_RULES}, got {rule!r}")
    h, w = int(image_hw[0]), int(image_hw[1])
    ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
    rows, cols = (0, ch), (0, cw)
    if w / h > cw / ch:
        x = h * (cw / w)
        new_h = int(round(x, 7)) if rule == "hf" else int(x)
        pad = (ch - new_h) // 2
        rows = (pad, ch - pad)
    else:
        x = w * (ch / h)
        new_w = int(round(x, 7)) if rule == "hf" else int(x)
        pad = (cw - new_w) // 2
        cols = (pad, cw - pad)
    return rows, cols


@dataclass(frozen=True)
class CropCanvas:
    """The stitched crop canvas of one image: a grid of `grid_rows x grid_cols` crop blocks, each
    `grid_h x grid_w` patches, crops placed row-major (or transposed, see the module doc), and its
    unpadded rectangle."""

    geom: ImageGeometry
    transposed: bool = False
    rule: str = "hf"

    @property
    def grid_rows(self) -> int:
        return self.geom.cols if self.transposed else self.geom.rows

    @property
    def grid_cols(self) -> int:
        return self.geom.rows if self.transposed else self.geom.cols

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid_rows * self.geom.grid_h, self.grid_cols * self.geom.grid_w

    @property
    def ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.geom.image_size is None:
            return (0, self.shape[0]), (0, self.shape[1])
        return unpad_ranges(self.geom.image_size, self.shape, self.rule)

    def block(self, partition: int) -> tuple[int, int]:
        """Grid cell (block row, block col) of crop partition (>= 1)."""
        q = partition - 1
        return divmod(q, self.grid_cols)

    def rc(self, partition: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas (row, col) of crop patches (partition >= 1, local raster index)."""
        g = self.geom
        q = partition.to(torch.long) - 1
        br = torch.div(q, self.grid_cols, rounding_mode="floor")
        bc = q % self.grid_cols
        index = index.to(torch.long)
        r = br * g.grid_h + torch.div(index, g.grid_w, rounding_mode="floor")
        c = bc * g.grid_w + index % g.grid_w
        return r, c

    def crop_valid(self, partition: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The unpadded rectangle of one crop in its own local (row, col) coordinates (may be empty)."""
        g = self.geom
        br, bc = self.block(partition)
        (r0, r1), (c0, c1) = self.ranges
        rows = (min(max(r0 - br * g.grid_h, 0), g.grid_h), min(max(r1 - br * g.grid_h, 0), g.grid_h))
        cols = (min(max(c0 - bc * g.grid_w, 0), g.grid_w), min(max(c1 - bc * g.grid_w, 0), g.grid_w))
        return rows, cols

    def crop_valid_indices(self, partition: int) -> torch.Tensor:
        """Local raster indices of a crop's unpadded patches, in raster order."""
        (a, b), (c, d) = self.crop_valid(partition)
        rr, cc = torch.meshgrid(torch.arange(a, b), torch.arange(c, d), indexing="ij")
        return (rr * self.geom.grid_w + cc).reshape(-1)


def pack(
    canvas: CropCanvas,
    prefix: torch.Tensor,
    ids: torch.Tensor,
    r: torch.Tensor,
    c: torch.Tensor,
    newline: str,
    clip_to_valid: bool = True,
) -> torch.Tensor:
    """Emission order: `prefix` (image-level ids, e.g. the base image's kept tokens) then the crop
    tokens `ids` placed at canvas cells (r, c), canvas row by row, each row followed by a newline
    under the `newline` rule. With `clip_to_valid`, tokens outside the unpadded rectangle are dropped
    (what unpadding the canvas does); otherwise every placed token is emitted."""
    if newline not in PACK_NEWLINES:
        raise ValueError(f"newline rule must be one of {PACK_NEWLINES}, got {newline!r}")
    H, W = canvas.shape
    (r0, r1), (c0, c1) = canvas.ranges
    ids, r, c = ids.to(torch.long).cpu(), r.to(torch.long).cpu(), c.to(torch.long).cpu()
    if clip_to_valid:
        ok = (r >= r0) & (r < r1) & (c >= c0) & (c < c1)
        ids, r, c = ids[ok], r[ok], c[ok]
    if newline == "none":
        nl_rows = torch.empty(0, dtype=torch.long)
    elif newline == "kept-rows":
        nl_rows = torch.unique(r)
    elif newline == "all-rows":
        nl_rows = torch.arange(r0, r1)
    else:
        nl_rows = torch.arange(H)
    key = torch.cat([r * (W + 1) + c, nl_rows * (W + 1) + W])
    vals = torch.cat([ids, torch.full_like(nl_rows, NEWLINE)])
    order = torch.argsort(key, stable=True)
    return torch.cat([prefix.to(torch.long).cpu(), vals[order]])
