"""Stage B by construction: a projector fitted to the patch labels that hands the LLM clean one-hot
tokens, and an LLM whose look-up circuit is written into its weights ("compiled"), then trained.

Five attempts to have gradient descent find the look-up (question word -> the patches it names ->
the answer) in the CPU budget ended near the answer prior (docs/TRAINED.md). The circuit itself is
small, so stage B writes it and then trains every weight with the LLaVA answer loss:

- **Projector** (`fit_projector`): a one-vs-rest logistic read-out of the frozen tower's layer -2
  features per class (7 colour classes with "none", 6 shape classes with "none", object centre),
  fitted on cached training scenes, becomes the projector's first linear layer; GELU differences
  turn each logit into a 0/1 step, so every image token is one-hot in colour, shape and centre, plus
  a unit (cos, sin) code of its column and a constant channel. Every clean image token then has the
  same norm, so the LLM's RMSNorm treats them alike.
- **LLM** (`compile_llm`), 16 layers:
  - layer 0: the last prompt token (":" after ASSISTANT) finds the question's shape word, its colour
    word (or a sink: the ASSISTANT token) and its type word ("What" colour, "a" presence, "How"
    count, "or" side), and copies their codes;
  - layers 1-15: two heads of the last token look the image up: one attends to the patches whose
    shape (and colour, if asked) match, against a sink at 0.5 (one word asked) or 1.5 (two words)
    matches, and reads their colour and column; one attends to the centre patches of the asked shape
    and to a sink of equal weight, so the sink's share is 1 / (count + 1). Only layer 15 writes what
    they read (layers 1-14 attend the same way and write nothing), so pruning inside the LLM (FastV
    after layer 2, ATP at 2/6/10/14, MustDrop's LLM stage) happens before the image is read;
  - layer 15's MLP turns what was read into the answer, gated by the question type (SwiGLU products);
    the answer words' embeddings predict the end of the answer.
  Look-up keys use the RoPE dimensions that barely rotate over the sequence (pairs 5-7 at
  rope_theta 1e6); the sink sits next to the query, so its logit does not depend on the image length.

Layouts of the 64-dim residual stream are the constants below; tests check the compiled model
against the scenes' labels (tests/test_trained.py).

Scope: one question per prompt, in the four templates of `vtprune.scenes` (the offline task, the
demo, `compare` and the notebooks ask them so). In a multi-turn conversation the word look-ups of
layer 0 mix the turns; a question without a type word ("What" / "a" / "How" / "or") opens no
answer gate, and the answer is empty.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import scenes as S

D = 64
CONST = 16.0  # every token's constant channel: sets its RMS, so content of norm ~2 shifts it < 1 %
GAIN = 2.0  # RMSNorm weight on content channels (RMS of a token is ~CONST / 8 = 2)
# image tokens (projector outputs)
C_COL = 0  # 7: colour none + 6 colours
C_SHP = 7  # 6: shape none + 5 shapes
C_CEN = 13  # 2: centre, not centre
C_X = 15  # 2: cos, sin of the column angle
# text tokens (embeddings), and what layer 0 writes at the last token
W_SHP = 17  # 5: shape word one-hot (the last token: the asked shape)
W_COL = 22  # 6: colour word one-hot (the last token: the asked colour)
F_SW, F_CW, F_TW = 28, 29, 30  # shape word, colour word, type word flags
W_TYP = 31  # 4: question type (colour, presence, count, side)
F_SINK, F_Q, F_ANS = 35, 36, 37  # ASSISTANT (sink), ":" (the query), answer word (-> end of answer)
# what layer 15's attention writes at the last token
R_COL, R_X, R_SINK, R_CNT = 38, 44, 46, 47
# answer channels, read by lm_head
A_COL, A_YES, A_NO, A_LEFT, A_RIGHT, A_CNT = 48, 54, 55, 56, 57, 58  # A_CNT: 5 (0..4)
PAD = 62  # gives the sink token the norm of an image token
C_ONE = 63

TYPE_WORDS = {"What": 0, "a": 1, "How": 2, "or": 3}
SHAPE_CODE = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=torch.float32)
COLOUR_CODE = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float32)
# head dims (of 16) used for content: RoPE pairs (i, i + 8) for i = 5, 6, 7 rotate by < 0.11 rad over
# 600 positions at rope_theta 1e6; pair 4 holds the sink, which sits next to the query
SHAPE_DIMS = (7, 15, 6)
COLOUR_DIMS = (14, 5, 13)
CENTRE_DIM = 14
SINK_DIM = 4
L_WORD = 20.0  # logit of a found word (layer 0)
L_LOOK = 12.0  # logit per matched attribute (object look-up)
L_COUNT = 10.0  # logit per matched attribute (count look-up)
GATE = 20.0  # SwiGLU gate slope of the question-type gates
STEP = 400.0  # slope of the count thresholds (sink share between 1/(n+1) values)
L_OUT = 10.0  # lm_head scale of the answer channels
FLOOR = 0.05  # answer-channel floor of the asked type's words


def _x_angle(col: torch.Tensor, grid: int = 24) -> torch.Tensor:
    return col * (math.pi / grid)


# --- projector ---------------------------------------------------------------------------------


def _targets(scene_list):
    from .train import scene_targets

    ts = [scene_targets(sc) for sc in scene_list]
    col, shp, cen = (torch.from_numpy(np.concatenate([t[k] for t in ts])) for k in ("colour", "shape", "centre"))
    onehot = torch.cat([F.one_hot(col.long(), 7), F.one_hot(shp.long(), 6), cen[:, None].round().long()], 1).float()
    return onehot


def fit_projector(model, feats, scene_list, steps: int = 400, val=None, log=print, centre_weight: float = 4.0, const: float = CONST) -> dict:
    """Fit the one-vs-rest read-out on cached layer -2 features (`feats`: per scene (1, 576, d)) of
    `scene_list` and write the projector (see the module doc; `const`: the constant channel, `CONST`
    for the compiled LLM, whose RMSNorms it pins; the learned stage B uses 1, see `train.stage_b`). Returns per-patch accuracy of the
    projected tokens on `val` = (feats, scenes) (or on the fitting scenes): colour / shape on object
    patches, and centre precision / recall."""
    from .train import NPOS, OMEGA_X, OMEGA_Y, P_RES

    d_in = feats[0].shape[-1]
    x = torch.cat([f.reshape(-1, d_in) for f in feats])
    y = _targets(scene_list)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-3)
    lin = nn.Linear(d_in, y.shape[1])
    opt = torch.optim.Adam(lin.parameters(), lr=3e-2)
    pos_w = torch.ones(y.shape[1])
    pos_w[-1] = centre_weight  # centres are 1 patch per object
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(lin((x - mu) / sd), y, pos_weight=pos_w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    proj = model.model.multi_modal_projector
    n_cls = y.shape[1]  # 14
    ny, nx = len(OMEGA_Y), len(OMEGA_X)
    sin_x, cos_x = d_in - NPOS + 2 * ny, d_in - NPOS + 2 * ny + nx  # the coarse x frequency (pi / 24)
    assert abs(OMEGA_X[0] - math.pi / 24) < 1e-9
    with torch.no_grad():
        w = lin.weight / sd
        b = lin.bias - lin.weight @ (mu / sd)
        z_scale = 6.0  # steps of width ~1/3 logit: 99 % of validation tokens come out within 0.05 of 0/1 (`tokens_0_1`)
        l1w, l1b = torch.zeros_like(proj.linear_1.weight), torch.zeros_like(proj.linear_1.bias)
        l2w, l2b = torch.zeros_like(proj.linear_2.weight), torch.zeros_like(proj.linear_2.bias)
        for k in range(n_cls):  # step_k = (GELU(u + 2) - GELU(u - 2)) / 4, u = z_scale * logit
            for j, off in enumerate((2.0, -2.0)):
                l1w[2 * k + j], l1b[2 * k + j] = z_scale * w[k], z_scale * b[k] + off
        # output channels: colour 0-6, shape 7-12, centre 13 (step) / 14 (1 - step)
        for k in range(n_cls):
            out = k if k < 13 else C_CEN
            l2w[out, 2 * k], l2w[out, 2 * k + 1] = 0.25, -0.25
        l2w[C_CEN + 1, 2 * 13], l2w[C_CEN + 1, 2 * 13 + 1] = -0.25, 0.25
        l2b[C_CEN + 1] = 1.0
        # column code: the features carry sin / cos (pi x / 24) x P_RES; pass them through GELU's linear range
        for j, ch in enumerate((cos_x, sin_x)):
            u = 2 * n_cls + j
            l1w[u, ch], l1b[u] = 1.0 / P_RES, 10.0
            l2w[C_X + j, u], l2b[C_X + j] = 1.0, -10.0
        l2b[C_ONE] = const
        proj.linear_1.weight.copy_(l1w)
        proj.linear_1.bias.copy_(l1b)
        proj.linear_2.weight.copy_(l2w)
        proj.linear_2.bias.copy_(l2b)
        if val is not None:
            feats, scene_list = val
            y = _targets(scene_list)
        t = torch.cat([proj(f.reshape(-1, d_in)) for f in feats])
        obj = y[:, C_SHP] == 0
        col_ok = (t[:, :7].argmax(1) == y[:, :7].argmax(1))[obj].float().mean().item()
        shp_ok = (t[:, 7:13].argmax(1) == y[:, 7:13].argmax(1))[obj].float().mean().item()
        cen_pred, cen_true = t[:, C_CEN] > 0.5, y[:, 13] > 0.5
        tp = (cen_pred & cen_true).sum().item()
        hard = ((t[:, :C_X] - t[:, :C_X].round()).abs() < 0.05).all(1).float().mean().item()
    acc = dict(patch_colour=col_ok, patch_shape=shp_ok, centre_precision=tp / max(1, cen_pred.sum().item()),
               centre_recall=tp / max(1, cen_true.sum().item()), tokens_0_1=hard)
    log("B projector fitted; " + ("validation" if val is not None else "fitting") + " patches " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc


def background_token() -> torch.Tensor:
    """A token that matches nothing (LLaVA-NeXT's image_newline starts as this)."""
    v = torch.zeros(D)
    v[C_COL] = v[C_SHP] = v[C_CEN + 1] = 1.0
    v[C_X] = 1.0
    v[C_ONE] = CONST
    return v


# --- LLM ---------------------------------------------------------------------------------------


def compile_llm(model, tok, centres_per_object: int = 1) -> None:
    """Write the circuit of the module doc into the LLM of `model` (LLaVA-1.5 or NeXT built by
    `train.build_model`): embeddings, every decoder layer, the final norm and lm_head.
    `centres_per_object`: centre tokens the count look-up sees per object (LLaVA-NeXT: base image
    and crops each hold one)."""
    lm = model.model.language_model
    cfg = lm.config
    hd, nq, nkv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    assert cfg.hidden_size == D and hd == 16 and nq == 4 and nkv == 2, "compile_llm is written for the trained models' Llama (64 wide, 4 heads, 2 KV heads)"
    words = tok.get_vocab()
    eos = tok.eos_token_id
    sc = 1.0 / math.sqrt(hd)  # SDPA's scale
    with torch.no_grad():
        # embeddings
        E = torch.zeros_like(lm.embed_tokens.weight)
        E[:, C_ONE] = CONST
        for k, shape in enumerate(S.SHAPES):
            for w in (shape, S.plural(shape)):
                E[words[w], W_SHP + k] = 1.0
                E[words[w], F_SW] = 1.0
        for c, colour in enumerate(S.COLOURS):
            E[words[colour], W_COL + c] = 1.0
            E[words[colour], F_CW] = 1.0
            E[words[colour], F_ANS] = 1.0
        for w, t in TYPE_WORDS.items():
            E[words[w], F_TW] = 1.0
            E[words[w], W_TYP + t] = 1.0
        E[words["ASSISTANT"], F_SINK] = 1.0
        E[words["ASSISTANT"], PAD] = math.sqrt(3.0)  # image tokens' content norm^2 is 4 (four one-hots)
        E[words[":"], F_Q] = 1.0
        for w in ["yes", "no", "left", "right"] + [str(i) for i in range(10)]:
            E[words[w], F_ANS] = 1.0
        lm.embed_tokens.weight.copy_(E)
        g = torch.full((D,), GAIN)
        g[C_ONE] = 1.0 / (CONST / GAIN)  # the constant channel arrives as ~1
        for layer in lm.layers:
            layer.input_layernorm.weight.copy_(g)
            layer.post_attention_layernorm.weight.copy_(g)
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
        lm.norm.weight.copy_(g)

        def q_row(h, dim):
            return h * hd + dim

        def kv_row(k, dim):
            return k * hd + dim

        # layer 0: find the words
        at = lm.layers[0].self_attn
        Wq, Wk, Wv, Wo = at.q_proj.weight, at.k_proj.weight, at.v_proj.weight, at.o_proj.weight
        Wk[kv_row(0, 7), F_SW] = 1.0
        Wk[kv_row(0, 15), F_CW] = 1.0
        Wk[kv_row(0, 6), F_SINK] = 1.0
        Wk[kv_row(1, 7), F_TW] = 1.0
        Wq[q_row(0, 7), F_Q] = L_WORD / sc
        Wq[q_row(1, 15), F_Q] = L_WORD / sc
        Wq[q_row(1, 6), F_Q] = 0.5 * L_WORD / sc
        Wq[q_row(2, 7), F_Q] = L_WORD / sc
        for k in range(5):
            Wv[kv_row(0, k), W_SHP + k] = 1.0
            Wo[W_SHP + k, q_row(0, k)] = 1.0
        for c in range(6):
            Wv[kv_row(0, 5 + c), W_COL + c] = 1.0
            Wo[W_COL + c, q_row(1, 5 + c)] = 1.0
        for t in range(4):
            Wv[kv_row(1, t), W_TYP + t] = 1.0
            Wo[W_TYP + t, q_row(2, t)] = 1.0

        # layers 1-15: the look-ups (layer 15 writes)
        for li in range(1, len(lm.layers)):
            at = lm.layers[li].self_attn
            Wq, Wk, Wv, Wo = at.q_proj.weight, at.k_proj.weight, at.v_proj.weight, at.o_proj.weight
            for kv in range(2):
                for j, dim in enumerate(SHAPE_DIMS):
                    Wk[kv_row(kv, dim), C_SHP + 1 : C_SHP + 6] = SHAPE_CODE[:, j]
            for j, dim in enumerate(COLOUR_DIMS):
                Wk[kv_row(0, dim), C_COL + 1 : C_COL + 7] = COLOUR_CODE[:, j]
            Wk[kv_row(1, CENTRE_DIM), C_CEN] = 1.0
            Wk[kv_row(0, SINK_DIM), F_SINK] = 1.0
            Wk[kv_row(1, SINK_DIM), F_SINK] = 1.0
            # head 0: object look-up; sink at 0.5 (+1 if a colour was asked) matches
            for j, dim in enumerate(SHAPE_DIMS):
                Wq[q_row(0, dim), W_SHP : W_SHP + 5] = SHAPE_CODE[:, j] * (L_LOOK / sc)
                Wq[q_row(2, dim), W_SHP : W_SHP + 5] = SHAPE_CODE[:, j] * (L_COUNT / sc)
            for j, dim in enumerate(COLOUR_DIMS):
                Wq[q_row(0, dim), W_COL : W_COL + 6] = COLOUR_CODE[:, j] * (L_LOOK / sc)
            Wq[q_row(0, SINK_DIM), C_ONE] = 0.5 * L_LOOK / sc
            Wq[q_row(0, SINK_DIM), W_COL : W_COL + 6] = L_LOOK / sc
            # head 2: count look-up; centre patches of the shape at 2 matches, the sink at 2
            Wq[q_row(2, CENTRE_DIM), C_ONE] = L_COUNT / sc
            Wq[q_row(2, SINK_DIM), C_ONE] = 2.0 * L_COUNT / sc
            for c in range(6):
                Wv[kv_row(0, c), C_COL + 1 + c] = 1.0
            Wv[kv_row(0, 6), C_X] = 1.0
            Wv[kv_row(0, 7), C_X + 1] = 1.0
            Wv[kv_row(0, 8), F_SINK] = 1.0
            Wv[kv_row(1, 0), F_SINK] = 1.0
            if li == len(lm.layers) - 1:
                for c in range(6):
                    Wo[R_COL + c, q_row(0, c)] = 1.0
                Wo[R_X, q_row(0, 6)] = 1.0
                Wo[R_X + 1, q_row(0, 7)] = 1.0
                Wo[R_SINK, q_row(0, 8)] = 1.0
                Wo[R_CNT, q_row(2, 0)] = 1.0

        # layer 15 MLP: the answer
        mlp = lm.layers[-1].mlp
        Wg, Wu, Wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        half = GATE / 2  # silu(GATE * (1 - 0.5)) ~ GATE / 2 when the type is on
        n = 0

        def gate_on(row, t):
            Wg[row, W_TYP + t] = GATE
            Wg[row, C_ONE] = -GATE / 2

        for c in range(6):  # colour: the read colour
            gate_on(n, 0)
            Wu[n, R_COL + c] = 1.0
            Wd[A_COL + c, n] = 1.0 / half
            n += 1
        gate_on(n, 1)  # presence: yes if the object look-up's sink got < 1/2
        Wu[n, C_ONE], Wu[n, R_SINK] = 0.5, -1.0
        Wd[A_YES, n], Wd[A_NO, n] = 2.0 / half, -2.0 / half
        n += 1
        gate_on(n, 3)  # side: the read column angle against the middle (column 11.5)
        mid = _x_angle(torch.tensor(11.5)).item()
        Wu[n, R_X + 1], Wu[n, R_X] = 15.0 * math.cos(mid), -15.0 * math.sin(mid)
        Wd[A_RIGHT, n], Wd[A_LEFT, n] = 1.0 / half, -1.0 / half
        n += 1
        gate_on(n, 2)  # count: S_0 = 1, S_j = [sink share < theta_j]; answer n = S_n - S_{n+1}
        Wu[n, C_ONE] = 1.0
        Wd[A_CNT, n] = 1.0 / half
        n += 1
        for j in range(1, S.MAX_COUNT + 1):
            for sign in (1.0, -1.0):  # step = (silu(u + 2) - silu(u - 2)) / 4; thresholds below
                Wg[n, R_CNT] = -STEP
                Wu[n, W_TYP + 2] = 0.25
                Wd[A_CNT + j, n] += sign
                Wd[A_CNT + j - 1, n] -= sign
                n += 1
        set_count_thresholds(model, compiled_count_thresholds(centres_per_object))
        # a small floor under each type's answer words, so the answer is one of them even when the
        # look-up finds nothing (e.g. a blank image): the type's first answer word by order wins ties
        floors = {0: list(range(A_COL, A_COL + 6)), 1: [A_YES, A_NO], 2: list(range(A_CNT, A_CNT + S.MAX_COUNT + 1)), 3: [A_LEFT, A_RIGHT]}
        for t, chans in floors.items():
            gate_on(n, t)
            Wu[n, C_ONE] = 1.0
            for ch in chans:
                Wd[ch, n] = FLOOR / half
            n += 1
        # lm_head
        H = torch.zeros_like(model.lm_head.weight)
        for c, colour in enumerate(S.COLOURS):
            H[words[colour], A_COL + c] = L_OUT
        H[words["yes"], A_YES], H[words["no"], A_NO] = L_OUT, L_OUT
        H[words["left"], A_LEFT], H[words["right"], A_RIGHT] = L_OUT, L_OUT
        for k in range(S.MAX_COUNT + 1):
            H[words[str(k)], A_CNT + k] = L_OUT
        H[eos, F_ANS] = L_OUT
        model.lm_head.weight.copy_(H)
        if hasattr(model.model, "image_newline"):
            model.model.image_newline.copy_(background_token())


# --- the count thresholds: compiled, or fitted to data (`fit_count_thresholds`) ----------------------


def compiled_count_thresholds(centres_per_object: int = 1) -> list[float]:
    """theta_j (j = 1..MAX_COUNT) between the sink shares 1 / (centres x count + 1) the count look-up
    gives for j - 1 and j objects, as written by `compile_llm`: "count >= j" when the share < theta_j."""
    shares = [1.0 / (centres_per_object * k + 1) for k in range(S.MAX_COUNT + 1)]
    shrink = 1.0 - 6.0 / (2 * CONST**2)  # the RMSNorm of the last token (content norm^2 ~6) scales the share
    return [math.sqrt(shares[j - 1] * shares[j]) * shrink for j in range(1, S.MAX_COUNT + 1)]


def _count_rows(model) -> list[int]:
    Wg = model.model.language_model.layers[-1].mlp.gate_proj.weight
    rows = torch.nonzero(Wg[:, R_CNT]).flatten().tolist()
    if len(rows) != 2 * S.MAX_COUNT:
        raise ValueError(f"expected {2 * S.MAX_COUNT} count-step rows in the last layer's MLP gate, found {len(rows)}: not a compiled model")
    return rows


def count_thresholds(model) -> list[float]:
    """The count thresholds the model's last MLP holds (share of the count head's sink, relative to
    the constant channel, below which "count >= j")."""
    Wg = model.model.language_model.layers[-1].mlp.gate_proj.weight
    rows = _count_rows(model)
    return [(Wg[r, C_ONE].item() - 2.0) / -Wg[r, R_CNT].item() for r in rows[::2]]


def set_count_thresholds(model, thetas) -> None:
    """Write thresholds theta_1 > ... > theta_MAX_COUNT into the count steps of the last MLP: row pair
    j gates on STEP x (theta_j - share) +- 2, so its difference steps from 0 to 1 as the share falls
    below theta_j."""
    thetas = [float(t) for t in thetas]
    if len(thetas) != S.MAX_COUNT or not all(0 < b < a for a, b in zip([1.5] + thetas, thetas)):
        raise ValueError(f"count thresholds must be {S.MAX_COUNT} decreasing values in (0, 1.5), got {thetas}")
    Wg = model.model.language_model.layers[-1].mlp.gate_proj.weight
    rows = _count_rows(model)
    with torch.no_grad():
        for j, theta in enumerate(thetas):
            for r, off in zip(rows[2 * j : 2 * j + 2], (2.0, -2.0)):
                Wg[r, C_ONE] = STEP * theta + off


def fit_count_thresholds(share, count, weight=None, steps: int = 1500, init=None) -> tuple[list[float], float]:
    """Fit the count thresholds to measured sink shares: a cumulative-logit (ordinal logistic) model
    P(count >= j) = sigmoid(a (log theta_j - log share)) with one slope `a`, by maximum likelihood
    (Adam, full batch, deterministic). `weight` (per sample) reweights the classes, e.g. to the answer
    mix the evaluation asks. Returns (thetas, slope); the model then answers "count >= j" when the
    share < theta_j (where P = 1/2)."""
    share = torch.as_tensor(np.asarray(share, np.float64)).clamp_min(1e-6)
    count = torch.as_tensor(np.asarray(count, np.int64))
    w = torch.ones(len(share), dtype=torch.float64) if weight is None else torch.as_tensor(np.asarray(weight, np.float64))
    init = compiled_count_thresholds() if init is None else init
    c = torch.tensor(np.log(init), dtype=torch.float64, requires_grad=True)
    log_a = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([c, log_a], lr=0.05)
    ls = share.log()
    for _ in range(steps):
        cum = torch.sigmoid(log_a.exp() * (c[None] - ls[:, None]))  # P(count >= j), j = 1..K
        one = torch.ones(len(ls), 1, dtype=cum.dtype)
        p = torch.cat([one, cum], 1) - torch.cat([cum, 0 * one], 1)
        loss = -(w * p.gather(1, count[:, None])[:, 0].clamp_min(1e-9).log()).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    thetas = sorted(np.exp(c.detach().numpy()).tolist(), reverse=True)
    return thetas, float(log_a.detach().exp())
