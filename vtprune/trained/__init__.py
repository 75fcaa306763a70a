"""Small trained LLaVA-architecture models for judging pruning offline (`vtprune.scenes` data).

Both variants ship with the package (`path(variant)`, 8.4 MB each) and are the default offline model
of `vtprune compare`, the demo, the notebooks and the lmms-eval plugin. Unpruned exact-match accuracy
on the test split (docs/TRAINED.md, `python -m vtprune.eval.accuracy`): LLaVA-1.5 91.0 % (colour
100 %, presence 87 %, count 80 %, side 97 %), against 34 % for the per-type majority answer. All of it
is trained: the vision tower (an image-level objective on its CLS), the projector (fitted to the
patch labels, LLaVA's stage 1) and the LLM (LLaVA-style conversations, with supervised attention
on its two look-up hops; `train.py`).

Two variants:

- ``"llava15"``: `LlavaForConditionalGeneration`, 336 x 336 input, 576 visual tokens.
- ``"llava_next"``: `LlavaNextForConditionalGeneration` (AnyRes: base image + two 336 crops for the
  672 x 336 and 336 x 672 scenes it is trained on), sharing the LLaVA-1.5 model's vision tower.

Both have a CLIP-shaped vision tower (24 layers, patch 14, 336 px, width 64, 4 heads) whose CLS token
is trained with an image-level objective, and a 16-layer Llama over a word-level vocabulary, so every
method's default layer indices apply.

    python -m vtprune.trained.train --variant llava15 --seed 0 --out runs/llava15
    from vtprune.trained import load
    model, processor = load("llava15", directory="runs/llava15")    # or the package's own files
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["VARIANTS", "available", "path", "load"]

VARIANTS = ("llava15", "llava_next")
_ALIASES = {"llava": "llava15", "llava-1.5": "llava15", "llava-next": "llava_next", "next": "llava_next"}
_DIR = Path(__file__).resolve().parent


def _variant(variant: str) -> str:
    v = _ALIASES.get(variant, variant)
    if v not in VARIANTS:
        raise ValueError(f"unknown trained variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return v


def path(variant: str = "llava15") -> Path:
    """The directory holding the variant's config, weights, tokenizer and processor files."""
    return _DIR / _variant(variant)


def available(variant: str = "llava15", directory=None) -> bool:
    """True when the variant's weights and processor files are installed with the package (or are in
    `directory`, a folder written by `python -m vtprune.trained.train --out DIR`)."""
    d = Path(directory) if directory is not None else path(variant)
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"))


def load(variant: str = "llava15", dtype=None, device=None, directory=None):
    """(model, processor) of a shipped trained model, from the package's own files (no network), or
    from `directory` (the `--out` folder of `python -m vtprune.trained.train`).

    `dtype` defaults to float32 (the training precision); `device` to CPU. The model is in eval mode;
    the tokenizer pads on the left (batched generation)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor

    v = _variant(variant)
    where = Path(directory) if directory is not None else path(v)
    if not available(v, where):
        raise FileNotFoundError(
            f"the trained {v} model is not installed at {where}; train it with "
            f"`python -m vtprune.trained.train --variant {v} --out {path(v)}` (see docs/TRAINED.md)"
        )
    d = str(where)
    model_cls, proc_cls = (
        (LlavaNextForConditionalGeneration, LlavaNextProcessor) if v == "llava_next" else (LlavaForConditionalGeneration, LlavaProcessor)
    )
    model = model_cls.from_pretrained(d, dtype=dtype or torch.float32, local_files_only=True).eval()
    if device is not None:
        model = model.to(device)
    processor = proc_cls.from_pretrained(d, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor
