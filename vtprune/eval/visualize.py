"""Draw what a pruner kept on the original image: kept patches bright, dropped ones dimmed, or a
score heat map. LLaVA-NeXT crops are mapped back onto the original image (the canvas of crops, as
the processor resized and padded it), with the base image's own selection beside it.

    from vtprune.eval.visualize import render
    picture = render(image, pruner.last, image_index=0, processor=processor)   # a PIL image
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageEnhance


def _llava15_box(processor, W: int, H: int):
    """The region of the original image the 336x336 input covers, and whether it was padded."""
    ip = getattr(processor, "image_processor", processor)
    if getattr(ip, "do_pad", False):  # padded to a square, then resized
        s = max(W, H)
        return (-(s - W) / 2, -(s - H) / 2, s, s)
    if getattr(ip, "do_center_crop", False):
        side = min(W, H)
        return ((W - side) / 2, (H - side) / 2, side, side)
    return (0.0, 0.0, float(W), float(H))


def patch_boxes(geometry, partition: int, W: int, H: int, processor=None, patch: int = 14) -> torch.Tensor:
    """[patches, 4] boxes (x0, y0, x1, y1) in original-image pixels of a partition's patches."""
    gh, gw = geometry.grid_h, geometry.grid_w
    r = torch.arange(gh * gw) // gw
    c = torch.arange(gh * gw) % gw
    if partition == 0:
        if geometry.has_crops:  # the NeXT base image: the whole image squashed to the input size
            x0, y0, w, h = 0.0, 0.0, float(W), float(H)
        else:
            x0, y0, w, h = _llava15_box(processor, W, H)
        return torch.stack([x0 + c * w / gw, y0 + r * h / gh, x0 + (c + 1) * w / gw, y0 + (r + 1) * h / gh], 1).float()
    # crops: canvas cell -> padded best-resolution pixel -> original pixel
    R, C = geometry.canvas_rc(torch.full_like(r, partition), torch.arange(gh * gw))
    best_h, best_w = geometry.canvas[0] * patch, geometry.canvas[1] * patch
    sw, sh = best_w / W, best_h / H
    if sw < sh:
        new_w, new_h = best_w, min(math.ceil(H * sw), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(W * sh), best_w)
    px, py = (best_w - new_w) // 2, (best_h - new_h) // 2
    fx, fy = new_w / W, new_h / H
    x0 = (C * patch - px) / fx
    y0 = (R * patch - py) / fy
    return torch.stack([x0, y0, x0 + patch / fx, y0 + patch / fy], 1).float()


def _heat(value: float) -> tuple[int, int, int]:
    """A small blue -> yellow -> red colour map for v in [0, 1]."""
    v = max(0.0, min(1.0, value))
    if v < 0.5:
        t = v / 0.5
        return (int(40 + 215 * t), int(60 + 160 * t), int(200 - 150 * t))
    t = (v - 0.5) / 0.5
    return (255, int(220 - 180 * t), int(50 - 30 * t))


def _draw(image: Image.Image, boxes: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor | None, heat: bool, valid=None) -> Image.Image:
    W, H = image.size
    base = image.convert("RGB")
    if heat and scores is not None:
        s = scores.float().clone()
        ok = torch.isfinite(s) if valid is None else (torch.isfinite(s) & valid)
        lo, hi = (float(s[ok].min()), float(s[ok].max())) if bool(ok.any()) else (0.0, 1.0)
        overlay = Image.new("RGB", (W, H))
        od = ImageDraw.Draw(overlay)
        for j, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            if not bool(ok[j]):
                continue
            od.rectangle([x0, y0, x1, y1], fill=_heat((float(s[j]) - lo) / (hi - lo + 1e-12)))
        out = Image.blend(base, overlay, 0.55)
    else:
        out = ImageEnhance.Brightness(base).enhance(0.28)
        for j in kept.tolist():
            x0, y0, x1, y1 = boxes[j].tolist()
            box = (max(0, int(x0)), max(0, int(y0)), min(W, int(math.ceil(x1))), min(H, int(math.ceil(y1))))
            if box[2] > box[0] and box[3] > box[1]:
                out.paste(base.crop(box), box[:2])
    d = ImageDraw.Draw(out)
    for j in kept.tolist():
        x0, y0, x1, y1 = boxes[j].tolist()
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255) if not heat else (0, 0, 0))
    return out


def _kept_with_sources(report, i: int, p: int, P: int) -> torch.Tensor:
    """Patches of partition p that reached the LLM, merged groups expanded."""
    kept = report.kept[i][p].cpu()
    srcs = report.sources[i] if report.sources and report.sources[i] is not None else None
    if srcs is None:
        return kept
    ids = torch.cat([g.cpu() for g in srcs[p]]) if srcs[p] else kept
    return torch.unique(ids[ids // P == p] - p * P) if ids.numel() else kept


def render(image: Image.Image, report, image_index: int = 0, processor=None, heat: bool = False, max_side: int = 448, geometry=None) -> Image.Image:
    """The original image with image `image_index`'s kept patches (or its score heat map)."""
    from ..patches.anyres import llava_geometry, next_geometry

    W, H = image.size
    rows, cols = report.grids[image_index] if report.grids else (0, 0)
    if geometry is None and getattr(report, "geometries", None):
        geometry = report.geometries[image_index]
    if geometry is None:
        grid = int(round(math.sqrt(report.available[image_index]))) if not rows else None
        if rows:
            ip = getattr(processor, "image_processor", processor)
            pins = getattr(ip, "image_grid_pinpoints", None)
            cs = getattr(ip, "crop_size", None)
            crop = getattr(cs, "height", None) or (cs["height"] if isinstance(cs, dict) else 336)
            geometry = next_geometry((H, W), pins, crop, 14)
        else:
            geometry = llava_geometry(grid, grid)
    scale = min(1.0, max_side / max(W, H))
    shown = image.convert("RGB").resize((max(1, int(W * scale)), max(1, int(H * scale))))
    scores = report.scores[image_index] if report.scores and report.scores[image_index] is not None else None
    P = geometry.patches
    panels = []
    parts = range(geometry.num_partitions)
    if geometry.has_crops:  # the crops mapped onto the image, then the base image
        boxes = torch.cat([patch_boxes(geometry, p, W, H, processor) for p in parts if p > 0]) * scale
        kept = torch.cat([_kept_with_sources(report, image_index, p, P) + (p - 1) * P for p in parts if p > 0])
        sc = torch.cat([scores[p].cpu() for p in parts if p > 0]) if scores is not None else None
        valid = torch.cat([geometry.valid_mask(p) for p in parts if p > 0])
        panels.append(_draw(shown, boxes, kept, sc, heat, valid))
    boxes = patch_boxes(geometry, 0, W, H, processor) * scale
    panels.append(_draw(shown, boxes, _kept_with_sources(report, image_index, 0, P), scores[0].cpu() if scores is not None else None, heat))
    if len(panels) == 1:
        return panels[0]
    small = panels[1].resize((panels[1].width // 2, panels[1].height // 2))
    canvas = Image.new("RGB", (panels[0].width + small.width + 8, panels[0].height), (255, 255, 255))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(small, (panels[0].width + 8, 0))
    return canvas


def render_unpruned(image: Image.Image, max_side: int = 448) -> Image.Image:
    W, H = image.size
    scale = min(1.0, max_side / max(W, H))
    return image.convert("RGB").resize((max(1, int(W * scale)), max(1, int(H * scale))))
