"""An independent reference for pruned LLaVA / LLaVA-NeXT inference, built only from transformers'
own functions and the inspection contract (`pruner.last.kept` / `.sources`): the stock visual
tokens of each image (unpatched `get_image_features`), the stock slot order re-derived with HF's
`unpad_image` on an index canvas, a prompt with exactly K placeholders, the kept features passed as
`inputs_embeds` to the unpatched model, and an uncached greedy loop. Nothing from vtprune.patches
is used here."""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

NL = ("newline", -1)


def stock_slots(model, image_size=None):
    """Stock order of one image's visual tokens as (partition, index) pairs or NL."""
    vc = model.config.vision_config
    g = vc.image_size // vc.patch_size
    base = [(0, i) for i in range(g * g)]
    if image_size is None:  # LLaVA-1.5
        return base
    rows, cols = get_anyres_image_grid_shape(image_size, model.config.image_grid_pinpoints, vc.image_size)
    # canvas of encoded (partition, index) ids, [1, rows*g, cols*g]
    canvas = torch.zeros(rows * g, cols * g, dtype=torch.long)
    for p in range(rows * cols):
        r0, c0 = (p // cols) * g, (p % cols) * g
        canvas[r0 : r0 + g, c0 : c0 + g] = (p + 1) * 100000 + torch.arange(g * g).view(g, g)
    canvas = unpad_image(canvas[None], image_size)[0]
    out = list(base)
    for row in canvas.tolist():
        out.extend((v // 100000, v % 100000) for v in row)
        out.append(NL)
    return out


def stock_features(model, pixel_values, image_sizes=None):
    with torch.no_grad():
        if image_sizes is None:
            feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        else:
            feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True).pooler_output
    return list(feats)


def pre_projector(model, pixel_values, image_sizes=None):
    """Per image, [partitions, patches, D] vision features before the projector (unpatched tower)."""
    px = pixel_values
    counts = [1] * px.shape[0]
    if image_sizes is not None:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vc = model.config.vision_config
        counts = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, vc.image_size) for s in image_sizes]
        px = torch.cat([p[:n] for p, n in zip(pixel_values, counts)])
    with torch.no_grad():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
    out, s = [], 0
    for n in counts:
        out.append(hs[s : s + n])
        s += n
    return out


def kept_slots(model, report, i, image_size=None):
    """The stock positions (indices into stock_slots) of the tokens of image i that reach the LLM,
    in LLM order, derived from report.kept: base in raster order, crops in canvas raster order, one
    newline after each canvas row holding a kept token (vtprune's 'kept-rows' / stock layout)."""
    slots = stock_slots(model, image_size)
    kept = {(p, int(x)) for p, kp in enumerate(report.kept[i]) for x in kp.tolist()}
    out, row_has = [], False
    for j, s in enumerate(slots):
        if s == NL:
            if row_has:
                out.append(j)
            row_has = False
        elif s in kept:
            out.append(j)
            row_has = row_has or s[0] > 0
    return out, slots


def reference_features(model, report, i, pixel_values, image_sizes=None):
    """Features of image i as the LLM should see them after pruning (selection or merging)."""
    size = None if image_sizes is None else image_sizes[i]
    pos, slots = kept_slots(model, report, i, size)
    stock = stock_features(model, pixel_values[i : i + 1], None if image_sizes is None else image_sizes[i : i + 1])[0]
    if report.sources[i] is None:
        return stock[pos], pos, slots
    pre = pre_projector(model, pixel_values[i : i + 1], None if image_sizes is None else image_sizes[i : i + 1])[0]
    flat = pre.reshape(-1, pre.shape[-1])
    groups = {(p, int(x)): src for p, (kp, sp) in enumerate(zip(report.kept[i], report.sources[i])) for x, src in zip(kp.tolist(), sp)}
    rows = []
    for j in pos:
        s = slots[j]
        if s == NL:
            rows.append(model.model.image_newline)
        else:
            src = groups[s]
            with torch.no_grad():
                rows.append(model.model.multi_modal_projector(flat[src].mean(0, keepdim=True))[0])
    return torch.stack(rows), pos, slots


def greedy_reference(model, input_ids, feats, stock_pos, n_new, position_mode="compact"):
    """Batch-1 uncached greedy decoding with a prompt holding exactly len(feats) placeholders.
    `stock_pos` are the stock slot indices of the kept tokens (for original positions)."""
    tok_id = model.config.image_token_id
    ids = input_ids[0]
    ph = (ids == tok_id).nonzero()[:, 0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[ph[feats.shape[0]:]] = False
    new_ids = ids[keep][None]
    emb = model.get_input_embeddings()(new_ids)
    mask = (new_ids == tok_id)[..., None]
    emb = emb.masked_scatter(mask, feats.to(emb.dtype))
    if position_mode == "original":
        orig = torch.arange(ids.shape[0])
        pos = orig.clone()
        pos[ph[: feats.shape[0]]] = ph[torch.tensor(stock_pos, dtype=torch.long)]
        positions = pos[keep]
    else:
        positions = torch.arange(new_ids.shape[1])
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            mask2 = torch.ones(1, emb.shape[1], dtype=torch.long)  # explicit: gapped positions without a mask mean packing
            logits = model(inputs_embeds=emb, attention_mask=mask2, position_ids=positions[None], use_cache=False).logits[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            emb = torch.cat([emb, model.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
            positions = torch.cat([positions, positions[-1:] + 1])
    return out


def llm_by_hand(model, embeds, cut_layer=None, keep_cols=None, position_mode="compact", score_fn=None, vis_cols=None, budget=None, positions=None):
    """Batch-1, unpadded, uncached forward of the language model layer by layer (no vtprune hooks),
    optionally dropping tokens after `cut_layer`: either the given `keep_cols`, or the ones chosen by
    `score_fn(q_last, k_vis, v_last, v_vis, kv_groups, scaling)` over `vis_cols` (top `budget`),
    computed here from the layer's own projections. Returns (last-token logits, kept columns)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    T = embeds.shape[1]
    h = embeds
    pos = torch.arange(T)[None] if positions is None else positions
    cos_sin = lm.rotary_emb(h, pos)
    with torch.no_grad():
        for j, layer in enumerate(lm.layers):
            if j == cut_layer and keep_cols is None:
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                d = attn.head_dim
                q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)
                k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)
                v = attn.v_proj(x).view(1, T, -1, d).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, *cos_sin)
                V = vis_cols.numel()
                if V > budget:
                    s = score_fn(q[0, :, T - 1], k[0][:, vis_cols], v[0, :, T - 1], v[0][:, vis_cols], attn.num_key_value_groups, attn.scaling)
                    kept_vis = vis_cols[torch.sort(torch.topk(s, budget).indices).values]
                else:
                    kept_vis = vis_cols
                drop = torch.zeros(T, dtype=torch.bool)
                drop[vis_cols] = True
                drop[kept_vis] = False
                keep_cols = torch.nonzero(~drop).flatten()
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin, cache=None, use_cache=False)
            if j == cut_layer:
                h = h[:, keep_cols]
                pos = torch.arange(keep_cols.numel())[None] if position_mode == "compact" else pos[:, keep_cols]
                cos_sin = lm.rotary_emb(h, pos)
        h = lm.norm(h)
        return model.lm_head(h[:, -1])[0], keep_cols
