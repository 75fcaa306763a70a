"""`vtprune demo`: the comparison logic, bad input as messages, and the page itself driven in a real
headless Chromium (Playwright) plus a gradio_client call of the same endpoint."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vtprune.testing import make_image, tiny_llava

from .helpers import need

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo():
    from vtprune.eval.demo import Demo

    model, proc = tiny_llava()
    return Demo(model, proc, "tiny")


def test_panels_for_every_method(demo):
    panels, messages = demo.run(make_image(3, (420, 300)), "What is red?", ["vtc-cls", "flowcut", "pool"], keep=64)
    assert [p["method"] for p in panels] == ["unpruned", "vtc-cls", "flowcut", "pool"]
    for p in panels:
        assert p["answer"] and p["image"].size[0] > 0 and p["kv_bytes"] > 0 and p["prefill_ms"] > 0
    assert panels[0]["visual_tokens"] == 576 and all(p["visual_tokens"] == 64 for p in panels[1:])
    assert panels[1]["kv_bytes"] < panels[0]["kv_bytes"], "a pruned KV cache is smaller"
    html = demo.html(panels)
    assert html.count('class="vtp-panel"') == 4 and html.count("<img") == 4
    heat, _ = demo.run(make_image(3, (420, 300)), "What is red?", ["vtc-cls"], keep=64, heat=True)
    assert heat[1]["image"].tobytes() != panels[1]["image"].tobytes()
    assert messages == []


def test_bad_input_is_a_message(demo, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    img, msg = demo.load_image(str(text))
    assert img is None and "not an image" in msg
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (9000, 10)).save(big)
    img, msg = demo.load_image(str(big))
    assert img is None and "too large" in msg
    panels, messages = demo.run(make_image(1), "   ", ["vtc-cls"], keep=64)
    assert panels == [] and "Type a question" in messages[0]
    panels, messages = demo.run(make_image(1), "What is red?", ["vtc-cls", "globalcom2"], keep=5000)
    assert any("nothing is pruned" in m for m in messages)
    assert any(p.get("error") and "LLaVA-NeXT" in p["error"] for p in panels)
    assert "vtp-error" in demo.html(panels)


# --- the page in a browser -----------------------------------------------------------------------------------
def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def server():
    need("gradio", "demo")
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "vtprune.cli", "demo", "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the demo exited:\n" + proc.stdout.read())
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except Exception:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("the demo did not start within 180 s")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_gradio_client(server, tmp_path):
    gc = need("gradio_client", "demo")
    png = tmp_path / "img.png"
    make_image(7).save(png)
    client = gc.Client(server, verbose=False)
    html, rows, status = client.predict(gc.handle_file(str(png)), "What is red?", ["vtc-cls", "random"], 32, False, api_name="/compare")
    assert [r["method"] for r in rows] == ["unpruned", "vtc-cls", "random"]
    assert all(r["answer"] for r in rows) and rows[1]["visual_tokens"] == 32
    assert html.count("<img") == 3 and status == "Done."
    _, _, status = client.predict(gc.handle_file(str(png)), "", ["vtc-cls"], 32, False, api_name="/compare")
    assert "Type a question" in status


def test_browser(server, tmp_path):
    need("playwright")
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed")
    from playwright.sync_api import sync_playwright

    png = tmp_path / "img.png"
    make_image(9, (500, 400)).save(png)
    shot = ROOT / "build" / "demo-screenshot.png"
    shot.parent.mkdir(exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="networkidle")
            page.set_input_files("#vtp-image input[type=file]", str(png))
            page.wait_for_timeout(1500)
            page.fill("#vtp-question textarea", "What colour is the square?")
            page.fill("#vtp-keep input", "48")
            page.click("#vtp-compare")
            page.wait_for_selector(".vtp-panel img", timeout=240_000)
            page.wait_for_function("document.querySelectorAll('.vtp-panel').length >= 5", timeout=240_000)
            panels = page.query_selector_all(".vtp-panel")
            names = [pn.query_selector("h4").inner_text() for pn in panels]
            assert names[0] == "unpruned" and len(names) == 5
            for pn in panels:
                assert pn.query_selector("img") is not None, "every panel shows an image"
                assert pn.query_selector(".vtp-answer").inner_text().strip(), "every panel shows an answer"
            assert "48/576" in panels[1].inner_text()
            page.screenshot(path=str(shot), full_page=True)
            # bad input keeps the app serving: an empty question is a message, then a good run works again
            page.fill("#vtp-question textarea", "")
            page.click("#vtp-compare")
            page.wait_for_function("document.querySelector('#vtp-status').innerText.includes('Type a question')", timeout=60_000)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
