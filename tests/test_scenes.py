"""vtprune.scenes: seeded, split-disjoint scenes with small objects and answers that match the pixels."""

import numpy as np
import pytest

from vtprune import scenes as S


def test_deterministic():
    a = S.scenes("train", 5, "llava15", seed=3)
    b = S.scenes("train", 5, "llava15", seed=3)
    assert [s.key() for s in a] == [s.key() for s in b]
    assert np.array_equal(np.asarray(a[0].render()), np.asarray(b[0].render()))
    assert S.eval_questions(a) == S.eval_questions(b)
    assert [s.key() for s in S.scenes("train", 3, "llava15", seed=3, start=2)] == [s.key() for s in a[2:5]]
    assert S.scenes("train", 3, "llava15", seed=4)[0].key() != a[0].key()


@pytest.mark.parametrize("variant", ["llava15", "llava_next"])
def test_splits_never_share_a_scene(variant):
    keys = {split: {s.key() for s in S.scenes(split, 150, variant)} for split in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    for split, ks in keys.items():
        assert all(S.scene_split(s) == split for s in S.scenes(split, 20, variant))


def test_sizes_and_small_objects():
    sc = S.scenes("test", 60, "llava15")
    assert all((s.width, s.height) == (336, 336) for s in sc)
    radii = [o.r for s in sc for o in s.objects]
    assert sum(2 * r <= 42 for r in radii) / len(radii) > 0.35  # many objects fit in 3x3 patches
    nx = S.scenes("test", 20, "llava_next")
    assert {(s.width, s.height) for s in nx} <= {(672, 336), (336, 672)}
    assert nx[0].render().size == (nx[0].width, nx[0].height)
    # the answer of many questions hangs on a small object
    small = 0
    for i, q in S.eval_questions(sc, types=("colour", "side")):
        small += all(2 * sc[i].objects[t].r <= 42 for t in q.target)
    assert small > 20


def test_answers_match_the_pixels():
    sc = S.scenes("val", 25, "llava15")
    seen = set()
    for s in sc:
        img, lab = s.render(labels=True)
        arr = np.asarray(img).astype(int)
        for t, qs in S.all_questions(s).items():
            for q in qs:
                seen.add(t)
                if q.type == "colour":
                    (i,) = q.target
                    px = arr[lab == i + 1]
                    assert len(px) > 50
                    mean = px.mean(0)
                    nearest = min(S.COLOURS, key=lambda c: np.abs(np.array(S.COLOURS[c]) - mean).sum())
                    assert nearest == q.answer
                elif q.type == "side":
                    (i,) = q.target
                    xs = np.nonzero(lab == i + 1)[1]
                    assert (xs.max() < s.width / 2) if q.answer == "left" else (xs.min() >= s.width / 2)
                elif q.type == "count":
                    shape = {S.plural(k): k for k in S.SHAPES}[q.text.split()[2]]
                    assert int(q.answer) == sum(o.shape == shape for o in s.objects)
                    assert len(q.target) == int(q.answer)
                    assert all(np.any(lab == i + 1) for i in q.target)  # every counted object is visible
                elif q.type == "presence":
                    _, _, _, colour, shape = q.text[:-1].split()
                    assert (q.answer == "yes") == s.has(colour, shape)
    assert seen == set(S.QUESTION_TYPES)


def test_eval_questions_balanced():
    sc = S.scenes("test", 100, "llava15")
    qs = S.eval_questions(sc)
    by = {}
    for _, q in qs:
        by.setdefault(q.type, []).append(q.answer)
    assert set(by) == set(S.QUESTION_TYPES)
    assert len(by["colour"]) == len(by["count"]) == len(by["presence"]) == 100
    assert 0.4 < by["presence"].count("yes") / 100 < 0.6
    assert len(set(by["count"])) >= 4 and len(set(by["colour"])) == len(S.COLOURS)


def test_normalize_and_corpus():
    assert S.normalize(" Red.\nmore") == "red"
    assert S.normalize("Three") == "3"
    assert S.normalize("the left") == "left"
    words = {w for line in S.corpus() for w in line.replace("?", " ").split()}
    assert {"red", "yes", "no", "left", "right", "4", "triangle", "circles"} <= words


def test_count_questions_use_english_plurals():
    qs = [q for q in S.corpus() if q.startswith("How many")]
    assert "How many crosses are there?" in qs and "How many circles are there?" in qs
    assert not any("crosss" in q for q in S.corpus())
