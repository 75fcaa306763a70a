"""Adapter for HF `LlavaForConditionalGeneration` (LLaVA-1.5): where things are, and how an image
becomes the visual tokens the LLM sees.

`encode()` reproduces `get_image_features` step by step (tower up to the feature layer, CLS
dropped, projector over all patches exactly as transformers does it, so keeping everything is
bit-identical), with the method's selection in between, and returns per image the packed features
and their layout. `LlavaNextAdapter` (llava_next.py) overrides the geometry and pixel flattening.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError, VTPruneError
from ..methods.base import ImageContext, Method, Selection
from . import anyres
from .anyres import NEWLINE, ImageGeometry, Layout
from .clip import ClsCapture, VisionTower, run_vision


@dataclass
class EncodedImage:
    features: torch.Tensor  # [k, D_llm] packed, in LLM order
    layout: Layout
    geometry: ImageGeometry
    available: int
    budget: int
    selection: Selection
    scores: list[torch.Tensor] | None


class _LazyKey:
    """A stable per-image key from its pixels (computed only if a method asks)."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels
        self._value = None

    def __int__(self) -> int:
        if self._value is None:
            data = self.pixels.detach().float().cpu().contiguous().numpy().tobytes()
            self._value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 62) - 1)
        return self._value

    __index__ = __int__


class LlavaAdapter:
    family = "llava"

    def __init__(self, model):
        self.model = model
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "vision_tower") or not hasattr(base, "multi_modal_projector"):
            raise UnsupportedModelError(f"{type(model).__name__} does not have the LLaVA layout (model.vision_tower, model.multi_modal_projector)")
        self.base = base
        self.config = model.config
        self.tower = VisionTower(base.vision_tower)
        self.projector = base.multi_modal_projector
        vc = self.config.vision_config
        self.grid = vc.image_size // vc.patch_size
        self.image_token_id = self.config.image_token_id
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} keeps the CLS token among the visual tokens; vtprune supports "
                "the 'default' strategy (CLS dropped), which every LLaVA-1.5 / LLaVA-NeXT checkpoint uses"
            )

    # --- configuration --------------------------------------------------------------------------------
    def hidden_indices(self, vision_feature_layer=None) -> list[int]:
        v = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        layers = [v] if isinstance(v, int) else list(v)
        n = self.tower.num_layers + 1
        out = []
        for x in layers:
            idx = x if x >= 0 else n + x
            if not 0 <= idx < n:
                raise VTPruneError(f"vision_feature_layer {x} is outside the tower's {n} hidden states")
            out.append(idx)
        return out

    def feature_layer(self) -> int:
        """0-based encoder layer whose output the LLM reads (22 for CLIP-L with vision_feature_layer=-2)."""
        return max(self.hidden_indices()) - 1

    def newline_param(self):
        return None

    # --- images ---------------------------------------------------------------------------------------
    def split_pixels(self, pixel_values, image_sizes) -> tuple[torch.Tensor, list[ImageGeometry], list[int]]:
        if pixel_values.dim() != 4:
            raise VTPruneError(f"pixel_values must be [images, 3, H, W] for LLaVA-1.5, got shape {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        gh = pixel_values.shape[-2] // self.config.vision_config.patch_size
        gw = pixel_values.shape[-1] // self.config.vision_config.patch_size
        return pixel_values, [anyres.llava_geometry(gh, gw) for _ in range(n)], [1] * n

    # --- the encode pipeline ---------------------------------------------------------------------------
    def encode(
        self,
        method: Method,
        capture: ClsCapture | None,
        pixel_values: torch.Tensor,
        image_sizes=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
    ) -> tuple[list[EncodedImage], dict[str, float]]:
        if vision_feature_select_strategy not in (None, "default"):
            raise VTPruneError("vtprune supports vision_feature_select_strategy='default' only (CLS dropped)")
        t0 = time.perf_counter()
        pixels, geoms, parts = self.split_pixels(pixel_values, image_sizes)
        idxs = self.hidden_indices(vision_feature_layer)
        budgets = [method.budget(g.stock_count()) for g in geoms]
        starts = [sum(parts[:i]) for i in range(len(parts))]
        runs = run_vision(self.tower, method, capture, pixels, geoms, budgets, parts, idxs, self.feature_layer())
        if len(idxs) > 1 and any(run.tile_ids(0, 1) is not None for run in runs):
            raise VTPruneError(f"{method.name} prunes inside the vision tower; it needs a single vision_feature_layer")
        per_image: dict[int, tuple] = {}
        for run in runs:
            feats = [run.hidden[i] for i in idxs]
            pre = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
            pre = pre[:, 1:]  # CLS dropped ('default' strategy)
            proj = self.projector(pre)  # over every remaining patch of the run, as transformers does
            for i, (s, n) in zip(run.images, run.slices):
                per_image[i] = (pre[s : s + n], proj[s : s + n], run.tile_ids(s, n), run.tile_sources(s, n), run.logits(s, n))
        t1 = time.perf_counter()

        contexts = []
        for i, (g, n) in enumerate(zip(geoms, parts)):
            pre_i, _, tile_ids, tile_srcs, cls_i = per_image[i]
            ctx = ImageContext(
                index=i,
                geometry=g,
                budget=budgets[i],
                available=g.stock_count(),
                cls_logits=cls_i,
                features=pre_i,
                key=_LazyKey(pixels[starts[i] : starts[i] + n]),
                tile_ids=tile_ids,
                tile_sources=tile_srcs,
            )
            contexts.append(ctx)

        # a method may refine image.budget inside select (e.g. HiRED's own budget depends on the grid); the
        # report reads it afterwards
        prune = [c for c in contexts if method.needs_selection(c.available, c.budget)]
        chosen = dict(zip((c.index for c in prune), method.select_batch(prune))) if prune else {}
        out = []
        newline = self.newline_param()
        for ctx in contexts:
            g = ctx.geometry
            _, proj_i, tile_ids, _, _ = per_image[ctx.index]
            sel = chosen.get(ctx.index)
            if sel is None:  # keep everything: the stock layout
                sel = Selection(kept=g.full_selection(), newline="all-rows")
                scores = method.score(ctx)
            else:
                scores = sel.scores if sel.scores is not None else method.score(ctx)
            if sel.slots is not None:
                lay = anyres.layout_from_slots(g, sel.slots)
            else:
                lay = anyres.layout(g, sel.kept, sel.newline, sel.base_order)
            feats_i = self._gather(lay, sel, proj_i, ctx.features, newline, g, tile_ids)
            out.append(EncodedImage(feats_i, lay, g, ctx.available, ctx.budget, sel, scores))
        t2 = time.perf_counter()
        return out, {"vision_s": t1 - t0, "select_s": t2 - t1}

    def _gather(self, lay: Layout, sel: Selection, proj: torch.Tensor, pre: torch.Tensor, newline, g: ImageGeometry, tile_ids=None) -> torch.Tensor:
        slots = lay.slots.to(proj.device)
        P = g.patches
        flat = proj.reshape(-1, proj.shape[-1])
        if tile_ids is not None:  # the tower shortened the tiles: map image-level ids to rows
            row_of = torch.full((g.num_partitions * P,), -1, dtype=torch.long)
            rows_per_tile = proj.shape[1]
            for p, ids in enumerate(tile_ids):
                row_of[p * P + ids.cpu()] = p * rows_per_tile + torch.arange(ids.numel())
            patch = slots != NEWLINE
            mapped = row_of[slots[patch].cpu()].to(slots.device)
            if bool((mapped < 0).any()):
                raise VTPruneError("a selected patch did not survive the in-tower stage (method bug)")
            slots = slots.clone()
            slots[patch] = mapped
        if sel.groups is not None:
            # merged tokens: average the pre-projector features of each group, then project
            lookup = {}
            for p, (kp, gp) in enumerate(zip(sel.kept, sel.groups)):
                for j, idx in enumerate(kp.tolist()):
                    lookup[p * P + idx] = gp[j]
            ids = [s for s in lay.slots.tolist() if s != NEWLINE]
            pre_flat = pre.reshape(-1, pre.shape[-1])
            merged = torch.stack([pre_flat[lookup[s].to(pre.device)].mean(0) if s in lookup else pre_flat[s] for s in ids]) if ids else pre_flat[:0]
            flat = self.projector(merged)
            pos = torch.full_like(slots, -1)
            pos[slots != NEWLINE] = torch.arange(len(ids), device=slots.device)
            slots = pos
        if newline is not None:
            table = torch.cat([flat, newline[None].to(flat.device, flat.dtype)], 0)
            index = torch.where(slots == NEWLINE, torch.full_like(slots, table.shape[0] - 1), slots)
        else:
            if bool((slots == NEWLINE).any()):
                raise VTPruneError("this model has no image_newline embedding; use newline='none'")
            table, index = flat, slots
        return table.index_select(0, index)


def check_supported(model) -> str:
    """The family name of a supported model, or a clear error naming the supported classes."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    if isinstance(model, torch.nn.Module) and type(model).__name__ == "OptimizedModule":
        raise UnsupportedModelError(
            "this is a torch.compile'd module; patch the model first and compile afterwards: "
            "vtprune.patch(model._orig_mod, ...)"
        )
    if isinstance(model, LlavaNextForConditionalGeneration):
        return "llava_next"
    if isinstance(model, LlavaForConditionalGeneration):
        return "llava"
    raise UnsupportedModelError(
        f"vtprune cannot patch {type(model).__name__}; supported: LlavaForConditionalGeneration (LLaVA-1.5), "
        "LlavaNextForConditionalGeneration (LLaVA-NeXT), and as bare towers transformers' CLIPVisionModel and "
        "open_clip's VisionTransformer (model.visual)"
    )
