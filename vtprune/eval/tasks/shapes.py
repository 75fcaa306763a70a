"""The offline `vtprune_shapes` tasks: generated images, questions with one exact answer.

Each document describes a picture (one colour, one kind of shape, 1-4 copies, a size and a seed);
`doc_to_visual` draws it on the fly, so nothing but `shapes.jsonl` (text) ships and no network is
needed. Three kinds of question: the colour, the shape, the count. Two tasks share the data:

- `vtprune_shapes` (generate_until): the answer is scored by exact match after normalisation
  (lower case, first line, surrounding punctuation and a leading article dropped, number words
  as digits);
- `vtprune_shapes_mc` (multiple_choice, i.e. loglikelihood requests): the choices are the six
  colours, the three shapes or the counts 1-4; scored by accuracy.

Regenerate the data with `python -m vtprune.eval.tasks.shapes` (the test suite checks the shipped
file matches `build_docs()`).
"""

from __future__ import annotations

import itertools
import json
import random
import string
from pathlib import Path

from ...scenes import COLOURS  # the same palette as the trained models' scenes

SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3", "4")
SIZES = ((336, 336), (480, 336), (336, 480), (560, 420))
QUESTION_KINDS = ("colour", "shape", "count")
DATA_FILE = Path(__file__).resolve().parent / "vtprune_shapes" / "shapes.jsonl"

_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = ("a ", "an ", "the ")


def _question(kind: str, colour: str, shape: str, count: int) -> tuple[str, str, list[str]]:
    many = count > 1
    if kind == "colour":
        q = f"What colour {'are the ' + shape + 's' if many else 'is the ' + shape}? Answer with one word."
        return q, colour, list(COLOURS)
    if kind == "shape":
        q = f"What shape {'are the ' + colour + ' objects' if many else 'is the ' + colour + ' object'}? Answer with one word: circle, square or triangle."
        return q, shape, list(SHAPES)
    q = f"How many {colour} {shape}s are there in the image? Answer with a number."
    return q, str(count), list(COUNTS)


def build_docs() -> list[dict]:
    """The documents of the task, in order (deterministic)."""
    docs = []
    for i, (colour, shape, kind) in enumerate(itertools.product(COLOURS, SHAPES, QUESTION_KINDS)):
        count = 1 + (i // 3) % 4  # each (colour, shape) picture set cycles through the counts
        width, height = SIZES[i % len(SIZES)]
        question, answer, choices = _question(kind, colour, shape, count)
        docs.append(
            {
                "id": i,
                "question_kind": kind,
                "question": question,
                "answer": answer,
                "choices": choices,
                "colour": colour,
                "shape": shape,
                "count": count,
                "width": width,
                "height": height,
                "seed": 1000 + i,
            }
        )
    # interleave question kinds and picture sizes so that --limit N samples a mix
    rng = random.Random(7)
    rng.shuffle(docs)
    for j, d in enumerate(docs):
        d["id"] = j
    return docs


def draw(doc: dict):
    """The picture a document describes: `count` shapes of one colour and kind on a textured
    grey background, in distinct cells of a 3x3 grid (so they never overlap)."""
    from PIL import Image, ImageDraw

    rng = random.Random(doc["seed"])
    w, h = int(doc["width"]), int(doc["height"])
    base = rng.randint(150, 200)
    img = Image.new("RGB", (w, h), (base, base, base))
    px = img.load()
    for _ in range(w * h // 30):
        x, y = rng.randrange(w), rng.randrange(h)
        v = max(0, min(255, base + rng.randint(-25, 25)))
        px[x, y] = (v, v, v)
    draw_ = ImageDraw.Draw(img)
    cw, ch = w / 3, h / 3
    r = int(min(cw, ch) * 0.32)
    fill = COLOURS[doc["colour"]]
    for cell in rng.sample(range(9), int(doc["count"])):
        cx = int((cell % 3 + 0.5) * cw + rng.uniform(-0.1, 0.1) * cw)
        cy = int((cell // 3 + 0.5) * ch + rng.uniform(-0.1, 0.1) * ch)
        if doc["shape"] == "circle":
            draw_.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif doc["shape"] == "square":
            draw_.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw_.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def normalize(text: str) -> str:
    """Lower case, first line only, surrounding whitespace/punctuation and a leading article
    removed, number words as digits ("Two." -> "2", "The circle" -> "circle")."""
    text = (text or "").strip().split("\n", 1)[0].strip().lower()
    text = text.strip(string.punctuation + string.whitespace)
    for a in _ARTICLES:
        if text.startswith(a):
            text = text[len(a) :].strip()
    return _NUMBER_WORDS.get(text, text)


# --- lmms-eval hooks (referenced from the YAML files with !function) -----------------------------


def doc_to_visual(doc):
    return [draw(doc)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target_index(doc):
    return list(doc["choices"]).index(doc["answer"])


def process_results(doc, results):
    prediction = results[0] if results else ""
    return {"exact_match": float(normalize(prediction) == normalize(doc["answer"]))}


def write_data(path: Path = DATA_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in build_docs():
            f.write(json.dumps(d, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":  # pragma: no cover
    print(write_data())
