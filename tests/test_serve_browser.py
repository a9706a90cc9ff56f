"""The web page end to end in real headless Chromium (Debian's, driven by Playwright): upload an
image, ask, see the streamed answer, ask again, reset; paint and see the picture in the gallery."""
from __future__ import annotations

import os
import shutil

import pytest
from playwright.sync_api import expect

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
