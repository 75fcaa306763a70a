"""Adapter for HF `LlavaNextForConditionalGeneration` (LLaVA-NeXT, AnyRes): the base image plus
grid crops, unpadded and packed with one `image_newline` per canvas row (see anyres.py)."""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import VTPruneError
from . import anyres
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"

    def newline_param(self):
        return self.base.image_newline

    def split_pixels(self, pixel_values, image_sizes):
        if image_sizes is None:
            raise VTPruneError("LLaVA-NeXT needs image_sizes (the processor returns it); pass it to generate()/forward()")
        vc = self.config.vision_config
        pins = self.config.image_grid_pinpoints
        counts = [image_size_to_num_patches(s, pins, vc.image_size) for s in image_sizes]
        if pixel_values.dim() == 5:
            pixels = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
        elif pixel_values.dim() == 4:
            pixels = pixel_values
        else:
            raise VTPruneError(f"pixel_values must be 4-D or 5-D for LLaVA-NeXT, got shape {tuple(pixel_values.shape)}")
        geoms = [anyres.next_geometry(s, pins, vc.image_size, vc.patch_size) for s in image_sizes]
        for g, n in zip(geoms, counts):
            if g.num_partitions != n:  # pragma: no cover - defensive: transformers' count rule changed
                raise VTPruneError(f"partition count mismatch ({g.num_partitions} vs {n}); unsupported transformers version?")
        return pixels, geoms, counts
