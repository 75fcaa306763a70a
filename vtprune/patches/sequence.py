"""The placeholder problem, solved once for every method.

HF processors expand each `<image>` into N placeholder ids (576 for LLaVA-1.5 at 336 px; the AnyRes
count for LLaVA-NeXT) and the model checks that the features match that count. After pruning,
image `i` contributes `k_i` tokens, so the prompt is rebuilt: each image keeps the first `k_i` of its
placeholders, and `input_ids` / `inputs_embeds`, `attention_mask`, `labels` and `position_ids` are
shrunk with the same mask, per sample. Rows that became shorter than the longest are re-padded on
the caller's padding side (left if the caller used left padding or none).

Positions: "compact" renumbers contiguously (what the model does by itself on the shorter prompt;
nothing is passed unless the caller passed `position_ids`); "original" gives every kept token the
position it had in the unpruned sequence (visual tokens: the position of their stock slot), and
always passes `position_ids` explicitly (generation continues from the original length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import VTPruneError


@dataclass
class Shrunk:
    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    input_keep: torch.Tensor  # bool [B, T]
    new_index: torch.Tensor  # long [B, T], -1 where removed
    sample_of: list[int]
    length: int
    image_cols: list[torch.Tensor]  # per image: columns of its placeholders in the caller's sequence


def assign_images(image_mask: torch.Tensor, counts: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Walk placeholders in batch order and give image `i` the next `counts[i]` of them.
    Returns the sample of each image and the column positions of its placeholders."""
    pos = image_mask.nonzero()
    total = int(pos.shape[0])
    if total != sum(counts):
        raise VTPruneError(
            f"the prompt has {total} image placeholder tokens but the images give {sum(counts)} visual tokens "
            f"({counts} per image). Build inputs with the model's own processor and the same image settings "
            "(for LLaVA-NeXT pass size={'shortest_edge': 336}, crop_size=336), one <image> per image"
        )
    samples, cols = [], []
    start = 0
    for n in counts:
        rows = pos[start : start + n, 0]
        if rows.numel() and not bool((rows == rows[0]).all()):
            raise VTPruneError("an image's placeholder tokens span two samples; check the number of <image> tokens per prompt")
        samples.append(int(rows[0]) if rows.numel() else 0)
        cols.append(pos[start : start + n, 1])
        start += n
    return samples, cols


def padding_side(attention_mask: torch.Tensor | None) -> str:
    if attention_mask is None or attention_mask.shape[1] == 0:
        return "left"
    first, last = attention_mask[:, 0] == 0, attention_mask[:, -1] == 0
    if bool(last.any()) and not bool(first.any()):
        return "right"
    return "left"


def original_positions(
    mode: str, batch: int, length: int, device, attention_mask=None, position_ids=None, past: int = 0, past_mask=None
) -> torch.Tensor:
    """The positions the unpatched model would give each token: the caller's `position_ids`, else
    generate()'s rule (attention-mask cumsum over the cache and the prompt, pads at 0), else
    forward()'s rule (arange + past)."""
    if position_ids is not None:
        if position_ids.dim() != 2:
            raise VTPruneError("position_ids must be 2-D [batch, length] for pruned LLaVA models")
        return position_ids.expand(batch, -1)
    if mode == "generate" and attention_mask is not None:
        full = attention_mask if past_mask is None else torch.cat([past_mask.to(attention_mask), attention_mask], 1)
        pos = full.long().cumsum(-1) - 1
        return pos.masked_fill(full == 0, 0)[:, -length:]
    return (torch.arange(length, device=device) + past).unsqueeze(0).expand(batch, -1)


def shrink(
    image_mask: torch.Tensor,
    counts: list[int],
    offsets: list[torch.Tensor],
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    position_mode: str = "compact",
    mode: str = "generate",
    pad_id: int = 0,
    past: int = 0,
    past_mask: torch.Tensor | None = None,
) -> Shrunk:
    """Rebuild the prompt so that image `i` has `len(offsets[i])` placeholders (its packed tokens,
    whose stock offsets are `offsets[i]`)."""
    B, T = image_mask.shape
    device = image_mask.device
    sample_of, cols = assign_images(image_mask, counts)
    keep = ~image_mask
    need_pos = position_mode == "original" or position_ids is not None
    orig_pos = original_positions(mode, B, T, device, attention_mask, position_ids, past, past_mask) if need_pos else None
    pos_src = orig_pos.clone() if orig_pos is not None else None
    for i, (b, c) in enumerate(zip(sample_of, cols)):
        k = int(offsets[i].numel())
        if k > c.numel():
            raise VTPruneError(f"image {i}: {k} packed tokens but only {c.numel()} placeholders")
        keep[b, c[:k]] = True
        if position_mode == "original" and k:
            pos_src[b, c[:k]] = orig_pos[b, c[offsets[i].to(device)]]
    lengths = keep.sum(1)
    L = int(lengths.max()) if B else 0
    side = padding_side(attention_mask)
    shift = (L - lengths) if side == "left" else torch.zeros_like(lengths)
    new_index = torch.where(keep, keep.long().cumsum(1) - 1 + shift[:, None], torch.full_like(keep, -1, dtype=torch.long))
    rows = torch.arange(B, device=device)[:, None].expand(B, T)[keep]
    dst = new_index[keep]
    extra_pad = bool((lengths != L).any())

    def take(src: torch.Tensor | None, fill) -> torch.Tensor | None:
        if src is None:
            return None
        src = src.expand(B, *src.shape[1:]) if src.shape[0] == 1 and B > 1 else src
        out = torch.full((B, L, *src.shape[2:]), fill, dtype=src.dtype, device=src.device)
        out[rows.to(src.device), dst.to(src.device)] = src[keep.to(src.device)]
        return out

    new_ids = take(input_ids, pad_id)
    new_embeds = take(inputs_embeds, 0)
    if attention_mask is not None:
        new_mask = take(attention_mask, 0)
    elif extra_pad or position_mode == "original":
        new_mask = take(torch.ones(B, T, dtype=torch.long, device=device), 0)
    else:
        new_mask = None
    new_labels = take(labels, -100)
    new_pos = None
    if position_mode == "original":
        new_pos = take(pos_src, 0)
    elif position_ids is not None:
        # contiguous renumbering; a position reset (packed sequences) restarts the count
        removed = (~keep).long()
        c = removed.cumsum(1)
        start = torch.where(orig_pos == 0, c - removed, torch.zeros_like(c)).cummax(1).values
        new_pos = take(orig_pos - (c - start), 0)
    return Shrunk(new_ids, new_embeds, new_mask, new_labels, new_pos, keep, new_index, sample_of, L, cols)
