"""The `vtprune` command: methods, compare (the README's main job) and the bench script."""

import json

import pytest

import vtprune
from vtprune import cli
from vtprune.eval.bench import bench_model, format_result
from vtprune.testing import make_image


def test_methods_command(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("vtc-cls", "random", "pool", "none"):
        assert name in out
    assert "start_layer=20" in out
    assert cli.main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data} >= {"vtc-cls", "random", "pool", "none"}


def test_compare_command(tmp_path, capsys):
    img = tmp_path / "img.png"
    make_image(3).save(img)
    rc = cli.main(["compare", "--image", str(img), "--question", "What colour is the circle?", "--methods", "vtc-cls,random,pool", "--keep", "64", "--repeats", "1", "--max-new-tokens", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"unpruned", "vtc-cls", "random", "pool"}
    assert "576/576" in rows["unpruned"] and "1.00x" in rows["unpruned"]
    for m in ("vtc-cls", "random"):
        assert "64/576" in rows[m] and "ms" in rows[m]


def test_compare_json(tmp_path, capsys):
    img = tmp_path / "img.png"
    make_image(4).save(img)
    assert cli.main(["compare", "--image", str(img), "--question", "Is there a square?", "--methods", "vtc-cls", "--keep-ratio", "0.25", "--repeats", "1", "--max-new-tokens", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["unpruned", "vtc-cls"]
    assert rows[1]["visual_tokens"] == 144 and rows[1]["available"] == 576
    assert all(r["prefill_s"] > 0 for r in rows)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--image", "missing.png", "--question", "hi"], "cannot read an image"),
        (["--image", "README.md", "--question", "hi"], "cannot read an image"),
        (["--image", "examples/shapes.png", "--question", "  "], "question is empty"),
        (["--image", "examples/shapes.png", "--question", "hi", "--methods", "nope"], "unknown method 'nope'"),
        (["--image", "examples/shapes.png", "--question", "hi", "--keep", "0"], "keep must be a positive int"),
    ],
)
def test_compare_bad_input(argv, match, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli.main(["compare", *argv, "--repeats", "1", "--max-new-tokens", "1"]) == 2
    assert match in capsys.readouterr().err


def test_bench_runs_side_by_side(llava):
    import torch

    model, proc = llava
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads waiting for each other on a loaded CI machine cost seconds per forward
    try:
        res = bench_model(model, proc, ["vtc-cls", "pool"], [64], repeats=1, warmup=0, decode_tokens=1, memory="off", tower=False, label="tiny")
    finally:
        torch.set_num_threads(threads)
    assert [(r["kind"], r["method"]) for r in res["rows"]] == [
        ("unpruned", "unpruned"), ("method", "vtc-cls"), ("oracle", "vtc-cls"), ("method", "pool"), ("oracle", "pool"),
    ]
    rows = res["rows"]
    assert rows[0]["visual_tokens"] == 576 and all(r["visual_tokens"] == 64 for r in rows[1:])
    assert rows[0]["speedup"] == 1.0 and all(r["speedup"] > 0 for r in rows)
    assert rows[1]["vs_oracle"] > 0 and rows[1]["oracle_ok"] and rows[3]["oracle_ok"]
    assert vtprune.get_pruner(model) is None  # every row unpatched after itself
    text = format_result(res)
    assert "oracle" in text and "vs oracle" in text and "field GF" in text
