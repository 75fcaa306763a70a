"""Analytic FLOPs of a LLaVA prefill, from the model's real shapes and the token counts that really
entered each layer.

Counted: every matrix product, as `2 * multiply-adds` — the convention of
`torch.utils.flop_counter.FlopCounterMode`, against which the tests check these formulas on the
tiny models (with the math SDPA backend, whose attention is two batched matmuls). Not counted:
norms, softmax, activations, the rotary table and rotation (elementwise in transformers 5), top-k
and other elementwise work (a few percent of a layer at most; the counter ignores them too).

Per image, with `n` the tokens entering a layer (CLS included in the tower):

- vision tower layer (width D, MLP M): q/k/v/o `4 * 2nD^2`, MLP `2 * 2nDM`, scores and values
  `2 * 2n^2 D`; patch embedding `2 * P * D * 3p^2` per tile (P patches of p x p pixels);
- projector (two linears): `2 * rows * (D_in * d + d * d)` over every row it projects;
- LLM layer (width d, q heads Hq, KV heads Hkv, head dim h, gated MLP m): q `2n d Hq h`, k and v
  `2 * 2n d Hkv h` (grouped-query heads), o `2n Hq h d`, the MLP's three matrices `3 * 2ndm`,
  scores and values `2 * 2 n^2 Hq h` (dense: what SDPA math and most kernels compute; causal
  skipping would halve it);
- LM head: `2 * d * V` for the one position whose logits generate needs (`logits_to_keep=1`);
- scoring: the CLS attention rows that vtprune recomputes from q/k hooks, `2 * n * D` per captured
  layer and tile (any method with `cls_layers`); FlowCut's in-tower signals (two CLS-row products
  per layer while it prunes) and its LLaVA-NeXT layer-1 stage. Methods with other in-tower or
  in-LLM scoring have no formula here (`scoring_flops` returns None) and the bench measures their
  scoring with the flop counter instead (method minus its oracle).

`field_flops` is the figure most papers print (FastV's `4nd^2 + 2n^2 d + 2ndm` per LLM layer,
summed over layers with each layer's token count): LLM only, multi-head (no GQA), two-matrix MLP,
no vision tower, no LM head. It is given beside ours, labelled, so numbers can be compared with
papers; it is not a count of what the model computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelDims:
    """The shapes FLOPs depend on, read from a LLaVA / LLaVA-NeXT config."""

    v_hidden: int
    v_mlp: int
    v_heads: int
    v_layers: int
    image_size: int
    patch: int
    channels: int
    proj_in: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        vc, tc = config.vision_config, config.text_config
        vfl = getattr(config, "vision_feature_layer", -2)
        n_feat = 1 if isinstance(vfl, int) else len(vfl)
        heads = tc.num_attention_heads
        return cls(
            v_hidden=vc.hidden_size,
            v_mlp=vc.intermediate_size,
            v_heads=vc.num_attention_heads,
            v_layers=vc.num_hidden_layers,
            image_size=vc.image_size,
            patch=vc.patch_size,
            channels=getattr(vc, "num_channels", 3),
            proj_in=vc.hidden_size * n_feat,
            hidden=tc.hidden_size,
            mlp=tc.intermediate_size,
            heads=heads,
            kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            layers=tc.num_hidden_layers,
            vocab=tc.vocab_size,
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def v_head_dim(self) -> int:
        return self.v_hidden // self.v_heads


# --- per-block counts ---------------------------------------------------------------------------------
def vision_layer(dims: ModelDims, n: int, tiles: int = 1) -> int:
    """One CLIP encoder layer over `tiles` sequences of `n` tokens."""
    D, M = dims.v_hidden, dims.v_mlp
    return tiles * (4 * 2 * n * D * D + 2 * 2 * n * D * M + 2 * 2 * n * n * D)


def patch_embedding(dims: ModelDims, tiles: int) -> int:
    return tiles * 2 * dims.patches * dims.v_hidden * dims.channels * dims.patch * dims.patch


def projector(dims: ModelDims, rows: int) -> int:
    d = dims.hidden
    return 2 * rows * (dims.proj_in * d + d * d)


def llm_layer(dims: ModelDims, n: int, kv: int | None = None, batch: int = 1) -> int:
    """One decoder layer: `n` query tokens attending over `kv` keys (prefill: kv = n)."""
    kv = n if kv is None else kv
    d, h = dims.hidden, dims.head_dim
    q = 2 * n * d * dims.heads * h
    k_v = 2 * 2 * n * d * dims.kv_heads * h
    o = 2 * n * dims.heads * h * d
    mlp = 3 * 2 * n * d * dims.mlp
    attn = 2 * 2 * n * kv * dims.heads * h
    return batch * (q + k_v + o + mlp + attn)


def lm_head(dims: ModelDims, rows: int = 1) -> int:
    return 2 * rows * dims.hidden * dims.vocab


def cls_row(dims: ModelDims, n: int, tiles: int = 1) -> int:
    """The CLS query's logits over `n` keys, all heads (vtprune's hook recomputation)."""
    return tiles * 2 * n * dims.v_hidden


def field_layer(dims: ModelDims, n: int) -> int:
    """FastV's per-layer figure `4nd^2 + 2n^2 d + 2ndm` (the field's usual formula)."""
    d, m = dims.hidden, dims.mlp
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


# --- a prefill's schedule -------------------------------------------------------------------------------
@dataclass
class Schedule:
    """What really entered each layer during one prefill (one sample), as the bench records it.

    - `vision[i]`: runs of vision layer `i` as `(tiles, tokens)` pairs (CLS included); empty if the
      layer did not run;
    - `tiles`: tiles through the patch embedding; `projector_rows`: rows per projector call;
    - `llm[j]`: tokens entering decoder layer `j` (text + visual); `visual[j]`: the visual ones;
    - `stages`: in-LLM cuts as `(layer, visual tokens entering the stage)`;
    - `kv[j]`: entries in layer `j`'s KV cache after the prefill.
    """

    vision: list[list[tuple[int, int]]] = field(default_factory=list)
    tiles: int = 0
    projector_rows: list[int] = field(default_factory=list)
    llm: list[int] = field(default_factory=list)
    visual: list[int] = field(default_factory=list)
    stages: list[tuple[int, int]] = field(default_factory=list)
    kv: list[int] = field(default_factory=list)

    def vision_tokens(self) -> list[int]:
        """Tokens entering each vision layer (all tiles; 0 where the layer did not run)."""
        return [sum(t * n for t, n in runs) for runs in self.vision]

    def vision_counts(self) -> list[int]:
        """Per-tile tokens entering each vision layer (the last run's; 0 where it did not run)."""
        return [runs[-1][1] if runs else 0 for runs in self.vision]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["vision"] = [[list(r) for r in runs] for runs in self.vision]
        d["stages"] = [list(s) for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(
            vision=[[tuple(r) for r in runs] for runs in d.get("vision", [])],
            tiles=d.get("tiles", 0),
            projector_rows=list(d.get("projector_rows", [])),
            llm=list(d.get("llm", [])),
            visual=list(d.get("visual", [])),
            stages=[tuple(s) for s in d.get("stages", [])],
            kv=list(d.get("kv", [])),
        )


def prefill_flops(dims: ModelDims, sched: Schedule, scoring: int | None = 0) -> dict:
    """FLOPs of one prefill, by part: vision, projector, llm, lm_head, scoring, total; and per
    layer: `vision_layers[i]` (every run of tower layer i) and `llm_layers[j]` (decoder layer j)."""
    per_v = [sum(vision_layer(dims, n, t) for t, n in runs) for runs in sched.vision]
    per_l = [llm_layer(dims, n) for n in sched.llm]
    vision = patch_embedding(dims, sched.tiles) + sum(per_v)
    proj = projector(dims, sum(sched.projector_rows))
    llm = sum(per_l)
    head = lm_head(dims, 1) if sched.llm else 0
    out = {"vision": vision, "projector": proj, "llm": llm, "lm_head": head, "scoring": scoring}
    out["total"] = vision + proj + llm + head + (scoring or 0)
    out["vision_layers"], out["llm_layers"] = per_v, per_l
    return out


def decode_flops(dims: ModelDims, kv: list[int]) -> int:
    """FLOPs of the first decoded token over caches of `kv[j]` entries."""
    return sum(llm_layer(dims, 1, k + 1) for k in kv) + lm_head(dims, 1)


def field_flops(dims: ModelDims, llm: list[int]) -> int:
    """The field's `sum over layers of 4nd^2 + 2n^2 d + 2ndm` (labelled as such wherever shown)."""
    return sum(field_layer(dims, n) for n in llm)


def kv_bytes(dims: ModelDims, kv: list[int], element_size: int, batch: int = 1) -> int:
    """Bytes of the KV cache: keys and values of `kv[j]` entries in every layer."""
    return sum(2 * batch * dims.kv_heads * dims.head_dim * n * element_size for n in kv)


# --- scoring ------------------------------------------------------------------------------------------------
def _feature_layer(config) -> int:
    vfl = getattr(config, "vision_feature_layer", -2)
    n = config.vision_config.num_hidden_layers + 1
    idx = [v if v >= 0 else n + v for v in ([vfl] if isinstance(vfl, int) else vfl)]
    return max(idx) - 1


def _cls_rows(method, dims: ModelDims, sched: Schedule, feature_layer: int) -> int:
    total = 0
    for layer in method.cls_layers(dims.v_layers, feature_layer):
        if layer < len(sched.vision):
            total += sum(cls_row(dims, n, t) for t, n in sched.vision[layer])
    return total


def _flowcut_extra(method, dims: ModelDims, sched: Schedule, feature_layer: int, family: str) -> int:
    total = 0
    stage_layers = method.vision_stage_layers(dims.v_layers, feature_layer)
    counts = sched.vision_counts()
    if stage_layers and len(set(c for c in counts if c)) > 1:  # the in-tower stage ran
        final = counts[feature_layer] if feature_layer < len(counts) and counts[feature_layer] else min(c for c in counts if c)
        for layer in stage_layers:
            for t, n in sched.vision[layer] if layer < len(sched.vision) else []:
                if n > final:  # signals are computed while more than K patches remain
                    total += 2 * cls_row(dims, n, t)  # q_cls . k and v_cls . v
    for _, v in sched.stages:  # the LLaVA-NeXT layer-1 cut: q_last . K_vis and v_last . V_vis
        total += 2 * v * dims.head_dim * (dims.heads + dims.kv_heads)
    return total


# method name -> FLOPs of scoring beyond the CLS rows every `cls_layers` method gets
EXTRA_SCORING = {"flowcut": _flowcut_extra}
CLS_ONLY = {"none", "random", "pool", "vtc-cls", "hired", "globalcom2"}


def scoring_flops(method, config, sched: Schedule, family: str) -> int | None:
    """Analytic scoring FLOPs of `method` (a vtprune Method) in this prefill, or None when the method
    scores in a way this module has no formula for (the bench then measures it)."""
    dims = ModelDims.from_config(config)
    f = _feature_layer(config)
    total = _cls_rows(method, dims, sched, f)
    name = getattr(method, "name", "")
    if name in EXTRA_SCORING:
        return total + EXTRA_SCORING[name](method, dims, sched, f, family)
    if name in CLS_ONLY:
        return total
    if method.vision_stage_layers(dims.v_layers, f) or method.llm_stages(family, dims.layers):
        return None
    return total


# --- the unpruned reference schedule, for worked examples ------------------------------------------------
def reference_schedule(dims: ModelDims, visual: int, text: int, vision_layers: int | None = None, tiles: int = 1) -> Schedule:
    """A schedule with `visual` tokens entering every LLM layer and the tower run for `vision_layers`
    layers on full tiles (default: all of them, as transformers does)."""
    nv = dims.v_layers if vision_layers is None else vision_layers
    n = dims.patches + 1
    return Schedule(
        vision=[[(tiles, n)] for _ in range(nv)] + [[] for _ in range(dims.v_layers - nv)],
        tiles=tiles,
        projector_rows=[tiles * dims.patches],
        llm=[visual + text] * dims.layers,
        visual=[visual] * dims.layers,
        kv=[visual + text] * dims.layers,
    )


def worked_example(config, text: int = 40, budgets=(576, 64), cls_layers: int = 3) -> list[dict]:
    """FLOPs of LLaVA-1.5 at the given visual-token budgets: ours (tower + LLM + LM head, and the
    scoring of a `cls_layers`-layer CLS ranking like vtc-cls, tower stopped at the feature layer as
    vtprune runs it) next to the field's formula. The unpruned row runs the whole tower, as transformers does."""
    dims = ModelDims.from_config(config)
    f = _feature_layer(config)
    rows = []
    for b in budgets:
        full = b >= dims.patches
        sched = reference_schedule(dims, b, text, None if full else f + 1)
        score = 0 if full else cls_layers * cls_row(dims, dims.patches + 1)
        fl = prefill_flops(dims, sched, score)
        rows.append({"visual": b, "text": text, **fl, "field": field_flops(dims, sched.llm)})
    return rows


def format_flops(x: float | int | None) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"
