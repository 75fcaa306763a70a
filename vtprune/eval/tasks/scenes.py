"""The offline `vtprune_scenes` tasks: questions about `vtprune.scenes` test-split scenes, the
data the shipped trained models (`vtprune.trained`) learned from.

Each document names a scene by its index in the seeded test split (`vtprune.scenes.scenes("test",
n, variant)`), so only text ships and the picture is rendered on the fly with no network. The
questions are `vtprune.scenes.eval_questions` (one per type per scene: colour, presence, count,
side); answers are single words scored by exact match after `vtprune.scenes.normalize`.

- `vtprune_scenes`: 336 x 336 scenes (the LLaVA-1.5 variant), 100 scenes.
- `vtprune_scenes_next`: 672 x 336 / 336 x 672 scenes (the LLaVA-NeXT variant), 50 scenes.

Regenerate the data with `python -m vtprune.eval.tasks.scenes` (a test checks the shipped files
match `build_docs()`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "vtprune_scenes"
TASKS = {"vtprune_scenes": ("llava15", 100), "vtprune_scenes_next": ("llava_next", 50)}


def data_file(task: str) -> Path:
    return HERE / f"{task}.jsonl"


def build_docs(task: str) -> list[dict]:
    """The documents of `task`, in order (deterministic)."""
    from ... import scenes as S

    variant, n = TASKS[task]
    docs = []
    for i, q in S.eval_questions(S.scenes("test", n, variant)):
        docs.append({"id": len(docs), "variant": variant, "n_scenes": n, "scene": i, "type": q.type, "question": q.text, "answer": q.answer})
    return docs


@functools.lru_cache(maxsize=4)
def _scenes(variant: str, n: int):
    from ... import scenes as S

    return S.scenes("test", n, variant)


# --- lmms-eval hooks (referenced from the YAML files with !function) -----------------------------


def doc_to_visual(doc):
    return [_scenes(doc["variant"], int(doc["n_scenes"]))[int(doc["scene"])].render()]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    from ... import scenes as S

    prediction = results[0] if results else ""
    return {"exact_match": float(S.normalize(prediction) == S.normalize(doc["answer"]))}


def write_data() -> list[Path]:
    paths = []
    for task in TASKS:
        path = data_file(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for d in build_docs(task):
                f.write(json.dumps(d, sort_keys=True) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in write_data():
        print(p)
