"""Dropping visual tokens between decoder layers of HF Llama / Qwen2 language models, with hooks.

A method declares *stages* (`LLMStage`: "after decoder layer K, keep these visual tokens"). During
prefill, the output of layer K is really shortened (per sample, re-padded on the caller's padding
side), and every later layer gets a consistent attention mask, position ids and rotary embeddings
through forward pre-hooks that replace its keyword arguments. The KV cache is left alone: layers
0..K hold the full prompt, later layers the shortened one (`DynamicCache` layers have independent
lengths). During decoding, the same pre-hooks give the upper layers a 2-D mask made of their own
prefill mask plus the new tokens, and positions shifted by the tokens removed below them
("compact", contiguous renumbering) or unchanged ("original").

Signals for scoring come from hooks on the stage layer's own `q_proj` / `k_proj` / `v_proj`
outputs, rotated with the layer's rotary embedding: the model keeps its attention implementation.
Everything lives on the language-model instance and is removed by `remove()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError, UnsupportedSettingError


@dataclass
class StageContext:
    """What an in-LLM stage sees at the output of its layer (one prefill)."""

    layer: int
    q: torch.Tensor  # [B, Hq, T, d] after RoPE (model dtype)
    k: torch.Tensor  # [B, Hkv, T, d] after RoPE
    v: torch.Tensor  # [B, Hkv, T, d]
    hidden: torch.Tensor  # [B, T, D] output of the layer
    mask2d: torch.Tensor  # [B, T] 1 = real token
    last: torch.Tensor  # [B] index of each sample's last real token
    images: list[tuple[int, torch.Tensor]]  # per image: (sample, columns of its visual tokens now)
    budgets: list[int]
    num_kv_groups: int
    head_dim: int
    scaling: float


class LLMStage:
    """After decoder layer `layer`, keep per image the visual tokens `select()` returns (indices into
    that image's visual tokens as they enter the stage, ascending), or None to keep them all."""

    layer: int = 0

    def select(self, ctx: StageContext) -> list[torch.Tensor | None]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class PrefillRequest:
    images: list[tuple[int, torch.Tensor]]  # (sample, columns) in the LLM input sequence
    budgets: list[int]
    report: object = None


@dataclass
class _StageState:
    mask2d: torch.Tensor
    pos: torch.Tensor
    cos_sin: tuple
    masks: dict
    removed: torch.Tensor  # [B] tokens removed in each row below this stage (all stages so far)
    first_layer: int


@dataclass
class _Run:
    cache: object
    T: int
    mask2d: torch.Tensor
    pos: torch.Tensor
    images: list[tuple[int, torch.Tensor]]
    budgets: list[int]
    report: object
    side: str
    prefill: bool = True
    stages: dict = field(default_factory=dict)  # stage index -> _StageState
    sig: dict = field(default_factory=dict)
    cos_sin: dict = field(default_factory=dict)
    surviving: list = field(default_factory=list)  # per image: indices into the visual segment as it entered the LLM
    counts: list = field(default_factory=list)  # per image: [(first layer, count)]
    seq_maps: list = field(default_factory=list)  # per sequence so far (0 = LLM input): [B, T_s] -> current column, -1 dropped
    layer_state: dict = field(default_factory=dict)  # decode: layer -> _StageState of what its cache holds
    call_mask: torch.Tensor | None = None
    call_pos: torch.Tensor | None = None
    decode_cache: dict = field(default_factory=dict)


def _padding_side(mask2d: torch.Tensor) -> str:
    first, last = mask2d[:, 0] == 0, mask2d[:, -1] == 0
    return "right" if bool(last.any()) and not bool(first.any()) else "left"


class DecoderPruner:
    def __init__(self, language_model: nn.Module, stages: list[LLMStage], position_mode: str = "compact", evict_layers=()):
        layers = getattr(language_model, "layers", None)
        if layers is None or not hasattr(language_model, "rotary_emb"):
            raise UnsupportedModelError(
                f"in-LLM pruning needs a Llama/Qwen2-style decoder (layers + rotary_emb); got {type(language_model).__name__}"
            )
        attn = getattr(layers[0], "self_attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim")):
            raise UnsupportedModelError(f"in-LLM pruning needs q_proj/k_proj/v_proj attention; got {type(attn).__name__}")
        self.lm = language_model
        self.config = language_model.config
        self.layers = layers
        self.stages = sorted(stages, key=lambda s: s.layer)
        for s in self.stages:
            if not 0 <= s.layer < len(layers) - 1:
                raise UnsupportedModelError(f"an in-LLM stage after layer {s.layer} needs a decoder with more than {s.layer + 1} layers")
        self.position_mode = position_mode
        self.evict_layers = sorted(set(evict_layers))
        for j in self.evict_layers:
            if not 0 <= j < len(layers):
                raise UnsupportedModelError(f"cannot evict the cache of layer {j}: the decoder has {len(layers)} layers")
        self.pending: PrefillRequest | None = None
        self.run: _Run | None = None
        self.handles = []
        self.stage_layers = {s.layer: i for i, s in enumerate(self.stages)}
        first = self.stages[0].layer
        self.handles.append(language_model.register_forward_pre_hook(self._on_lm_call, with_kwargs=True))
        self.handles.append(language_model.register_forward_hook(self._on_lm_done))
        for j, layer in enumerate(layers):
            if j > first or j in self.stage_layers or j in self.evict_layers:
                self.handles.append(layer.register_forward_pre_hook(self._pre_layer(j), with_kwargs=True))
            if j in self.stage_layers:
                self.handles.append(layer.register_forward_hook(self._post_layer(j)))
                for kind in ("q", "k", "v"):
                    proj = getattr(layer.self_attn, f"{kind}_proj")
                    self.handles.append(proj.register_forward_hook(self._proj_hook(j, kind)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.run = None
        self.pending = None

    # --- the language-model call -------------------------------------------------------------------------
    def _on_lm_call(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = args[0] if args else None
        if embeds is None or embeds.dim() != 3:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        B, T = embeds.shape[:2]
        mask2d = kwargs.get("attention_mask")
        if isinstance(mask2d, torch.Tensor) and mask2d.dim() != 2:
            raise UnsupportedSettingError("in-LLM pruning needs a 2-D attention_mask (padding mask)")
        pos = kwargs.get("position_ids")
        if self.pending is not None:
            req, self.pending = self.pending, None
            if cache is not None:
                from transformers.cache_utils import DynamicCache

                if not isinstance(cache, DynamicCache):
                    raise UnsupportedSettingError(
                        f"in-LLM pruning keeps layers of different lengths in the KV cache and needs a DynamicCache; got "
                        f"{type(cache).__name__} (drop cache_implementation=..., e.g. 'static')"
                    )
                if cache.get_seq_length() > 0:
                    raise UnsupportedSettingError("in-LLM pruning needs the image prompt in one prefill (no prefix cache)")
            m2 = mask2d.long() if mask2d is not None else torch.ones(B, T, dtype=torch.long, device=embeds.device)
            if pos is None:
                pos = torch.arange(T, device=embeds.device)[None].expand(B, T)
            pos = pos.expand(B, T) if pos.shape[0] == 1 else pos
            self.run = _Run(cache, T, m2, pos, list(req.images), list(req.budgets), req.report, _padding_side(m2))
            self.run.surviving = [torch.arange(c.numel()) for _, c in req.images]
            self.run.counts = [[(0, int(c.numel()))] for _, c in req.images]
            self.run.seq_maps = [torch.arange(T, device=embeds.device)[None].expand(B, T).clone()]
            return None
        run = self.run
        if run is not None and not run.prefill and cache is not None and cache is run.cache:
            run.call_mask = mask2d.long() if mask2d is not None else None
            if pos is None:
                past = cache.get_seq_length(0)
                pos = (torch.arange(T, device=embeds.device) + past)[None].expand(B, T)
            run.call_pos = pos.expand(B, T) if pos.shape[0] == 1 else pos
            run.decode_cache = {}
            return None
        self.run = None  # an unrelated call (a new conversation without pixels, a different cache)
        return None

    def _on_lm_done(self, module, args, output):
        run = self.run
        if run is not None and run.prefill:
            run.prefill = False
            rep = run.report
            if rep is not None:
                n_layers = len(self.layers)
                for i in range(len(run.images)):
                    counts = run.counts[i]
                    per_layer = []
                    for j in range(n_layers):
                        c = [n for first, n in counts if first <= j][-1]
                        per_layer.append(c)
                    rep.tokens_per_layer[i] = per_layer
                rep.output_index = run.seq_maps[0]
            if run.cache is None:  # the model created its cache inside this call
                run.cache = getattr(output, "cache", None) if not isinstance(output, tuple) else None
            if run.cache is None:
                self.run = None
            else:
                self._finish_prefill(run)
        return None

    def _finish_prefill(self, run: _Run) -> None:
        """Decode-time state of every layer whose cache differs from layer 0's, and the end-of-prefill
        eviction: the caches of `evict_layers` keep only the tokens that survived every stage."""
        for j in range(len(self.layers)):
            s = self._stage_for(j)
            if s is not None and s in run.stages:
                run.layer_state[j] = run.stages[s]
        if not run.stages or not self.evict_layers:
            return
        final_idx = max(run.stages)
        final = run.stages[final_idx]
        n_seq = len(run.seq_maps) - 1  # index of the final sequence
        L = final.mask2d.shape[1]
        for j in self.evict_layers:
            held = sum(1 for s in self.stages if s.layer < j and self.stages.index(s) in run.stages)
            if held >= n_seq:
                continue
            layer = run.cache.layers[j]
            m = run.seq_maps[held].to(layer.keys.device)  # [B, T_held] -> final column or -1
            B = layer.keys.shape[0]
            keep = m >= 0
            rows = torch.arange(B, device=m.device)[:, None].expand_as(m)[keep]
            for name in ("keys", "values"):
                src = getattr(layer, name)
                out = src.new_zeros(B, src.shape[1], L, src.shape[-1])
                out[rows, :, m[keep]] = src.permute(0, 2, 1, 3)[keep]
                setattr(layer, name, out)
            run.layer_state[j] = final

    # --- hooks on the layers -----------------------------------------------------------------------------
    def _proj_hook(self, j: int, kind: str):
        def hook(module, args, output):
            run = self.run
            if run is not None and run.prefill:
                run.sig.setdefault(j, {})[kind] = output
            return None

        return hook

    def _stage_for(self, j: int) -> int | None:
        """Index of the last stage whose layer is below j."""
        idx = None
        for i, s in enumerate(self.stages):
            if s.layer < j:
                idx = i
        return idx

    def _pre_layer(self, j: int):
        def hook(module, args, kwargs):
            run = self.run
            if run is None:
                return None
            changed = False
            if run.prefill:
                s = self._stage_for(j)
                if s is not None and s in run.stages:
                    st = run.stages[s]
                    kwargs["attention_mask"] = st.masks[self._layer_type(j)]
                    kwargs["position_embeddings"] = st.cos_sin
                    kwargs["position_ids"] = st.pos
                    changed = True
            elif run.call_pos is not None and j in run.layer_state:
                st = run.layer_state[j]
                hidden = args[0] if args else kwargs["hidden_states"]
                mask, cos_sin, pos = self._decode_inputs(run, st, hidden, j)
                kwargs["attention_mask"] = mask
                kwargs["position_embeddings"] = cos_sin
                kwargs["position_ids"] = pos
                changed = True
            if run.prefill and j in self.stage_layers:
                run.cos_sin[j] = kwargs.get("position_embeddings")
            return (args, kwargs) if changed else None

        return hook

    def _layer_type(self, j: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[j] if types else "full_attention"

    def _masks(self, hidden, mask2d, pos, first_layer):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        cache = self.run.cache
        kinds = {self._layer_type(j) for j in range(first_layer, len(self.layers))}
        out = {}
        for kind in kinds:
            fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            out[kind] = fn(config=self.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache, position_ids=pos, layer_idx=first_layer if cache is not None else None)
        return out

    def _decode_inputs(self, run, st, hidden, j):
        key = (id(st), self._layer_type(j))
        if key not in run.decode_cache:
            if run.call_mask is not None:
                extra = run.call_mask[:, run.T :]
            else:  # generate drops an all-ones mask: every token since the prefill is real
                n_new = run.cache.get_seq_length(st.first_layer) + hidden.shape[1] - st.mask2d.shape[1]
                extra = torch.ones(hidden.shape[0], n_new, dtype=torch.long, device=hidden.device)
            mask2d = torch.cat([st.mask2d, extra.to(st.mask2d)], dim=1)
            pos = run.call_pos - st.removed[:, None] if self.position_mode == "compact" else run.call_pos
            cos_sin = self.lm.rotary_emb(hidden, pos)
            from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

            fn = create_sliding_window_causal_mask if key[1] == "sliding_attention" else create_causal_mask
            mask = fn(config=self.config, inputs_embeds=hidden, attention_mask=mask2d, cache=run.cache, position_ids=pos, layer_idx=st.first_layer)
            run.decode_cache[key] = (mask, cos_sin, pos)
        return run.decode_cache[key]

    def _post_layer(self, j: int):
        def hook(module, args, output):
            run = self.run
            if run is None or not run.prefill:
                return None
            return self._cut(run, j, output)

        return hook

    # --- the cut -----------------------------------------------------------------------------------------
    def _cut(self, run: _Run, j: int, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        s = self.stage_layers[j]
        stage = self.stages[s]
        attn = self.layers[j].self_attn
        sig = run.sig.pop(j)
        B, T, _ = hidden.shape
        d = attn.head_dim
        q = sig["q"].view(B, T, -1, d).transpose(1, 2)
        k = sig["k"].view(B, T, -1, d).transpose(1, 2)
        v = sig["v"].view(B, T, -1, d).transpose(1, 2)
        cos, sin = run.cos_sin.pop(j)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        prev = run.stages.get(s - 1) if s > 0 else None
        mask2d = prev.mask2d if prev is not None else run.mask2d
        pos = prev.pos if prev is not None else run.pos
        removed = prev.removed if prev is not None else torch.zeros(B, dtype=torch.long, device=hidden.device)
        if run.side == "left":
            last = torch.full((B,), T - 1, dtype=torch.long, device=hidden.device)
        else:
            last = mask2d.long().sum(1) - 1
        ctx = StageContext(j, q, k, v, hidden, mask2d, last, run.images, run.budgets, getattr(attn, "num_key_value_groups", 1), d, getattr(attn, "scaling", d**-0.5))
        choice = stage.select(ctx)
        keep = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        new_images = []
        for i, ((b, cols), sel) in enumerate(zip(run.images, choice)):
            if sel is None:
                new_images.append((b, cols))
                continue
            sel = torch.sort(sel.to(torch.long).cpu()).values
            drop = torch.ones(cols.numel(), dtype=torch.bool)
            drop[sel] = False
            keep[b, cols[drop.to(cols.device)]] = False
            run.surviving[i] = run.surviving[i][sel]
            new_images.append((b, cols[sel.to(cols.device)]))
            run.counts[i].append((j + 1, int(sel.numel())))
            if run.report is not None:
                from ..report import Stage

                run.report.stages[i].append(Stage(j, run.surviving[i].clone()))
        lengths = keep.sum(1)
        L = int(lengths.max())
        shift = (L - lengths) if run.side == "left" else torch.zeros_like(lengths)
        new_index = torch.where(keep, keep.long().cumsum(1) - 1 + shift[:, None], torch.full_like(keep, -1, dtype=torch.long))
        rows = torch.arange(B, device=hidden.device)[:, None].expand(B, T)[keep]
        dst = new_index[keep]

        def take(src, fill):
            out = torch.full((B, L, *src.shape[2:]), fill, dtype=src.dtype, device=src.device)
            out[rows, dst] = src[keep]
            return out

        h_new = take(hidden, 0)
        m_new = take(mask2d.long(), 0)
        removed_before = (~keep).long().cumsum(1)
        if self.position_mode == "compact":
            p_new = take(pos - removed_before, 0)
        else:
            p_new = take(pos, 0)
        removed_total = removed + (~keep).long().sum(1)
        cos_sin = self.lm.rotary_emb(h_new, p_new)
        run.stages[s] = _StageState(m_new, p_new, cos_sin, self._masks(h_new, m_new, p_new, j + 1), removed_total, j + 1)
        run.images = [(b, new_index[b, c]) for b, c in new_images]
        run.seq_maps = [torch.where(m >= 0, new_index.gather(1, m.clamp_min(0)), m) for m in run.seq_maps]
        run.seq_maps.append(torch.arange(L, device=hidden.device)[None].expand(B, L).clone())
        return h_new
