"""The handle returned by `vtprune.patch`: hooks and instance attributes on one model, `unpatch()`,
and `last` (the report of the most recent prefill).

Only the given model instance changes: forward hooks on its own vision attention projections, and
instance attributes `forward` / `generate` (wrappers around the bound originals) plus `_vtprune`.
`unpatch()` removes all of them; nothing on transformers' classes or on the (possibly shared)
config is ever touched.
"""

from __future__ import annotations

import functools
import copy
import inspect
import logging
import warnings
import weakref

import torch

from .errors import UnsupportedSettingError, VTPruneError
from .methods.base import Method
from .patches import sequence
from .patches.clip import ClsCapture
from .patches.decoder import DecoderPruner, PrefillRequest
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
        self._decoder: DecoderPruner | None = None
        self._saved: dict[str, object] = {}
        self._wrappers: dict[str, object] = {}
        self._installed: set[str] = set()
        self._continuations = weakref.WeakKeyDictionary()
        self._past_of_prefill = 0

    # --- install / remove ---------------------------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        nl, f = self.adapter.tower.num_layers, self.adapter.feature_layer()
        layers = self.method.cls_layers(nl, f)
        qkv = self.method.vision_stage_layers(nl, f)
        base = getattr(self.adapter, "base", None)
        lm = base.language_model if base is not None else None
        stages = self.method.llm_stages(self.adapter.family, len(getattr(lm, "layers", []))) if lm is not None else []
        try:
            self._capture = ClsCapture(self.adapter.tower, layers, qkv) if (layers or qkv) else None
            if stages:
                evict = self.method.llm_evict_layers(self.adapter.family, len(lm.layers))
                self._decoder = DecoderPruner(lm, stages, self.method.policy("position_mode"), evict)
            self._wrappers = self._build_wrappers()
            for name in self._wrappers:
                self._saved[name] = model.__dict__.get(name, _MISSING)
            for name, fn in self._wrappers.items():
                object.__setattr__(model, name, fn)
                self._installed.add(name)
            object.__setattr__(model, _ATTR, self)
            self.active = True
        except BaseException:
            self._remove()
            raise

    def _build_wrappers(self) -> dict:
        """Instance attributes to install: the wrapped forward/generate of a LLaVA model."""
        model = self.model
        self._check_forward(model.forward)
        return {
            "forward": self._make_forward(model.forward),
            "generate": self._make_generate(model.generate),
            "__deepcopy__": self._deepcopy,
        }

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
        if self._decoder is not None:
            self._decoder.remove()
            self._decoder = None
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

    def _deepcopy(self, memo):
        """copy.deepcopy(model) of a patched model gives an *unpatched* copy (hooks and wrappers belong
        to this instance); patch the copy separately if you want it pruned."""
        warnings.warn("deep-copying a vtprune-patched model: the copy is unpatched; patch it separately", stacklevel=3)
        self._remove()
        try:
            clone = copy.deepcopy(self.model, memo)
        finally:
            self._install()
        return clone

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
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def generate(*args, **kwargs):
            kwargs = _bind(sig, args, kwargs)
            inputs = kwargs.pop("inputs", None)
            if inputs is not None:
                if kwargs.get("input_ids") is not None:
                    raise VTPruneError("pass the prompt once: either as the first argument or as input_ids=")
                kwargs["input_ids"] = inputs
            if kwargs.get("pixel_values") is None or kwargs.get("mm_encoder_outputs") is not None:
                pruner._note_unpruned(kwargs)
                return orig(**kwargs)
            original_ids = kwargs.get("input_ids")
            prompt = original_ids if original_ids is not None else kwargs.get("inputs_embeds")
            kwargs = pruner._infer_attention_mask(kwargs)
            new_kwargs, shrunk = pruner._prepare(kwargs, mode="generate")
            pruner._adjust_lengths(new_kwargs, prompt.shape[1] - shrunk.length)
            if new_kwargs.get("streamer") is not None and original_ids is not None:
                new_kwargs["streamer"] = _PromptStreamer(new_kwargs["streamer"], original_ids)
            out = orig(**new_kwargs)
            return pruner._restore_prompt(out, original_ids, shrunk)

        return generate

    def _infer_attention_mask(self, kwargs: dict) -> dict:
        """generate() infers a padding mask from pad_token_id when none is given; do it before the
        prompt is shrunk (so the caller's padding stays masked), with transformers' rule."""
        ids = kwargs.get("input_ids")
        if kwargs.get("attention_mask") is not None or ids is None:
            return kwargs
        cfg = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        pad = kwargs.get("pad_token_id", getattr(cfg, "pad_token_id", None))
        eos = kwargs.get("eos_token_id", getattr(cfg, "eos_token_id", None))
        eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        if pad is not None and pad not in eos and bool((ids == pad).any()):
            kwargs = dict(kwargs, attention_mask=(ids != pad).long())
        return kwargs

    def _adjust_lengths(self, kwargs: dict, removed: int) -> None:
        """max_length / min_length count the caller's prompt: shift them by the removed tokens."""
        if removed <= 0:
            return
        cfg = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        length = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"].shape[1]
        if kwargs.get("max_new_tokens") is None and getattr(cfg, "max_new_tokens", None) is None:
            ml = kwargs.get("max_length", getattr(cfg, "max_length", None))
            if ml is not None:
                kwargs["max_length"] = max(ml - removed, length + 1)
        if kwargs.get("min_new_tokens") is None and getattr(cfg, "min_new_tokens", None) is None:
            ml = kwargs.get("min_length", getattr(cfg, "min_length", 0)) or 0
            if ml:
                kwargs["min_length"] = max(ml - removed, 0)

    def _make_forward(self, orig):
        pruner = self
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def forward(*args, **kwargs):
            kwargs = _bind(sig, args, kwargs)
            if kwargs.get("pixel_values") is None or kwargs.get("mm_encoder_outputs") is not None:
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                if cache is None and kwargs.get("mm_encoder_outputs") is None:
                    pruner._note_unpruned(kwargs)  # a text-only prefill called directly
                elif cache is not None and kwargs.get("mm_encoder_outputs") is None:
                    kwargs = pruner._continue(kwargs, cache)
                return orig(**kwargs)
            new_kwargs, shrunk = pruner._prepare(kwargs, mode="forward")
            out = orig(**new_kwargs)
            cache = getattr(out, "cache", None) if not isinstance(out, tuple) else None
            if cache is not None:
                pruner._remember(cache, kwargs, shrunk)
            return out

        return forward

    # --- continuing a pruned prefill with plain forward calls (manual decode loops) -----------------------
    def _remember(self, cache, kwargs, shrunk) -> None:
        prompt = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        past = self._past_of_prefill
        try:
            self._continuations[cache] = (past + prompt.shape[1], past + shrunk.length, shrunk.attention_mask)
        except TypeError:  # pragma: no cover - an unhashable / non-weakref-able cache class
            pass

    def _continue(self, kwargs, cache):
        """A forward call continuing a cache that a pruned prefill filled: translate the caller's
        attention mask (which counts the original prompt) and, under position_mode="original", the
        positions (which continue from the original length)."""
        try:
            info = self._continuations.get(cache)
        except TypeError:  # pragma: no cover
            info = None
        if info is None:
            return kwargs
        orig_len, new_len, new_mask = info
        kwargs = dict(kwargs)
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        q = ids.shape[1]
        past = cache.get_seq_length()
        extra = past - new_len  # tokens added since the pruned prefill
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() == 2 and am.shape[1] == orig_len + extra + q and orig_len != new_len:
            head = new_mask.to(am) if new_mask is not None else torch.ones(am.shape[0], new_len, dtype=am.dtype, device=am.device)
            kwargs["attention_mask"] = torch.cat([head, am[:, orig_len:]], dim=1)
        if kwargs.get("position_ids") is None and self.method.policy("position_mode") == "original":
            start = past + (orig_len - new_len)
            kwargs["position_ids"] = (torch.arange(q, device=ids.device) + start)[None].expand(ids.shape[0], q)
        return kwargs

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
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        prompt = input_ids if input_ids is not None else inputs_embeds
        past_mask = None
        if attention_mask is not None and prompt is not None and past and attention_mask.shape[1] == past + prompt.shape[1]:
            past_mask, attention_mask = attention_mask[:, :past], attention_mask[:, past:]
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
            past_mask=past_mask,
        )
        self._past_of_prefill = past
        if past and shrunk.attention_mask is not None:
            head = past_mask if past_mask is not None else torch.ones(shrunk.attention_mask.shape[0], past, dtype=shrunk.attention_mask.dtype, device=shrunk.attention_mask.device)
            shrunk.attention_mask = torch.cat([head.to(shrunk.attention_mask), shrunk.attention_mask], dim=1)
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
        if self._decoder is not None:
            vis = []
            for i, (b, c) in enumerate(zip(shrunk.sample_of, shrunk.image_cols)):
                cols = c[: len(images[i].layout)]
                vis.append((b, shrunk.new_index[b, cols]))
            self._decoder.pending = PrefillRequest(vis, [im.budget for im in images], self.last)
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
            if im.selection.sources is not None:
                rep.sources.append(_align_sources(im.layout.kept, im.selection, im.geometry, im.selection.sources))
            else:
                rep.sources.append(_align_sources(im.layout.kept, im.selection, im.geometry) if groups is not None else None)
            rep.scores.append(im.scores)
            rep.stages.append([])
            n = len(im.layout)
            rep.num_visual_tokens.append(n)
            rep.available.append(im.available)
            rep.budget.append(im.budget)
            rep.tokens_per_layer.append([n] * n_layers)
            rep.grids.append((im.geometry.rows, im.geometry.cols))
            rep.geometries.append(im.geometry)
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


def _align_sources(kept, sel, geom, groups=None):
    """Per partition, the merge groups aligned with the (possibly filtered) kept indices."""
    groups = sel.groups if groups is None else groups
    out = []
    for p, kp in enumerate(kept):
        src = dict(zip(sel.kept[p].tolist(), groups[p])) if p < len(sel.kept) else {}
        out.append([src.get(i, torch.tensor([p * geom.patches + i])) for i in kp.tolist()])
    return out



def _bind(sig: inspect.Signature, args, kwargs) -> dict:
    """Positional and keyword arguments of a call as one keyword dict (VAR_KEYWORD flattened)."""
    if not args:
        return dict(kwargs)
    bound = sig.bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL and name in out:
            if out.pop(name):
                raise VTPruneError("unexpected extra positional arguments; pass them by name")
    return out


class _PromptStreamer:
    """Gives a streamer the caller's prompt (not the shrunk one) on its first put()."""

    def __init__(self, inner, prompt):
        self._inner, self._prompt, self._first = inner, prompt, True

    def put(self, value):
        if self._first:
            self._first = False
            value = self._prompt.to(value.device) if isinstance(value, torch.Tensor) else value
        return self._inner.put(value)

    def end(self):
        return self._inner.end()

    def __getattr__(self, name):
        return getattr(self._inner, name)
