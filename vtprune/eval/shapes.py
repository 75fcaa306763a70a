"""Random-weight models with real shapes, built offline (for speed and memory benchmarks), and
loading of real checkpoints by name or path.

Shapes:
- `trained` / `trained-next`: the small trained LLaVA-1.5 / LLaVA-NeXT models shipped in
  `vtprune.trained` (real answers on `vtprune.scenes` images; the default offline model).
- `tiny`: vtprune.testing's tiny LLaVA-1.5 (narrow; plumbing only).
- `llava-0.5b`: the real LLaVA vision tower (CLIP ViT-L/14-336: 24 layers, width 1024, 16 heads)
  and a Qwen2-0.5B-shaped Llama (896 wide, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936):
  a 2-core CPU runs a prefill in about a second in bf16.
- `llava-1.5-7b`: CLIP-L/336 + Vicuna-7B shape (4096 wide, 32 layers, MLP 11008, vocab 32064);
  about 14 GB in bf16, 1.5 min to build on CPU.
- `llava-next-7b`: the same with LLaVA-NeXT's AnyRes (pinpoints up to 672x672).
"""

from __future__ import annotations

import torch

SHAPES = ("trained", "trained-next", "tiny", "tiny-next", "llava-0.5b", "llava-next-0.5b", "llava-1.5-7b", "llava-next-7b")

_CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
_LLM_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
_LLM_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False)
_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_shape(shape: str, dtype=torch.bfloat16, seed: int = 0):
    """(model, processor) for a named shape, random weights, no download."""
    from ..testing import _image_processor_classes, tiny_llava, tiny_llava_next, tiny_tokenizer

    if shape in ("trained", "trained-next"):
        from ..trained import load

        return load("llava_next" if shape == "trained-next" else "llava15", dtype=dtype)
    if shape == "tiny":
        return tiny_llava(dtype=dtype, seed=seed)
    if shape == "tiny-next":
        return tiny_llava_next(dtype=dtype, seed=seed)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)} (or pass a checkpoint name/path)")
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tok = tiny_tokenizer()
    llm = _LLM_05B if "0.5b" in shape else _LLM_7B
    text = LlamaConfig(max_position_embeddings=8192, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **llm)
    vision = CLIPVisionConfig(**_CLIP_L)
    common = dict(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default")
    next_ = "next" in shape
    cfg = LlavaNextConfig(image_grid_pinpoints=_PINPOINTS, **common) if next_ else LlavaConfig(**common)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
        model = cls(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    clip_cls, next_cls = _image_processor_classes()
    size, crop = {"shortest_edge": 336}, {"height": 336, "width": 336}
    ip = next_cls(size=size, crop_size=crop, image_grid_pinpoints=_PINPOINTS) if next_ else clip_cls(size=size, crop_size=crop)
    proc_cls = LlavaNextProcessor if next_ else LlavaProcessor
    from ..testing import CHAT_TEMPLATE

    proc = proc_cls(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return model, proc


def load_model(name_or_path: str | None, dtype=None, device: str | None = None):
    """(model, processor, label): a built-in shape, or a real HF LLaVA / LLaVA-NeXT checkpoint."""
    if name_or_path is None:
        from ..trained import available, load

        if available("llava15"):
            model, proc = load("llava15", dtype=dtype)
            return model.to(device or "cpu"), proc, "built-in trained LLaVA-1.5 (vtprune.trained, small model trained on vtprune.scenes)"
        from ..testing import tiny_llava

        model, proc = tiny_llava()
        return model, proc, "built-in offline tiny LLaVA (random weights: answers are meaningless; trained weights not installed)"
    if name_or_path in ("trained", "trained-next"):
        model, proc = build_shape(name_or_path, dtype=dtype or torch.float32)
        return model.to(device or "cpu"), proc, f"built-in {name_or_path} model (vtprune.trained)"
    if name_or_path in SHAPES:
        model, proc = build_shape(name_or_path, dtype=dtype or torch.bfloat16)
        return model.to(device or "cpu"), proc, f"random-weight {name_or_path} shape"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kw = {"dtype": dtype or "auto"}
    if device:
        kw["device_map"] = device
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kw).eval()
    proc = AutoProcessor.from_pretrained(name_or_path)
    return model, proc, name_or_path
