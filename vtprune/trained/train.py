"""Train vtprune's small LLaVA-architecture models on `vtprune.scenes` (CPU, from a seed).

    python -m vtprune.trained.train --variant llava15 --seed 0 --out DIR          # stages A + B
    python -m vtprune.trained.train --variant llava_next --seed 0 --out DIR2 --init DIR
                                                                                  # NeXT: reuses DIR's tower,
                                                                                  # fine-tunes projector + LLM

Stage A (llava15 only) trains the CLIP-shaped tower (24 layers, patch 14, 336 px, width 64, 4 heads)
on rendered scenes: dense per-patch targets (colour, shape, object centre) on the feature layer LLaVA
reads (hidden state -2) and an image-level objective on the CLS token (multi-label colour x shape
presence and per-shape counts, read from the post-layernorm CLS of the last layer, as CLIP's pooled
output, and from the CLS of layers 20-22). Position channels, neighbour-looking heads in layers 0-5
and zero residual branches at initialisation, and a window -> crop -> full-image curriculum make a
ViT learn shapes in CPU minutes (see the comment above `position_code`). A quarter of the images are
LLaVA-NeXT scenes squashed to 336x336 (what the NeXT base image looks like), so the same tower serves
both variants.

Stage B freezes the tower, caches its layer -2 patch features for a fixed set of training scenes,
and trains the projector and a small Llama (16 layers, width 64, RoPE theta 1e6, word-level
tokenizer built from `vtprune.scenes.corpus()`) LLaVA-style: multi-turn conversations about one
image, loss on the answer tokens (and the end-of-turn token), plus supervised attention
(`attention_loss`: in decoder layer 0 the question's shape and colour words attend to the patches of
the objects they name, in layer 1 the answer position attends to those words; targets from the
scene labels), a value/output initialisation of those two layers (`init_value_paths`) and auxiliary
answer targets; optional: a look-up initialisation (`init_lookup`), a background-token and an object
curriculum. The NeXT variant starts
from the LLaVA-1.5 model's projector and LLM and fine-tunes them on AnyRes features (base + two 336
crops, HF's own `pack_image_features`, a trained `image_newline`).

Status (docs/TRAINED.md): stage A learns; stage B with supervised attention learns every question
type on oracle features, but not yet on the tower's features, so no weights ship.

Everything is seeded; fp32; `--threads` (default 2) sets torch's intra-op threads.
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
# 2-core CPU can show it in minutes (the first recipe: shape at chance after 2,640 images). Three
# things make it learn shapes in minutes here, none of which changes the architecture:
#   * position in its own 16 channels (2-D sin-cos at 4 frequencies, one of them coarse), content in
#     the other channels;
#   * the first `LOCAL_LAYERS` layers start as "convolutions": each head's query is the rotated
#     position code of one neighbour (left / right / up / down, then the diagonals), its key the
#     position code itself, so at initialisation head h of layer 0 looks at the patch next to it;
#   * every residual branch starts at zero (attention out_proj, MLP fc2), so the 24-layer tower
#     starts as the identity and trains like a shallow one;
# and a curriculum: A1 trains the first `A1_LAYERS` layers on 5x5-patch windows around objects
# (26 tokens: hundreds of windows per second), A2 all 24 layers on 12x12-patch crops with the
# image-level objective on the CLS token, A3 all layers on full 336 px images.
# All weights stay trainable throughout; the initialisation is only a starting point.

NPOS = 16  # position channels (the last NPOS of the hidden size)
OMEGA = (math.pi / 24, 0.9, 2.3, 2.8)  # per axis: one coarse (monotone over the grid) + 3 fine frequencies
LOCAL_LAYERS = 6
OFFSETS = (((0, -1), (0, 1), (-1, 0), (1, 0)), ((-1, -1), (-1, 1), (1, -1), (1, 1)))
LOCAL_BETA = 8.0  # ~0.7 of a head's attention on its neighbour at initialisation
A1_LAYERS = 8
WIN = 5
CLS_LAYERS = (20, 21, 22)  # encoder layers whose CLS output is also trained on the image-level target
N_DENSE = 7 + 6 + 1  # colour (0 = none), shape (0 = none), object centre


def position_code(grid: int = GRID) -> torch.Tensor:
    """(grid*grid, NPOS): [sin y, cos y, sin x, cos x] at the OMEGA frequencies."""
    w = torch.tensor(OMEGA)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    out = []
    for c in (ys.flatten(), xs.flatten()):
        out += [(c[:, None] * w).sin(), (c[:, None] * w).cos()]
    return torch.cat(out, 1)


def _shift(oy: int, ox: int) -> torch.Tensor:
    """(NPOS, NPOS) rotation with code(p) -> code(p + (oy, ox)), so q . k peaks at the neighbour."""
    m = torch.zeros(NPOS, NPOS)
    for axis, o in ((0, oy), (1, ox)):
        for f, w in enumerate(OMEGA):
            si, ci, b = axis * 8 + f, axis * 8 + 4 + f, w * o
            m[si, si], m[si, ci], m[ci, si], m[ci, ci] = math.cos(b), math.sin(b), -math.sin(b), math.cos(b)
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
    d = tower.config.hidden_size
    hd = d // tower.config.num_attention_heads
    assert hd >= NPOS and tower.config.num_attention_heads == 4
    emb = tower.embeddings
    with torch.no_grad():
        init_patch_embedding(emb.patch_embedding)
        emb.patch_embedding.weight[d - NPOS :] = 0
        emb.class_embedding[d - NPOS :] = 0
        pe = emb.position_embedding.weight
        pe.zero_()
        pe[1:, d - NPOS :] = position_code()
        for i, layer in enumerate(tower.encoder.layers):
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
            if i < LOCAL_LAYERS:
                _local_heads(layer, i, d, hd)


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
            k.weight[h * hd : h * hd + NPOS, d - NPOS :] = torch.eye(NPOS)


def pin_positions(tower) -> None:
    """Keep the last NPOS channels of the tower's residual stream an exact position code: the patch
    embedding, class embedding and every layer's residual writes (attention out_proj, MLP fc2) leave
    them at zero, the position embedding holds `position_code()`, and pre_layrnorm passes them
    through unscaled. Applied at initialisation and after every stage A step. Without it, training
    writes patch content into these channels (rms 1.26 against a code of rms 0.7 after stage A's 3,440 steps)
    and the neighbour heads go from local to uniform over the 576 patches: their 3x3 mass on full
    images fell to 0.02-0.05, and the patches lost the context that tells a shape's edge patch from
    another's (per-patch shape 0.97 on 5x5 windows, 0.38 on whole images; 0.49 with this). Pinning
    the neighbour heads' queries and keys as well (position-only attention in layers 0-7) did not
    help: 0.31 on whole images after the windows, 0.60 after 150 whole-image steps against 0.68."""
    d = tower.config.hidden_size
    emb = tower.embeddings
    with torch.no_grad():
        emb.patch_embedding.weight[d - NPOS :] = 0
        if emb.patch_embedding.bias is not None:
            emb.patch_embedding.bias[d - NPOS :] = 0
        emb.class_embedding[d - NPOS :] = 0
        pe = emb.position_embedding.weight
        pe[0, d - NPOS :] = 0
        pe[1:, d - NPOS :] = position_code()
        tower.pre_layrnorm.weight[d - NPOS :] = 1.0
        tower.pre_layrnorm.bias[d - NPOS :] = 0.0
        for layer in tower.encoder.layers:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight[d - NPOS :] = 0
                lin.bias[d - NPOS :] = 0


def tower_forward(tower, pix: torch.Tensor, ids: torch.Tensor, n_layers: int = 24) -> list[torch.Tensor]:
    """Hidden states of the tower on patches `pix` (B, 3, h, w) whose grid indices are `ids` (B, n),
    row-major; equals the HF forward's hidden_states when the patches are the whole image."""
    emb = tower.embeddings
    p = emb.patch_embedding(pix).flatten(2).transpose(1, 2)
    cls = (emb.class_embedding + emb.position_embedding.weight[0]).expand(p.shape[0], 1, -1)
    x = tower.pre_layrnorm(torch.cat([cls, p + emb.position_embedding(ids + 1)], 1))
    hs = [x]
    for layer in tower.encoder.layers[:n_layers]:
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
    d = tower.config.hidden_size
    init_tower(tower)
    pin = getattr(args, "pin_positions", 0)
    if pin:
        pin_positions(tower)
    heads = Heads(d)
    pool = S.scenes("train", args.scenes_a * 3 // 4, "llava15", seed=args.seed) + S.scenes("train", args.scenes_a // 4, "llava_next", seed=args.seed)
    rng.shuffle(pool)
    t0 = time.time()
    data = [scene_targets(s) for s in pool]
    log(f"A rendered {len(data)} training scenes in {time.time() - t0:.0f}s")
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a, weight_decay=0.05, betas=(0.9, 0.98))

    def local_step(pix, ids, col, shp, cen, isc, step, steps):
        # one step of the first A1_LAYERS layers (A1 windows, A1b whole images): dense targets at
        # layer A1_LAYERS, auxiliary ones at a quarter and half of it
        hs = tower_forward(tower, pix, ids, A1_LAYERS)
        z = heads.dense(heads.norm(hs[-1][:, 1:]))
        loss = dense_loss(z, col, shp, cen, isc)
        for head, layer in zip(heads.aux, (A1_LAYERS // 4, A1_LAYERS // 2)):
            loss = loss + 0.3 * dense_loss(head(hs[layer][:, 1:]), col, shp, None)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if pin:
            pin_positions(tower)
        meter.add(step, steps, loss=loss.item(), **_acc(z, col, shp, isc))

    # A1: the first A1_LAYERS layers on WIN x WIN windows, centred on an object's centre patch or random
    meter = Meter("A1", 100)
    for step in range(args.steps_a1):
        for g in opt.param_groups:
            g["lr"] = _lr(args.lr_a, step, args.steps_a1 + args.steps_a2)
        wins = []
        while len(wins) < args.batch_a1:
            t = data[rng.randrange(len(data))]
            for c in t["centres"] + [rng.randrange(N_PATCH)]:
                gy, gx = divmod(c, GRID)
                y0, x0 = min(max(gy - WIN // 2, 0), GRID - WIN), min(max(gx - WIN // 2, 0), GRID - WIN)
                ids = np.array([(y0 + y) * GRID + x0 + x for y in range(WIN) for x in range(WIN)])
                wins.append((pixels(t["img"][y0 * 14 : (y0 + WIN) * 14, x0 * 14 : (x0 + WIN) * 14]), ids, t["colour"][ids], t["shape"][ids], t["centre"][ids], ids == c))
        pix, ids, col, shp, cen, isc = (torch.from_numpy(np.stack(z)) for z in zip(*wins[: args.batch_a1]))
        isc = isc & (shp > 0)
        local_step(pix, ids, col, shp, cen, isc, step, args.steps_a1)

    # A1b (optional): the same layers on whole images. Window-trained features lose most of their
    # shape accuracy there (0.97 -> 0.49 with pinned positions): a 5x5 window never shows the layers
    # what lies beyond +-2 patches. This step trains them in the context the tower sees at inference;
    # it recovers to ~0.7 and flattens (docs/TRAINED.md, "Fourth attempt").
    meter = Meter("A1b", 50)
    for step in range(args.steps_a1b):
        for g in opt.param_groups:
            g["lr"] = _lr(args.lr_a_1b, step, args.steps_a1b, warm=10)
        batch = [data[rng.randrange(len(data))] for _ in range(args.batch_a1b)]
        pix = torch.from_numpy(np.stack([pixels(t["img"]) for t in batch]))
        col, shp, cen = (torch.from_numpy(np.stack([t[k] for t in batch])) for k in ("colour", "shape", "centre"))
        isc = (cen > 0) & (shp > 0)
        ids = torch.arange(N_PATCH)[None].expand(len(batch), -1)
        local_step(pix, ids, col, shp, cen, isc, step, args.steps_a1b)

    # A2 (crops) and A3 (full images): all layers; dense targets on hidden state -2 (what LLaVA reads),
    # image-level targets on the CLS of layers CLS_LAYERS and the pooled output of the last layer
    def full_step(step, steps, n, bs, meter, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        y0, x0 = rng.randint(0, GRID - n), rng.randint(0, GRID - n)
        ids1 = np.array([(y0 + y) * GRID + x0 + x for y in range(n) for x in range(n)])
        batch = [data[rng.randrange(len(data))] for _ in range(bs)]
        pix = torch.from_numpy(np.stack([pixels(t["img"][y0 * 14 : (y0 + n) * 14, x0 * 14 : (x0 + n) * 14]) for t in batch]))
        col, shp, cen = (torch.from_numpy(np.stack([t[k][ids1] for t in batch])) for k in ("colour", "shape", "centre"))
        img = [torch.from_numpy(np.stack(z)) for z in zip(*(crop_image_targets(t, y0, x0, n) for t in batch))]
        isc = (cen > 0) & (shp > 0)
        hs = tower_forward(tower, pix, torch.from_numpy(ids1)[None].expand(bs, -1))
        z = heads.dense(heads.norm(hs[-2][:, 1:]))
        loss = dense_loss(z, col, shp, cen, isc)
        loss = loss + 0.3 * dense_loss(heads.aux[1](hs[A1_LAYERS][:, 1:]), col, shp, None)
        zc = heads.cls(tower.post_layernorm(hs[-1][:, 0]))
        loss = loss + image_loss(zc, *img)
        for head, layer in zip(heads.cls_mid, CLS_LAYERS):
            loss = loss + 0.5 * image_loss(head(hs[layer + 1][:, 0]), *img)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if pin:
            pin_positions(tower)
        with torch.no_grad():
            pres, pmask = img[0], img[1]
            hit = ((zc[:, : len(PAIRS)] > 0).float() == pres) & (pmask > 0)
            rec = hit[pres > 0].float().mean().item() if (pres > 0).any() else float("nan")
        meter.add(step, steps, loss=loss.item(), cls_recall=rec, **_acc(z, col, shp, isc))

    meter = Meter("A2", 25)
    for step in range(args.steps_a2):
        full_step(step, args.steps_a2, 12, args.batch_a2, meter, _lr(args.lr_a, args.steps_a1 + step, args.steps_a1 + args.steps_a2))
    meter = Meter("A3", 10)
    for step in range(args.steps_a3):
        full_step(step, args.steps_a3, GRID, args.batch_a3, meter, _lr(0.3 * args.lr_a, step, args.steps_a3, warm=5))
    tower_report(tower, heads, [scene_targets(s) for s in S.scenes("val", args.val_a, "llava15", seed=args.seed)])
    return tower


def cls_attention(tower, hs, layer: int) -> torch.Tensor:
    """Head-mean attention of the CLS query over the patches at encoder `layer` (B, 576)."""
    from ..patches.clip import cls_logits

    block = tower.encoder.layers[layer]
    h = block.layer_norm1(hs[layer])
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
            a = cls_attention(tower, hs, layer)
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


def lookup_target(scene: S.Scene, asked: S.Scene, q: S.Question, core: np.ndarray):
    """Where the question's words should look in decoder layer 0 (the supervised look-up of stage B):
    (shape-word target, colour-word target or None), each (original patch indices, their weights,
    weight on the word itself). The shape word looks at every object of its kind that the LLM sees
    (colour questions: the one object; none: the word itself); for "how many", at each such object's
    centre patch and at itself, 1/(n+1) each, so the share left on the word says how many. The colour
    word (presence, side) looks at every object of its colour. `core`: `object_masks(scene,
    grow=False)`; `asked`: the scene the question was asked about (`scene` or a reduced copy)."""
    seen = [next(i for i, o in enumerate(scene.objects) if o is a) for a in asked.objects]
    words = q.text.rstrip("?").split()
    kind = next(k for k in S.SHAPES if k in words or S.plural(k) in words)
    colour = next((c for c in S.COLOURS if c in words), None)
    same = [i for i in seen if scene.objects[i].shape == kind]
    if q.type == "count":
        idx = [c for c in (_centre(core[i]) for i in same) if c is not None]
        n = len(idx)
        shape_t = (torch.tensor(idx, dtype=torch.long), torch.full((n,), 1.0 / (n + 1)), 1.0 / (n + 1))
    else:
        shape_t = _spread(core, same)
    colour_t = _spread(core, [i for i in seen if scene.objects[i].colour == colour]) if colour else None
    return shape_t, colour_t


def _centre(mask: np.ndarray):
    """The patch of `mask` (576,) nearest its centroid (None if empty)."""
    ii = np.nonzero(mask)[0]
    if not len(ii):
        return None
    y, x = ii // GRID, ii % GRID
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


def sample_questions(scene: S.Scene, rng: random.Random, per_type: int = 2) -> list[S.Question]:
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


VO_LAYERS = 2  # the decoder layers attention_loss supervises


def init_value_paths(model, scale: float = 1.0, n_layers: int = VO_LAYERS, same_slices: bool = True) -> None:
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
            if Q is None or not same_slices:
                Q = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))[0]
            for kv in range(n_kv):
                at.v_proj.weight[kv * hd : (kv + 1) * hd] = Q[:, kv * hd : (kv + 1) * hd].T
            for h in range(n_q):
                kv = h // (n_q // n_kv)
                at.o_proj.weight[:, h * hd : (h + 1) * hd] = Q[:, kv * hd : (kv + 1) * hd] * (scale / (n_q // n_kv))


def stage_b(model, tok, proc, args, rng: random.Random, next_: bool):
    variant = "llava_next" if next_ else "llava15"
    tower = model.model.vision_tower
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    train_sc = S.scenes("train", args.cache_b, variant, seed=args.seed + 1)
    val_sc = S.scenes("val", args.val_b, variant, seed=args.seed)
    feats, sizes = cache(tower, proc, train_sc, next_)
    vfeats, vsizes = cache(tower, proc, val_sc, next_)
    val_q = S.eval_questions(val_sc)
    objects_step = getattr(args, "objects_step", 0)
    att_w = getattr(args, "att_b", 0.0) if not next_ else 0.0
    need = not next_ and (objects_step or args.bg_start < 1.0 or att_w > 0)
    cores = [object_masks(sc, grow=False) for sc in train_sc] if need else None  # one render per scene
    omasks = [grow_masks(c) for c in cores] if need else None
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
    if getattr(args, "proj_init", 0) and not next_:
        init_projector(model, feats[:200])
    if args.lookup_init and not next_:
        init_lookup(model, tok, feats[: args.lookup_scenes], train_sc[: args.lookup_scenes])
        log("B look-up initialisation done")
    if vo:
        init_value_paths(model, vo)
    log(f"B cached {len(feats)} train + {len(vfeats)} val images in {time.time() - t0:.0f}s")
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    # the decoder layers above the supervised hops can start later and at a lower rate: AdamW moves
    # each of their zero-initialised residual branches by ~lr per weight per step from step 0, and
    # 14 such layers add noise to the residual stream before the hops below them have formed
    deep_ids = {id(p) for j, layer in enumerate(model.model.language_model.layers) if j >= VO_LAYERS for p in layer.parameters()}
    deep_start = int(getattr(args, "deep_start_b", 0.0) * args.steps_b)
    deep_lr = getattr(args, "deep_lr_b", 1.0)
    opt = torch.optim.AdamW(
        [dict(params=[p for p in params if id(p) not in deep_ids], mult=1.0), dict(params=[p for p in params if id(p) in deep_ids], mult=deep_lr, deep=True)],
        lr=args.lr_b,
        weight_decay=0.01,
        betas=(0.9, 0.98),
    )

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
        qsets = [sample_questions(sc, rng, args.per_type) for sc in asked]
        att = None
        if att_w > 0:
            att = (att_w, [[lookup_target(train_sc[j], sc, q, cores[j]) for q in qs] for j, sc, qs in zip(idx, asked, qsets)])
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


# --- main -------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["llava15", "llava_next"], default="llava15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", help="llava15 model dir to start from (required for llava_next; skips stage A for llava15)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scenes-a", type=int, default=2000, help="training scenes rendered for stage A")
    ap.add_argument("--steps-a1", type=int, default=3000)
    ap.add_argument("--batch-a1", type=int, default=64, help="5x5-patch windows per A1 step")
    ap.add_argument("--pin-positions", type=int, default=1, help="keep the tower's position channels exact during stage A (pin_positions)")
    ap.add_argument("--steps-a1b", type=int, default=0, help="A1b: the first layers on whole images after the windows")
    ap.add_argument("--batch-a1b", type=int, default=4, help="whole images per A1b step")
    ap.add_argument("--lr-a-1b", type=float, default=1e-3)
    ap.add_argument("--steps-a2", type=int, default=400)
    ap.add_argument("--batch-a2", type=int, default=16, help="12x12-patch crops per A2 step")
    ap.add_argument("--steps-a3", type=int, default=40)
    ap.add_argument("--batch-a3", type=int, default=8, help="full images per A3 step")
    ap.add_argument("--lr-a", type=float, default=3e-3)
    ap.add_argument("--val-a", type=int, default=40, help="validation scenes for the stage A report")
    ap.add_argument("--steps-b", type=int, default=None)
    ap.add_argument("--batch-b", type=int, default=None)
    ap.add_argument("--lr-b", type=float, default=None)
    ap.add_argument("--bg-start", type=float, default=None, help="share of background patches kept at the start of stage B (1 = no curriculum)")
    ap.add_argument("--bg-full", type=float, default=0.6, help="fraction of stage B after which every patch is kept")
    ap.add_argument("--lookup-init", type=int, default=0, help="start the LLM with word/patch similarity heads (init_lookup)")
    ap.add_argument("--lookup-scenes", type=int, default=200)
    ap.add_argument("--att-b", type=float, default=1.0, help="weight of the supervised attention loss (attention_loss; LLaVA-1.5 only; 0 = off)")
    ap.add_argument("--vo-init", type=float, default=1.0, help="value/output init of decoder layers 0-1 (init_value_paths; 0 = off)")
    ap.add_argument("--proj-init", type=int, default=1, help="start the projector as a standardisation of the cached features (init_projector)")
    ap.add_argument("--objects-step", type=int, default=0, help="object curriculum: the LLM sees at most 1 + step // N objects' tokens (0 = off)")
    ap.add_argument("--deep-start-b", type=float, default=0.0, help="fraction of stage B before the decoder layers above the supervised hops train")
    ap.add_argument("--deep-lr-b", type=float, default=1.0, help="learning-rate multiplier of those layers")
    ap.add_argument("--zero-init-b", type=int, default=1, help="zero-init the LLM's residual branches (all but the attention init_value_paths sets)")
    ap.add_argument("--aux-b", type=int, default=1, help="answer targets from the shape word on (1) or on the answer only (0)")
    ap.add_argument("--per-type", type=int, default=4, help="questions per type in each training conversation")
    ap.add_argument("--cache-b", type=int, default=None, help="training scenes whose features are cached")
    ap.add_argument("--val-b", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--tower-only", action="store_true", help="stop after stage A (saves the model with an untrained LLM)")
    args = ap.parse_args(argv)
    next_ = args.variant == "llava_next"
    args.bg_start = args.bg_start if args.bg_start is not None else (1.0 if next_ else 0.05)
    args.steps_b = args.steps_b or (24 if next_ else 150)
    args.batch_b = args.batch_b or (4 if next_ else 8)
    args.lr_b = args.lr_b or (1e-3 if next_ else 2e-3)
    args.cache_b = args.cache_b or (120 if next_ else 1000)
    args.val_b = args.val_b or (40 if next_ else 100)
    args.eval_every = args.eval_every or (12 if next_ else 50)
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
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        log(f"init from {args.init}; new parameters: {missing}")
        if next_:
            with torch.no_grad():
                model.model.image_newline.normal_(0, 1.0 / math.sqrt(TEXT["hidden_size"]))
        del src
    elif next_:
        ap.error("--variant llava_next needs --init <trained llava15 dir> (the tower is shared)")
    else:
        stage_a(model.model.vision_tower, args, rng)
        log(f"stage A done in {time.time() - t0:.0f}s")
    if not args.tower_only:
        # stage B has its own seeds, so "A then B" in one run equals "--tower-only" then "--init"
        torch.manual_seed(args.seed + 1000)
        stage_b(model, tok, proc, args, random.Random(args.seed + 1000), next_)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    meta = {"variant": args.variant, "seed": args.seed, "seconds": round(time.time() - t0), "args": vars(args)}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"saved to {args.out} after {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
