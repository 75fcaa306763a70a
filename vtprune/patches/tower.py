"""Bare vision towers: a transformers `CLIPVisionModel` or an open_clip `VisionTransformer`, patched
on their own (e.g. zero-shot classification with fewer tokens).

    pruner = vtprune.patch(clip_vision_model, "flowcut", keep=64)
    out = clip_vision_model(pixel_values)      # last_hidden_state is [B, 1 + 64, D]: CLS + kept patches
    pruner.last.kept[i][0]                     # which patches were kept

The tower returns the pruned sequence: in-tower methods (flowcut) really shorten it between layers;
selection methods (vtc-cls, random, pool, ...) run the tower unchanged and keep (or merge) the chosen
patch tokens of its output; CLS always stays first. Budgets are patch tokens per image (CLS not
counted). Schedules that refer to "the feature layer" use the LLaVA convention, the second-to-last
layer (22 of 24 for CLIP-L). `pruner.last.tokens_per_layer[i]` counts the patch tokens entering each
*vision* layer. A transformers `CLIPModel` is pruned through its `vision_model` (patch that).
"""

from __future__ import annotations

import inspect

import torch

from ..errors import UnsupportedModelError, VTPruneError
from ..methods.base import ImageContext, Selection
from ..report import Report
from . import anyres
from .clip import VisionTower, run_vision
from .llava import _LazyKey


class BareTowerAdapter:
    family = "clip"

    def __init__(self, model):
        self.model = model
        self.tower = self._make_tower(model)

    def _make_tower(self, model):
        return VisionTower(model)

    def feature_layer(self) -> int:
        return max(0, self.tower.num_layers - 2)

    def grid(self, pixel_values) -> tuple[int, int]:
        ps = self.tower.config.patch_size
        return pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps

    def embed_kwargs(self, kwargs) -> dict:
        return {}

    # --- the pruned forward -----------------------------------------------------------------------------
    def prune(self, pruner, pixel_values, want_hidden: bool = False):
        """(tokens [B, 1+K, D] of the last layer, hidden states by index or None), and pruner.last."""
        method, capture = pruner.method, pruner._capture
        if pixel_values is None or pixel_values.dim() != 4:
            raise VTPruneError("pass pixel_values as a [batch, 3, H, W] tensor")
        B = pixel_values.shape[0]
        method.check_model(self.family, B)
        gh, gw = self.grid(pixel_values)
        P = gh * gw
        geoms = [anyres.llava_geometry(gh, gw) for _ in range(B)]
        parts = [1] * B
        budgets = [method.budget(P) for _ in range(B)]
        L = self.tower.num_layers
        idxs = list(range(L + 1)) if want_hidden else [L]
        lengths: list[list[int]] = [[] for _ in range(B)]
        counter = [h.register_forward_pre_hook(self._length_hook(lengths)) for h in self.tower.layers]
        self._run_rows = None
        try:
            runs = run_vision(self.tower, method, capture, pixel_values, geoms, budgets, parts, idxs, self.feature_layer())
        finally:
            for h in counter:
                h.remove()
        contexts, rows_of = [], {}
        for run in runs:
            for i, (s, n) in zip(run.images, run.slices):
                last = run.hidden[L][s : s + n]
                ctx = ImageContext(
                    index=i,
                    geometry=geoms[i],
                    budget=budgets[i],
                    available=P,
                    cls_logits=run.logits(s, n),
                    features=last[:, 1:],
                    key=_LazyKey(pixel_values[i : i + 1]),
                    tile_ids=run.tile_ids(s, n),
                    tile_sources=run.tile_sources(s, n),
                )
                contexts.append(ctx)
                rows_of[i] = last[0]
        contexts.sort(key=lambda c: c.index)
        prune = [c for c in contexts if method.needs_selection(c.available, c.budget)]
        chosen = dict(zip((c.index for c in prune), method.select_batch(prune))) if prune else {}
        tokens, rep = [], Report(method.name, method.params(), position_mode=None)
        for ctx in contexts:
            g = ctx.geometry
            sel = chosen.get(ctx.index) or Selection(kept=g.full_selection(), newline="none")
            x = rows_of[ctx.index]
            ids = ctx.tile_ids[0] if ctx.tile_ids is not None else torch.arange(P)
            row_of = torch.full((P,), -1, dtype=torch.long)
            row_of[ids.cpu()] = torch.arange(ids.numel())
            kept = torch.sort(sel.kept[0].cpu()).values
            if sel.groups is not None:
                merged = [x[1 + row_of[grp.cpu()]].mean(0) for grp in dict(zip(sel.kept[0].tolist(), sel.groups[0])).values()]
                order = torch.argsort(sel.kept[0].cpu())
                patch = torch.stack([merged[j] for j in order.tolist()]) if merged else x[1:1]
            else:
                rows = row_of[kept]
                if bool((rows < 0).any()):
                    raise VTPruneError("a selected patch did not survive the in-tower stage (method bug)")
                patch = x[1 + rows.to(x.device)]
            tokens.append(torch.cat([x[:1], patch], 0))
            rep.kept.append([kept])
            srcs = sel.sources if sel.sources is not None else (sel.groups if sel.groups is not None else None)
            if srcs is None and ctx.tile_sources is not None:
                srcs = ctx.tile_sources
            if srcs is not None:
                src = dict(zip(sel.kept[0].tolist(), srcs[0])) if len(srcs[0]) == sel.kept[0].numel() else {}
                rep.sources.append([[src.get(k, torch.tensor([k])) for k in kept.tolist()]])
            else:
                rep.sources.append(None)
            scores = sel.scores if sel.scores is not None else method.score(ctx)
            rep.scores.append(scores)
            rep.stages.append([])
            rep.num_visual_tokens.append(int(kept.numel()))
            rep.available.append(P)
            rep.budget.append(ctx.budget)
            rep.tokens_per_layer.append([n - 1 for n in lengths[ctx.index]])
            rep.sample_of.append(ctx.index)
            rep.grids.append((0, 0))
            rep.geometries.append(g)
        if len({t.shape[0] for t in tokens}) != 1:
            raise VTPruneError("the images of this batch kept different numbers of tokens; give keep= (the same for every image) or run them one at a time")
        out = torch.stack(tokens)
        hidden = None
        if want_hidden:
            if len(runs) != 1:
                raise VTPruneError(
                    "output_hidden_states with per-image schedules (the default for in-tower methods): run one image at a time, "
                    "or use official=True (one schedule for the batch)"
                )
            hidden = runs[0].hidden
        pruner.last = rep
        return out, hidden

    def _length_hook(self, lengths):
        """Record the tokens entering each tower layer, per image (runs are per group of images)."""
        state = {"offset": 0}

        def hook(module, args):
            h = args[0]
            n = h.shape[1] if getattr(self.tower, "batch_first", True) else h.shape[0]
            b = h.shape[0] if getattr(self.tower, "batch_first", True) else h.shape[1]
            if module is self.tower.layers[0]:
                state["offset"] = self._next_offset(lengths, b)
            for j in range(b):
                lengths[state["offset"] + j].append(n)
            return None

        return hook

    @staticmethod
    def _next_offset(lengths, b) -> int:
        for i, row in enumerate(lengths):
            if not row:
                return i
        return 0  # pragma: no cover

    def forward(self, pruner, orig, kwargs):
        pixels = kwargs.pop("pixel_values", None)
        want_hidden = bool(kwargs.pop("output_hidden_states", False) or getattr(self.model.config, "output_hidden_states", False))
        return_dict = kwargs.pop("return_dict", True)
        if kwargs.pop("interpolate_pos_encoding", False):
            raise VTPruneError("interpolate_pos_encoding is not supported by a pruned tower; resize the images to the tower's size")
        kwargs.pop("output_attentions", None)
        if kwargs:
            raise VTPruneError(f"unexpected arguments for a pruned vision tower: {', '.join(kwargs)}")
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        x, hidden = self.prune(pruner, pixels, want_hidden)
        pooled = self.tower.module.post_layernorm(x[:, 0])
        hs = tuple(hidden[i] for i in range(self.tower.num_layers + 1)) if hidden is not None else None
        if hs is not None:
            hs = hs[:-1] + (x,)
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=hs)
        return out if return_dict is not False else out.to_tuple()


class OpenClipAdapter(BareTowerAdapter):
    family = "open_clip"

    def _make_tower(self, model):
        from .openclip import OpenClipTower

        return OpenClipTower(model)

    def grid(self, pixel_values):
        return self.tower.grid(pixel_values)

    def forward(self, pruner, orig, kwargs):
        pixels = kwargs.pop("x", None)
        if kwargs:
            raise VTPruneError(f"unexpected arguments for a pruned open_clip tower: {', '.join(kwargs)}")
        x, _ = self.prune(pruner, pixels)
        return self.tower.finish(x)


def tower_adapter(model):
    """The bare-tower adapter for `model`, or None if it is not a bare tower."""
    from .openclip import is_open_clip_visual

    if is_open_clip_visual(model):
        return OpenClipAdapter(model)
    try:
        from transformers import CLIPVisionModel
    except Exception:  # pragma: no cover
        return None
    if isinstance(model, CLIPVisionModel):
        return BareTowerAdapter(model)
    if type(model).__name__ == "CLIPModel":
        raise UnsupportedModelError("patch the vision tower of a CLIPModel: vtprune.patch(clip_model.vision_model, ...)")
    return None


def make_tower_forward(pruner, orig):
    sig = inspect.signature(orig)

    def forward(*args, **kwargs):
        from ..pruner import _bind

        kw = _bind(sig, args, kwargs)
        return pruner.adapter.forward(pruner, orig, kw)

    forward.__wrapped__ = orig
    return forward


def _tower_pruner_class():
    from ..pruner import Pruner

    class TowerPruner(Pruner):
        """The handle of a patched bare tower: only `forward` is wrapped."""

        def _build_wrappers(self) -> dict:
            self._check_forward(self.model.forward)
            return {"forward": make_tower_forward(self, self.model.forward), "__deepcopy__": self._deepcopy}

    return TowerPruner
