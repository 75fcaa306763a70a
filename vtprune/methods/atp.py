"""`atp`: a training-free adaptation of ATP-LLaVA (Ye et al., "ATP-LLaVA: Adaptive Token Pruning for
Large Vision Language Models", CVPR 2025).

This is NOT ATP-LLaVA. ATP-LLaVA is a *trained* method: small learned modules between decoder layers
predict per-instance thresholds, and the LLM is fine-tuned with them; no official code was released.
`atp` keeps its structure (pruning modules between decoder layers, a redundancy score from
self-modality and cross-modality attention, Spatial Augmented Pruning, kept tokens keeping their
original positions) and replaces every learned part with a parameter-free rule. Expect a larger
accuracy drop than the paper's figures, which come from the fine-tuned model.

What stands in for what (knob, default):

| ATP-LLaVA (learned)                               | `atp` (training-free)                                              |
| ------------------------------------------------- | ------------------------------------------------------------------ |
| modules between decoder layers (layers unknown)   | `atp_layers` (2, 6, 10, 14): cuts after these decoder layers       |
| redundancy threshold head theta_r (per instance)  | `rule`: "mass" keeps the smallest set of tokens whose normalised   |
|                                                   | score mass reaches p_l (`mass_schedule` 0.90, 0.85, 0.80, 0.75);   |
|                                                   | "zscore" keeps S > mean + k_l std (`zscore_schedule` -0.5, 0,      |
|                                                   | 0.25, 0.5); "otsu" (Otsu's split of the scores, no knob)           |
| spatial threshold head theta_s / sampling rate    | `sap` (True): also keep tokens whose original grid coordinate lies |
|                                                   | on a stride-s_l lattice, `sap_strides` (2, 3, 4, 6) (R_s = 1/s^2)  |
| per-layer ratio from the depth-weighted penalty   | the monotone schedules above; rails `min_keep` (16), `max_keep`    |
| training towards a target average (576 -> 144)    | `shift` (0): one scalar added to every p_l (mass) / subtracted     |
|                                                   | from every k_l (zscore); `atp.calibrate(model, inputs, keep=144)`  |
|                                                   | bisects it on calibration inputs to hit a layer-averaged target    |
| soft attention masks during training              | none: hard pruning only                                            |

Score, at each module, from the preceding decoder layer's own q/k (RoPE applied, float32, softmax over
ALL keys with the causal and padding masks, head mean, GQA keys repeated as attention does), over the
image's current patch tokens v:
- S_cross(v) = mean over the text tokens after the image (the question and the template) of A[t, v];
- S_self(v) = sum over the image's patch-token queries u at or after v of A[u, v], divided by their
  number (`self_norm="reach"`: a causal model lets only later tokens see v) or by all of them
  ("all", the literal "average attention received");
- S = alpha * S_cross / sum S_cross + (1 - alpha) * S_self / sum S_self (`alpha` 0.5; S_self alone
  when the prompt has no text after the image);
- optional sink guard (`sink_factor`, off): tokens with S_self above sink_factor x the median are kept
  and left out of the threshold rule.
A token survives if the rule keeps it OR it lies on the lattice; then `min_keep` / `max_keep` are
enforced by S. Survivors keep their order and their original RoPE positions (`position_mode`
"original", the paper's choice; "compact" also works).

Budget: `atp` has none of its own, and `keep` / `keep_ratio` are refused: its counts are per
instance. Use `shift` (from `calibrate`) to move the average, `max_keep` to cap a module.
`pruner.last.tokens_per_layer` / `mean_tokens` report what each image kept. Keep-all setting:
`mass_schedule=(1.0, 1.0, 1.0, 1.0)` (every score mass kept); the hooks still run and the output
equals the unpatched model.

LLaVA-NeXT: lattice coordinates are per partition (the base image, each crop); newline tokens are
not scored and survive while any token of their canvas row survives.

KV cache after prefill (text = non-visual prompt tokens): decoder layer j holds
`text + pruner.last.tokens_per_layer[i][j]` entries (the tokens that entered it): layers
0..atp_layers[0] the full image, and so on; no end-of-prefill eviction.

`official=True` is refused: there is no official implementation to reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import VTPruneError
from ..patches import anyres
from ..patches.decoder import LLMStage, StageContext
from ..registry import register
from .base import ImageContext, Method, Selection
from .fastv import attention_rows, check_layer_count, text_rows_after

RULES = ("mass", "zscore", "otsu")
SELF_NORMS = ("reach", "all")


def otsu_threshold(s: torch.Tensor) -> float:
    """Otsu's split of a 1-D score vector, on the exact sorted values: the value t maximising the
    between-class variance of {s < t} and {s >= t}; the upper class is kept."""
    v = torch.sort(s.double()).values
    n = v.numel()
    if n < 2 or float(v[0]) == float(v[-1]):
        return float(v[0]) if n else 0.0
    c = torch.cumsum(v, 0)
    total = float(c[-1])
    i = torch.arange(1, n, dtype=torch.float64)  # lower class = first i values
    w0, w1 = i / n, (n - i) / n
    mu0 = c[:-1] / i
    mu1 = (total - c[:-1]) / (n - i)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[v[1:] == v[:-1]] = -1  # a split must fall between distinct values
    j = int(torch.argmax(between))
    return float(v[j + 1])


def rule_keep(S: torch.Tensor, rule: str, param: float | None) -> torch.Tensor:
    """Bool mask of the tokens the threshold rule keeps (S: float scores >= 0)."""
    n = S.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    if rule == "mass":
        p = float(param)
        total = float(S.sum())
        if p >= 1 or total <= 0:
            return torch.ones(n, dtype=torch.bool)
        if p <= 0:
            return torch.zeros(n, dtype=torch.bool)
        order = torch.sort(S, descending=True, stable=True).indices
        cum = torch.cumsum(S[order].double(), 0) / total
        m = int(torch.searchsorted(cum, torch.tensor([p], dtype=torch.float64), right=False)[0]) + 1
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[: min(m, n)]] = True
        return keep
    if rule == "zscore":
        mean, std = S.mean(), S.std(unbiased=False)
        return S > mean + float(param) * std
    return S >= otsu_threshold(S)


@dataclass
class _Tokens:
    """Per visual token of one image as it currently is in the LLM."""

    newline: torch.Tensor  # bool
    group: torch.Tensor  # row group (newlines survive with their group)
    r: torch.Tensor  # lattice row (partition-local), -1 for newlines
    c: torch.Tensor

    def take(self, idx: torch.Tensor) -> "_Tokens":
        return _Tokens(self.newline[idx], self.group[idx], self.r[idx], self.c[idx])


def token_table(g, lay) -> _Tokens:
    """Newline flags, row groups (0 = base image, 1 + canvas row for crops; a newline takes the group
    of the patch token before it) and partition-local grid coordinates of a packed image."""
    slots = lay.slots.to(torch.long).cpu()
    nl = slots == anyres.NEWLINE
    P, gw = g.patches, g.grid_w
    sid = slots.clamp_min(0)
    part, idx = torch.div(sid, P, rounding_mode="floor"), sid % P
    group = torch.zeros_like(slots)
    crop = (part > 0) & ~nl
    if bool(crop.any()):
        row, _ = g.canvas_rc(part[crop], idx[crop])
        group[crop] = 1 + row
    # a newline belongs to the row of the patch token just before it
    pos = torch.arange(slots.numel())
    last_patch = torch.cummax(torch.where(nl, torch.full_like(pos, -1), pos), 0).values
    has_prev = last_patch >= 0
    group[nl & has_prev] = group[last_patch[nl & has_prev]]
    group[nl & ~has_prev] = -1
    r = torch.where(nl, torch.full_like(idx, -1), torch.div(idx, gw, rounding_mode="floor"))
    c = torch.where(nl, torch.full_like(idx, -1), idx % gw)
    return _Tokens(nl, group, r, c)


class _ATPStage(LLMStage):
    def __init__(self, method: "ATP", layer: int, index: int):
        self.method = method
        self.layer = layer
        self.index = index

    def select(self, ctx: StageContext):
        m = self.method
        if self.index == 0:
            m._run = dict(m._pending)
            m._pending = {}
            if m.trace:
                m.last_trace = []
        out, trace = [], []
        for i, (b, cols) in enumerate(ctx.images):
            tok = m._run.get(i)
            if tok is None or cols.numel() == 0 or bool(tok.newline.all()):
                out.append(None)
                continue
            keep, info = m._module(ctx, b, cols, tok, self.index)
            if m.trace:
                trace.append(dict(info, image=i, layer=self.layer))
            if bool(keep.all()):
                out.append(None)
                continue
            sel = torch.nonzero(keep).flatten()
            m._run[i] = tok.take(sel)
            out.append(sel)
        if m.trace and m.last_trace is not None:
            m.last_trace.append(trace)
        return out


@register("atp")
@dataclass
class ATP(Method):
    """Training-free adaptation of ATP-LLaVA: adaptive thresholds on self+cross attention, lattice SAP."""

    atp_layers: tuple = (2, 6, 10, 14)
    rule: str = "mass"
    mass_schedule: tuple = (0.90, 0.85, 0.80, 0.75)
    zscore_schedule: tuple = (-0.5, 0.0, 0.25, 0.5)
    alpha: float = 0.5
    self_norm: str = "reach"
    sap: bool = True
    sap_strides: tuple = (2, 3, 4, 6)
    min_keep: int = 16
    max_keep: int | None = None
    sink_factor: float | None = None
    shift: float = 0.0
    trace: bool = False

    summary: ClassVar[str] = "ATP (training-free adaptation of ATP-LLaVA): adaptive self+cross attention thresholds + lattice, after LLM layers 2/6/10/14"
    has_official: ClassVar[bool] = False
    needs_budget: ClassVar[bool] = False
    POLICIES: ClassVar[dict] = {"position_mode": ("original", "original")}

    def __post_init__(self) -> None:
        if self.official:
            raise VTPruneError(
                "atp: ATP-LLaVA is a trained method with no released code, so there is nothing official to reproduce; "
                "atp is vtprune's training-free adaptation: drop official=True"
            )
        if self.keep is not None or self.keep_ratio is not None:
            raise VTPruneError(
                "atp chooses its token counts per instance and takes no keep=/keep_ratio=; to reach a layer-averaged "
                "target, calibrate its shift on a few inputs: vtprune.methods.atp.calibrate(model, inputs, keep=144) "
                "(or pass shift=, or cap each module with max_keep=)"
            )
        super().__post_init__()
        layers = tuple(self.atp_layers) if isinstance(self.atp_layers, (list, tuple)) else None
        if not layers or any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers) or list(layers) != sorted(set(layers)):
            raise VTPruneError(f"atp: atp_layers must be increasing non-negative decoder layer indices (default (2, 6, 10, 14)), got {self.atp_layers!r}")
        self.atp_layers = layers
        if self.rule not in RULES:
            raise VTPruneError(f"atp: rule must be one of {RULES}, got {self.rule!r}")
        if self.self_norm not in SELF_NORMS:
            raise VTPruneError(f"atp: self_norm must be one of {SELF_NORMS}, got {self.self_norm!r}")
        for name in ("mass_schedule", "zscore_schedule", "sap_strides"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != len(layers):
                raise VTPruneError(f"atp: {name} needs one value per module ({len(layers)} for atp_layers={layers}), got {v!r}")
            setattr(self, name, tuple(v))
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.sap_strides):
            raise VTPruneError(f"atp: sap_strides must be ints >= 1, got {self.sap_strides!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 <= self.alpha <= 1:
            raise VTPruneError(f"atp: alpha (weight of the cross-modal score) must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise VTPruneError(f"atp: min_keep must be an int >= 0 (default 16), got {self.min_keep!r}")
        if self.max_keep is not None and (isinstance(self.max_keep, bool) or not isinstance(self.max_keep, int) or self.max_keep < max(1, self.min_keep)):
            raise VTPruneError(f"atp: max_keep must be None or an int >= max(1, min_keep), got {self.max_keep!r}")
        if self.sink_factor is not None and (not isinstance(self.sink_factor, (int, float)) or self.sink_factor <= 1):
            raise VTPruneError(f"atp: sink_factor must be None or a number > 1 (suggested 20), got {self.sink_factor!r}")
        if not isinstance(self.shift, (int, float)) or isinstance(self.shift, bool):
            raise VTPruneError(f"atp: shift must be a number, got {self.shift!r}")
        if self.rule == "otsu" and self.shift != 0:
            raise VTPruneError("atp: rule='otsu' has no knob to shift; use rule='mass' or 'zscore' with shift=")
        self._pending: dict[int, _Tokens] = {}
        self._run: dict[int, _Tokens] = {}
        self.last_trace = None

    @classmethod
    def keep_all_params(cls) -> dict[str, Any]:
        return {"mass_schedule": (1.0, 1.0, 1.0, 1.0)}

    def budget(self, available: int) -> int:
        return available  # nothing is dropped before the LLM; `select` records the table its stages use

    def needs_selection(self, available: int, budget: int) -> bool:
        return True

    def check_model(self, family: str, batch_images: int) -> None:
        super().check_model(family, batch_images)
        self._pending = {}

    def select(self, image: ImageContext) -> Selection:
        g = image.geometry
        kept = g.full_selection()
        lay = anyres.layout(g, kept, "all-rows")
        self._pending[image.index] = token_table(g, lay)
        image.budget = image.available
        return Selection(kept=kept, newline="all-rows")

    def llm_stages(self, family: str, num_layers: int) -> list:
        check_layer_count("atp", self.atp_layers, num_layers, "atp_layers")
        return [_ATPStage(self, l, s) for s, l in enumerate(self.atp_layers)]

    # --- one module ------------------------------------------------------------------------------------------
    def _module(self, ctx: StageContext, b: int, cols: torch.Tensor, tok: _Tokens, s: int):
        dev = ctx.mask2d.device
        cols = cols.to(dev)
        patch = ~tok.newline
        pc = cols[patch.to(dev)]
        n = pc.numel()
        rows = text_rows_after(ctx, b, cols)
        if rows.numel():
            s_cross = attention_rows(ctx, b, rows)[:, pc].mean(0).cpu()
        else:
            s_cross = torch.zeros(n)
        A = attention_rows(ctx, b, pc)[:, pc].cpu()  # [u, v] over the image's patch tokens
        received = A.sum(0)
        if self.self_norm == "reach":
            s_self = received / torch.arange(n, 0, -1, dtype=torch.float32)
        else:
            s_self = received / n
        alpha = float(self.alpha) if float(s_cross.sum()) > 0 else 0.0
        S = (1 - alpha) * s_self / s_self.sum().clamp_min(1e-30)
        if alpha > 0:
            S = S + alpha * s_cross / s_cross.sum()
        sinks = torch.zeros(n, dtype=torch.bool)
        if self.sink_factor is not None:
            sinks = s_self > float(self.sink_factor) * s_self.median()
        cand = ~sinks
        if self.rule == "mass":
            param = min(1.0, max(0.0, self.mass_schedule[s] + float(self.shift)))
        elif self.rule == "zscore":
            param = self.zscore_schedule[s] - float(self.shift)
        else:
            param = None
        keep_r = torch.zeros(n, dtype=torch.bool)
        keep_r[cand] = rule_keep(S[cand], self.rule, param)
        keep_s = torch.zeros(n, dtype=torch.bool)
        if self.sap:
            st = self.sap_strides[s]
            r, c = tok.r[patch], tok.c[patch]
            keep_s = (r % st == 0) & (c % st == 0)
        keep = keep_r | keep_s | sinks
        order = torch.sort(S, descending=True, stable=True).indices
        if int(keep.sum()) < min(self.min_keep, n):
            extra = order[~keep[order]][: min(self.min_keep, n) - int(keep.sum())]
            keep[extra] = True
        if self.max_keep is not None and int(keep.sum()) > self.max_keep:
            ranked = order[keep[order]][: self.max_keep]
            keep = torch.zeros(n, dtype=torch.bool)
            keep[ranked] = True
        full = torch.zeros(tok.newline.numel(), dtype=torch.bool)
        full[patch] = keep
        kept_groups = set(tok.group[patch][keep].tolist())
        nl_idx = torch.nonzero(tok.newline).flatten()
        for j in nl_idx.tolist():
            full[j] = int(tok.group[j]) in kept_groups
        info = {"S": S, "S_self": s_self, "S_cross": s_cross, "by_rule": keep_r, "by_lattice": keep_s, "sinks": sinks, "param": param}
        return full, info


def calibrate(model, inputs, keep: float, iters: int = 16, **params) -> ATP:
    """Offline calibration of `shift` (no gradients): bisection until the mean over the calibration
    inputs of `pruner.last.mean_tokens` (visual tokens per decoder layer, per image) reaches `keep`.
    `inputs`: a list of processor outputs (dicts for `model(**x)`); `params`: other ATP knobs.
    Returns the calibrated `ATP` instance (use `vtprune.patch(model, method)`). Cost: `iters` prefills
    per input."""
    from ..api import pruned

    params = dict(params)
    params.pop("shift", None)
    rule = params.get("rule", "mass")
    if rule == "otsu":
        raise VTPruneError("atp.calibrate: rule='otsu' has no knob to shift; use rule='mass' or 'zscore'")
    if not inputs:
        raise VTPruneError("atp.calibrate: give at least one calibration input (a list of processor outputs)")
    lo, hi = (-1.0, 1.0) if rule == "mass" else (-6.0, 6.0)

    def measure(shift: float) -> float:
        method = ATP(shift=shift, **params)
        values = []
        with pruned(model, method) as pr, torch.no_grad():
            for x in inputs:
                model(**x)
                values.extend(pr.last.mean_tokens)
        return sum(values) / len(values)

    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        got = measure(mid)
        if best is None or abs(got - keep) < abs(best[1] - keep):
            best = (mid, got)
        if got < keep:
            lo = mid
        else:
            hi = mid
    return ATP(shift=best[0], **params)
