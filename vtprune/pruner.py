"""The handle returned by `vtprune.patch`: hooks and instance attributes on one model, `unpatch()`,
and `last` (the report of the most recent prefill).

Only the given model instance changes: forward hooks on its own vision attention projections, and
instance attributes `forward` / `generate` (wrappers around the bound originals) plus `_vtprune`.
`unpatch()` removes all of them; nothing on transformers' classes or on the (possibly shared)
config is ever touched.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings

import torch

from .errors import UnsupportedSettingError, VTPruneError
from .methods.base import Method
from .patches import sequence
from .patches.clip import ClsCapture
from .report import Report

log = logging.getLogger("vtprune")

_MISSING = object()
_ATTR = "_vtprune"


class Pruner:
    def __init__(self, model, method: Method, adapter):
        self.model = model
        self.method = method
        self.adapter = adapter
        self.last: Report | None = None
        self.active = False
        self._capture: ClsCapture | None = None
        self._saved: dict[str, object] = {}
        self._wrappers: dict[str, object] = {}
        self._installed: set[str] = set()

    # --- install / remove ---------------------------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        layers = self.method.cls_layers(self.adapter.tower.num_layers, self.adapter.feature_layer())
        try:
            self._capture = ClsCapture(self.adapter.tower, layers) if layers else None
            for name in ("forward", "generate"):
                self._saved[name] = model.__dict__.get(name, _MISSING)
            orig_forward, orig_generate = model.forward, model.generate
            self._orig_forward = orig_forward
            self._check_forward(orig_forward)
            self._wrappers["forward"] = self._make_forward(orig_forward)
            self._wrappers["generate"] = self._make_generate(orig_generate)
            for name, fn in self._wrappers.items():
                object.__setattr__(model, name, fn)
                self._installed.add(name)
            object.__setattr__(model, _ATTR, self)
            self.active = True
        except BaseException:
            self._remove()
            raise

    @staticmethod
    def _check_forward(fn) -> None:
        if hasattr(fn, "_torchdynamo_orig_callable") or type(fn).__name__ in ("OptimizedModule",):
            raise UnsupportedSettingError(
                "model.forward is torch.compile'd; patch the model before compiling it (vtprune.patch(model, ...) then "
                "torch.compile), or undo the compile"
            )

    def _remove(self) -> None:
        model = self.model
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        for name, saved in self._saved.items():
            if name not in self._installed:
                continue
            current = model.__dict__.get(name, _MISSING)
            if current is not _MISSING and current is not self._wrappers.get(name):
                warnings.warn(f"model.{name} was replaced after vtprune.patch(); restoring the pre-patch {name}", stacklevel=3)
            if saved is _MISSING:
                model.__dict__.pop(name, None)
            else:
                object.__setattr__(model, name, saved)
        self._saved = {}
        self._wrappers = {}
        self._installed = set()
        if model.__dict__.get(_ATTR) is self:
            del model.__dict__[_ATTR]
        self.active = False

    def unpatch(self) -> None:
        """Restore the model exactly as it was (idempotent)."""
        if self.active:
            self._remove()

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Pruner({self.method.name}, {state}, params={self.method.params()})"

    # --- the wrappers ---------------------------------------------------------------------------------
    def _make_generate(self, orig):
        pruner = self

        @functools.wraps(orig)
        def generate(inputs=None, *args, **kwargs):
            if inputs is not None:
                if "input_ids" in kwargs:
                    raise VTPruneError("pass the prompt once: either as the first argument or as input_ids=")
                kwargs["input_ids"] = inputs
            if kwargs.get("pixel_values") is None or kwargs.get("mm_encoder_outputs") is not None:
                pruner._note_unpruned(kwargs)
                return orig(*args, **kwargs)
            original_ids = kwargs.get("input_ids")
            new_kwargs, shrunk = pruner._prepare(kwargs, mode="generate")
            out = orig(*args, **new_kwargs)
            return pruner._restore_prompt(out, original_ids, shrunk)

        return generate

    def _make_forward(self, orig):
        pruner = self
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def forward(*args, **kwargs):
            if args:
                bound = sig.bind_partial(*args, **kwargs)
                kwargs = dict(bound.arguments)
                extra = kwargs.pop("kwargs", None)
                if extra:
                    kwargs.update(extra)
            if kwargs.get("pixel_values") is None or kwargs.get("mm_encoder_outputs") is not None:
                fresh = kwargs.get("cache") is None and kwargs.get("past_key_values") is None
                if fresh and kwargs.get("mm_encoder_outputs") is None:
                    pruner._note_unpruned(kwargs)  # a text-only prefill called directly
                return orig(**kwargs)
            new_kwargs, _ = pruner._prepare(kwargs, mode="forward")
            return orig(**new_kwargs)

        return forward

    def _note_unpruned(self, kwargs) -> None:
        """A prefill without pixels (text-only prompt, or precomputed features): nothing is pruned."""
        if kwargs.get("mm_encoder_outputs") is not None and kwargs.get("pixel_values") is not None:
            return  # transformers raises for this itself
        self.last = Report(self.method.name, self.method.params(), position_mode=self.method.policy("position_mode"))

    # --- the core step: encode, select, shrink ----------------------------------------------------------
    def _prepare(self, kwargs: dict, mode: str):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs = dict(kwargs)
        adapter, method = self.adapter, self.method
        input_ids = kwargs.pop("input_ids", None)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        attention_mask = kwargs.pop("attention_mask", None)
        labels = kwargs.pop("labels", None)
        position_ids = kwargs.pop("position_ids", None)
        pixel_values = kwargs.pop("pixel_values")
        image_sizes = kwargs.pop("image_sizes", None)
        vfl = kwargs.pop("vision_feature_layer", None)
        vfs = kwargs.pop("vision_feature_select_strategy", None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))

        if attention_mask is not None and attention_mask.dim() != 2:
            raise UnsupportedSettingError("vtprune needs a 2-D attention_mask [batch, length] (padding mask), not a 4-D mask")
        if input_ids is not None:
            image_mask = input_ids == adapter.image_token_id
        elif inputs_embeds is not None:
            emb = self.model.get_input_embeddings()(torch.tensor(adapter.image_token_id, device=inputs_embeds.device))
            image_mask = (inputs_embeds == emb).all(-1)
        else:
            raise VTPruneError("pass input_ids (or inputs_embeds) together with pixel_values")
        if not bool(image_mask.any()):
            raise VTPruneError(
                "pixel_values were given but the prompt has no image placeholder tokens; put '<image>' in the text "
                "(or use processor.apply_chat_template with an image entry) and build inputs with the processor"
            )
        method.check_model(adapter.family, int(pixel_values.shape[0]))

        images, timings = adapter.encode(method, self._capture, pixel_values, image_sizes, vfl, vfs)
        counts = [im.available for im in images]
        offsets = [im.layout.offsets for im in images]
        mode_pos = method.policy("position_mode")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        shrunk = sequence.shrink(
            image_mask,
            counts,
            offsets,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,
            position_mode=mode_pos,
            mode=mode,
            pad_id=self._pad_id(),
            past=past,
        )
        feats = [im.features for im in images]
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
        for name, value in (
            ("input_ids", shrunk.input_ids),
            ("inputs_embeds", shrunk.inputs_embeds),
            ("attention_mask", shrunk.attention_mask),
            ("labels", shrunk.labels),
            ("position_ids", shrunk.position_ids),
        ):
            if value is not None:
                kwargs[name] = value
        self.last = self._report(images, shrunk, timings, mode_pos)
        return kwargs, shrunk

    def _pad_id(self) -> int:
        cfg = self.model.config
        text = getattr(cfg, "text_config", cfg)
        gen = getattr(self.model, "generation_config", None)
        for cand in (getattr(gen, "pad_token_id", None), getattr(text, "pad_token_id", None), getattr(cfg, "pad_token_id", None)):
            if isinstance(cand, (list, tuple)):
                cand = cand[0] if cand else None
            if cand is not None and cand != self.adapter.image_token_id:
                return int(cand)
        return 0 if self.adapter.image_token_id != 0 else 1

    def _report(self, images, shrunk, timings, mode_pos) -> Report:
        n_layers = getattr(getattr(self.model.config, "text_config", self.model.config), "num_hidden_layers", 0)
        rep = Report(self.method.name, self.method.params(), position_mode=mode_pos, timings=timings)
        for im in images:
            groups = im.selection.groups
            rep.kept.append(im.layout.kept)
            rep.sources.append(_align_sources(im.layout.kept, im.selection, im.geometry) if groups is not None else None)
            rep.scores.append(im.scores)
            rep.stages.append([])
            n = len(im.layout)
            rep.num_visual_tokens.append(n)
            rep.available.append(im.available)
            rep.budget.append(im.budget)
            rep.tokens_per_layer.append([n] * n_layers)
            rep.grids.append((im.geometry.rows, im.geometry.cols))
        rep.sample_of = list(shrunk.sample_of)
        rep.input_keep = shrunk.input_keep
        rep.new_index = shrunk.new_index
        return rep

    def _restore_prompt(self, out, original_ids, shrunk):
        """generate() returns the caller's original prompt followed by the new tokens."""
        if original_ids is None:
            return out  # inputs_embeds prompts: transformers returns only the new tokens
        seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        if seqs is None:
            return out
        reps = seqs.shape[0] // original_ids.shape[0]
        prompt = original_ids.to(seqs.device)
        if reps > 1:
            prompt = prompt.repeat_interleave(reps, dim=0)
        full = torch.cat([prompt, seqs[:, shrunk.length :]], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out


def _align_sources(kept, sel, geom):
    """Per partition, the merge groups aligned with the (possibly filtered) kept indices."""
    out = []
    for p, kp in enumerate(kept):
        src = dict(zip(sel.kept[p].tolist(), sel.groups[p])) if p < len(sel.kept) else {}
        out.append([src.get(i, torch.tensor([p * geom.patches + i])) for i in kp.tolist()])
    return out

