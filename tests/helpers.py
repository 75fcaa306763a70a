"""Shared test helpers (batches, hook snapshots, batch == single checks, optional modules, one thread)."""

import os

import pytest
import torch

import vtprune
from vtprune.testing import make_image, make_inputs


def need(module: str, extra: str = "dev"):
    """Import an optional module; skip without it, but fail in CI, where the extra must be installed."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required in CI (the `{extra}` extra)")
        pytest.skip(f"{module} not installed")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one torch thread: tiny models are dominated by thread
    start-up, and on a shared 2-core machine one thread is far faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(proc, sizes, questions=None):
    questions = questions or ["What is red?", "How many circles are in the picture?", "Is there a blue square?"][: len(sizes)]
    return make_inputs(proc, [make_image(10 + i, s) for i, s in enumerate(sizes)], questions)


def _hooks(model):
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
        for name, m in model.named_modules()
    }


def _greedy(model, inputs, n=6):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True)
    T = inputs["input_ids"].shape[1]
    return out.sequences[:, T:], torch.stack(out.logits, 1)


def _sample(inputs, b, counts):
    """Sample b of a processor batch, unpadded, as its own batch of one."""
    keep = inputs["attention_mask"][b].bool()
    first = sum(counts[:b])
    out = {"input_ids": inputs["input_ids"][b : b + 1, keep], "attention_mask": inputs["attention_mask"][b : b + 1, keep]}
    out["pixel_values"] = inputs["pixel_values"][first : first + counts[b]]
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][first : first + counts[b]]
    return out


def _assert_batch_equals_single(model, inputs, counts, method, params):
    with vtprune.pruned(model, method, **params) as pr:
        toks, logits = _greedy(model, inputs)
        batch_rep = pr.last
        for b in range(len(counts)):
            single = _sample(inputs, b, counts)
            t1, l1 = _greedy(model, single)
            images = [i for i, s in enumerate(batch_rep.sample_of) if s == b]
            assert len(images) == counts[b]
            for j, i in enumerate(images):
                for p, kp in enumerate(batch_rep.kept[i]):
                    assert torch.equal(kp, pr.last.kept[j][p]), f"sample {b} image {j} partition {p}: kept differs in batch"
                assert batch_rep.num_visual_tokens[i] == pr.last.num_visual_tokens[j]
                assert batch_rep.tokens_per_layer[i] == pr.last.tokens_per_layer[j]
                for sb, ss in zip(batch_rep.stages[i], pr.last.stages[j]):
                    assert sb.layer == ss.layer and torch.equal(sb.surviving, ss.surviving), f"sample {b}: in-LLM stage differs in batch"
            for step in range(t1.shape[1]):
                torch.testing.assert_close(logits[b, step], l1[0, step], atol=1e-4, rtol=0)
                top2 = torch.topk(l1[0, step], 2).values
                if toks[b, step] != t1[0, step]:
                    assert float(top2[0] - top2[1]) <= 1e-3, f"sample {b} step {step}: tokens differ with a clear margin"
                    break


def assert_no_eager(model, inputs, monkeypatch, method, params):
    """Generate with `method` while eager attention is booby-trapped and SDPA is spied on: no eager
    attention, no output_attentions request, the model's attention settings untouched (while patched
    and after), both the CLIP tower and the LLM ran on SDPA. Returns the pruner's last report."""
    import transformers.models.clip.modeling_clip as mc
    import transformers.models.llama.modeling_llama as ml
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = model.config

    def impls():
        return (cfg._attn_implementation, cfg.vision_config._attn_implementation, cfg.text_config._attn_implementation)

    before = impls()

    def boom(*a, **k):
        raise AssertionError("eager attention was used")

    monkeypatch.setattr(mc, "eager_attention_forward", boom)
    monkeypatch.setattr(ml, "eager_attention_forward", boom)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = []

    def spy(module, *args, **kwargs):
        assert not kwargs.get("output_attentions"), "output_attentions must never be requested"
        seen.append(type(module).__name__)
        return sdpa(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        with vtprune.pruned(model, method, **params) as pr, torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert impls() == before
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    assert impls() == before
    assert "LlamaAttention" in seen and "CLIPAttention" in seen
    return pr.last
