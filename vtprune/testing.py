"""Tiny, offline, random-weight LLaVA-1.5 and LLaVA-NeXT models with working processors.

Everything here is built from configs in-process, in seconds, with no download: a byte-level BPE
tokenizer trained on a fixed corpus, the stock HF image processors, and HF model classes with
random weights. The geometry is the real one (a 24-layer CLIP tower at 336 px with patch 14, so
576 patches per image or crop; an LLM of 16 layers), only the widths are narrow, so every method's
default layer indices and windows apply unchanged.

    from vtprune.testing import tiny_llava, make_image
    model, processor = tiny_llava()
    inputs = processor(images=make_image(0), text=prompt(processor, "What is red?"), return_tensors="pt")

`size="small"` gives the same depths at 112 px (64 patches per image or crop) and half the width,
for fast plumbing tests. Random weights produce meaningless answers; they are for plumbing,
identity and equivalence checks. The weights are scaled (`attention_gain`) so that CLS attention
is far from uniform and score-based selections have clear margins.
"""

from __future__ import annotations

import functools
import math
import random as _random
from dataclasses import dataclass

import torch

__all__ = [
    "TinySpec",
    "tiny_tokenizer",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_clip_tower",
    "trained_llava",
    "trained_llava_next",
    "make_image",
    "prompt",
    "make_inputs",
    "SPECS",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "USER: What is the colour of the circle? ASSISTANT: The circle is red.",
    "USER: Is there a blue square in the image? ASSISTANT: Yes, there is a blue square on the left.",
    "USER: How many triangles are there? ASSISTANT: There are three triangles.",
    "USER: Which side is the green star on? ASSISTANT: The green star is on the right side.",
    "Describe the picture in one sentence. A small yellow shape sits near the top of a textured background.",
    "red green blue yellow purple orange white black grey circle square triangle star cross left right top bottom",
    "zero one two three four five six seven eight nine ten yes no maybe the a an of in on at is are",
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - + = / \n",
]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. `image_size`/`patch_size` give the patch grid (336/14 = 24x24)."""

    image_size: int = 336
    patch_size: int = 14
    vision_layers: int = 24
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_mlp: int = 128
    text_layers: int = 16
    text_hidden: int = 64
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 128
    attention_gain: float = 12.0
    text_model: str = "llama"  # or "qwen2"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pinpoints(self) -> list[list[int]]:
        s = self.image_size
        return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


SPECS = {
    "default": TinySpec(),
    "small": TinySpec(image_size=112, vision_hidden=32, vision_heads=4, vision_mlp=64, text_hidden=32, text_mlp=64),
}


def _spec(size: str | TinySpec) -> TinySpec:
    if isinstance(size, TinySpec):
        return size
    if size not in SPECS:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SPECS)} or pass a TinySpec")
    return SPECS[size]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~512) with `<image>` as a special token; built in-process."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _image_processor_classes():
    """Stock HF image processors; the PIL backends when torchvision is not installed."""
    try:
        import torchvision  # noqa: F401

        from transformers import CLIPImageProcessor, LlavaNextImageProcessor

        return CLIPImageProcessor, LlavaNextImageProcessor
    except Exception:  # torchvision missing or broken: use the PIL backends explicitly
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return CLIPImageProcessorPil, LlavaNextImageProcessorPil


def _configs(spec: TinySpec, tok, next_: bool, attn_implementation: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="quick_gelu",
        projection_dim=spec.vision_hidden,
    )
    text_cls = LlamaConfig
    if spec.text_model == "qwen2":
        from transformers import Qwen2Config as text_cls
    elif spec.text_model != "llama":
        raise ValueError(f"text_model must be 'llama' or 'qwen2', got {spec.text_model!r}")
    text = text_cls(
        vocab_size=len(tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=16384,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if next_:
        cfg = LlavaNextConfig(image_grid_pinpoints=spec.pinpoints, **common)
    else:
        cfg = LlavaConfig(**common)
    cfg.pad_token_id = tok.pad_token_id
    cfg._attn_implementation = attn_implementation
    return cfg


def _scale_attention(model, gain: float, seed: int) -> None:
    """Sharpen random attention so CLS rows are far from uniform (clear top-k margins)."""
    g = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(gain)
            elif "position_embedding" in name or "class_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _build(spec, next_, seed, dtype, attn_implementation):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    tok = tiny_tokenizer()
    cfg = _configs(spec, tok, next_, attn_implementation)
    torch.manual_seed(seed)
    cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    model = cls(cfg)
    _scale_attention(model, spec.attention_gain, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model = model.to(dtype).eval()
    return model, tok


def _processor(spec: TinySpec, tok, next_: bool):
    from transformers import LlavaNextProcessor, LlavaProcessor

    clip_cls, next_cls = _image_processor_classes()
    size = {"shortest_edge": spec.image_size}
    crop = {"height": spec.image_size, "width": spec.image_size}
    if next_:
        ip = next_cls(size=size, crop_size=crop, image_grid_pinpoints=spec.pinpoints)
        proc_cls = LlavaNextProcessor
    else:
        ip = clip_cls(size=size, crop_size=crop)
        proc_cls = LlavaProcessor
    return proc_cls(
        image_processor=ip,
        tokenizer=tok,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llava(size="default", seed: int = 0, dtype=torch.float32, attn_implementation: str = "sdpa"):
    """A random-weight `LlavaForConditionalGeneration` and its `LlavaProcessor` (offline, seconds)."""
    spec = _spec(size)
    model, tok = _build(spec, False, seed, dtype, attn_implementation)
    return model, _processor(spec, tok, False)


def tiny_llava_next(size="default", seed: int = 0, dtype=torch.float32, attn_implementation: str = "sdpa"):
    """A random-weight `LlavaNextForConditionalGeneration` and its `LlavaNextProcessor` (AnyRes pinpoints
    1x2, 2x1, 2x2, 3x1, 1x3 of the crop size)."""
    spec = _spec(size)
    model, tok = _build(spec, True, seed, dtype, attn_implementation)
    return model, _processor(spec, tok, True)


def trained_llava(dtype=torch.float32, fallback: bool = True):
    """The small trained LLaVA-1.5 shipped in `vtprune.trained` (answers questions about
    `vtprune.scenes` images), as (model, processor). When its weights are not installed: the random
    `tiny_llava()` if `fallback`, else FileNotFoundError."""
    from .trained import available, load

    if available("llava15") or not fallback:
        return load("llava15", dtype=dtype)
    return tiny_llava(dtype=dtype)


def trained_llava_next(dtype=torch.float32, fallback: bool = True):
    """The small trained LLaVA-NeXT shipped in `vtprune.trained` (AnyRes, 672x336 / 336x672 scenes);
    falls back to the random `tiny_llava_next()` like `trained_llava`."""
    from .trained import available, load

    if available("llava_next") or not fallback:
        return load("llava_next", dtype=dtype)
    return tiny_llava_next(dtype=dtype)


def tiny_clip_tower(size="default", seed: int = 0, dtype=torch.float32):
    """A bare random-weight `CLIPVisionModel` with the tiny geometry."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    spec = _spec(size)
    cfg = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    tower = CLIPVisionModel(cfg)
    _scale_attention(tower, spec.attention_gain, seed)
    return tower.to(dtype).eval()


_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


def make_image(seed: int = 0, size: tuple[int, int] = (336, 336), shapes: int = 6):
    """A deterministic PIL image (width, height) = `size`: coloured circles, squares and triangles on a
    noisy background."""
    from PIL import Image, ImageDraw

    rng = _random.Random(seed)
    w, h = size
    bg = tuple(rng.randint(90, 170) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    px = img.load()
    for _ in range(w * h // 40):  # light texture
        x, y = rng.randrange(w), rng.randrange(h)
        d = rng.randint(-30, 30)
        px[x, y] = tuple(max(0, min(255, c + d)) for c in bg)
    draw = ImageDraw.Draw(img)
    names = list(_COLOURS)
    for _ in range(shapes):
        colour = _COLOURS[names[rng.randrange(len(names))]]
        r = rng.randint(max(4, min(w, h) // 24), max(6, min(w, h) // 6))
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def prompt(processor, question: str, images: int = 1) -> str:
    """The chat-formatted prompt with `images` image slots, ending in the assistant turn."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_inputs(processor, images, questions, padding_side: str = "left"):
    """Processor outputs for a batch: one image (or a list of images) and one question per sample."""
    if not isinstance(questions, (list, tuple)):
        questions = [questions]
        images = [images]
    flat, texts = [], []
    for img, q in zip(images, questions):
        imgs = list(img) if isinstance(img, (list, tuple)) else [img]
        flat.extend(imgs)
        texts.append(prompt(processor, q, images=len(imgs)))
    processor.tokenizer.padding_side = padding_side
    return processor(images=flat, text=texts, return_tensors="pt", padding=True)


def attention_entropy_ratio(model) -> float:  # pragma: no cover - diagnostic helper
    """Mean normalised entropy of the CLS attention row of the last vision layer (1 = uniform)."""
    tower = model.model.vision_tower if hasattr(model, "model") else model
    spec_patches = tower.config.image_size // tower.config.patch_size
    x = torch.randn(1, 3, tower.config.image_size, tower.config.image_size)
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(x))
        for layer in tower.encoder.layers[:-1]:
            h = layer(h, None)
        attn = tower.encoder.layers[-1].self_attn
        hn = tower.encoder.layers[-1].layer_norm1(h)
        q = attn.q_proj(hn)[:, :1].view(1, 1, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(hn).view(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)[..., 1:]
        p = p / p.sum(-1, keepdim=True)
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return float((ent / math.log(spec_patches**2)).mean())


def llava_around_tower(tower_config: dict, tower_state: dict, seed: int = 0, dtype=torch.float32, next_: bool = False):
    """A random-weight LLaVA-1.5 (or, with `next_=True`, LLaVA-NeXT with pinpoints 1x2, 2x1, 2x2, 3x1,
    1x3 of the tower's image size) whose vision tower is the given CLIP tower (config dict + state
    dict, hub key layout with or without the `vision_model.` prefix) — e.g. a golden case's tower.
    Returns (model, tokenizer)."""
    from transformers import CLIPVisionConfig

    cfg = {k: v for k, v in tower_config.items() if k != "model_type"}
    vision = CLIPVisionConfig(**cfg)
    spec = TinySpec(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_layers=vision.num_hidden_layers,
        vision_hidden=vision.hidden_size,
        vision_heads=vision.num_attention_heads,
        vision_mlp=vision.intermediate_size,
        attention_gain=1.0,
    )
    model, tok = _build(spec, next_, seed, torch.float32, "sdpa")
    state = {k.removeprefix("vision_model."): v.float() for k, v in tower_state.items()}
    missing, unexpected = model.model.vision_tower.load_state_dict(state, strict=False)
    missing = [m for m in missing if "post_layernorm" not in m]
    if missing or unexpected:
        raise ValueError(f"tower weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval(), tok
