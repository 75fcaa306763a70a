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
image, loss on the answer tokens (and the end-of-turn token), plus optional auxiliary answer targets,
a look-up initialisation (`init_lookup`) and a background-token curriculum. The NeXT variant starts
from the LLaVA-1.5 model's projector and LLM and fine-tunes them on AnyRes features (base + two 336
crops, HF's own `pack_image_features`, a trained `image_newline`).

Status (docs/TRAINED.md): stage A learns; stage B has not yet learned to read the image in its budget,
so no weights ship.

Everything is seeded; fp32; `--threads` (default 2) sets torch's intra-op threads.
"""

from __future__ import annotations

import argparse
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
                q, k = layer.self_attn.q_proj, layer.self_attn.k_proj
                for lin in (q, k):
                    lin.weight.zero_()
                    lin.bias.zero_()
                for h, (oy, ox) in enumerate(OFFSETS[i % 2]):
                    q.weight[h * hd : h * hd + NPOS, d - NPOS :] = LOCAL_BETA * _shift(oy, ox)
                    k.weight[h * hd : h * hd + NPOS, d - NPOS :] = torch.eye(NPOS)


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
    heads = Heads(d)
    pool = S.scenes("train", args.scenes_a * 3 // 4, "llava15", seed=args.seed) + S.scenes("train", args.scenes_a // 4, "llava_next", seed=args.seed)
    rng.shuffle(pool)
    t0 = time.time()
    data = [scene_targets(s) for s in pool]
    log(f"A rendered {len(data)} training scenes in {time.time() - t0:.0f}s")
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a, weight_decay=0.05, betas=(0.9, 0.98))

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
        hs = tower_forward(tower, pix, ids, A1_LAYERS)
        z = heads.dense(heads.norm(hs[-1][:, 1:]))
        loss = dense_loss(z, col, shp, cen, isc)
        for head, layer in zip(heads.aux, (A1_LAYERS // 4, A1_LAYERS // 2)):
            loss = loss + 0.3 * dense_loss(head(hs[layer][:, 1:]), col, shp, None)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        meter.add(step, args.steps_a1, loss=loss.item(), **_acc(z, col, shp, isc))

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


def object_mask(scene: S.Scene) -> np.ndarray:
    """(576,) bool: patches any object pixel falls in, grown by one patch (a LLaVA-1.5 scene)."""
    _, lab = scene.render(labels=True)
    m = (lab.reshape(GRID, 14, GRID, 14) > 0).any(axis=(1, 3))
    g = np.pad(m, 1)
    grown = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            grown |= g[dy : dy + GRID, dx : dx + GRID]
    return grown.flatten()


def curriculum_keep(masks, idx, p_bg: float, rng: random.Random):
    """Per image: every object patch (grown by one) and each background patch with probability p_bg."""
    if p_bg >= 1.0 or masks is None:
        return None
    out = []
    for j in idx:
        m = masks[j]
        out.append(torch.tensor([i for i in range(N_PATCH) if m[i] or rng.random() < p_bg], dtype=torch.long))
    return out


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
        eos = self.tok.eos_token_id
        img = self.tok.convert_tokens_to_ids("<image>")
        ids = self.enc("USER:") + [img] * n_img
        labels = [-100] * len(ids)
        for j, q in enumerate(questions):
            p = self.enc(("" if j == 0 else "USER: ") + q.text + " ASSISTANT:")
            a = self.enc(q.answer) + [eos]
            lab = [-100] * len(p)
            if self.aux:
                words = self.tok.convert_ids_to_tokens(p)
                kw = max(i for i, w in enumerate(words) if w in SHAPE_WORDS)
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


def lm_loss(model, tok, seqb, feats, sizes, qsets, next_: bool, first_only: bool = False, keep=None):
    """Teacher-forced loss over answer tokens; with `first_only`, also the argmax hits of turn 1's answer."""
    embeds = image_embeds(model, feats, sizes, next_, keep)
    rows, labs = [], []
    for e, qs in zip(embeds, qsets):
        ids, lab = seqb.build(qs, e.shape[0])
        rows.append(ids)
        labs.append(lab)
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
    h = base.language_model(inputs_embeds=x, attention_mask=am).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(h[:, :-1][sel])
    loss = F.cross_entropy(logits, tgt[sel])
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


def init_lookup(model, tok, feats, scene_list, scale: float = 2.0, recency: float = 3.0) -> None:
    """Start the LLM with the look-up it has to learn already in place (stage B, from scratch only).

    From the projected features of cached training patches: the direction that sets each shape's
    patches apart (class mean minus the mean of all patches, orthonormalised per attribute), and
    the same for colours. Shape words (and plurals) and colour words are embedded as fresh
    orthonormal codes orthogonal to those directions; in decoder layer 0, KV head 0's key rows read
    the shape directions and its query heads' rows read the shape-word codes, KV head 1 the same for
    colours, all in the low-frequency RoPE pairs (which barely rotate over a few hundred positions).
    So at initialisation "circle" attends to circle patches and not to itself (its key is zero).
    Everything stays trainable."""
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
        u = codes[-1]  # a "constant" direction every token gets: the recency heads' key and query
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
        # decoder layer 1, KV head 0: a recency head. q = k = a * u on the RoPE pairs 1..3, so the score
        # is beta * sum_i cos(theta_i * distance): the last few tokens (the question) win over the image
        att1 = model.model.language_model.layers[1].self_attn
        a = (4.0 * recency / 32.0) ** 0.5  # |u . x| ~ sqrt(d_model / 2) after RMSNorm
        w = torch.zeros(hd, d_model)
        for i in (1, 2, 3):
            w[i] = a * u
        att1.k_proj.weight[:hd] = w
        for h in range(groups):
            att1.q_proj.weight[h * hd : (h + 1) * hd] = w


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
    masks = None if next_ or args.bg_start >= 1.0 else [object_mask(sc) for sc in train_sc]
    if not next_ and args.zero_init_b:
        # residual branches of the fresh LLM start at zero (a 16-layer stack that trains like a shallow one)
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    if args.lookup_init and not next_:
        init_lookup(model, tok, feats[: args.lookup_scenes], train_sc[: args.lookup_scenes])
        log("B look-up initialisation done")
    log(f"B cached {len(feats)} train + {len(vfeats)} val images in {time.time() - t0:.0f}s")
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    opt = torch.optim.AdamW(params, lr=args.lr_b, weight_decay=0.01, betas=(0.9, 0.98))
    seqb = Seq(tok, aux=args.aux_b)
    model.train()
    steps, bs = args.steps_b, args.batch_b
    order = []
    hist = []
    t1 = time.time()
    for step in range(steps):
        lr = args.lr_b * min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.97 + 0.03)
        for g in opt.param_groups:
            g["lr"] = lr
        if len(order) < bs:
            perm = list(range(len(feats)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:bs], order[bs:]
        qsets = [sample_questions(train_sc[j], rng, args.per_type) for j in idx]
        # curriculum: early steps see every object patch but few background patches (the answer-bearing
        # tokens are a larger share, so the look-up is found sooner); from `bg_full` of the run on, all
        p_bg = args.bg_start + (1.0 - args.bg_start) * min(1.0, step / max(1.0, args.bg_full * steps))
        keep = curriculum_keep(masks, idx, p_bg, rng)
        loss, _ = lm_loss(model, tok, seqb, [feats[j] for j in idx], [sizes[j] for j in idx], qsets, next_, keep=keep)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"B {step}/{steps} loss {np.mean(hist[-10:]):.3f} lr {lr:.2e} background kept {p_bg:.2f} {time.time() - t1:.0f}s")
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
    ap.add_argument("--lookup-init", type=int, default=1, help="start the LLM with word/patch similarity heads (init_lookup)")
    ap.add_argument("--lookup-scenes", type=int, default=200)
    ap.add_argument("--zero-init-b", type=int, default=1)
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
