"""Seeded scenes and questions for vtprune's trained offline models (`vtprune.trained`).

A scene is a few coloured shapes of several kinds (circle, square, triangle, star, cross), small ones
included (about half are at most 42 px wide, i.e. they cover no more than 3x3 patches of 14 px), at
random non-overlapping positions on a plain or textured background (noise, stripes, checks,
gradient). Questions have one exact, one-word answer that depends on a small region:

    colour    "What colour is the triangle?"                          -> "red"     (the only triangle)
    presence  "Is there a blue star?"                                 -> "yes" / "no"
    count     "How many circles are there?"                           -> "0" .. "4"
    side      "Is the green cross on the left or the right?"          -> "left" / "right"

Two variants: `"llava15"` scenes are 336 x 336 (LLaVA-1.5's input); `"llava_next"` scenes are
672 x 336 or 336 x 672 with more objects at the same pixel sizes (two AnyRes crops at full
resolution, and a base image in which every object is half as large).

Splits never share a scene, by construction: a scene's split is a function of its content (a hash
of its canonical description), and each split keeps only the candidates that hash into it.

    from vtprune.scenes import scenes, eval_questions
    sc = scenes("test", 100, variant="llava15")       # deterministic for a given (split, n, variant, seed)
    img = sc[0].render()                              # PIL image
    qs = eval_questions(sc)                           # one question per type per scene where valid
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COLOURS",
    "SHAPES",
    "QUESTION_TYPES",
    "VARIANTS",
    "Obj",
    "Scene",
    "Question",
    "make_scene",
    "scene_split",
    "scenes",
    "all_questions",
    "eval_questions",
    "normalize",
    "corpus",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (36, 160, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
QUESTION_TYPES: tuple[str, ...] = ("colour", "presence", "count", "side")
MAX_COUNT = 4
SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}  # percent ranges of the content hash
BACKGROUNDS = ("plain", "noise", "stripes", "checks", "gradient")


@dataclass(frozen=True)
class VariantSpec:
    sizes: tuple[tuple[int, int], ...]  # (width, height) choices
    objects: tuple[int, int]  # min, max objects per scene


VARIANTS: dict[str, VariantSpec] = {
    "llava15": VariantSpec(sizes=((336, 336),), objects=(3, 7)),
    "llava_next": VariantSpec(sizes=((672, 336), (336, 672)), objects=(5, 10)),
}

# object half-extent in pixels: "small" objects are at most 42 px (3 patches) across
SMALL_R = (13, 21)
LARGE_R = (22, 38)
P_SMALL = 0.55


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: int
    cy: int
    r: int  # half extent in pixels

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str  # one of BACKGROUNDS
    bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_param: int  # period / direction code of the texture
    texture_seed: int
    objects: tuple[Obj, ...]

    # --- content --------------------------------------------------------------------------------
    def key(self) -> str:
        """Canonical description (everything that determines the pixels)."""
        objs = ";".join(f"{o.shape},{o.colour},{o.cx},{o.cy},{o.r}" for o in self.objects)
        return f"{self.width}x{self.height}|{self.background}|{self.bg_colours}|{self.bg_param}|{self.texture_seed}|{objs}"

    def digest(self) -> str:
        return hashlib.blake2b(self.key().encode(), digest_size=16).hexdigest()

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def has(self, colour: str, shape: str) -> bool:
        return any(o.shape == shape and o.colour == colour for o in self.objects)

    def unique(self, colour: str | None, shape: str) -> Obj | None:
        hits = [o for o in self.objects if o.shape == shape and (colour is None or o.colour == colour)]
        return hits[0] if len(hits) == 1 else None

    def side_of(self, o: Obj, margin: int = 7) -> str | None:
        """"left"/"right" when the whole object lies on one side of the vertical centre line
        (with `margin` px to spare), else None."""
        mid = self.width / 2
        if o.cx + o.r < mid - margin:
            return "left"
        if o.cx - o.r > mid + margin:
            return "right"
        return None

    # --- pixels ----------------------------------------------------------------------------------
    def render(self, labels: bool = False):
        """The PIL RGB image; with `labels=True` also an (H, W) uint8 array: 0 background, i+1 for
        object i."""
        from PIL import Image, ImageDraw

        arr = _background(self)
        img = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(img)
        lab = Image.new("L", (self.width, self.height), 0) if labels else None
        ldraw = ImageDraw.Draw(lab) if labels else None
        for i, o in enumerate(self.objects):
            _draw_shape(draw, o, COLOURS[o.colour])
            if labels:
                _draw_shape(ldraw, o, i + 1)
        if labels:
            return img, np.asarray(lab)
        return img

    def caption(self) -> str:
        parts = [f"a {'small' if 2 * o.r <= 42 else 'large'} {o.colour} {o.shape} on the {self.side_of(o, 0) or 'centre'}" for o in self.objects]
        return f"{self.background} background; " + ", ".join(parts)


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation background tone, far from every object colour."""
    base = rng.randint(95, 200)
    return tuple(int(min(255, max(0, base + rng.randint(-18, 18)))) for _ in range(3))


def _background(s: Scene) -> np.ndarray:
    h, w = s.height, s.width
    rng = np.random.default_rng(s.texture_seed)
    a = np.array(s.bg_colours[0], dtype=np.float32)
    b = np.array(s.bg_colours[1], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    if s.background == "plain":
        img = np.broadcast_to(a, (h, w, 3)).copy()
    elif s.background == "noise":
        img = a + rng.normal(0.0, 14.0, size=(h, w, 1)).astype(np.float32)
    elif s.background == "stripes":
        period = 6 + s.bg_param % 19
        direction = (s.bg_param // 19) % 3  # 0 vertical, 1 horizontal, 2 diagonal
        coord = xx if direction == 0 else yy if direction == 1 else (xx + yy)
        m = ((coord // period) % 2).astype(np.float32)[..., None]
        img = a * (1 - m) + b * m
    elif s.background == "checks":
        period = 8 + s.bg_param % 23
        m = (((xx // period) + (yy // period)) % 2).astype(np.float32)[..., None]
        img = a * (1 - m) + b * m
    elif s.background == "gradient":
        t = (xx / max(1, w - 1)) if s.bg_param % 2 == 0 else (yy / max(1, h - 1))
        t = t.astype(np.float32)[..., None]
        img = a * (1 - t) + b * t
    else:  # pragma: no cover
        raise ValueError(s.background)
    if s.background != "noise":
        img = img + rng.normal(0.0, 4.0, size=(h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _star(cx, cy, r):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw, o: Obj, fill) -> None:
    cx, cy, r = o.cx, o.cy, o.r
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        s = round(r * 0.82)
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + round(r * 0.8)), (cx + r, cy + round(r * 0.8))], fill=fill)
    elif o.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif o.shape == "cross":
        t = max(2, round(r * 0.32))
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:  # pragma: no cover
        raise ValueError(o.shape)


# --- sampling ------------------------------------------------------------------------------------


def _radius(rng: random.Random) -> int:
    return rng.randint(*SMALL_R) if rng.random() < P_SMALL else rng.randint(*LARGE_R)


def _place(rng: random.Random, w: int, h: int, r: int, placed: list[Obj], tries: int = 60):
    for _ in range(tries):
        cx, cy = rng.randint(r + 2, w - r - 3), rng.randint(r + 2, h - r - 3)
        if all(math.hypot(cx - o.cx, cy - o.cy) >= r + o.r + 6 for o in placed):
            return cx, cy
    return None


def make_scene(rng: random.Random, variant: str = "llava15") -> Scene:
    """One scene from `rng`. Guarantees at least one shape kind that occurs once (a colour question)
    and one unique colour+shape object wholly on one side (a side question)."""
    spec = VARIANTS[variant]
    while True:
        w, h = spec.sizes[rng.randrange(len(spec.sizes))]
        n = rng.randint(*spec.objects)
        # a "focus" kind with a count drawn 1..MAX_COUNT keeps count answers spread out (absent kinds
        # give the zeros)
        focus = rng.choice(SHAPES)
        kinds = [focus] * min(n - 1, rng.randint(1, MAX_COUNT))
        others = [s for s in SHAPES if s != focus]
        while len(kinds) < n:
            kinds.append(rng.choice(others))
        rng.shuffle(kinds)
        objs: list[Obj] = []
        for kind in kinds:
            if sum(k == kind for k in (o.shape for o in objs)) >= MAX_COUNT:
                continue
            r = _radius(rng)
            pos = _place(rng, w, h, r, objs)
            if pos is None:
                continue
            objs.append(Obj(kind, rng.choice(list(COLOURS)), pos[0], pos[1], r))
        bg = rng.choice(BACKGROUNDS)
        scene = Scene(
            width=w,
            height=h,
            background=bg,
            bg_colours=(_muted(rng), _muted(rng)),
            bg_param=rng.randrange(1000),
            texture_seed=rng.randrange(2**31),
            objects=tuple(objs),
        )
        if len(objs) >= 2 and _valid(scene):
            return scene


def _valid(s: Scene) -> bool:
    if not any(s.count(k) == 1 for k in SHAPES):
        return False
    return any(s.unique(o.colour, o.shape) is not None and s.side_of(o) for o in s.objects)


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to, from its content alone."""
    v = int(scene.digest()[:8], 16) % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= v < hi:
            return name
    raise AssertionError(v)  # pragma: no cover


def _stream_seed(split: str, variant: str, seed: int) -> int:
    return int(hashlib.blake2b(f"vtprune-scenes|{split}|{variant}|{seed}".encode(), digest_size=8).hexdigest(), 16)


def scenes(split: str, n: int, variant: str = "llava15", seed: int = 0, start: int = 0) -> list[Scene]:
    """Scenes `start .. start+n-1` of `split` ("train", "val", "test") for `variant`; deterministic.
    Candidates come from a seeded stream per (split, variant, seed); a candidate is kept only if its
    content hashes into `split`, so no scene can ever appear in two splits."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    rng = random.Random(_stream_seed(split, variant, seed))
    out: list[Scene] = []
    kept = 0
    while len(out) < n:
        s = make_scene(rng, variant)
        if scene_split(s) != split:
            continue
        if kept >= start:
            out.append(s)
        kept += 1
    return out


# --- questions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str
    target: tuple[int, ...] = field(default=())  # indices of the objects the answer depends on


def _q_colour(shape: str) -> str:
    return f"What colour is the {shape}?"


def _q_presence(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape}?"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _q_count(shape: str) -> str:
    return f"How many {plural(shape)} are there?"


def _q_side(colour: str, shape: str) -> str:
    return f"Is the {colour} {shape} on the left or the right?"


def all_questions(s: Scene) -> dict[str, list[Question]]:
    """Every valid question about `s`, by type (presence: every present colour+shape, and as many
    absent ones, hard negatives first: the shape or the colour occurs in the scene)."""
    out: dict[str, list[Question]] = {t: [] for t in QUESTION_TYPES}
    idx = {o: i for i, o in enumerate(s.objects)}
    for shape in SHAPES:
        o = s.unique(None, shape)
        if o is not None:
            out["colour"].append(Question("colour", _q_colour(shape), o.colour, (idx[o],)))
    present = sorted({(o.colour, o.shape) for o in s.objects})
    for c, k in present:
        hits = tuple(i for i, o in enumerate(s.objects) if o.colour == c and o.shape == k)
        out["presence"].append(Question("presence", _q_presence(c, k), "yes", hits))
    shapes_in = {o.shape for o in s.objects}
    colours_in = {o.colour for o in s.objects}
    absent = [(c, k) for c in COLOURS for k in SHAPES if not s.has(c, k)]
    hard = [(c, k) for c, k in absent if k in shapes_in or c in colours_in]
    easy = [(c, k) for c, k in absent if not (k in shapes_in or c in colours_in)]
    rng = random.Random(s.digest())
    rng.shuffle(hard)
    rng.shuffle(easy)
    for c, k in (hard + easy)[: len(present)]:
        rel = tuple(i for i, o in enumerate(s.objects) if o.colour == c or o.shape == k)
        out["presence"].append(Question("presence", _q_presence(c, k), "no", rel))
    for shape in SHAPES:
        hits = tuple(i for i, o in enumerate(s.objects) if o.shape == shape)
        out["count"].append(Question("count", _q_count(shape), str(len(hits)), hits))
    for i, o in enumerate(s.objects):
        side = s.side_of(o)
        if side and s.unique(o.colour, o.shape) is not None:
            out["side"].append(Question("side", _q_side(o.colour, o.shape), side, (i,)))
    return out


def eval_questions(scene_list: list[Scene], types=QUESTION_TYPES) -> list[tuple[int, Question]]:
    """One question per type per scene, `(scene index, question)`, chosen by each scene's own hash:
    presence alternates yes/no over the scenes; count draws a target 0..4 from the scene's hash and
    asks about the kind whose count is nearest to it (so count answers are spread out)."""
    out = []
    for i, s in enumerate(scene_list):
        rng = random.Random("eval|" + s.digest())
        qs = all_questions(s)
        for t in types:
            cand = qs[t]
            if t == "presence":
                want = "yes" if i % 2 == 0 else "no"
                cand = [q for q in cand if q.answer == want] or cand
            elif t == "count":
                target = rng.randint(0, MAX_COUNT)
                gap = min(abs(int(q.answer) - target) for q in cand)
                cand = [q for q in cand if abs(int(q.answer) - target) == gap]
            if cand:
                out.append((i, rng.choice(cand)))
    return out


# --- text ----------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, first line, first word, surrounding punctuation dropped, number words as digits."""
    words = (text or "").strip().split("\n", 1)[0].strip().lower().split()
    if words and words[0] in ("a", "an", "the") and len(words) > 1:
        words = words[1:]
    w = words[0].strip(string.punctuation) if words else ""
    numbers = {n: str(i) for i, n in enumerate("zero one two three four five six seven eight nine ten".split())}
    return numbers.get(w, w)


def corpus() -> list[str]:
    """Every question template with every answer word (trains the tokenizer)."""
    lines = []
    for k in SHAPES:
        lines.append(_q_colour(k))
        lines.append(_q_count(k))
        for c in COLOURS:
            lines.append(_q_presence(c, k))
            lines.append(_q_side(c, k))
    answers = list(COLOURS) + ["yes", "no", "left", "right"] + [str(i) for i in range(10)]
    lines += [f"USER: <image>\n{q} ASSISTANT: {a}" for q in lines[:20] for a in answers]
    return lines
