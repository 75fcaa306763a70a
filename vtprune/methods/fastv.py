"""`fastv`: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024; code pkunlp-icler/FastV).

Every visual token enters the LLM. The first `k` decoder layers (FastV's K, default 2) process the
whole prompt; at the output of the K-th layer (0-based index `k - 1`) the visual tokens of each image
are cut to the `keep` ones that the last prompt token attends to most in that layer: head-mean of
the softmax attention probabilities of the last real prompt token's query (RoPE applied, GQA keys
repeated as the attention does, softmax over ALL keys with the causal/padding mask, float32),
restricted to the image's visual columns; top `keep`, survivors in their original order. This is the
official code's rule: it reads the attention of layer K-1 and drops before layer K.

Budget: `keep` = R, the visual tokens kept after layer K (the paper's "R = 50%" drop is
`keep_ratio=0.5`, "R = 75%" is `keep_ratio=0.25`). The layer average reported in
`pruner.last.mean_tokens` is `(K * V + (L - K) * keep) / L` for an image of V visual tokens and an
L-layer LLM. LLaVA-NeXT: newlines are visual tokens of the image segment and compete like any
other (the official code's image span includes them); `keep` counts them.

Positions (`position_mode`, default "original" = the official in-place code, which sets the kept
tokens' position ids to their indices in the unpruned prompt): kept tokens keep their positions and
decoding continues at the unpruned prompt length. "compact" renumbers the survivors contiguously and
shifts decode positions of layers >= K by the tokens removed.

KV cache after prefill (per sample, text = non-visual prompt tokens): layers 0..K-1 hold
`text + V` entries, layers K..L-1 hold `text + keep`. Scores are computed once, at prefill.

Deviations from the official code (`official=True` restores what can be restored):
- Batches: the official code reads batch element 0 and drops the padding mask; vtprune scores each
  sample on its own with its mask (left or right padding). `official=True` raises at more than one
  image per call instead of reproducing it.
- The official in-place code has no KV cache and re-runs (and re-selects) the whole sequence at every
  generated token; its KV-cache variant selects once at prefill (as vtprune does) but runs layer K-1
  twice, duplicating that layer's cache entries (a bug, not reproduced).
- The image span is hard-coded in the official code (35 prompt tokens before a 576-token image);
  vtprune uses each image's real columns (several images per prompt are cut independently).
- The official code skips FastV for prompts shorter than 100 tokens (a decode-step guard); vtprune
  prunes whenever an image has more than `keep` visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import VTPruneError
from ..patches.decoder import LLMStage, StageContext
from ..registry import register
from .base import ImageContext, Method, Selection


# --- attention rows recomputed from q/k (shared by the in-LLM methods) -------------------------------------
def attention_rows(ctx: StageContext, b: int, rows: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Head-mean softmax attention probabilities of query rows `rows` of sample `b` over ALL keys of
    the stage layer, float32, with the causal mask and the padding mask (`ctx.mask2d`) applied:
    [len(rows), T]. Computed in chunks of query rows (memory O(heads * chunk * T))."""
    k = ctx.k[b].float()
    if ctx.num_kv_groups > 1:
        k = k.repeat_interleave(ctx.num_kv_groups, dim=0)
    T = k.shape[1]
    real = ctx.mask2d[b].to(torch.bool).to(k.device)
    keys = torch.arange(T, device=k.device)
    rows = rows.to(k.device)
    out = []
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        q = ctx.q[b][:, r].float()  # [H, R, d]
        logits = torch.einsum("hrd,htd->hrt", q, k) * ctx.scaling
        allowed = (keys[None, :] <= r[:, None]) & real[None, :]
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        out.append(torch.softmax(logits, dim=-1).mean(0))
    if not out:
        return torch.zeros(0, T, dtype=torch.float32, device=k.device)
    return torch.cat(out, 0)


def visual_columns_of_sample(ctx: StageContext, b: int) -> torch.Tensor:
    """Bool [T]: the columns of sample b that hold visual tokens of any of its images."""
    T = ctx.mask2d.shape[1]
    vis = torch.zeros(T, dtype=torch.bool, device=ctx.mask2d.device)
    for sb, cols in ctx.images:
        if sb == b and cols.numel():
            vis[cols.to(vis.device)] = True
    return vis


def text_rows_after(ctx: StageContext, b: int, cols: torch.Tensor) -> torch.Tensor:
    """The real, non-visual tokens of sample b after an image's last visual token (MustDrop's text
    rows: for one image per prompt, every token after the image block)."""
    T = ctx.mask2d.shape[1]
    dev = ctx.mask2d.device
    if cols.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    after = torch.arange(T, device=dev) > int(cols.max())
    ok = after & ctx.mask2d[b].to(torch.bool) & ~visual_columns_of_sample(ctx, b)
    return torch.nonzero(ok).flatten()


def check_layer_count(name: str, layers, num_layers: int, knob: str) -> None:
    """In-LLM stage layers must leave at least one layer after the last cut."""
    bad = [l for l in layers if not 0 <= l < num_layers - 1]
    if bad:
        raise VTPruneError(
            f"{name}: {knob}={tuple(layers)} needs a decoder with more than {max(layers) + 1} layers, this one has "
            f"{num_layers}; pass {knob}= with layers below {num_layers - 1}"
        )


class _LastTokenCut(LLMStage):
    def __init__(self, layer: int):
        self.layer = layer

    def select(self, ctx: StageContext):
        out = []
        for (b, cols), R in zip(ctx.images, ctx.budgets):
            V = cols.numel()
            if V <= R:
                out.append(None)
                continue
            last = ctx.last[b].reshape(1)
            probs = attention_rows(ctx, b, last)[0]
            score = probs[cols.to(probs.device)]
            out.append(torch.sort(torch.topk(score, R).indices).values.cpu())
        return out


@register("fastv")
@dataclass
class FastV(Method):
    """FastV: after the K-th decoder layer keep the visual tokens the last prompt token attends to most."""

    k: int = 2

    summary: ClassVar[str] = "FastV: after decoder layer K (2) keep the top-`keep` visual tokens by the last token's attention"
    POLICIES: ClassVar[dict] = {"position_mode": ("original", "original")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise VTPruneError(f"fastv: k must be an int >= 1 (FastV's K: layers that see every visual token; paper: 2), got {self.k!r}")

    def check_model(self, family: str, batch_images: int) -> None:
        super().check_model(family, batch_images)
        if self.official and batch_images > 1:
            raise VTPruneError(
                "fastv official=True reproduces the batch-1 official code (it reads batch element 0 only); run one image "
                "at a time or drop official=True (vtprune scores every sample on its own)"
            )

    def select(self, image: ImageContext) -> Selection:
        # nothing is dropped before the LLM: the stock layout enters it, the cut happens after layer K
        return Selection(kept=image.geometry.full_selection(), newline="all-rows")

    def llm_stages(self, family: str, num_layers: int) -> list:
        if self.k >= num_layers:
            raise VTPruneError(f"fastv: k={self.k} leaves no decoder layer after the cut (this LLM has {num_layers} layers); use k < {num_layers}")
        return [_LastTokenCut(self.k - 1)]
