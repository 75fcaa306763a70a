"""Train vtprune's small LLaVA-architecture models on `vtprune.scenes` (CPU, from a seed).

    python -m vtprune.trained.train --variant llava15 --seed 0 --out DIR          # stages A + B
    python -m vtprune.trained.train --variant llava_next --seed 0 --out DIR2 --init DIR
                                                                                  # NeXT: reuses DIR's tower,
                                                                                  # fine-tunes projector + LLM

Stage A (llava15 only) trains the CLIP-shaped tower (24 layers, patch 14, 336 px, width 32, 4 heads) on
rendered scenes with an image-level objective on the CLS token (multi-label colour x shape presence
and per-shape counts, read from the post-layernorm CLS of the last layer, as CLIP's pooled output)
plus dense per-patch targets on the feature layer LLaVA reads (hidden state -2: colour, shape and
"object centre" of the patch). A quarter of the images are LLaVA-NeXT scenes squashed to 336x336
(what the NeXT base image looks like), so the same tower serves both variants.

Stage B freezes the tower, caches its layer -2 patch features for a fixed set of training scenes,
and trains the projector and a small Llama (16 layers, width 64, word-level tokenizer built from
`vtprune.scenes.corpus()`) LLaVA-style: multi-turn conversations about one image, loss on the
answer tokens (and the end-of-turn token) only. The NeXT variant starts from the LLaVA-1.5 model's
projector and LLM and fine-tunes them on AnyRes features (base + two 336 crops, HF's own
`pack_image_features`, a trained `image_newline`).

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
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=24,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    projection_dim=32,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
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
    """CLIP normalisation of a 336x336 PIL image -> (3, 336, 336) float32 (the processor's numbers)."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def render_a(scene: S.Scene):
    """A 336x336 training image for stage A and its dense + image-level targets."""
    from PIL import Image

    img, lab = scene.render(labels=True)
    sx, sy = 336 / scene.width, 336 / scene.height
    if (scene.width, scene.height) != (336, 336):  # a NeXT scene as its squashed base image
        img = img.resize((336, 336), Image.BICUBIC)
        lab = np.asarray(Image.fromarray(lab).resize((336, 336), Image.NEAREST))
    onehot = lab.reshape(GRID, 14, GRID, 14).transpose(0, 2, 1, 3).reshape(N_PATCH, 196)
    colour = np.zeros(N_PATCH, np.int64)
    shape = np.zeros(N_PATCH, np.int64)
    for p in range(N_PATCH):
        vals = onehot[p]
        nz = vals[vals > 0]
        if nz.size >= 40:
            o = scene.objects[np.bincount(nz).argmax() - 1]
            colour[p], shape[p] = COLOUR_IDX[o.colour], SHAPE_IDX[o.shape]
    centre = np.zeros(N_PATCH, np.float32)
    for o in scene.objects:
        gx, gy = min(GRID - 1, int(o.cx * sx) // 14), min(GRID - 1, int(o.cy * sy) // 14)
        centre[gy * GRID + gx] = 1.0
    presence = np.array([float(scene.has(c, k)) for c, k in PAIRS], np.float32)
    counts = np.array([min(scene.count(k), S.MAX_COUNT) for k in S.SHAPES], np.int64)
    return pixels(img), colour, shape, centre, presence, counts


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    q = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    out = []
    for c in (ys.flatten(), xs.flatten()):
        a = c[:, None] * omega[None]
        out += [a.sin(), a.cos()]
    return torch.cat(out, 1)


# --- stage A ----------------------------------------------------------------------------------


AUX_LAYERS = (6, 12, 18)  # deep supervision: the dense targets also on these layers' outputs


class Heads(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.dense = nn.Linear(d, 7 + 6 + 1)
        self.cls = nn.Linear(d, len(PAIRS) + len(S.SHAPES) * (S.MAX_COUNT + 1))
        self.aux = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 7 + 6)) for _ in AUX_LAYERS)


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


def stage_a(tower, args, rng: random.Random):
    d = tower.config.hidden_size
    with torch.no_grad():
        pe = tower.embeddings.position_embedding.weight
        pe[1:] = sincos_2d(d, GRID)
        pe[0] = 0
    init_patch_embedding(tower.embeddings.patch_embedding)
    heads = Heads(d)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a, weight_decay=0.05, betas=(0.9, 0.98))
    steps, bs = args.steps_a, args.batch_a
    n15 = steps * bs
    pool15 = S.scenes("train", n15 * 3 // 4 + 1, "llava15", seed=args.seed)
    poolnx = S.scenes("train", n15 // 4 + 1, "llava_next", seed=args.seed)
    pool = pool15 + poolnx
    rng.shuffle(pool)
    wbg = torch.tensor([0.3] + [1.0] * 6)
    wbg_s = torch.tensor([0.1] + [1.0] * 5)
    t0 = time.time()
    hist = []
    for step in range(steps):
        lr = args.lr_a * min(1.0, (step + 1) / 30) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [render_a(s) for s in pool[step * bs : (step + 1) * bs]]
        x, col, shp, cen, pres, cnt = (torch.from_numpy(np.stack(z)) for z in zip(*batch))
        out = tower(pixel_values=x, output_hidden_states=True)
        feat = heads.norm(out.hidden_states[-2][:, 1:])
        dl = heads.dense(feat)
        loss_d = F.cross_entropy(dl[..., :7].reshape(-1, 7), col.flatten(), weight=wbg) + 2.0 * F.cross_entropy(
            dl[..., 7:13].reshape(-1, 6), shp.flatten(), weight=wbg_s
        )
        loss_c = F.binary_cross_entropy_with_logits(dl[..., 13], cen, pos_weight=torch.tensor(20.0))
        cl = heads.cls(out.pooler_output)
        loss_p = F.binary_cross_entropy_with_logits(cl[:, : len(PAIRS)], pres)
        loss_n = F.cross_entropy(cl[:, len(PAIRS) :].reshape(-1, S.MAX_COUNT + 1), cnt.flatten())
        loss_aux = 0.0
        for layer, head in zip(AUX_LAYERS, heads.aux):
            al = head(out.hidden_states[layer][:, 1:])
            loss_aux = loss_aux + F.cross_entropy(al[..., :7].reshape(-1, 7), col.flatten(), weight=wbg) + F.cross_entropy(
                al[..., 7:13].reshape(-1, 6), shp.flatten(), weight=wbg_s
            )
        loss = loss_d + 0.5 * loss_c + 2.0 * loss_p + 0.5 * loss_n + 0.3 * loss_aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            obj = shp.flatten() > 0
            acc_s = (dl[..., 7:13].reshape(-1, 6).argmax(-1) == shp.flatten())[obj].float().mean().item()
            acc_c = (dl[..., :7].reshape(-1, 7).argmax(-1) == col.flatten())[obj].float().mean().item()
            acc_p = ((cl[:, : len(PAIRS)] > 0).float() == pres).float().mean().item()
        hist.append((loss.item(), acc_c, acc_s, acc_p))
        if step % 10 == 0 or step == steps - 1:
            m = np.mean(hist[-10:], 0)
            log(f"A {step}/{steps} loss {m[0]:.3f} patch-colour {m[1]:.3f} patch-shape {m[2]:.3f} cls-presence {m[3]:.3f} lr {lr:.2e} {time.time() - t0:.0f}s")
    return tower


# --- stage B ----------------------------------------------------------------------------------


def tower_features(tower, pix: torch.Tensor, bs: int = 16) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(pix), bs):
            outs.append(tower(pixel_values=pix[i : i + bs], output_hidden_states=True).hidden_states[-2][:, 1:])
    return torch.cat(outs)


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


class Seq:
    """Token ids with the image span at a fixed place and labels on the answers."""

    def __init__(self, tok):
        self.tok = tok
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
            ids += p + a
            labels += [-100] * len(p) + a
        return ids, labels


def image_embeds(model, feats, sizes, next_: bool):
    """Projected (and, for NeXT, packed) features of each cached image: list of (n_tokens, hidden)."""
    base = model.model
    out = []
    for f, hw in zip(feats, sizes):
        p = base.multi_modal_projector(f)
        if next_:
            packed, _ = base.pack_image_features([p], torch.tensor([hw]), "default", image_newline=base.image_newline)
            out.append(packed[0])
        else:
            out.append(p[0])
    return out


def lm_loss(model, tok, seqb, feats, sizes, qsets, next_: bool, first_only: bool = False):
    """Teacher-forced loss over answer tokens; with `first_only`, also the argmax hits of turn 1's answer."""
    embeds = image_embeds(model, feats, sizes, next_)
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
    log(f"B cached {len(feats)} train + {len(vfeats)} val images in {time.time() - t0:.0f}s")
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    opt = torch.optim.AdamW(params, lr=args.lr_b, weight_decay=0.01, betas=(0.9, 0.98))
    seqb = Seq(tok)
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
        loss, _ = lm_loss(model, tok, seqb, [feats[j] for j in idx], [sizes[j] for j in idx], qsets, next_)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"B {step}/{steps} loss {np.mean(hist[-10:]):.3f} lr {lr:.2e} {time.time() - t1:.0f}s")
        if (step + 1) % args.eval_every == 0 or step == steps - 1:
            acc = evaluate_fast(model, tok, seqb, vfeats, vsizes, val_q, next_)
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
    ap.add_argument("--steps-a", type=int, default=220)
    ap.add_argument("--batch-a", type=int, default=12)
    ap.add_argument("--lr-a", type=float, default=2e-3)
    ap.add_argument("--steps-b", type=int, default=None)
    ap.add_argument("--batch-b", type=int, default=None)
    ap.add_argument("--lr-b", type=float, default=None)
    ap.add_argument("--per-type", type=int, default=4, help="questions per type in each training conversation")
    ap.add_argument("--cache-b", type=int, default=None, help="training scenes whose features are cached")
    ap.add_argument("--val-b", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--tower-only", action="store_true", help="stop after stage A (saves the model with an untrained LLM)")
    args = ap.parse_args(argv)
    next_ = args.variant == "llava_next"
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
