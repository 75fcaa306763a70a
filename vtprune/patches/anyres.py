"""Image geometry and packing, in one place for every method and model family.

An image is made of *partitions*: partition 0 is the base image (LLaVA-1.5: the only one), and for
LLaVA-NeXT (AnyRes) partitions 1.. are the crops in row-major grid order. Each partition has a
`grid_h x grid_w` patch grid (24x24 for CLIP-L/336), raster-indexed. The crops are stitched into a
*canvas* of `rows*grid_h x cols*grid_w` patches, of which the *valid* (unpadded) rectangle
`row_range x col_range` reaches the LLM, following transformers' own unpadding rule
(`int(round(x, 7))`) so counts match the processor.

Image-level patch id: `partition * patches_per_partition + index`.

The stock LLaVA-NeXT layout of one image is: the 576 base tokens in raster order, then the valid
canvas row by row with one `image_newline` after every row. `layout()` packs any selection into
that layout (kept tokens in canvas raster order, newline policy explicit) and gives each packed
token its *stock offset* (where it sat in the unpruned sequence), which the position policy
"original" uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEWLINE = -1
NEWLINE_POLICIES = ("kept-rows", "all-rows", "none")


@dataclass(frozen=True)
class ImageGeometry:
    grid_h: int
    grid_w: int
    rows: int = 0
    cols: int = 0
    row_range: tuple[int, int] = (0, 0)
    col_range: tuple[int, int] = (0, 0)
    base_newline: bool = False
    crop_newlines: bool = False
    image_size: tuple[int, int] | None = None  # original (H, W), HF order

    # --- sizes -------------------------------------------------------------------------------------
    @property
    def patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def num_partitions(self) -> int:
        return 1 + self.rows * self.cols

    @property
    def has_crops(self) -> bool:
        return self.rows * self.cols > 0

    @property
    def canvas(self) -> tuple[int, int]:
        return self.rows * self.grid_h, self.cols * self.grid_w

    @property
    def valid_h(self) -> int:
        return self.row_range[1] - self.row_range[0]

    @property
    def valid_w(self) -> int:
        return self.col_range[1] - self.col_range[0]

    @property
    def base_len(self) -> int:
        return self.patches + (1 if self.base_newline else 0)

    def stock_count(self) -> int:
        """Visual tokens of this image in the unpruned model (newlines included)."""
        if not self.has_crops:
            return self.base_len
        return self.base_len + self.valid_h * self.valid_w + (self.valid_h if self.crop_newlines else 0)

    # --- coordinates -------------------------------------------------------------------------------
    def canvas_rc(self, partition: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas (row, col) of crop patches (partition >= 1)."""
        q = partition - 1
        r = torch.div(q, self.cols, rounding_mode="floor") * self.grid_h + torch.div(index, self.grid_w, rounding_mode="floor")
        c = (q % self.cols) * self.grid_w + index % self.grid_w
        return r, c

    def canvas_to_id(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Image-level patch id of canvas cells."""
        p = 1 + torch.div(r, self.grid_h, rounding_mode="floor") * self.cols + torch.div(c, self.grid_w, rounding_mode="floor")
        return p * self.patches + (r % self.grid_h) * self.grid_w + c % self.grid_w

    def valid_mask(self, partition: int) -> torch.Tensor:
        """Bool [patches]: which patches of a partition can reach the LLM (crops: inside the unpadded area)."""
        if partition == 0:
            return torch.ones(self.patches, dtype=torch.bool)
        idx = torch.arange(self.patches)
        r, c = self.canvas_rc(torch.full_like(idx, partition), idx)
        return (r >= self.row_range[0]) & (r < self.row_range[1]) & (c >= self.col_range[0]) & (c < self.col_range[1])

    def valid_ids(self) -> torch.Tensor:
        """Image-level ids of every patch that can reach the LLM, base first then canvas raster order."""
        base = torch.arange(self.patches)
        if not self.has_crops:
            return base
        rr, cc = torch.meshgrid(
            torch.arange(*self.row_range), torch.arange(*self.col_range), indexing="ij"
        )
        return torch.cat([base, self.canvas_to_id(rr.reshape(-1), cc.reshape(-1))])

    def split_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Image-level ids -> per-partition sorted local indices."""
        ids = ids.to(torch.long).cpu()
        part = torch.div(ids, self.patches, rounding_mode="floor")
        out = []
        for p in range(self.num_partitions):
            out.append(torch.sort(ids[part == p] - p * self.patches).values)
        return out

    def full_selection(self) -> list[torch.Tensor]:
        return self.split_ids(self.valid_ids())


def llava_geometry(grid_h: int, grid_w: int) -> ImageGeometry:
    return ImageGeometry(grid_h=grid_h, grid_w=grid_w)


def next_geometry(image_size, pinpoints, crop_px: int, patch: int, newline: bool = True) -> ImageGeometry:
    """LLaVA-NeXT geometry of an image of original size (H, W), exactly as transformers packs it."""
    from transformers.image_processing_utils import select_best_resolution

    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    h, w = int(image_size[0]), int(image_size[1])
    best_h, best_w = select_best_resolution([h, w], [list(p) for p in pinpoints])
    rows, cols = best_h // crop_px, best_w // crop_px
    g = crop_px // patch
    if rows * cols == 0:
        return ImageGeometry(g, g, base_newline=newline, image_size=(h, w))
    cur_h, cur_w = rows * g, cols * g
    row_range, col_range = (0, cur_h), (0, cur_w)
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        pad = (cur_h - new_h) // 2
        row_range = (pad, cur_h - pad)
    else:
        new_w = int(round(w * (cur_h / h), 7))
        pad = (cur_w - new_w) // 2
        col_range = (pad, cur_w - pad)
    return ImageGeometry(
        g, g, rows, cols, row_range, col_range, base_newline=False, crop_newlines=newline, image_size=(h, w)
    )


@dataclass
class Layout:
    """A packed image: `slots[j]` is the image-level patch id of token j (or NEWLINE), `offsets[j]`
    its position in the stock (unpruned) image sequence, `kept` the per-partition kept indices."""

    slots: torch.Tensor
    offsets: torch.Tensor
    kept: list[torch.Tensor]

    def __len__(self) -> int:
        return int(self.slots.numel())


def layout(geom: ImageGeometry, kept: list[torch.Tensor], newline: str = "kept-rows", base_order: torch.Tensor | None = None) -> Layout:
    """Pack a per-partition selection into the model's layout.

    Base tokens first (ascending raster order, or `base_order` if given), then crop tokens in canvas
    raster order, with `newline` = "kept-rows" (one newline after every canvas row that has a kept
    token), "all-rows" (after every valid row, as stock) or "none". Kept crop patches outside the
    valid area cannot reach the LLM and are dropped (reflected in the returned `kept`).
    """
    if newline not in NEWLINE_POLICIES:
        raise ValueError(f"newline policy must be one of {NEWLINE_POLICIES}, got {newline!r}")
    P = geom.patches
    base = kept[0].to(torch.long).cpu()
    if base_order is not None:
        base = base_order.to(torch.long).cpu()
    slots = [base]
    offsets = [base.clone()]
    if geom.base_newline:
        slots.append(torch.tensor([NEWLINE]))
        offsets.append(torch.tensor([P]))
    out_kept = [torch.sort(kept[0].to(torch.long).cpu()).values]
    if geom.has_crops:
        parts, idxs = [], []
        for p in range(1, geom.num_partitions):
            k = kept[p].to(torch.long).cpu() if p < len(kept) else torch.empty(0, dtype=torch.long)
            parts.append(torch.full_like(k, p))
            idxs.append(k)
        part = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        idx = torch.cat(idxs) if idxs else torch.empty(0, dtype=torch.long)
        r, c = geom.canvas_rc(part, idx)
        (r0, r1), (c0, c1) = geom.row_range, geom.col_range
        ok = (r >= r0) & (r < r1) & (c >= c0) & (c < c1)
        part, idx, r, c = part[ok], idx[ok], r[ok], c[ok]
        wc = geom.canvas[1]
        order = torch.argsort(r * wc + c)
        part, idx, r, c = part[order], idx[order], r[order], c[order]
        ids = part * P + idx
        row_stride = geom.valid_w + (1 if geom.crop_newlines else 0)
        offs = geom.base_len + (r - r0) * row_stride + (c - c0)
        for p in range(1, geom.num_partitions):
            out_kept.append(torch.sort(idx[part == p]).values)
        if newline == "none":
            slots.append(ids)
            offsets.append(offs)
        else:
            rows_to_emit = range(r0, r1) if newline == "all-rows" else torch.unique(r).tolist()
            # newline stock offset: after the row's last valid column (stock layout); without stock
            # newlines, the offset of the row's last token
            nl_extra = geom.valid_w if geom.crop_newlines else geom.valid_w - 1
            counts = torch.bincount(r - r0, minlength=geom.valid_h) if r.numel() else torch.zeros(geom.valid_h, dtype=torch.long)
            starts = torch.cumsum(counts, 0) - counts
            for row in rows_to_emit:
                row = int(row)
                s, n = int(starts[row - r0]), int(counts[row - r0])
                slots.append(ids[s : s + n])
                offsets.append(offs[s : s + n])
                slots.append(torch.tensor([NEWLINE]))
                offsets.append(torch.tensor([geom.base_len + (row - r0) * row_stride + nl_extra]))
    return Layout(torch.cat(slots), torch.cat(offsets), out_kept)


def fill(geom: ImageGeometry, ranking: torch.Tensor, budget: int, newline: str = "kept-rows") -> list[torch.Tensor]:
    """Take image-level ids from `ranking` (best first) until `budget` packed tokens are used,
    counting the newlines the policy will emit: under "kept-rows" the first kept token of a canvas
    row costs 2 (itself + the row's newline); under "all-rows" every valid row's newline is paid up
    front. Candidates that no longer fit are skipped, so the budget is met exactly when possible.
    Returns per-partition sorted indices."""
    ranking = ranking.to(torch.long).cpu()
    budget = max(0, int(budget))
    if not geom.has_crops or newline == "none":
        return geom.split_ids(ranking[:budget])
    if newline == "all-rows":
        return geom.split_ids(ranking[: max(0, budget - geom.valid_h)])
    P = geom.patches
    part = torch.div(ranking, P, rounding_mode="floor")
    idx = ranking % P
    r, _ = geom.canvas_rc(part.clamp_min(1), idx)
    is_crop = (part > 0).tolist()
    rows = r.tolist()
    opened: set[int] = set()
    used = 0
    take = []
    for j, (crop, row) in enumerate(zip(is_crop, rows)):
        if used >= budget:
            break
        cost = 2 if (crop and row not in opened) else 1
        if used + cost > budget:
            continue
        used += cost
        take.append(j)
        if crop:
            opened.add(row)
    return geom.split_ids(ranking[torch.tensor(take, dtype=torch.long)] if take else ranking[:0])


def stock_offset(geom: ImageGeometry, ids: torch.Tensor) -> torch.Tensor:
    """Stock offsets of image-level patch ids; crop cells outside the valid area get the offset of
    the nearest valid cell (they have no slot of their own in the stock sequence)."""
    ids = ids.to(torch.long).cpu()
    P = geom.patches
    part = torch.div(ids, P, rounding_mode="floor")
    idx = ids % P
    out = idx.clone()
    crop = part > 0
    if bool(crop.any()):
        r, c = geom.canvas_rc(part[crop], idx[crop])
        (r0, r1), (c0, c1) = geom.row_range, geom.col_range
        r, c = r.clamp(r0, r1 - 1), c.clamp(c0, c1 - 1)
        stride = geom.valid_w + (1 if geom.crop_newlines else 0)
        out[crop] = geom.base_len + (r - r0) * stride + (c - c0)
    return out


def layout_from_slots(geom: ImageGeometry, slots: torch.Tensor) -> Layout:
    """A Layout from an explicit emission order (image-level ids, NEWLINE for a newline), for methods
    whose official packing differs from `layout()` (custom order, newlines per padded row, ...).
    A newline's stock offset is the one just after the preceding patch token's stock offset."""
    slots = slots.to(torch.long).cpu()
    is_nl = slots == NEWLINE
    offsets = torch.zeros_like(slots)
    if bool((~is_nl).any()):
        offsets[~is_nl] = stock_offset(geom, slots[~is_nl])
    prev = 0
    for j in torch.nonzero(is_nl).flatten().tolist():
        before = offsets[:j][~is_nl[:j]]
        prev = int(before[-1]) + 1 if before.numel() else 0
        offsets[j] = prev
    return Layout(slots, offsets, geom.split_ids(slots[~is_nl]))
