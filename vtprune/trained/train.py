"""Train vtprune's small LLaVA-architecture models on `vtprune.scenes` (CPU, from a seed).

    python -m vtprune.trained.train --variant llava15 --seed 0 --out DIR          # stages A + B
    python -m vtprune.trained.train --variant llava_next --seed 0 --out DIR2 --init DIR
                                                                                  # NeXT: reuses DIR's tower,
                                                                                  # fine-tunes projector + LLM

Stage A (llava15 only) trains the CLIP-shaped tower (24 layers, patch 14, 336 px, width 64, 4 heads)
on rendered scenes: dense per-patch targets (colour, shape, object centre) on the feature layer LLaVA
reads (hidden state -2) and an image-level objective on the CLS token (multi-label colour x shape
presence and per-shape counts, read from the post-layernorm CLS of the last layer, as CLIP's pooled
output, and from the CLS of layers 20-22). Its first 8 layers are exactly local (a large position
code in 16 channels, fixed neighbour-looking queries and keys), so they train like a small CNN, on
whole images, through `local_forward` (the HF forward restricted to each query's few candidate keys;
see the comment above `position_code`). A quarter of the images are LLaVA-NeXT scenes squashed to
336x336 (what the NeXT base image looks like), so the same tower serves both variants.

Stage B (default `--stage-b learned`, `stage_b`) freezes the tower, caches its layer -2 patch
features for 200 training scenes and fits the projector to the patch labels (`circuit.fit_projector`:
one-hot colour / shape / centre tokens, LLaVA's stage 1 with labels for captions), which then stays
frozen. A small Llama (16 layers, width 64, RoPE theta 1e6, word-level tokenizer built from
`vtprune.scenes.corpus()`) is trained from scratch, LLaVA-style: multi-turn conversations about
fresh scenes, answer loss, plus a supervised-attention loss on its two look-up hops (layer 0: the
question's words look up their objects; layer 1: the answer position finds the words), 800 steps.
The NeXT variant starts from the LLaVA-1.5 model (tower, projector, LLM) and fine-tunes the LLM on
AnyRes features (base + two 336 crops, HF's own `pack_image_features`). `--stage-b compiled`
(`stage_b_compiled`) instead writes the look-up circuit into the LLM's weights (`circuit.compile_llm`;
what shipped before the learned recipe worked, docs/TRAINED.md).

Everything is seeded; fp32; `--threads` (default 1, which reproduces the shipped weights bit for bit
on the CPU that trained them; another CPU's kernels sum in another order, and the result lands within
the ±2-point bar instead, see docs/TRAINED.md "Reproduction") sets torch's intra-op threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import scenes as S

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=24,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    projection_dim=64,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1e6,  # more RoPE pairs that barely rotate over an image: content look-ups (init_lookup)
    tie_word_embeddings=False,
)
PINPOINTS = [[336, 672], [672, 336], [672, 672]]  # (height, width); 672x336 scenes -> base + 2 crops
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
GRID = 24
N_PATCH = GRID * GRID
COLOUR_IDX = {c: i + 1 for i, c in enumerate(S.COLOURS)}
SHAPE_IDX = {k: i + 1 for i, k in enumerate(S.SHAPES)}
PAIRS = [(c, k) for c in S.COLOURS for k in S.SHAPES]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# --- tokenizer / processor / model --------------------------------------------------------------


def build_tokenizer():
    """A word-level tokenizer over `scenes.corpus()` (every question word and answer), `<image>` special."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..testing import CHAT_TEMPLATE

    words = []
    for line in S.corpus() + ["USER: ASSISTANT:"]:
        for w in re.findall(r"\w+|[^\w\s]", line.replace("<image>", " ")):
            if w not in words:
                words.append(w)
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    fast.padding_side = "left"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tok, next_: bool):
    from transformers import LlavaNextProcessor, LlavaProcessor

    from ..testing import CHAT_TEMPLATE, _image_processor_classes

    clip_cls, next_cls = _image_processor_classes()
    size, crop = {"shortest_edge": 336}, {"height": 336, "width": 336}
    if next_:
        ip, cls = next_cls(size=size, crop_size=crop, image_grid_pinpoints=PINPOINTS), LlavaNextProcessor
    else:
        ip, cls = clip_cls(size=size, crop_size=crop), LlavaProcessor
    return cls(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tok, next_: bool):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    text = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TEXT,
    )
    common = dict(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if next_:
        cfg, cls = LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common), LlavaNextForConditionalGeneration
    else:
        cfg, cls = LlavaConfig(**common), LlavaForConditionalGeneration
    cfg.pad_token_id = tok.pad_token_id
    cfg._attn_implementation = "sdpa"
    model = cls(cfg)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    gc.max_new_tokens, gc.do_sample = 4, False
    return model


# --- images ------------------------------------------------------------------------------------


def pixels(img) -> np.ndarray:
    """CLIP normalisation of a 336x336 PIL image (or an HxWx3 uint8 array) -> (3, H, W) float32
    (the processor's numbers)."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


# --- stage A: the tower ------------------------------------------------------------------------
#
# A ViT trained from scratch learns colour at once but shape only after far more images than a
# 2-core CPU can show it in minutes. A small CNN (a 14/14 patch convolution, then four blocks of
# 3x3 convolution + MLP on the 24x24 grid, width 64) learns per-patch shape on whole scenes to 0.99 in
# 1,500 steps of 8 images (5 minutes). The same blocks built from the tower's own layers, with each
# head copying exactly one neighbour, learn as fast; with soft attention heads that start local but
# can spread over 577 tokens, they stay near chance for 500 steps (docs/TRAINED.md, "Fifth attempt").
# So the tower's first `LOCAL_LAYERS` layers are made *exactly local*, with the standard
# `CLIPVisionModel` architecture and every layer's weights ordinary:
#   * position in its own 16 channels (2-D sin-cos at 4 frequencies, one of them coarse), content in
#     the other channels; the code is large (P_EMB in the position embedding, P_RES in the residual
#     stream), so it dominates every token's LayerNorm statistics and what a LayerNorm makes of it
#     hardly depends on the patch's content;
#   * in layers 0-7 each head's query is the position code rotated to one neighbour (left / right /
#     up / down, then the diagonals), its key the code: its attention sits on that neighbour (> 0.99;
#     the other keys are at least LOCAL_MARGIN logits below). These queries and keys stay fixed, so
#     the layers are 3x3 "convolutions" (rank 16 per tap) followed by an MLP;
#   * every residual branch starts at zero (`out_proj`, `fc2`), so the 24 layers start as the
#     identity;
#   * `pin_positions` keeps the code exact after every step.
# Training then uses `local_forward`: in layers 0-7 each patch query's softmax runs over its few
# candidate keys (the CLS and the keys within LOCAL_MARGIN of the best by position alone), which is
# the HF forward up to the attention mass left outside (< 1e-5; measured by the stage A report and a
# test) at a fraction of its cost. A1 trains layers 0-7 on whole images; A2 all 24 layers on whole
# images, with the image-level objective on the CLS token.

NPOS = 16  # position channels (the last NPOS of the hidden size)
OMEGA_Y = (math.pi / 24, 0.9, 2.3, 2.8)  # one coarse frequency (monotone over the grid) + fine ones
OMEGA_X = (math.pi / 24, 0.9, 2.3)
N_CODE = 2 * (len(OMEGA_Y) + len(OMEGA_X))  # 14 sin / cos channels; the last 2 make every row sum to 0
POS_NORM2 = 36.0  # |code|^2 of every row (7 from the sin / cos pairs, 29 from the two balancing channels)
LN_SCALE = math.sqrt(POS_NORM2 / 64)  # a LayerNorm's std over a token whose code (scaled by P) dominates: P x LN_SCALE
P_EMB = 30.0  # scale of the position code in the position embedding
P_RES = 200.0  # its scale in the residual stream (pre_layrnorm's weight on the position channels)
CLS_AT = (-12, -12)  # the CLS token's position code: a point off the grid, so no neighbour head looks at it
LOCAL_LAYERS = 8
OFFSETS = (((0, -1), (0, 1), (-1, 0), (1, 0)), ((-1, -1), (-1, 1), (1, -1), (1, 1)))
LOCAL_BETA = 96.0
LOCAL_MARGIN = 30.0  # candidate keys of a local head: within this many logits of the best, by position alone
LOCAL_K = 4  # at most this many candidates per query (plus the CLS)
A1_LAYERS = LOCAL_LAYERS
CLS_LAYERS = (20, 21, 22)  # encoder layers whose CLS output is also trained on the image-level target
N_DENSE = 7 + 6 + 1  # colour (0 = none), shape (0 = none), object centre


def position_code(grid: int = GRID, at: tuple[int, int] | None = None) -> torch.Tensor:
    """(grid*grid, NPOS): [sin y, cos y] at OMEGA_Y, [sin x, cos x] at OMEGA_X, then two channels
    that make every row sum to zero at a constant norm (|row|^2 = POS_NORM2), so the code shifts no
    LayerNorm mean and sets the same LayerNorm std at every position. With `at` = (y, x), the
    (1, NPOS) code of that one point."""
    if at is not None:
        ys, xs = torch.tensor([float(at[0])]), torch.tensor([float(at[1])])
    else:
        ys, xs = (c.flatten() for c in torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"))
    wy, wx = torch.tensor(OMEGA_Y), torch.tensor(OMEGA_X)
    c = torch.cat([(ys[:, None] * wy).sin(), (ys[:, None] * wy).cos(), (xs[:, None] * wx).sin(), (xs[:, None] * wx).cos()], 1)
    total, rest = c.sum(1), POS_NORM2 - N_CODE / 2  # a + b = -total, a^2 + b^2 = rest
    root = (2 * rest - total**2).clamp_min(0).sqrt()
    return torch.cat([c, ((-total + root) / 2)[:, None], ((-total - root) / 2)[:, None]], 1)


def _shift(oy: int, ox: int) -> torch.Tensor:
    """(NPOS, NPOS) map with code(p) -> code(p + (oy, ox)) on the sin / cos channels (zero on the
    balancing ones), so q . k peaks at the neighbour."""
    m = torch.zeros(NPOS, NPOS)
    base = 0
    for omega, o in ((OMEGA_Y, oy), (OMEGA_X, ox)):
        n = len(omega)
        for f, w in enumerate(omega):
            si, ci, b = base + f, base + n + f, w * o
            m[si, si], m[si, ci], m[ci, si], m[ci, ci] = math.cos(b), math.sin(b), -math.sin(b), math.cos(b)
        base += 2 * n
    return m


def init_patch_embedding(conv: nn.Conv2d) -> None:
    """Start the patch embedding from filters that already see colour and coarse shape: per colour
    channel the patch mean, the four quadrant means and horizontal / vertical gradients (the rest of
    the channels keep their random init)."""
    w = conv.weight  # (d, 3, 14, 14)
    k = 0
    with torch.no_grad():
        for c in range(3):
            if k + 7 > w.shape[0]:
                break
            w[k : k + 7] = 0
            w[k, c] = 1.0 / 196
            for qy in range(2):
                for qx in range(2):
                    w[k + 1 + 2 * qy + qx, c, 7 * qy : 7 * qy + 7, 7 * qx : 7 * qx + 7] = 2.0 / 49
            w[k + 5, c, :, :7], w[k + 5, c, :, 7:] = -2.0 / 98, 2.0 / 98
            w[k + 6, c, :7, :], w[k + 6, c, 7:, :] = -2.0 / 98, 2.0 / 98
            k += 7


def init_tower(tower) -> None:
    """The stage A initialisation: the position code in its channels, LayerNorm weights that give the
    content channels back their scale (the large code sets every token's LayerNorm std), zero residual
    branches, neighbour heads in layers 0..LOCAL_LAYERS-1."""
    d = tower.config.hidden_size
    hd = d // tower.config.num_attention_heads
    assert hd >= NPOS and tower.config.num_attention_heads == 4
    emb = tower.embeddings
    with torch.no_grad():
        init_patch_embedding(emb.patch_embedding)
        emb.position_embedding.weight.zero_()
        # with the code dominating, a LayerNorm divides by about P x LN_SCALE: these weights undo that
        tower.pre_layrnorm.weight[: d - NPOS] = P_EMB * LN_SCALE
        for i, layer in enumerate(tower.encoder.layers):
            for ln in (layer.layer_norm1, layer.layer_norm2):
                ln.weight[: d - NPOS] = P_RES * LN_SCALE
                ln.weight[d - NPOS :] = 1.0
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
            if i < LOCAL_LAYERS:
                _local_heads(layer, i, d, hd)
    pin_positions(tower)


def _local_heads(layer, i: int, d: int, hd: int) -> None:
    """Layer i's heads as neighbour heads: query = the position code rotated to one neighbour,
    key = the code; no content terms."""
    q, k = layer.self_attn.q_proj, layer.self_attn.k_proj
    with torch.no_grad():
        for lin in (q, k):
            lin.weight.zero_()
            lin.bias.zero_()
        for h, (oy, ox) in enumerate(OFFSETS[i % 2]):
            q.weight[h * hd : h * hd + NPOS, d - NPOS :] = LOCAL_BETA * _shift(oy, ox)
            k.weight[h * hd : h * hd + N_CODE, d - NPOS : d - NPOS + N_CODE] = torch.eye(N_CODE)


def local_parameters(tower) -> set[int]:
    """ids of the parameters stage A holds fixed: the neighbour heads' queries and keys."""
    return {id(p) for layer in tower.encoder.layers[:LOCAL_LAYERS] for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj) for p in lin.parameters()}


def pin_positions(tower) -> None:
    """Keep the last NPOS channels of the tower's residual stream the position code: the patch
    embedding, class embedding and every layer's residual writes (attention out_proj, MLP fc2) leave
    them at zero, the position embedding holds P_EMB x `position_code()` (the CLS: the code of CLS_AT), pre_layrnorm scales it to
    P_RES, and the neighbour layers' first LayerNorm passes it through unchanged (their queries and
    keys read only these channels). Applied at initialisation and after every stage A step. Without
    it, training writes patch content into these channels (rms 1.26 against a code of rms 0.7 in the
    fourth attempt) and the neighbour heads stop being local."""
    d = tower.config.hidden_size
    emb = tower.embeddings
    with torch.no_grad():
        emb.patch_embedding.weight[d - NPOS :] = 0
        if emb.patch_embedding.bias is not None:
            emb.patch_embedding.bias[d - NPOS :] = 0
        emb.class_embedding[d - NPOS :] = 0
        pe = emb.position_embedding.weight
        pe[0, d - NPOS :] = P_EMB * position_code(at=CLS_AT)[0]
        pe[1:, d - NPOS :] = P_EMB * position_code()
        tower.pre_layrnorm.weight[d - NPOS :] = P_RES * LN_SCALE
        tower.pre_layrnorm.bias[d - NPOS :] = 0.0
        for i, layer in enumerate(tower.encoder.layers):
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight[d - NPOS :] = 0
                lin.bias[d - NPOS :] = 0
            if i < LOCAL_LAYERS:
                layer.layer_norm1.weight[d - NPOS :] = 1.0
                layer.layer_norm1.bias[d - NPOS :] = 0.0


def local_candidates(tower, margin: float = LOCAL_MARGIN, k_max: int = LOCAL_K) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per neighbour layer: (heads, 576, k_max) key indices (1.. = patches; 0 = the CLS, also the
    padding) whose attention logit, computed from the position code alone, is within `margin` of the
    query's best; and the grid rows whose neighbour in some head lies outside the grid (border
    patches: their attention has no clear target, so `local_forward` computes it over every key).
    Everything outside the candidates gets under e^-margin of the mass as long as the code dominates
    the LayerNorm statistics (the stage A report measures the difference to the HF forward)."""
    d = tower.config.hidden_size
    out = []
    with torch.no_grad():
        x = torch.zeros(N_PATCH, d)
        x[:, d - NPOS :] = P_EMB * position_code()
        x = tower.pre_layrnorm(x)
        for i, layer in enumerate(tower.encoder.layers[:LOCAL_LAYERS]):
            at = layer.self_attn
            hd = at.head_dim
            h = layer.layer_norm1(x)
            q = at.q_proj(h).view(N_PATCH, -1, hd).transpose(0, 1)
            k = at.k_proj(h).view(N_PATCH, -1, hd).transpose(0, 1)
            logit = (q @ k.transpose(-1, -2)) * at.scale  # (H, 576, 576)
            top = logit.topk(k_max, dim=-1)
            keep = top.values >= top.values[..., :1] - margin
            yy, xx = torch.arange(N_PATCH) // GRID, torch.arange(N_PATCH) % GRID
            border = torch.zeros(N_PATCH, dtype=torch.bool)
            for oy, ox in OFFSETS[i % 2]:
                border |= (yy + oy < 0) | (yy + oy >= GRID) | (xx + ox < 0) | (xx + ox >= GRID)
            out.append((torch.where(keep, top.indices + 1, torch.zeros_like(top.indices)), border.nonzero()[:, 0]))
    return out


def _local_attention(layer, h: torch.Tensor, cand: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A neighbour layer's attention output on (B, 577, d) normalised input: the CLS and the border
    patches' queries over every key, every other patch query over its candidate keys and the CLS
    (softmax restricted to them)."""
    at = layer.self_attn
    cand, border = cand
    b, n, _ = h.shape
    heads, hd = cand.shape[0], at.head_dim
    q = at.q_proj(h).view(b, n, heads, hd).transpose(1, 2) * at.scale
    k = at.k_proj(h).view(b, n, heads, hd).transpose(1, 2)
    v = at.v_proj(h).view(b, n, heads, hd).transpose(1, 2)
    idx = torch.cat([torch.zeros_like(cand[..., :1]), cand], -1)  # the CLS first, then the candidates
    hix = torch.arange(heads)[:, None, None]
    kk, vv = k[:, hix, idx], v[:, hix, idx]  # (B, H, 576, K+1, hd)
    logit = (q[:, :, 1:, None, :] * kk).sum(-1)
    pad = torch.zeros(idx.shape, dtype=torch.bool)
    pad[..., 1:] = cand == 0  # padding slots (index 0 again): masked so the CLS counts once
    w = logit.masked_fill(pad, float("-inf")).softmax(-1)
    o = (w[..., None] * vv).sum(-2)
    rows = torch.cat([torch.zeros(1, dtype=torch.long), border + 1])  # the CLS and the border patches
    full = (q[:, :, rows] @ k.transpose(-1, -2)).softmax(-1) @ v
    o = torch.cat([full[:, :, :1], o], 2).index_copy(2, rows[1:], full[:, :, 1:])
    return at.out_proj(o.transpose(1, 2).reshape(b, n, heads * hd))


def local_forward(tower, pix: torch.Tensor, n_layers: int = 24, cand: list | None = None) -> list[torch.Tensor]:
    """Hidden states of the tower on whole images (B, 3, 336, 336), as the HF forward computes them,
    with the neighbour layers' attention restricted to `local_candidates` (the HF forward up to the
    attention mass outside them); the layers above run unchanged."""
    cand = cand if cand is not None else local_candidates(tower)
    emb = tower.embeddings
    p = emb.patch_embedding(pix).flatten(2).transpose(1, 2)
    cls = (emb.class_embedding + emb.position_embedding.weight[0]).expand(p.shape[0], 1, -1)
    x = tower.pre_layrnorm(torch.cat([cls, p + emb.position_embedding.weight[1:]], 1))
    hs = [x]
    for i, layer in enumerate(tower.encoder.layers[:n_layers]):
        if i < LOCAL_LAYERS:
            x = x + _local_attention(layer, layer.layer_norm1(x), cand[i])
            x = x + layer.mlp(layer.layer_norm2(x))
        else:
            x = layer(x, None)
        hs.append(x)
    return hs


def scene_targets(scene: S.Scene):
    """A scene as the tower sees it (a NeXT scene squashed to 336x336, its base image) and its
    targets: per patch colour / shape of the object covering >= 40 of its 196 pixels (0 = none) and
    "object centre" (the patch holding an object's pixel centroid); per object its pixel count and
    the pixel label map (for crop-level image targets)."""
    from PIL import Image

    img, lab = scene.render(labels=True)
    if (scene.width, scene.height) != (336, 336):
        img = img.resize((336, 336), Image.BICUBIC)
        lab = np.asarray(Image.fromarray(lab).resize((336, 336), Image.NEAREST))
    n = len(scene.objects)
    per_patch = lab.reshape(GRID, 14, GRID, 14).transpose(0, 2, 1, 3).reshape(N_PATCH, 196)
    cover = np.stack([(per_patch == i + 1).sum(1) for i in range(n)], 1)
    best, ok = cover.argmax(1), cover.max(1) >= 40
    ci = np.array([COLOUR_IDX[o.colour] for o in scene.objects])
    si = np.array([SHAPE_IDX[o.shape] for o in scene.objects])
    colour, shape = np.where(ok, ci[best], 0), np.where(ok, si[best], 0)
    centre = np.zeros(N_PATCH, np.float32)
    centres = []
    for i in range(n):
        yy, xx = np.nonzero(lab == i + 1)
        if len(yy):
            c = min(GRID - 1, int(yy.mean()) // 14) * GRID + min(GRID - 1, int(xx.mean()) // 14)
            centre[c] = 1.0
            centres.append(c)
    return dict(scene=scene, img=np.asarray(img), lab=lab, colour=colour, shape=shape, centre=centre, centres=centres,
                area=np.bincount(lab.flatten(), minlength=n + 1)[1:])


def crop_image_targets(t, y0: int, x0: int, n: int):
    """Image-level targets of an n x n-patch crop: colour x shape presence and per-shape counts of the
    objects with >= half their pixels inside; masks out labels an object cut in two makes ambiguous."""
    scene = t["scene"]
    inside = np.bincount(t["lab"][y0 * 14 : (y0 + n) * 14, x0 * 14 : (x0 + n) * 14].flatten(), minlength=len(scene.objects) + 1)[1:]
    frac = inside / np.maximum(t["area"], 1)
    pres, pmask = np.zeros(len(PAIRS), np.float32), np.ones(len(PAIRS), np.float32)
    cnt, cmask = np.zeros(len(S.SHAPES), np.int64), np.ones(len(S.SHAPES), np.float32)
    for f, o in zip(frac, scene.objects):
        j, k = PAIRS.index((o.colour, o.shape)), S.SHAPES.index(o.shape)
        if f >= 0.5:
            pres[j], cnt[k] = 1.0, cnt[k] + 1
        elif f > 0.05:
            pmask[j], cmask[k] = 0.0, 0.0
    pmask[pres == 1] = 1.0
    return pres, pmask, np.minimum(cnt, S.MAX_COUNT), cmask


class Heads(nn.Module):
    """Training-only read-outs (not saved): dense per-patch targets and the image-level CLS target."""

    def __init__(self, d: int):
        super().__init__()
        n_img = len(PAIRS) + len(S.SHAPES) * (S.MAX_COUNT + 1)
        self.norm, self.dense = nn.LayerNorm(d), nn.Linear(d, N_DENSE)
        self.aux = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, N_DENSE)) for _ in range(2))
        self.cls = nn.Linear(d, n_img)  # on the tower's own post_layernorm(CLS of the last layer)
        self.cls_mid = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, n_img)) for _ in CLS_LAYERS)
        with torch.no_grad():  # the position code sets every token's LayerNorm std; give the content its scale back
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight[: d - NPOS] = P_RES * LN_SCALE


_WBG_C = torch.tensor([0.3] + [1.0] * 6)
_WBG_S = torch.tensor([0.3] + [1.0] * 5)


def dense_loss(z, colour, shape, centre, centre_mask=None):
    loss = F.cross_entropy(z[..., :7].reshape(-1, 7), colour.flatten(), weight=_WBG_C) + 2.0 * F.cross_entropy(
        z[..., 7:13].reshape(-1, 6), shape.flatten(), weight=_WBG_S
    )
    if centre is not None:
        loss = loss + 0.5 * F.binary_cross_entropy_with_logits(z[..., 13], centre, pos_weight=torch.tensor(10.0))
    if centre_mask is not None and centre_mask.any():
        loss = loss + 2.0 * F.cross_entropy(z[..., 7:13][centre_mask], shape[centre_mask])
    return loss


def image_loss(z, pres, pmask, cnt, cmask):
    npairs = len(PAIRS)
    lp = (F.binary_cross_entropy_with_logits(z[:, :npairs], pres, reduction="none") * pmask).sum() / pmask.sum().clamp(min=1)
    ln = F.cross_entropy(z[:, npairs:].reshape(-1, S.MAX_COUNT + 1), cnt.flatten(), reduction="none")
    ln = (ln * cmask.flatten()).sum() / cmask.sum().clamp(min=1)
    return 2.0 * lp + 0.5 * ln


def _lr(base: float, step: int, steps: int, warm: int = 30) -> float:
    return base * min(1.0, (step + 1) / warm) * (0.5 * (1 + math.cos(math.pi * step / max(steps, 1))) * 0.9 + 0.1)


class Meter:
    def __init__(self, name: str, every: int):
        self.name, self.every, self.rows, self.t0 = name, every, [], time.time()

    def add(self, step: int, steps: int, **kv):
        self.rows.append(kv)
        if step % self.every == 0 or step == steps - 1:
            keys = self.rows[-1].keys()
            m = {k: np.nanmean([r[k] for r in self.rows[-self.every :]]) for k in keys}
            log(f"{self.name} {step}/{steps} " + " ".join(f"{k} {v:.3f}" for k, v in m.items()) + f" {time.time() - self.t0:.0f}s")


def _acc(z, colour, shape, centre_mask):
    with torch.no_grad():
        obj = shape > 0
        ps = z[..., 7:13].argmax(-1)
        return dict(
            patch_colour=(z[..., :7].argmax(-1) == colour)[obj].float().mean().item(),
            patch_shape=(ps == shape)[obj].float().mean().item(),
            centre_shape=(ps == shape)[centre_mask].float().mean().item() if centre_mask.any() else float("nan"),
        )


def stage_a(tower, args, rng: random.Random):
    init_tower(tower)
    heads = Heads(tower.config.hidden_size)
    pool = S.scenes("train", args.scenes_a * 3 // 4, "llava15", seed=args.seed) + S.scenes("train", args.scenes_a // 4, "llava_next", seed=args.seed)
    rng.shuffle(pool)
    t0 = time.time()
    data = [scene_targets(s) for s in pool]
    log(f"A rendered {len(data)} training scenes in {time.time() - t0:.0f}s")
    fixed = local_parameters(tower)
    for p in tower.parameters():
        p.requires_grad_(id(p) not in fixed)
    cand = local_candidates(tower)

    def batch(bs):
        ts = [data[rng.randrange(len(data))] for _ in range(bs)]
        pix = torch.from_numpy(np.stack([pixels(t["img"]) for t in ts]))
        col, shp, cen = (torch.from_numpy(np.stack([t[k] for t in ts])) for k in ("colour", "shape", "centre"))
        img = [torch.from_numpy(np.stack(z)) for z in zip(*(crop_image_targets(t, 0, 0, GRID) for t in ts))]
        return pix, col, shp, cen, (cen > 0) & (shp > 0), img

    def step_(opt, params, loss):
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        pin_positions(tower)

    # A1: the neighbour layers on whole images, dense targets at their output and auxiliary ones at a
    # quarter and half of them (a CNN's training, with the tower's own layers)
    params = [p for layer in tower.encoder.layers[:A1_LAYERS] for p in layer.parameters() if p.requires_grad]
    params += [p for m in (tower.embeddings, tower.pre_layrnorm) for p in m.parameters()]
    params += list(heads.norm.parameters()) + list(heads.dense.parameters()) + list(heads.aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a, weight_decay=0.05, betas=(0.9, 0.98))
    meter = Meter("A1", 100)
    for step in range(args.steps_a1):
        for g in opt.param_groups:
            g["lr"] = _lr(args.lr_a, step, args.steps_a1)
        pix, col, shp, cen, isc, _ = batch(args.batch_a1)
        hs = local_forward(tower, pix, A1_LAYERS, cand)
        z = heads.dense(heads.norm(hs[-1][:, 1:]))
        loss = dense_loss(z, col, shp, cen, isc)
        for head, layer in zip(heads.aux, (A1_LAYERS // 4, A1_LAYERS // 2)):
            loss = loss + 0.3 * dense_loss(head(hs[layer][:, 1:]), col, shp, None)
        step_(opt, params, loss)
        meter.add(step, args.steps_a1, loss=loss.item(), **_acc(z, col, shp, isc))

    # A2: all layers on whole images; dense targets on hidden state -2 (what LLaVA reads), image-level
    # targets on the CLS of layers CLS_LAYERS and the pooled output of the last layer
    params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a2, weight_decay=0.05, betas=(0.9, 0.98))
    meter = Meter("A2", 25)
    for step in range(args.steps_a2):
        for g in opt.param_groups:
            g["lr"] = _lr(args.lr_a2, step, args.steps_a2, warm=10)
        pix, col, shp, cen, isc, img = batch(args.batch_a2)
        hs = local_forward(tower, pix, cand=cand)
        z = heads.dense(heads.norm(hs[-2][:, 1:]))
        loss = dense_loss(z, col, shp, cen, isc)
        zc = heads.cls(tower.post_layernorm(hs[-1][:, 0]))
        loss = loss + image_loss(zc, *img)
        for head, layer in zip(heads.cls_mid, CLS_LAYERS):
            loss = loss + 0.5 * image_loss(head(hs[layer + 1][:, 0]), *img)
        step_(opt, params, loss)
        with torch.no_grad():
            pres, pmask = img[0], img[1]
            hit = ((zc[:, : len(PAIRS)] > 0).float() == pres) & (pmask > 0)
            rec = hit[pres > 0].float().mean().item() if (pres > 0).any() else float("nan")
        meter.add(step, args.steps_a2, loss=loss.item(), cls_recall=rec, **_acc(z, col, shp, isc))
    for p in tower.parameters():
        p.requires_grad_(True)
    tower_report(tower, heads, [scene_targets(s) for s in S.scenes("val", args.val_a, "llava15", seed=args.seed)])
    return tower


def stage_a3(tower, args) -> dict:
    """A3: the last encoder layer's CLS learns the image-level objective on its own.

    A2's objective did not shape the last layer's CLS attention (it avoided objects: top-64 on
    objects 0.00), and GlobalCom² and MustDrop read exactly that row. LLaVA reads hidden state -2
    (the output of layer 22), so A3 trains only the last layer and `post_layernorm` on cached
    layer-22 outputs, with layers 0-22 frozen: the LLM's input is unchanged. The CLS output, through
    `post_layernorm` and a linear head (not saved), predicts colour x shape presence and per-shape
    counts (`image_loss`), as in A2. The last layer starts from stage A's weights (`--a3-init own`,
    the default) or, experimentally, as a copy of layer 22 (`layer22`). Own seeds: the same tower
    gives the same last layer whether stage A ran in this process or was loaded (--init with
    --a3-on-init)."""
    torch.manual_seed(args.seed + 3)
    rng = random.Random(args.seed + 3)
    t0 = time.time()
    n = args.scenes_a3
    pool = S.scenes("train", n - n // 4, "llava15", seed=args.seed + 3) + S.scenes("train", n // 4, "llava_next", seed=args.seed + 3)
    data = [scene_targets(s) for s in pool]
    val = [scene_targets(s) for s in S.scenes("val", args.val_a, "llava15", seed=args.seed)]

    def inputs(ts):  # the last layer's input (hidden state -2), all 577 tokens, from the HF forward
        out = []
        with torch.no_grad():
            for i in range(0, len(ts), 16):
                pix = torch.from_numpy(np.stack([pixels(t["img"]) for t in ts[i : i + 16]]))
                out.append(tower(pixel_values=pix, output_hidden_states=True).hidden_states[-2])
        return torch.cat(out)

    was = tower.training
    tower.eval()
    h, hv = inputs(data), inputs(val)
    img = [torch.from_numpy(np.stack(z)) for z in zip(*(crop_image_targets(t, 0, 0, GRID) for t in data))]
    log(f"A3 cached the last layer's input for {len(data)} + {len(val)} scenes in {time.time() - t0:.0f}s")
    layer = tower.encoder.layers[-1]
    if getattr(args, "a3_init", "own") == "layer22":
        # start from a copy of the layer below (experimental): its CLS mass on objects comes out at
        # 0.89-0.91 on two stage-A towers where stage A's own last layer gives 0.59-0.96, but
        # GlobalCom² does worse on it (docs/TRAINED.md "Reproduction")
        layer.load_state_dict(tower.encoder.layers[-2].state_dict())
    head = nn.Linear(tower.config.hidden_size, len(PAIRS) + len(S.SHAPES) * (S.MAX_COUNT + 1))
    for p in tower.parameters():
        p.requires_grad_(False)
    params = list(layer.parameters()) + list(tower.post_layernorm.parameters())
    for p in params:
        p.requires_grad_(True)
    params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a3, weight_decay=0.05)
    meter = Meter("A3", 200)
    layer.train()
    for step in range(args.steps_a3):
        idx = [rng.randrange(len(data)) for _ in range(16)]
        out = layer(h[idx], None)
        out = out[0] if isinstance(out, tuple) else out
        loss = image_loss(head(tower.post_layernorm(out[:, 0])), *(x[idx] for x in img))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        meter.add(step, args.steps_a3, loss=loss.item())
    for p in tower.parameters():
        p.requires_grad_(True)
    tower.train(was)
    res = last_cls_report(tower, hv, val)
    log("A3 report (validation) " + json.dumps(res))
    return res


def last_cls_report(tower, h, val) -> dict:
    """How much the last layer's CLS attention row (head mean) favours object patches: its mass on
    them, and the share of its top-k patches on them, against their share of the image."""
    obj = torch.from_numpy(np.stack([t["shape"] for t in val])) > 0
    with torch.no_grad():
        a = cls_attention(tower, h, len(tower.encoder.layers) - 1)
    res = {"object_patch_share": round(obj.float().mean().item(), 3), "cls_mass_on_objects": round((a * obj).sum(-1).mean().item(), 3)}
    for k in (8, 16, 64):
        res[f"cls_top{k}_on_objects"] = round(obj.gather(1, a.topk(k, dim=-1).indices).float().mean().item(), 3)
    return res


def cls_attention(tower, h_in, layer: int) -> torch.Tensor:
    """Head-mean attention of the CLS query over the patches at encoder `layer` (B, 576), from that
    layer's input hidden states `h_in` (hidden_states[layer])."""
    from ..patches.clip import cls_logits

    block = tower.encoder.layers[layer]
    h = block.layer_norm1(h_in)
    att = block.self_attn
    return cls_logits(att.q_proj(h[:, 0]), att.k_proj(h), att).softmax(-1).mean(1)[:, 1:]


def tower_report(tower, heads, val) -> dict:
    """Full-image accuracy of the dense read-out on validation scenes, CLS presence recall, and how
    much the CLS row favours object patches at the layers the CLS-guided methods read."""
    tower.eval()
    res = {}
    with torch.no_grad():
        pix = torch.from_numpy(np.stack([pixels(t["img"]) for t in val]))
        hs = tower(pixel_values=pix, output_hidden_states=True).hidden_states
        mine = local_forward(tower, pix)
        # how far the training forward is from the HF forward (relative, hidden state -2)
        res["local_forward_error"] = ((mine[-2] - hs[-2]).norm(dim=-1) / hs[-2].norm(dim=-1)).max().item()
        col, shp, cen = (torch.from_numpy(np.stack([t[k] for t in val])) for k in ("colour", "shape", "centre"))
        z = heads.dense(heads.norm(hs[-2][:, 1:]))
        res.update(_acc(z, col, shp, (cen > 0) & (shp > 0)))
        img = [torch.from_numpy(np.stack(x)) for x in zip(*(crop_image_targets(t, 0, 0, GRID) for t in val))]
        zc = heads.cls(tower.post_layernorm(hs[-1][:, 0]))
        pres = img[0]
        res["cls_recall"] = ((zc[:, : len(PAIRS)] > 0).float() == pres)[pres > 0].float().mean().item()
        res["cls_precision"] = (pres[zc[:, : len(PAIRS)] > 0] > 0).float().mean().item() if (zc[:, : len(PAIRS)] > 0).any() else float("nan")
        obj = shp > 0
        res["object_patch_share"] = obj.float().mean().item()
        for layer in (0, 20, 21, 22, 23):
            a = cls_attention(tower, hs[layer], layer)
            top = a.topk(64, dim=-1).indices
            res[f"cls_top64_on_objects_L{layer}"] = obj.gather(1, top).float().mean().item()
    tower.train()
    log("A report (validation, full images) " + json.dumps({k: round(v, 3) for k, v in res.items()}))
    return res


# --- stage B ----------------------------------------------------------------------------------


def tower_features(tower, pix: torch.Tensor, bs: int = 16) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(pix), bs):
            outs.append(tower(pixel_values=pix[i : i + bs], output_hidden_states=True).hidden_states[-2][:, 1:])
    return torch.cat(outs)


def object_masks(scene: S.Scene, grow: bool = True) -> np.ndarray:
    """(n_objects, 576) bool: per object, the patches its pixels fall in, grown by one patch unless
    `grow` is False (a LLaVA-1.5 scene; an object drawn over by a later one keeps only its visible pixels)."""
    _, lab = scene.render(labels=True)
    lab = lab.reshape(GRID, 14, GRID, 14)
    core = np.stack([(lab == i + 1).any(axis=(1, 3)).flatten() for i in range(len(scene.objects))]) if scene.objects else np.zeros((0, N_PATCH), bool)
    return grow_masks(core) if grow else core


def grow_masks(core: np.ndarray) -> np.ndarray:
    """(n, 576) bool patch masks, each grown by one patch in every direction (diagonals included)."""
    m = core.reshape(-1, GRID, GRID)
    g = np.pad(m, ((0, 0), (1, 1), (1, 1)))
    grown = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            grown |= g[:, dy : dy + GRID, dx : dx + GRID]
    return grown.reshape(-1, N_PATCH)


def next_object_masks(scene: S.Scene) -> tuple[np.ndarray, list[dict]]:
    """A LLaVA-NeXT scene's objects on its packed image tokens (`pack_image_features`, default
    strategy): the base image (the scene resized to 336 x 336, 24 x 24 patches, first), then the crop
    canvas row by row, each row followed by one `image_newline`. The scenes are 672 x 336 or 336 x 672,
    a pinpoint each, so the canvas is the scene at its own scale (no resize, no padding): canvas patch
    (r, c) is pixels [14r, 14r + 14) x [14c, 14c + 14); base patch (r, c) covers [r H/24, (r+1) H/24) x
    [c W/24, (c+1) W/24). Returns (core (n_objects, n_tokens) bool: the tokens an object's visible
    pixels fall in, in both views; per object {"base": centre token or None, "canvas": centre token or
    None}, the token nearest each view's centroid of the object)."""
    _, lab = scene.render(labels=True)
    H, W = lab.shape
    if H % 14 or W % 14 or H % GRID or W % GRID:
        raise ValueError(f"next_object_masks: a {W}x{H} scene is not a 14-pixel multiple of the 24-patch base grid")
    gh, gw = H // 14, W // 14
    n = len(scene.objects)
    n_tok = N_PATCH + gh * (gw + 1)
    core = np.zeros((n, n_tok), bool)
    centres = []
    for i in range(n):
        o = lab == i + 1
        base = o.reshape(GRID, H // GRID, GRID, W // GRID).any(axis=(1, 3))
        canvas = np.zeros((gh, gw + 1), bool)
        canvas[:, :gw] = o.reshape(gh, 14, gw, 14).any(axis=(1, 3))
        core[i, :N_PATCH] = base.flatten()
        core[i, N_PATCH:] = canvas.flatten()
        cb, cc = _centre(base.flatten(), GRID), _centre(canvas.flatten(), gw + 1)
        centres.append({"base": cb, "canvas": None if cc is None else N_PATCH + cc})
    return core, centres


def object_mask(scene: S.Scene) -> np.ndarray:
    """(576,) bool: patches any object pixel falls in, grown by one patch (a LLaVA-1.5 scene)."""
    return object_masks(scene).any(axis=0)


def curriculum_keep(masks, idx, p_bg: float, rng: random.Random):
    """Per image: every object patch (grown by one) and each background patch with probability p_bg."""
    if p_bg >= 1.0 or masks is None:
        return None
    out = []
    for j in idx:
        m = masks[j]
        out.append(torch.tensor([i for i in range(N_PATCH) if m[i] or rng.random() < p_bg], dtype=torch.long))
    return out


def subset_example(scene: S.Scene, omasks: np.ndarray, k_max: int, p_bg: float, rng: random.Random):
    """The object curriculum of stage B: the LLM sees the tokens of at most `k_max` of the scene's
    objects (a random subset of 1..k_max, each object's patches grown by one) and each background
    patch (one no object touches) with probability `p_bg`; the questions are asked about the scene
    reduced to those objects, so every answer is read off tokens the LLM sees. Returns (kept token
    indices, reduced scene); (None, scene) when the scene has no more than `k_max` objects and every
    background patch is kept."""
    n = len(scene.objects)
    if n <= k_max and p_bg >= 1.0:
        return None, scene
    chosen = sorted(rng.sample(range(n), rng.randint(1, min(n, k_max)))) if n > k_max else list(range(n))
    bg = ~omasks.any(axis=0)
    keep = omasks[chosen].any(axis=0) | (bg & (np.array([rng.random() for _ in range(N_PATCH)]) < p_bg))
    reduced = dataclasses.replace(scene, objects=tuple(scene.objects[i] for i in chosen))
    return torch.from_numpy(np.nonzero(keep)[0]).long(), reduced


def _spread(core: np.ndarray, objs: list[int]):
    """Uniform target over the patches of objects `objs`, or the word itself when there are none."""
    m = np.nonzero(core[objs].any(axis=0))[0] if objs else np.zeros(0, dtype=np.int64)
    if not len(m):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0), 1.0
    return torch.from_numpy(m).long(), torch.full((len(m),), 1.0 / len(m)), 0.0


def lookup_target(scene: S.Scene, asked: S.Scene, q: S.Question, core: np.ndarray, centres=None):
    """Where the question's words should look in decoder layer 0 (the supervised look-up of stage B):
    (shape-word target, colour-word target or None), each (original patch indices, their weights,
    weight on the word itself). The shape word looks at every object of its kind that the LLM sees
    (colour questions: the one object; none: the word itself); for "how many", at each such object's
    centre patch and at itself, 1/(n+1) each, so the share left on the word says how many. The colour
    word (presence, side) looks at every object of its colour. `core`: `object_masks(scene,
    grow=False)`, or a LLaVA-NeXT scene's `next_object_masks` core (token positions after the image
    start); `centres`: per object, the token positions that stand for it in a count (default: the
    centre patch of its `core` row on the 24 x 24 grid); `asked`: the scene the question was asked
    about (`scene` or a reduced copy)."""
    seen = [next(i for i, o in enumerate(scene.objects) if o is a) for a in asked.objects]
    kind, colour = question_words(q)
    same = [i for i in seen if scene.objects[i].shape == kind]
    if q.type == "count":
        if centres is None:
            idx = [c for c in (_centre(core[i]) for i in same) if c is not None]
        else:
            idx = [c for i in same for c in centres[i]]
        n = len(idx)
        shape_t = (torch.tensor(idx, dtype=torch.long), torch.full((n,), 1.0 / (n + 1)), 1.0 / (n + 1))
    else:
        shape_t = _spread(core, same)
    colour_t = _spread(core, [i for i in seen if scene.objects[i].colour == colour]) if colour else None
    return shape_t, colour_t


def _centre(mask: np.ndarray, width: int = GRID):
    """The patch of `mask` (a row-major grid `width` patches wide, flattened) nearest its centroid
    (None if empty)."""
    ii = np.nonzero(mask)[0]
    if not len(ii):
        return None
    y, x = ii // width, ii % width
    d = (y - y.mean()) ** 2 + (x - x.mean()) ** 2
    return int(ii[d.argmin()])


def cache(tower, proc, scene_list, next_: bool):
    """Per scene: frozen layer -2 patch features (n_crops, 576, d) and the (H, W) image size."""
    feats, sizes = [], []
    for i in range(0, len(scene_list), 16):
        chunk = scene_list[i : i + 16]
        if next_:
            for s in chunk:
                pv = proc.image_processor(images=s.render(), return_tensors="pt")
                feats.append(tower_features(tower, pv["pixel_values"][0]))
                sizes.append((s.height, s.width))
        else:
            pix = torch.from_numpy(np.stack([pixels(s.render()) for s in chunk]))
            f = tower_features(tower, pix)
            feats.extend(f[:, None])
            sizes.extend((s.height, s.width) for s in chunk)
    return feats, sizes


def question_words(q: S.Question) -> tuple[str, str | None]:
    """(the kind a question names, singular, and its colour or None)."""
    words = q.text.rstrip("?").split()
    kind = next(k for k in S.SHAPES if k in words or S.plural(k) in words)
    return kind, next((c for c in S.COLOURS if c in words), None)


def conjunction(scene: S.Scene, q: S.Question) -> bool:
    """Whether presence question `q` names a colour and a kind that are both in `scene` (on
    different objects when the answer is "no"): the case a model that does not bind colour to shape
    gets wrong (docs/TRAINED.md, eighth attempt)."""
    kind, colour = question_words(q)
    return any(o.shape == kind for o in scene.objects) and any(o.colour == colour for o in scene.objects)


def sample_questions(scene: S.Scene, rng: random.Random, per_type: int = 2, hard: float = 0.0) -> list[S.Question]:
    """`per_type` questions of each type about `scene`: presence yes/no drawn 50/50 (a "no" is, with
    probability `hard`, one whose colour and kind are both in the scene, when there is one: `conjunction`),
    count answers spread over 0..MAX_COUNT."""
    qs = S.all_questions(scene)
    out = []
    for t in S.QUESTION_TYPES:
        cand = list(qs[t])
        for _ in range(per_type):
            if not cand:
                break
            c = cand
            if t == "presence":
                want = rng.choice(["yes", "no"])
                c = [q for q in cand if q.answer == want] or cand
                if want == "no" and hard > 0 and rng.random() < hard:
                    c = [q for q in c if q.answer == "no" and conjunction(scene, q)] or c
            elif t == "count":
                target = rng.randint(0, S.MAX_COUNT)
                gap = min(abs(int(q.answer) - target) for q in cand)
                c = [q for q in cand if abs(int(q.answer) - target) == gap]
            q = rng.choice(c)
            cand.remove(q)
            out.append(q)
    rng.shuffle(out)
    return out


SHAPE_WORDS = set(S.SHAPES) | {S.plural(k) for k in S.SHAPES}


class Seq:
    """Token ids with the image span at a fixed place and labels on the answers.

    With `aux`, the answer's first token is also the target at every question position from the
    shape word on (the rest of the question is never supervised, LLaVA-style): this trains the
    look-up "which object does this word name, what colour / where / how many" at the word itself,
    one hop, before the answer position learns to read it from there. Off for evaluation."""

    def __init__(self, tok, aux: bool = False):
        self.tok = tok
        self.aux = aux
        self.ids = {}

    def enc(self, text: str) -> list[int]:
        if text not in self.ids:
            self.ids[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.ids[text]

    def build(self, questions, n_img: int):
        """(ids, labels); `self.marks` then holds, per question, (answer position, shape-word
        position, colour-word position or None) in the ids; `self.image_start` the first image position."""
        eos = self.tok.eos_token_id
        img = self.tok.convert_tokens_to_ids("<image>")
        ids = self.enc("USER:") + [img] * n_img
        self.image_start = len(self.enc("USER:"))
        self.marks = []
        labels = [-100] * len(ids)
        for j, q in enumerate(questions):
            p = self.enc(("" if j == 0 else "USER: ") + q.text + " ASSISTANT:")
            a = self.enc(q.answer) + [eos]
            words = self.tok.convert_ids_to_tokens(p)
            kw = max(i for i, w in enumerate(words) if w in SHAPE_WORDS)
            cw = [i for i, w in enumerate(words) if w in S.COLOURS]
            self.marks.append((len(ids) + len(p) - 1, len(ids) + kw, len(ids) + cw[-1] if cw else None))
            lab = [-100] * len(p)
            if self.aux:
                for t in range(kw + 1, len(p)):
                    lab[t] = a[0]
            ids += p + a
            labels += lab + a
        return ids, labels


def image_embeds(model, feats, sizes, next_: bool, keep=None):
    """Projected (and, for NeXT, packed) features of each cached image: list of (n_tokens, hidden);
    `keep` (per image, optional): indices of the tokens to keep (the stage B curriculum)."""
    base = model.model
    out = []
    for i, (f, hw) in enumerate(zip(feats, sizes)):
        if keep is not None and keep[i] is not None:
            out.append(base.multi_modal_projector(f[0, keep[i]]))
            continue
        p = base.multi_modal_projector(f)
        if next_:
            packed, _ = base.pack_image_features([p], torch.tensor([hw]), "default", image_newline=base.image_newline)
            out.append(packed[0])
        else:
            out.append(p[0])
    return out


def attention_rows(layer, h: torch.Tensor, b: int, qpos, rotary) -> torch.Tensor:
    """(heads, len(qpos), L) causal attention of decoder `layer` in batch row `b` at query positions
    `qpos` (an int or a list), from the layer's input hidden states `h` (B, L, D): recomputed from
    q/k for those rows only (right-padded rows, positions 0..L-1; padding keys are never attended
    to from a real query position, since they come after it). An int `qpos` gives (heads, qpos + 1)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    single = isinstance(qpos, int)
    qp = torch.tensor([qpos] if single else list(qpos), dtype=torch.long)
    L = int(qp.max()) + 1
    attn = layer.self_attn
    d = attn.head_dim
    x = layer.input_layernorm(h[b : b + 1, :L])
    k = attn.k_proj(x).view(1, L, -1, d).transpose(1, 2)
    q = attn.q_proj(x[:, qp]).view(1, len(qp), -1, d).transpose(1, 2)
    cos, sin = rotary(x, torch.arange(L)[None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, qp], sin[:, qp])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2))[0] * attn.scaling  # heads, n, L
    scores = scores.masked_fill(torch.arange(L)[None, :] > qp[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1)
    return out[:, 0] if single else out


def attention_loss(base, hs, seq_marks, image_starts, targets, keep) -> torch.Tensor:
    """Supervised attention, two hops. Decoder layer 0: each question's shape word looks its objects
    up (query heads of KV head 0) and its colour word, when it has one, looks its colour up (KV head
    1), as `lookup_target` says. Layer 1, at the answer position (the last prompt token): KV head 0's
    query heads find the shape word, KV head 1's the colour word. The other layers and heads are
    free. `targets`: per row, per question, `lookup_target`'s pair. Cross-entropy of each target
    distribution against the attention, averaged; the mean attention mass on each target is kept in
    `attention_loss.masses`. Both look-ups read raw word embeddings (layer 0), which is what makes
    them quick to learn: a look-up in layer 1 whose query had to be assembled by layer 0 stayed at
    0.3 of its target after 240 steps on oracle features; these reach 0.6-0.7 (look-ups) and 0.99
    (find the words) within 200."""
    layers = base.language_model.layers
    rotary = base.language_model.rotary_emb
    cfg = layers[0].self_attn.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    terms = []
    parts = {"shape look-up": [], "colour look-up": [], "find words": []}

    def xent(att, idx, w, w_self, self_pos, start):
        logp = torch.log(att + 1e-6)
        ce = -(logp[:, start + idx] * w).sum(-1) - w_self * logp[:, self_pos]
        mass = att[:, start + idx].sum(-1) + (att[:, self_pos] if w_self > 0 else 0.0)
        return (ce / (w.sum() + w_self)).mean(), mass.mean().item()

    for b, (marks, start, tg) in enumerate(zip(seq_marks, image_starts, targets)):
        pos_of = None
        if keep is not None and keep[b] is not None:
            pos_of = torch.full((N_PATCH,), -1, dtype=torch.long)
            pos_of[keep[b]] = torch.arange(len(keep[b]))
        qpos = sorted({m[1] for m in marks} | {m[2] for m in marks if m[2] is not None})
        col = {p: i for i, p in enumerate(qpos)}
        A0 = attention_rows(layers[0], hs[0], b, qpos, rotary)
        A1 = attention_rows(layers[1], hs[1], b, [m[0] for m in marks], rotary)
        for j, ((ans, kw, cw), t) in enumerate(zip(marks, tg)):
            terms.append(-torch.log(A1[:g, j, kw] + 1e-6).mean())
            found = [A1[:g, j, kw].mean().item()]
            if cw is not None:
                terms.append(-torch.log(A1[g : 2 * g, j, cw] + 1e-6).mean())
                found.append(A1[g : 2 * g, j, cw].mean().item())
            parts["find words"].append(float(np.mean(found)))
            if t is None:
                continue
            for name, tt, pos, heads in (("shape look-up", t[0], kw, slice(0, g)), ("colour look-up", t[1], cw, slice(g, 2 * g))):
                if tt is None or pos is None:
                    continue
                idx, w, w_self = tt
                if pos_of is not None:
                    p = pos_of[idx]
                    idx, w = p[p >= 0], w[p >= 0]
                if w.sum() + w_self <= 0:
                    continue
                ce, mass = xent(A0[heads, col[pos]], idx, w, w_self, pos, start)
                terms.append(ce)
                parts[name].append(mass)
    attention_loss.masses = {k: float(np.mean(v)) if v else float("nan") for k, v in parts.items()}
    return torch.stack(terms).mean() if terms else torch.zeros(())


def lm_loss(model, tok, seqb, feats, sizes, qsets, next_: bool, first_only: bool = False, keep=None, att=None):
    """Teacher-forced loss over answer tokens; with `first_only`, also the argmax hits of turn 1's answer.
    `att` = (weight, targets): adds `weight` x `attention_loss` (targets: per row, per question, the
    original patch indices of the objects the answer depends on, or None)."""
    embeds = image_embeds(model, feats, sizes, next_, keep)
    rows, labs, marks, starts = [], [], [], []
    for e, qs in zip(embeds, qsets):
        ids, lab = seqb.build(qs, e.shape[0])
        rows.append(ids)
        labs.append(lab)
        marks.append(seqb.marks)
        starts.append(seqb.image_start)
    L = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, L), tok.pad_token_id)
    labels = torch.full((B, L), -100)
    am = torch.zeros(B, L, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(lab)
        am[i, : len(r)] = 1
    base = model.model
    x = base.get_input_embeddings()(ids)
    img_id = tok.convert_tokens_to_ids("<image>")
    mask = ids == img_id
    x = x.masked_scatter(mask[..., None].expand_as(x), torch.cat(embeds).to(x.dtype))
    out = base.language_model(inputs_embeds=x, attention_mask=am, output_hidden_states=att is not None)
    h = out.last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(h[:, :-1][sel])
    loss = F.cross_entropy(logits, tgt[sel])
    lm_loss.last = (loss.item(), float("nan"))
    if att is not None and att[0] > 0:
        a_loss = attention_loss(base, out.hidden_states, marks, starts, att[1], keep)
        lm_loss.last = (loss.item(), a_loss.item())
        loss = loss + att[0] * a_loss
    hits = None
    if first_only:
        # first supervised position of each row = the first answer token of turn 1
        first = sel.float().argmax(1)
        lg = model.lm_head(h[torch.arange(B), first])
        hits = (lg.argmax(-1) == tgt[torch.arange(B), first]).tolist()
    return loss, hits


def evaluate_fast(model, tok, seqb, feats, sizes, val_q, next_: bool, bs: int = 8):
    """First-answer-token accuracy per type on (scene index, question) pairs (= greedy's first token)."""
    model.eval()
    res = {t: [] for t in S.QUESTION_TYPES}
    with torch.no_grad():
        for i in range(0, len(val_q), bs):
            chunk = val_q[i : i + bs]
            _, hits = lm_loss(
                model, tok, seqb, [feats[j] for j, _ in chunk], [sizes[j] for j, _ in chunk], [[q] for _, q in chunk], next_, True
            )
            for (_, q), h in zip(chunk, hits):
                res[q.type].append(h)
    model.train()
    return {t: float(np.mean(v)) if v else float("nan") for t, v in res.items()}


def init_lookup(model, tok, feats, scene_list, scale: float = 2.0, word_scale: float = 5.0) -> None:
    """Start the LLM with the look-up it has to learn already in place (stage B, from scratch only).

    From the projected features of cached training patches: the direction that sets each shape's
    patches apart (class mean minus the mean of all patches, orthonormalised per attribute), and
    the same for colours. Shape words (and plurals) and colour words are embedded as fresh
    orthonormal codes orthogonal to those directions; in decoder layer 0, KV head 0's key rows read
    the shape directions and its query heads' rows read the shape-word codes, KV head 1 the same for
    colours, all in the low-frequency RoPE pairs (which barely rotate over a few hundred positions).
    So at initialisation "circle" attends to circle patches and not to itself (its key is zero).
    Decoder layer 1 gets word-finding heads (below). Everything stays trainable."""
    proj = model.model.multi_modal_projector
    emb = model.model.get_input_embeddings().weight
    cfg = model.config.text_config
    d_model = cfg.hidden_size
    hd = d_model // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    low = [i for i in range(hd) if (i % (hd // 2)) >= hd // 4]  # the slower half of the RoPE pairs
    with torch.no_grad():
        P = torch.cat([proj(f[0]) for f in feats])
        t = [scene_targets(sc) for sc in scene_list]
        col = torch.from_numpy(np.concatenate([x["colour"] for x in t]))
        shp = torch.from_numpy(np.concatenate([x["shape"] for x in t]))
        obj = shp > 0
        objectness = P[obj].mean(0) - P.mean(0)
        unit = lambda v: v / v.norm(dim=-1, keepdim=True)
        # per attribute: what sets each value's patches apart from the other objects' patches, and
        # what sets object patches apart from the background
        sets = [
            (list(S.SHAPES), unit(torch.stack([P[shp == SHAPE_IDX[k]].mean(0) - P[obj].mean(0) for k in S.SHAPES]))),
            (list(S.COLOURS), unit(torch.stack([P[col == COLOUR_IDX[c]].mean(0) - P[obj].mean(0) for c in S.COLOURS]))),
        ]
        span = torch.linalg.qr(torch.cat([m for _, m in sets] + [objectness[None]]).T)[0]
        g = torch.Generator().manual_seed(0)
        r = torch.randn(d_model, sum(len(n) for n, _ in sets) + 1, generator=g)
        codes = torch.linalg.qr(r - span @ (span.T @ r))[0].T  # orthonormal, orthogonal to every direction
        norm = P.norm(dim=-1).mean()
        u = codes[-1]  # a "constant" direction every ordinary token gets: the word-finding heads' query
        for i in range(emb.shape[0]):
            emb[i] += u * emb[i].norm()
        proj.linear_2.bias += u * norm
        attn = model.model.language_model.layers[0].self_attn
        off = 0
        for kv, (names, dvec) in enumerate(sets):
            if kv >= cfg.num_key_value_heads:
                break
            code = codes[off : off + len(names)]
            off += len(names)
            for i, n in enumerate(names):
                for w in {n, S.plural(n)} if n in S.SHAPES else {n}:
                    emb[tok.convert_tokens_to_ids(w)] = code[i] * norm
            kw, qw = torch.zeros(hd, d_model), torch.zeros(hd, d_model)
            n = len(names)
            kw[low[:n]], kw[low[n]] = dvec, unit(objectness)
            qw[low[:n]], qw[low[n]] = code * scale, code.sum(0) * scale
            attn.k_proj.weight[kv * hd : (kv + 1) * hd] = kw
            for h in range(kv * groups, (kv + 1) * groups):
                attn.q_proj.weight[h * hd : (h + 1) * hd] = qw
        # decoder layer 1: word-finding heads. KV head 0's key reads the shape-word flag (the sum of the
        # shape codes; image tokens and other words have none of it) and its queries read u, which
        # every ordinary token carries: the question's last tokens attend to the shape word, where
        # layer 0 put the looked-up content (0.4 of the last token's attention at init on oracle
        # features, against 0.02 for the recency head this replaces). KV head 1: the same for colour words.
        att1 = model.model.language_model.layers[1].self_attn
        off = 0
        for kv, (names, _) in enumerate(sets[: cfg.num_key_value_heads]):
            flag = unit(codes[off : off + len(names)].sum(0))
            off += len(names)
            kw, qw = torch.zeros(hd, d_model), torch.zeros(hd, d_model)
            kw[hd // 2 - 1] = word_scale * flag  # the slowest RoPE pair: no decay over the image span
            qw[hd // 2 - 1] = word_scale * u
            att1.k_proj.weight[kv * hd : (kv + 1) * hd] = kw
            for h in range(kv * groups, (kv + 1) * groups):
                att1.q_proj.weight[h * hd : (h + 1) * hd] = qw


def init_projector(model, feats) -> None:
    """Start the projector as a per-channel standardisation of the tower's layer -2 features (from
    cached training features), then GELU, then the identity. The features' mean vector is 94 % of
    their norm (measured on the stage A tower: norm 120, mean 114, object patches differ from the
    mean by 129, background by 28), so with the default std-0.02 init every image token is, after
    the LLM's RMSNorm, nearly the same vector and the look-up has little to match on."""
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-3)
        proj.linear_1.weight.copy_(torch.diag(1.0 / sd))
        proj.linear_1.bias.copy_(-mu / sd)
        proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0], proj.linear_2.weight.shape[1]))
        proj.linear_2.bias.zero_()




def align_projector(model, feats, scene_list, steps: int = 300, val=None) -> dict:
    """LLaVA's stage-1 alignment, with the scenes' labels instead of captions: fit a linear read-out of
    the cached layer -2 features to each patch's colour, shape and object-centre labels (the stage A
    targets), and start the projector as that read-out: outputs 0-6 the colour, 7-12 the shape
    (GELU of logits scaled so a confident class is about 1), 13 the centre, 48-63 the position code
    (features' position channels / P_RES, passed through GELU's near-linear range), the rest zero. The
    LLM then starts from tokens that say what they show, in the layout of the oracle features its
    recipe was checked on (docs/TRAINED.md, third attempt). Returns the read-out's accuracy on `val`
    ((feats, scenes), optional) or on the fitting scenes."""
    d_in = feats[0].shape[-1]
    proj = model.model.multi_modal_projector
    d_out = proj.linear_1.weight.shape[0]

    def data(fs, scs):
        x = torch.cat([f.reshape(-1, d_in) for f in fs])
        ts = [scene_targets(sc) for sc in scs]
        col, shp, cen = (torch.from_numpy(np.concatenate([t[k] for t in ts])) for k in ("colour", "shape", "centre"))
        return x, col, shp, cen

    x, col, shp, cen = data(feats, scene_list)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-3)
    lin = nn.Linear(d_in, N_DENSE)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = dense_loss(lin((x - mu) / sd), col, shp, cen, (cen > 0) & (shp > 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        if val is not None:
            x, col, shp, cen = data(*val)
        z = lin((x - mu) / sd)
        acc = _acc(z, col, shp, (cen > 0) & (shp > 0))
        top = torch.cat([z[:, :7].max(-1).values, z[:, 7:13].max(-1).values]).median().clamp_min(1e-3)
        w = lin.weight / sd / top
        b = (lin.bias - lin.weight @ (mu / sd)) / top
        proj.linear_1.weight.zero_()
        proj.linear_1.bias.zero_()
        proj.linear_1.weight[:N_DENSE, :] = w
        proj.linear_1.bias[:N_DENSE] = b
        eye = torch.eye(NPOS) / P_RES
        proj.linear_1.weight[d_out - NPOS :, d_in - NPOS :] = eye
        proj.linear_1.bias[d_out - NPOS :] = 8.0  # GELU(x + 8) - 8 ~ x on the code's range (about -5.5..5.5)
        proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0], d_out))
        proj.linear_2.bias.zero_()
        proj.linear_2.bias[d_out - NPOS :] = -8.0
    log("B projector aligned; read-out on " + ("validation" if val is not None else "fitting") + " patches " + json.dumps({k: round(v, 3) for k, v in acc.items()}))
    return acc


VO_LAYERS = 2  # the decoder layers attention_loss supervises
PROJ_CONST = 1.0  # the fitted projector's constant channel for a learned LLM (`--proj-init 3`)


def init_value_paths(model, scale: float = 1.0, n_layers: int = VO_LAYERS, same_slices: bool = True, aligned: bool = False) -> None:
    """Decoder layers 0..n_layers-1 (the supervised hops): each KV head's value rows an orthonormal
    16-dim slice of the residual and every query head's output the transpose (scaled by
    scale / heads per KV head), so a head copies what it attends to into the residual from the
    start. With `same_slices`, every layer uses the same slices, so what layer 0's KV head k writes
    is exactly what layer 1's KV head k reads (with independent slices a hop passes on about a
    quarter of it). With std-0.02 value and output weights, a 2-hop path (patch -> word -> answer
    position) carries ~1e-2 of its signal and its readout is learnt hundreds of steps later (measured
    on oracle features: at the answer prior through 600 steps, against 200 with this)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        Q = None
        for layer in model.model.language_model.layers[:n_layers]:
            at = layer.self_attn
            hd = at.head_dim
            d_model = at.o_proj.weight.shape[0]
            n_kv = at.v_proj.weight.shape[0] // hd
            n_q = at.o_proj.weight.shape[1] // hd
            if aligned:
                # KV head 0: channels 0-15 (align_projector's colour / shape / centre), the last KV
                # head: the last 16 (the position code); others: the slices in between
                Q = torch.eye(d_model)
                order = list(range(n_kv))
                if n_kv > 1:
                    order = [0] + list(range(1, n_kv - 1)) + [d_model // hd - 1]
                Q = torch.cat([Q[:, o * hd : (o + 1) * hd] for o in order] + [Q[:, : d_model - n_kv * hd]], 1)
            elif Q is None or not same_slices:
                Q = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))[0]
            for kv in range(n_kv):
                at.v_proj.weight[kv * hd : (kv + 1) * hd] = Q[:, kv * hd : (kv + 1) * hd].T
            for h in range(n_q):
                kv = h // (n_q // n_kv)
                at.o_proj.weight[:, h * hd : (h + 1) * hd] = Q[:, kv * hd : (kv + 1) * hd] * (scale / (n_q // n_kv))


def freeze_tower(model):
    """Stage B: the vision tower in eval mode without gradients; returns it."""
    tower = model.model.vision_tower
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower


def learned_param_groups(model, args) -> list[dict]:
    """AdamW parameter groups of the learned stage B: every trainable parameter outside the tower (a
    frozen projector, `--proj-init 3`, is left out), each group with its learning-rate multiplier
    `mult`. The supervised look-ups' queries and keys (decoder layers 0..VO_LAYERS-1) learn at
    `qk_lr_b` x the rate: a look-up that puts most of its mass on ~10 of 600 tokens needs logits ~6
    apart, far from AdamW's ~lr-per-weight steps from a std-0.02 start (at 1x the shape look-up
    stalled at 0.34 of its target; at 10x it passes 0.6 within 100 steps). The layers above them
    (`deep`) can start later (`deep_start_b`) and at `deep_lr_b` x the rate: AdamW moves each of their
    zero-initialised residual branches by ~lr per weight per step from step 0, and 14 such layers add
    noise to the residual stream before the hops below them have formed."""
    layers = model.model.language_model.layers
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower") and p.requires_grad]
    deep_ids = {id(p) for layer in layers[VO_LAYERS:] for p in layer.parameters()}
    qk_ids = {id(w) for layer in layers[:VO_LAYERS] for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)}
    special = deep_ids | qk_ids
    groups = [
        dict(params=[p for p in params if id(p) not in special], mult=1.0),
        dict(params=[p for p in params if id(p) in qk_ids], mult=getattr(args, "qk_lr_b", None) or 1.0),
        dict(params=[p for p in params if id(p) in deep_ids], mult=getattr(args, "deep_lr_b", 1.0), deep=True),
    ]
    return [g for g in groups if g["params"]]


def stage_b(model, tok, proc, args, rng: random.Random, next_: bool):
    variant = "llava_next" if next_ else "llava15"
    tower = freeze_tower(model)
    t0 = time.time()
    train_sc = S.scenes("train", args.cache_b, variant, seed=args.seed + 1)
    val_sc = S.scenes("val", args.val_b, variant, seed=args.seed)
    feats, sizes = cache(tower, proc, train_sc, next_)
    vfeats, vsizes = cache(tower, proc, val_sc, next_)
    val_q = S.eval_questions(val_sc)
    objects_step = getattr(args, "objects_step", 0)
    att_w = getattr(args, "att_b", 0.0) or 0.0
    need = att_w > 0 or (not next_ and (objects_step or args.bg_start < 1.0))
    count_view = getattr(args, "count_view", "canvas")
    lookup_view = getattr(args, "lookup_view", "both")

    def cores_of(scs):
        """Per scene: (core object masks, count centres per object or None), one render each."""
        if not next_:
            return [(object_masks(sc, grow=False), None) for sc in scs]
        out = []
        for sc in scs:
            core, cen = next_object_masks(sc)
            # the other view's tokens are no target of the shape / colour look-ups
            if lookup_view == "base":
                core[:, N_PATCH:] = False
            elif lookup_view == "canvas":
                core[:, :N_PATCH] = False
            views = ("base", "canvas") if count_view == "both" else (count_view,)
            out.append((core, [[c[v] for v in views if c[v] is not None] for c in cen]))
        return out

    cores = cores_of(train_sc) if need else None
    omasks = [grow_masks(c) for c, _ in cores] if need and not next_ else None
    masks = None if next_ or args.bg_start >= 1.0 else [m.any(axis=0) for m in omasks]
    vo = getattr(args, "vo_init", 0.0) if not next_ else 0.0
    if not next_ and args.zero_init_b:
        # residual branches of the fresh LLM start at zero (a 16-layer stack that trains like a shallow
        # one), except the attention of the layers init_value_paths sets: their read-out path must not
        # start as a product of zero matrices
        with torch.no_grad():
            for j, layer in enumerate(model.model.language_model.layers):
                if not (vo and j < VO_LAYERS):
                    layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    proj_init = getattr(args, "proj_init", 0)
    if proj_init == 1 and not next_:
        init_projector(model, feats[:200])
    elif proj_init == 2 and not next_:
        align_projector(model, feats[: args.align_scenes], train_sc[: args.align_scenes], val=(vfeats, val_sc))
    elif proj_init == 3 and not next_:
        # LLaVA's stage 1 as a supervised fit: the projector becomes the one-vs-rest read-out of the
        # patch labels (one-hot colour / shape / centre tokens, circuit.fit_projector) with a constant
        # channel of PROJ_CONST. The compiled LLM wants 16 there (it pins its RMSNorms); a learned one
        # cannot read content riding on it (after RMSNorm the one-hot bits are 1/16 of the token and
        # colour stayed at chance through 400 steps; with 1 it is learnt in 300, docs "Seventh attempt")
        from . import circuit

        circuit.fit_projector(model, feats[: args.align_scenes], train_sc[: args.align_scenes], val=(vfeats, val_sc), log=log, const=PROJ_CONST)
    if proj_init == 3:
        # the projector stays as fitted (LLaVA-NeXT: as the LLaVA-1.5 model it starts from has it)
        for p in model.model.multi_modal_projector.parameters():
            p.requires_grad_(False)
    if args.lookup_init and not next_:
        init_lookup(model, tok, feats[: args.lookup_scenes], train_sc[: args.lookup_scenes])
        log("B look-up initialisation done")
    if vo:
        init_value_paths(model, vo, aligned=getattr(args, "vo_aligned", 0) and proj_init == 2)
    log(f"B cached {len(feats)} train + {len(vfeats)} val images in {time.time() - t0:.0f}s")
    groups = learned_param_groups(model, args)
    in_groups = {id(p) for g in groups for p in g["params"]}
    params = [p for p in model.parameters() if id(p) in in_groups]  # model order: clip_grad_norm_ sums in it
    deep_start = int(getattr(args, "deep_start_b", 0.0) * args.steps_b)
    opt = torch.optim.AdamW(
        groups,
        lr=args.lr_b,
        weight_decay=0.01,
        betas=(0.9, 0.98),
    )

    stream = None
    if getattr(args, "stream_b", 0):

        def _fresh(start):  # the training scenes after the cached ones, in chunks
            while True:
                yield from S.scenes("train", 256, variant, seed=args.seed + 1, start=start)
                start += 256

        stream = _fresh(len(train_sc))
    seqb = Seq(tok, aux=args.aux_b)
    model.train()
    steps, bs = args.steps_b, args.batch_b
    order = []
    hist, masses = [], []
    t1 = time.time()
    for step in range(steps):
        lr = args.lr_b * min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.97 + 0.03)
        for g in opt.param_groups:
            g["lr"] = 0.0 if g.get("deep") and step < deep_start else lr * g["mult"]
        if stream is not None:
            # fresh scenes every step (no scene is seen twice, so the LLM cannot fit a cache): render,
            # run the frozen tower, and append them to the lists the steps index
            fresh = [next(stream) for _ in range(bs)]
            f, z = cache(tower, proc, fresh, next_)
            idx = list(range(len(feats), len(feats) + bs))
            feats += f
            sizes += z
            train_sc += fresh
            if need:
                cores += cores_of(fresh)
                if omasks is not None:
                    omasks += [grow_masks(c) for c, _ in cores[-bs:]]
                if masks is not None:
                    masks += [m.any(axis=0) for m in omasks[-bs:]]
        else:
            if len(order) < bs:
                perm = list(range(len(feats)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:bs], order[bs:]
        # curriculum: early steps see every object patch but few background patches (the answer-bearing
        # tokens are a larger share, so the look-up is found sooner); from `bg_full` of the run on, all
        p_bg = args.bg_start + (1.0 - args.bg_start) * min(1.0, step / max(1.0, args.bg_full * steps))
        if objects_step and not next_:
            # object curriculum: at most 1 + step // objects_step objects' tokens, questions about those
            k_max = 1 + step // objects_step
            sub = [subset_example(train_sc[j], omasks[j], k_max, p_bg, rng) for j in idx]
            keep = [k for k, _ in sub]
            keep = None if all(k is None for k in keep) else [k if k is not None else torch.arange(N_PATCH) for k in keep]
            asked = [sc for _, sc in sub]
        else:
            asked = [train_sc[j] for j in idx]
            keep = curriculum_keep(masks, idx, p_bg, rng)
        qsets = [sample_questions(sc, rng, args.per_type, args.hard_presence) for sc in asked]
        att = None
        if att_w > 0:
            att = (att_w, [[lookup_target(train_sc[j], sc, q, *cores[j]) for q in qs] for j, sc, qs in zip(idx, asked, qsets)])
        loss, _ = lm_loss(model, tok, seqb, [feats[j] for j in idx], [sizes[j] for j in idx], qsets, next_, keep=keep, att=att)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append(lm_loss.last[0])  # the answer loss, without the attention term
        if att:
            masses.append(attention_loss.masses)
        if step % 10 == 0 or step == steps - 1:
            m = {k: round(float(np.nanmean([x[k] for x in masses[-10:]])), 3) for k in masses[-1]} if masses else {}
            log(f"B {step}/{steps} loss {np.mean(hist[-10:]):.3f} lr {lr:.2e} background kept {p_bg:.2f}" + (f" attention on target {json.dumps(m)}" if m else "") + f" {time.time() - t1:.0f}s")
        if (step + 1) % args.eval_every == 0 or step == steps - 1:
            acc = evaluate_fast(model, tok, Seq(tok), vfeats, vsizes, val_q, next_)  # no auxiliary targets
            log("B val first-token accuracy", json.dumps({k: round(v, 3) for k, v in acc.items()}), f"mean {np.mean(list(acc.values())):.3f}")
    model.eval()
    return model


def single_turn_loss(model, tok, feats, sizes, scene_list, idx, rng: random.Random, next_: bool):
    """The answer loss on single-question prompts (`USER: <image>\n{q} ASSISTANT: {a}</s>`), one
    question of each type about each scene in `idx` (the compiled circuit answers one question per
    prompt, as `vtprune compare`, the demo and the lmms-eval task ask them)."""
    rows_f, rows_s, rows_q = [], [], []
    for j in idx:
        for q in sample_questions(scene_list[j], rng, 1):
            rows_f.append(feats[j])
            rows_s.append(sizes[j])
            rows_q.append([q])
    loss, _ = lm_loss(model, tok, Seq(tok), rows_f, rows_s, rows_q, next_)
    return loss


def stage_b_compiled(model, tok, proc, args, rng: random.Random, next_: bool):
    """Stage B by construction (`circuit`): fit the projector to the patch labels (llava15), write the
    LLM's look-up circuit (`circuit.compile_llm`), then train projector + LLM with the answer loss for
    `--steps-b` steps (single-question prompts, AdamW without weight decay)."""
    from . import circuit

    variant = "llava_next" if next_ else "llava15"
    tower = freeze_tower(model)
    t0 = time.time()
    train_sc = S.scenes("train", args.fit_scenes, variant, seed=args.seed + 1)
    val_sc = S.scenes("val", args.val_b, variant, seed=args.seed)
    # training features: the projector's fit (llava15) and the answer-loss steps
    need = len(train_sc) if (not next_ or args.steps_b) else min(args.count_scenes, len(train_sc))
    feats, sizes = cache(tower, proc, train_sc[:need], next_) if need else ([], [])
    vfeats, vsizes = cache(tower, proc, val_sc, next_)
    log(f"B cached {len(feats)} train + {len(vfeats)} val images in {time.time() - t0:.0f}s")
    if not next_:
        circuit.fit_projector(model, feats, train_sc, val=(vfeats, val_sc), log=log)
    circuit.compile_llm(model, tok, centres_per_object=args.centres_b)
    if args.count_scenes:
        calibrate_count(model, tok, feats[: args.count_scenes], sizes[: args.count_scenes], train_sc[: args.count_scenes], next_)
    val_q = S.eval_questions(val_sc)
    acc = evaluate_fast(model, tok, Seq(tok), vfeats, vsizes, val_q, next_)
    log("B compiled: val first-token accuracy", json.dumps({k: round(v, 3) for k, v in acc.items()}), f"mean {np.mean(list(acc.values())):.3f}")
    if args.steps_b:
        params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
        opt = torch.optim.AdamW(params, lr=args.lr_b, weight_decay=0.0)
        model.train()
        t1 = time.time()
        hist = []
        for step in range(args.steps_b):
            idx = [rng.randrange(len(feats)) for _ in range(args.batch_b)]
            loss = single_turn_loss(model, tok, feats, sizes, train_sc, idx, rng, next_)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            hist.append(loss.item())
            if step % 10 == 0 or step == args.steps_b - 1:
                log(f"B {step}/{args.steps_b} loss {np.mean(hist[-10:]):.3f} {time.time() - t1:.0f}s")
        model.eval()
        acc = evaluate_fast(model, tok, Seq(tok), vfeats, vsizes, val_q, next_)
        log("B trained: val first-token accuracy", json.dumps({k: round(v, 3) for k, v in acc.items()}), f"mean {np.mean(list(acc.values())):.3f}")
    model.eval()
    return acc


def count_shares(model, tok, feats, sizes, scene_list, next_: bool, bs: int = 8):
    """Every count question of every scene (`scenes.all_questions`): the count look-up's sink share as
    the last layer's MLP reads it (relative to the constant channel), the true count, and whether
    `scenes.eval_questions` asks that question (its answer mix). Arrays (share, count, asked)."""
    from . import circuit

    asked = {(i, q.text) for i, q in S.eval_questions(scene_list, types=("count",))}
    pairs = [(i, q) for i, sc in enumerate(scene_list) for q in S.all_questions(sc)["count"]]
    store = []
    hook = model.model.language_model.layers[-1].post_attention_layernorm.register_forward_hook(lambda m, i, o: store.append(o.detach()))
    seqb = Seq(tok)
    share, count, ask = [], [], []
    try:
        with torch.no_grad():
            for k in range(0, len(pairs), bs):
                chunk = pairs[k : k + bs]
                store.clear()
                lm_loss(model, tok, seqb, [feats[i] for i, _ in chunk], [sizes[i] for i, _ in chunk], [[q] for _, q in chunk], next_)
                h = store[-1]
                n_img = [e.shape[0] for e in image_embeds(model, [feats[i] for i, _ in chunk], [sizes[i] for i, _ in chunk], next_)]
                for r, ((i, q), n) in enumerate(zip(chunk, n_img)):
                    seqb.build([q], n)
                    pos = seqb.marks[0][0]  # the last prompt token: it predicts the answer
                    share.append((h[r, pos, circuit.R_CNT] / h[r, pos, circuit.C_ONE]).item())
                    count.append(int(q.answer))
                    ask.append((i, q.text) in asked)
    finally:
        hook.remove()
    return np.array(share), np.array(count), np.array(ask)


MIN_PER_COUNT = 5  # calibrate_count: questions per answer 0..4 needed to fit the thresholds


def calibrate_count(model, tok, feats, sizes, scene_list, next_: bool) -> dict:
    """Fit the last MLP's count thresholds (`circuit.fit_count_thresholds`) to the sink shares the
    count look-up gives on training scenes, every count question weighted to the answer mix that
    `eval_questions` asks (which spreads the answers over 0..4). With fewer than MIN_PER_COUNT
    questions for some answer (or no valid fit) the compiled thresholds stay. Returns what it measured."""
    from . import circuit

    share, count, ask = count_shares(model, tok, feats, sizes, scene_list, next_)
    k = S.MAX_COUNT + 1
    p_all = np.bincount(count, minlength=k) / len(count)
    p_ask = np.bincount(count[ask], minlength=k) / max(ask.sum(), 1)
    weight = (p_ask / np.maximum(p_all, 1e-9))[count]
    before = circuit.count_thresholds(model)
    per_class = np.bincount(count, minlength=k)
    thetas, slope = before, float("nan")
    if per_class.min() >= MIN_PER_COUNT:
        fit, slope = circuit.fit_count_thresholds(share, count, weight, init=before)
        try:
            circuit.set_count_thresholds(model, fit)  # validates before it writes
            thetas = fit
        except ValueError:
            pass
    if thetas is before:
        log(f"B count thresholds: compiled ones kept (questions per answer 0..{k - 1}: {per_class.tolist()}, fewer than {MIN_PER_COUNT} or no valid fit)")

    def acc(th, m):
        if not m.any():
            return float("nan")
        pred = sum((share[m] < t).astype(int) for t in th)
        return float((pred == count[m]).mean())

    every = np.ones(len(share), bool)
    res = dict(
        questions=int(len(share)),
        compiled=[round(t, 4) for t in before],
        fitted=[round(t, 4) for t in thetas],
        slope=round(slope, 2),
        train_acc_compiled=round(acc(before, every), 3),
        train_acc_fitted=round(acc(thetas, every), 3),
        train_acc_asked_compiled=round(acc(before, ask), 3),
        train_acc_asked_fitted=round(acc(thetas, ask), 3),
        class_mean_share=[round(float(share[count == c].mean()), 3) if (count == c).any() else None for c in range(k)],
    )
    log("B count thresholds " + json.dumps(res))
    return res


STEPS_COMPILED = 0  # compiled stage B: answer-loss steps after the circuit is written
LR_COMPILED = 1e-5
CENTRES_NEXT = 2


# --- main -------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["llava15", "llava_next"], default="llava15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", help="llava15 model dir to start from (required for llava_next; skips stage A for llava15)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads; 2 (default): the one-shot recipe for both variants in 57 min on an idle 2-vCPU machine (docs/TRAINED.md, Reproduction); 1 is slower (about 85-90 min) but was what reproduced the earlier compiled recipe bit for bit on its CPU; another thread count sums in another order, like another CPU")
    ap.add_argument("--scenes-a", type=int, default=2000, help="training scenes rendered for stage A")
    ap.add_argument("--steps-a1", type=int, default=1500, help="A1: steps of the neighbour layers (0-7) on whole images")
    ap.add_argument("--batch-a1", type=int, default=8, help="whole images per A1 step")
    ap.add_argument("--lr-a", type=float, default=3e-3)
    ap.add_argument("--steps-a2", type=int, default=150, help="A2: steps of all 24 layers on whole images, with the CLS objective")
    ap.add_argument("--batch-a2", type=int, default=8, help="whole images per A2 step")
    ap.add_argument("--lr-a2", type=float, default=1e-3)
    ap.add_argument("--steps-a3", type=int, default=1200, help="A3: steps of the last encoder layer alone on the image-level CLS objective (layers 0-22 frozen; 0 = skip)")
    ap.add_argument("--scenes-a3", type=int, default=600, help="A3: training scenes whose last-layer inputs are cached")
    ap.add_argument("--lr-a3", type=float, default=3e-3)
    ap.add_argument("--a3-init", choices=["own", "layer22"], default="own", help="A3 starts the last layer from stage A's own weights (default, the shipped recipe) or from a copy of layer 22 (experimental: steadier CLS mass on objects, weaker GlobalCom²; docs/TRAINED.md)")
    ap.add_argument("--a3-on-init", action="store_true", help="llava15 with --init: run A3 on the loaded tower (by default --init keeps its tower as it is)")
    ap.add_argument("--val-a", type=int, default=40, help="validation scenes for the stage A report")
    ap.add_argument("--stage-b", choices=["learned", "compiled"], default="learned", help="learned (default): fitted projector (frozen, constant channel PROJ_CONST), then the LLM trained from scratch on LLaVA-style conversations with supervised attention on its two look-up hops (docs/TRAINED.md, seventh attempt); compiled: fitted projector + the LLM circuit written by construction (circuit.py), then --steps-b answer-loss steps (default 0)")
    ap.add_argument("--fit-scenes", type=int, default=200, help="compiled stage B: cached training scenes the projector is fitted on and the LLM trained on")
    ap.add_argument("--count-scenes", type=int, default=None, help="compiled stage B: training scenes whose count questions the count thresholds are fitted on (calibrate_count; default 200, llava_next 100; 0 = the compiled thresholds)")
    ap.add_argument("--centres-b", type=int, default=None, help="compiled stage B: centre tokens per object the count look-up expects (default 1; llava_next: base image + crops)")
    ap.add_argument("--steps-b", type=int, default=None)
    ap.add_argument("--batch-b", type=int, default=None)
    ap.add_argument("--lr-b", type=float, default=None)
    ap.add_argument("--bg-start", type=float, default=None, help="share of background patches kept at the start of stage B (1 = no curriculum)")
    ap.add_argument("--bg-full", type=float, default=0.6, help="fraction of stage B after which every patch is kept")
    ap.add_argument("--lookup-init", type=int, default=0, help="start the LLM with word/patch similarity heads (init_lookup)")
    ap.add_argument("--lookup-scenes", type=int, default=200)
    ap.add_argument("--att-b", type=float, default=None, help="weight of the supervised attention loss (attention_loss; default 1, llava_next 0: its targets on the AnyRes layout, next_object_masks, did not help, docs/TRAINED.md eighth attempt; 0 = off)")
    ap.add_argument("--hard-presence", type=float, default=None, help="learned stage B: share of the presence 'no' questions drawn from those whose colour and kind are both in the scene (train.conjunction; default 0.5 for llava15, which builds the colour-shape binding, docs/TRAINED.md ninth step; llava_next 0; 0 = drawn like the rest)")
    ap.add_argument("--lookup-view", choices=["both", "base", "canvas"], default="both", help="llava_next attention supervision: the view whose object tokens the shape and colour words' look-ups (all but count questions) are taught to find")
    ap.add_argument("--count-view", choices=["canvas", "base", "both"], default="canvas", help="llava_next attention supervision: the view whose object centres a count question's look-up is taught to find (canvas = the crops, the scene at its own scale)")
    ap.add_argument("--vo-init", type=float, default=1.0, help="value/output init of decoder layers 0-1 (init_value_paths; 0 = off)")
    ap.add_argument("--vo-aligned", type=int, default=0, help="init_value_paths copies align_projector's channels (colour/shape/centre, position) instead of random slices")
    ap.add_argument("--proj-init", type=int, default=3, help="learned stage B, projector: 3 = the one-vs-rest read-out of the patch labels (circuit.fit_projector, constant channel PROJ_CONST), frozen (default); 2 = fitted by align_projector and trained; 1 = a standardisation of the features (init_projector); 0 = random")
    ap.add_argument("--align-scenes", type=int, default=200, help="cached scenes align_projector fits on")
    ap.add_argument("--objects-step", type=int, default=0, help="object curriculum: the LLM sees at most 1 + step // N objects' tokens (0 = off)")
    ap.add_argument("--deep-start-b", type=float, default=0.0, help="fraction of stage B before the decoder layers above the supervised hops train")
    ap.add_argument("--deep-lr-b", type=float, default=1.0, help="learning-rate multiplier of those layers")
    ap.add_argument("--zero-init-b", type=int, default=1, help="zero-init the LLM's residual branches (all but the attention init_value_paths sets)")
    ap.add_argument("--aux-b", type=int, default=1, help="answer targets from the shape word on (1) or on the answer only (0)")
    ap.add_argument("--per-type", type=int, default=4, help="questions per type in each training conversation")
    ap.add_argument("--cache-b", type=int, default=None, help="training scenes whose features are cached (with --stream-b: those align_projector fits on)")
    ap.add_argument("--stream-b", type=int, default=None, help="learned stage B on fresh scenes every step (tower run per step) after the cached ones (default 1 for llava15, 0 for llava_next: 120 cached scenes; 0 = the cache only)")
    ap.add_argument("--qk-lr-b", type=float, default=None, help="learned stage B: learning-rate multiplier of the supervised look-up layers' queries and keys (decoder layers 0-1; default 10, llava_next 1: it fine-tunes look-ups that are already learnt)")
    ap.add_argument("--val-b", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--tower-only", action="store_true", help="stop after stage A (saves the model with an untrained LLM)")
    args = ap.parse_args(argv)
    next_ = args.variant == "llava_next"
    args.bg_start = args.bg_start if args.bg_start is not None else (1.0 if next_ else 0.05)
    if args.stage_b == "compiled":
        args.steps_b = args.steps_b if args.steps_b is not None else STEPS_COMPILED
        args.batch_b = args.batch_b or 8
        args.lr_b = args.lr_b or LR_COMPILED
        args.centres_b = args.centres_b or (CENTRES_NEXT if next_ else 1)
    else:
        args.steps_b = args.steps_b or (150 if next_ else 800)
        args.batch_b = args.batch_b or (4 if next_ else 8)
        args.lr_b = args.lr_b or (1e-3 if next_ else 2e-3)
        args.qk_lr_b = args.qk_lr_b or (1.0 if next_ else 10.0)
        args.att_b = (0.0 if next_ else 1.0) if args.att_b is None else args.att_b
    args.stream_b = int(not next_) if args.stream_b is None else args.stream_b
    args.hard_presence = (0.0 if next_ else 0.5) if args.hard_presence is None else args.hard_presence
    args.cache_b = args.cache_b or (120 if next_ else args.align_scenes if args.stream_b else 1000)
    args.val_b = args.val_b or (40 if next_ else 100)
    args.count_scenes = (100 if next_ else 200) if args.count_scenes is None else args.count_scenes
    args.eval_every = args.eval_every or (50 if next_ else 200)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    tok = build_tokenizer()
    proc = build_processor(tok, next_)
    model = build_model(tok, next_)
    if args.init:
        from transformers import AutoModelForImageTextToText

        src = AutoModelForImageTextToText.from_pretrained(args.init, dtype=torch.float32)
        state = src.state_dict()
        if args.stage_b == "learned" and not next_:
            # a learned LLaVA-1.5 stage B takes only the tower; projector and LLM start fresh
            state = {k: v for k, v in state.items() if k.startswith("model.vision_tower.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        log(f"init from {args.init}; new parameters: " + (str(missing) if len(missing) <= 5 else f"{len(missing)} (projector and LLM)"))
        if next_:
            with torch.no_grad():
                model.model.image_newline.normal_(0, 1.0 / math.sqrt(TEXT["hidden_size"]))
        del src
    elif next_:
        ap.error("--variant llava_next needs --init <trained llava15 dir> (the tower is shared)")
    else:
        stage_a(model.model.vision_tower, args, rng)
        log(f"stage A done in {time.time() - t0:.0f}s")
    if not next_ and args.steps_a3 and (not args.init or args.a3_on_init):
        stage_a3(model.model.vision_tower, args)
        log(f"stage A3 done at {time.time() - t0:.0f}s")
    if not args.tower_only:
        # stage B has its own seeds, so "A then B" in one run equals "--tower-only" then "--init"
        torch.manual_seed(args.seed + 1000)
        b = stage_b_compiled if args.stage_b == "compiled" else stage_b
        b(model, tok, proc, args, random.Random(args.seed + 1000), next_)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    meta = {"variant": args.variant, "seed": args.seed, "seconds": round(time.time() - t0), "args": vars(args)}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"saved to {args.out} after {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
