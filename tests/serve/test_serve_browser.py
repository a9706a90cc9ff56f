"""The web page end to end in real headless Chromium (Debian's, driven by Playwright): upload an
image, ask, see the streamed answer, ask again, reset; paint and see the picture in the gallery;
watch a painting's step progress and stop it."""
from __future__ import annotations

import os
import re
import shutil

import pytest
from playwright.sync_api import expect

from .serve_fixtures import counting_calls, wait_idle


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as root, without a network: no sandbox, no GPU, none of Chromium's own background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it with apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def test_chat_view_upload_ask_stream_reset(page, server, image_path):
    page.goto(server + "/")
    page.set_input_files("#chat-image", str(image_path))
    page.wait_for_selector("#image-preview:not([hidden])")
    page.click("summary")
    page.fill("#chat-max-tokens", "12")
    page.fill("#chat-input", "图片里有什么？")
    page.click("#chat-send")
    answer = page.wait_for_selector(".msg.assistant.done", timeout=30_000)
    assert answer.inner_text().strip()
    assert page.locator(".msg.user img").count() == 1  # the image went with the first question
    assert page.locator(".msg.error").count() == 0

    page.fill("#chat-input", "What colour is it?")
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant.done")).to_have_count(2, timeout=30_000)
    assert page.locator(".msg.assistant").nth(1).inner_text().strip()

    page.click("#chat-reset")
    assert page.locator(".msg").count() == 0
    assert page.locator("#image-preview").is_hidden()


def test_paint_view_prompt_to_gallery(page, server):
    page.goto(server + "/")
    page.click("#tab-paint")
    page.fill("#paint-prompt", "海上生明月，唯美风格")
    page.fill("#paint-steps", "3")
    page.fill("#paint-n", "2")
    page.fill("#paint-seed", "11")
    page.click("#paint-go")
    expect(page.locator("#gallery figure img")).to_have_count(2, timeout=30_000)
    widths = page.eval_on_selector_all("#gallery figure img", "images => images.map(i => i.naturalWidth)")
    assert widths == [32, 32]
    captions = page.locator("#gallery figcaption").all_inner_texts()
    assert any("seed 11" in c for c in captions) and any("seed 12" in c for c in captions)

    page.fill("#paint-size", "33x33")  # a bad size: the server's message appears in the gallery
    page.click("#paint-go")
    error = page.wait_for_selector("#gallery figure.error", timeout=30_000)
    assert "multiple of" in error.inner_text()


def test_paint_view_shows_step_progress_and_stop_cancels_the_painting(page, server, tiny_paint):
    page.goto(server + "/")
    page.click("#tab-paint")
    page.fill("#paint-prompt", "a red circle")
    page.fill("#paint-steps", "100")
    page.fill("#paint-size", "64x64")
    with counting_calls(tiny_paint.model.unet) as unet_calls:
        page.click("#paint-go")
        assert page.locator("#paint-go").is_disabled()
        expect(page.locator("#paint-progress-text")).to_have_text(re.compile(r"^step 步 [1-9]\d*/100 · \d+ s$"),
                                                                  timeout=60_000)
        assert page.eval_on_selector("#paint-bar", "bar => [bar.max, bar.value >= 1]") == [100, True]
        page.click("#paint-stop")
        expect(page.locator("#status")).to_have_text("stopped 已停止")
        wait_idle(server, "paint", timeout=60)  # the server stopped painting at its next step
    assert unet_calls[0] < 100
    assert page.locator("#gallery figure").count() == 0
    assert page.locator("#paint-progress").is_hidden() and page.locator("#paint-stop").is_hidden()
    assert page.locator("#paint-go").is_enabled()


def test_paint_view_edits_an_uploaded_image_with_a_painted_mask(page, server, tmp_path):
    """Issue 24: upload an image, drag a rectangle over its right half, paint: the edit goes to
    /v1/images/edits as an inpainting of that half; without a mask it is image-to-image."""
    import base64
    import io
    import json

    from PIL import Image

    source = tmp_path / "source.png"
    Image.new("RGB", (32, 32), (30, 60, 200)).save(source)
    page.goto(server + "/")
    page.click("#tab-paint")
    page.click("#edit-box summary")
    page.set_input_files("#edit-image", str(source))
    page.wait_for_selector("#edit-mask:visible")
    page.fill("#paint-prompt", "a red circle")
    page.fill("#paint-steps", "2")
    page.fill("#paint-seed", "5")
    page.fill("#edit-strength", "0.9")
    page.select_option("#edit-tool", "rect")
    box = page.locator("#edit-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 1, box["y"] + box["height"] - 1, steps=4)
    page.mouse.up()
    page.click("#paint-go")

    def newest_settings():
        expect(page.locator("#gallery figure img")).to_have_count(count, timeout=30_000)
        src = page.eval_on_selector("#gallery figure img", "img => img.src")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            return json.loads(image.text["viscpm"])

    count = 1
    edit = newest_settings()["metadata"]["edit"]
    assert edit["mode"] == "inpaint" and edit["strength"] == 0.9 and 0.4 <= edit["masked_share"] <= 0.6
    page.click("#edit-clear-mask")
    page.click("#paint-go")
    count = 2
    assert newest_settings()["metadata"]["edit"] == {"mode": "img2img", "strength": 0.9}
    page.click("#edit-remove")
    page.click("#paint-go")
    count = 3
    assert "edit" not in newest_settings()["metadata"]
