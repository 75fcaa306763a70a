"""`vtprune demo`: a Gradio page that answers one question about one image with several pruning
methods side by side, beside the unpruned model.

For each panel: the image with the kept patches highlighted (dropped ones dimmed; a toggle shows
the score heat map; LLaVA-NeXT crops are mapped back onto the image, the base image's own selection
beside them), the answer, the visual tokens that reached the LLM, the prefill time and the KV-cache
size after prefill. Bad input (a file that is not an image, an empty question, a huge image, a
budget at or above the image's token count, a method the model does not support) is a message in
the page; the app keeps serving.

    vtprune demo                                  # the built-in offline model, http://127.0.0.1:7860
    vtprune demo --model llava-hf/llava-1.5-7b-hf --host 0.0.0.0 --port 7860
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
import time
from pathlib import Path

import torch

MAX_PIXELS = 4096 * 4096
MAX_SIDE = 8192
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


class Demo:
    """The comparison logic, independent of Gradio (tested directly and through the page)."""

    def __init__(self, model, processor, label: str = ""):
        self.model, self.processor, self.label = model, processor, label
        from ..patches.llava import check_supported

        self.family = check_supported(model)

    def methods(self) -> list[str]:
        from ..registry import methods

        return [m.name for m in methods() if m.name != "none"]

    def load_image(self, path):
        """A PIL image from an uploaded path, or a message saying why not."""
        from PIL import Image, UnidentifiedImageError

        if not path:
            return None, "Upload an image or pick an example."
        try:
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                return None, f"The image is too large ({w}x{h}); use one under {MAX_SIDE} px a side and {MAX_PIXELS // 1_000_000} MP."
            return img.convert("RGB"), None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            return None, f"That file is not an image I can read ({type(e).__name__}). Upload a PNG or JPEG."

    def run(self, image, question: str, methods: list[str], keep: int | None = None, keep_ratio: float | None = None, heat: bool = False, max_new_tokens: int = 24):
        """Panels (dicts) for the unpruned model and each method, and messages (list of str)."""
        from .. import api
        from ..errors import VTPruneError
        from .compare import _to, build_inputs
        from .visualize import render, render_unpruned

        messages: list[str] = []
        if not question or not question.strip():
            return [], ["Type a question about the image."]
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = _to(build_inputs(self.processor, image, question.strip()), device, dtype)
        T = inputs["input_ids"].shape[1]
        available = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        if keep is not None and keep >= available:
            messages.append(f"keep={keep} is at least this image's {available} visual tokens: nothing is pruned (pick a smaller budget).")
        tok = getattr(self.processor, "tokenizer", self.processor)
        panels = []
        for name in ["none"] + [m for m in methods if m != "none"]:
            budget = {} if name == "none" else ({"keep": int(keep)} if keep is not None else {"keep_ratio": float(keep_ratio)})
            try:
                pruner = api.patch(self.model, name, **budget) if name != "none" else None
            except VTPruneError as e:
                panels.append({"method": name, "error": str(e)})
                messages.append(f"{name}: {e}")
                continue
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = self.model(**inputs, use_cache=True, logits_to_keep=1)
                    prefill = time.perf_counter() - t0
                    kv = _kv_bytes(out.cache)
                    del out
                    gen = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                answer = tok.decode(gen[0, T:], skip_special_tokens=True).strip() or "(empty answer)"
                if pruner is None:
                    picture, kept = render_unpruned(image), available
                else:
                    picture = render(image, pruner.last, 0, self.processor, heat=heat)
                    kept = pruner.last.num_visual_tokens[0]
            except VTPruneError as e:
                panels.append({"method": name, "error": str(e)})
                messages.append(f"{name}: {e}")
                continue
            finally:
                if pruner is not None:
                    pruner.unpatch()
            panels.append({
                "method": "unpruned" if name == "none" else name,
                "answer": answer,
                "visual_tokens": kept,
                "available": available,
                "prefill_ms": round(prefill * 1000, 1),
                "kv_bytes": kv,
                "image": picture,
            })
        return panels, messages

    def html(self, panels) -> str:
        cards = []
        for p in panels:
            if "error" in p:
                cards.append(f'<div class="vtp-panel vtp-error"><h4>{html.escape(p["method"])}</h4><p class="vtp-message">{html.escape(p["error"])}</p></div>')
                continue
            cards.append(
                f'<div class="vtp-panel"><h4>{html.escape(p["method"])}</h4>'
                f'<img alt="{html.escape(p["method"])} kept patches" src="data:image/png;base64,{_png_b64(p["image"])}"/>'
                f'<p class="vtp-answer">{html.escape(p["answer"])}</p>'
                f'<p class="vtp-stats">{p["visual_tokens"]}/{p["available"]} visual tokens · prefill {p["prefill_ms"]:.0f} ms · KV {_fmt_bytes(p["kv_bytes"])}</p></div>'
            )
        style = (
            "<style>.vtp-row{display:flex;flex-wrap:wrap;gap:12px}.vtp-panel{flex:1 1 260px;max-width:480px;border:1px solid #ccc;"
            "border-radius:8px;padding:8px}.vtp-panel img{width:100%;height:auto}.vtp-answer{font-weight:600}.vtp-error{background:#fff4f4}</style>"
        )
        return style + '<div class="vtp-row">' + "".join(cards) + "</div>"


def build_app(demo: Demo):
    import gradio as gr

    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []
    methods = demo.methods()
    default = [m for m in ("vtc-cls", "flowcut", "random", "pool") if m in methods]

    def compare(file, question, chosen, keep, heat):
        image, msg = demo.load_image(file)
        if image is None:
            return "", [], msg
        try:
            keep = int(keep) if keep not in (None, "") else None
        except (TypeError, ValueError):
            return "", [], "The budget must be a whole number of visual tokens."
        if keep is not None and keep <= 0:
            return "", [], "The budget must be a positive number of visual tokens."
        if not chosen:
            chosen = []
        panels, messages = demo.run(image, question or "", list(chosen), keep=keep, heat=bool(heat))
        rows = [{k: v for k, v in p.items() if k != "image"} for p in panels]
        return demo.html(panels) if panels else "", rows, "\n\n".join(messages) if messages else "Done."

    with gr.Blocks(title="vtprune: visual token pruning, side by side", analytics_enabled=False) as app:
        gr.Markdown(f"# vtprune — visual token pruning, side by side\nModel: {demo.label}")
        with gr.Row():
            with gr.Column(scale=1):
                file = gr.File(label="Image", file_types=None, type="filepath", elem_id="vtp-image")
                if examples:
                    pick = gr.Dropdown(choices=examples, label="…or an example", value=None, elem_id="vtp-example")
                    pick.change(lambda p: p, inputs=pick, outputs=file)
                question = gr.Textbox(label="Question", value="What colour is the circle?", elem_id="vtp-question")
                chosen = gr.CheckboxGroup(choices=methods, value=default, label="Methods", elem_id="vtp-methods")
                keep = gr.Number(value=64, precision=0, label="Visual tokens to keep per image", elem_id="vtp-keep")
                heat = gr.Checkbox(label="Show score heat maps", value=False, elem_id="vtp-heat")
                go = gr.Button("Compare", variant="primary", elem_id="vtp-compare")
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="vtp-status")
                panels = gr.HTML(elem_id="vtp-panels")
                table = gr.JSON(label="Figures", elem_id="vtp-table")
        go.click(compare, inputs=[file, question, chosen, keep, heat], outputs=[panels, table, status], api_name="compare")
    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint name/path or a built-in shape; default: the built-in offline model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None)


def main(args) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the demo needs gradio: pip install 'vtprune[demo]'", file=sys.stderr)
        return 2
    from .shapes import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    model, proc, label = load_model(args.model, dtype, args.device)
    app = build_app(Demo(model, proc, label))
    print(f"vtprune demo on http://{args.host}:{args.port} ({label})", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
