"""The demo page at ``/``, driven in headless Chromium against a live server.

Playwright's Python API drives the SYSTEM Chromium (Debian's ``chromium`` package, or
``NLPSERVE_CHROMIUM=/path``); nothing is downloaded (never ``playwright install``). Without a
Chromium the tests skip and say so. Screenshots go to the test's ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from service.api.routes.explain import warm_up_explain
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    live_server,
    make_settings,
    require_model,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000  # shared 2-core CI machines: generous, the waits are on page state

QA_CONTEXT = "中国的首都是北京，它有三千多年的历史。"
QA_QUESTION = "中国的首都是哪里？"
DETECT_TEXT = (
    "i think my dog ate it lol. additionally it is important to note that overall there are "
    "several factors"
)
POS_TEXT = "The old man sees a big dog in the park ."
POLARITY_TEXT = "a truly wonderful and charming film"
# Characters outside the BMP (two UTF-16 units each), a skin-tone modifier included.
EMOJI_REVIEW = "Loved it 😀 great 👍🏽 acting, terrible 💩 ending."
EMOJI_PASSAGE = "🎉🎉🎉 长城总长度超过两万千米。"
EMOJI_QUESTION = "长城有多长？"


def find_chromium() -> str | None:
    explicit = os.environ.get("NLPSERVE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[object]:
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "no Chromium installed (apt-get install chromium, or set NLPSERVE_CHROMIUM): "
            "the demo page browser test needs one; nothing is downloaded"
        )
    async_api = pytest.importorskip(
        "playwright.async_api", reason="the playwright Python package (dev extra) is missing"
    )
    async with async_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def post_json(page, url: str, **body: str) -> tuple[int, dict]:
    """The API called directly (the reference the rendered page is checked against)."""
    r = await page.request.post(url, data=body)
    return r.status, await r.json()


async def open_page(browser, url: str):
    page = await browser.new_page(viewport={"width": 1280, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    await page.goto(url + "/")
    await page.wait_for_function(
        "!document.getElementById('models-status').textContent.startsWith('Loading')"
    )
    return page, console_errors


async def test_every_panel_end_to_end(browser, inprocess_service, model_repo, tmp_path):
    for name in (QA_MODEL, DETECT_MODEL, POS_MODEL, POLARITY_MODEL):
        require_model(model_repo, name)
    srv = inprocess_service
    await warm_up_explain(srv.app)  # shap import + JIT (seconds) before the clicks
    page, page_errors = await open_page(browser, srv.url)
    status = await page.text_content("#models-status")
    assert status and "Models loaded" in status and DETECT_MODEL in status
    assert await page.locator(".panel.unavailable").count() == 0

    # --- QA: the answer is highlighted inside the passage
    await page.fill("#qa-context", QA_CONTEXT)
    await page.fill("#qa-question", QA_QUESTION)
    await page.click("#qa-form button")
    await page.wait_for_selector("#qa-result:not([hidden])")
    answer = await page.text_content("#qa-answer")
    _, api = await post_json(page, srv.url + "/v1/qa", question=QA_QUESTION, context=QA_CONTEXT)
    assert answer == api["answer"] and answer  # the tiny model always finds some span
    assert await page.text_content("#qa-passage mark.answer") == api["answer"]
    assert await page.text_content("#qa-passage") == QA_CONTEXT  # the passage, intact
    # the runners-up of top_k 3, with their scores
    listed = await page.request.post(
        srv.url + "/v1/qa", data={"question": QA_QUESTION, "context": QA_CONTEXT, "top_k": 3}
    )
    others = (await listed.json())["answers"][1:]
    assert others  # the tiny model has more than one span in this passage
    want = "Next best: " + ", ".join(f"{a['answer']} ({a['score']:.3f})" for a in others)
    assert await page.text_content("#qa-others") == want

    # --- detector: probability + tokens coloured by SHAP value
    await page.fill("#detect-text", DETECT_TEXT)
    await page.fill("#detect-evals", "150")
    await page.click("#detect-form button")
    await page.wait_for_selector("#detect-tokens .tok")
    await page.wait_for_selector("#detect-legend:not([hidden])")
    prob = await page.text_content("#detect-prob")
    assert prob and re.fullmatch(r"\d{1,3}\.\d%", prob)
    assert await page.text_content("#detect-label") in ("human", "machine")
    tokens = page.locator("#detect-tokens .tok")
    n = await tokens.count()
    assert n > 10
    # Rendered over the original text: the paragraph reads exactly as typed.
    assert await page.text_content("#detect-tokens") == DETECT_TEXT
    seen_signs = set()
    for i in range(n):
        tok = tokens.nth(i)
        value = float(await tok.get_attribute("data-value"))
        title = await tok.get_attribute("title")
        assert title and title.startswith("SHAP ") and f"{value:+.4f}" in title
        bg = await tok.evaluate("e => getComputedStyle(e).backgroundColor")
        rgb = tuple(int(x) for x in re.findall(r"\d+", bg)[:3])
        assert rgb == ((220, 38, 38) if value >= 0 else (37, 99, 235)), (value, bg)
        seen_signs.add(value >= 0)
    summary = await page.text_content("#detect-explain-status")
    assert summary and "model evaluations" in summary

    # --- POS: one tag under each word
    await page.fill("#pos-text", POS_TEXT)
    await page.click("#pos-form button")
    await page.wait_for_selector("#pos-tagged .word")
    words = await page.locator("#pos-tagged .w").all_text_contents()
    tags = await page.locator("#pos-tagged .t").all_text_contents()
    _, api = await post_json(page, srv.url + "/v1/pos", text=POS_TEXT)
    assert words == api["tokens"] == POS_TEXT.split()
    assert tags == api["tags"]

    # --- polarity: label + probability (+ word explanation)
    await page.fill("#polarity-text", POLARITY_TEXT)
    await page.click("#polarity-form button")
    await page.wait_for_selector("#polarity-tokens .tok")
    _, api = await post_json(page, srv.url + "/v1/polarity", text=POLARITY_TEXT)
    assert await page.text_content("#polarity-label") == api["label"]
    assert await page.text_content("#polarity-prob") == f"{100 * api['positive_probability']:.1f}%"
    assert await page.locator("#polarity-tokens .tok").count() == len(POLARITY_TEXT.split())

    await tokens.nth(n // 2).hover()  # the hover card (SHAP value) shows in the screenshot
    shot = tmp_path / "demo.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"demo page screenshot: {shot}")

    # --- API errors reach the user in words
    await page.fill("#polarity-text", "   ")
    await page.click("#polarity-form button")
    error = page.locator("#panel-polarity .error")
    await error.wait_for(state="visible")
    text = await error.text_content()
    assert text and "not accepted" in text and "visible text" in text
    long_text = " ".join(["dog"] * 500)
    await page.fill("#pos-text", long_text)
    await page.click("#pos-form button")
    error = page.locator("#panel-pos .error")
    await error.wait_for(state="visible")
    assert "tokens" in (await error.text_content() or "")
    await page.screenshot(path=str(tmp_path / "demo-errors.png"), full_page=True)
    assert page_errors == []
    await page.close()


async def test_panels_of_missing_models_say_so(browser, model_repo, tmp_path):
    # A repository with only the LSTM models: the QA and detector panels must say so.
    repo = tmp_path / "models"
    repo.mkdir()
    for name in (POS_MODEL, POLARITY_MODEL):
        (repo / name).symlink_to(model_repo / name, target_is_directory=True)
    settings = make_settings(repo, warmup=False, explain_max_evals_limit=600)
    async with live_server(settings) as srv:
        page, page_errors = await open_page(browser, srv.url)
        # the evaluations inputs take this server's limit (GET /v1/models says it)
        assert await page.get_attribute("#polarity-evals", "max") == "600"
        for panel in ("#panel-qa", "#panel-detect"):
            assert "unavailable" in (await page.get_attribute(panel, "class") or "")
            line = await page.text_content(f"{panel} [data-model-line]")
            assert line and "not loaded" in line
            assert await page.is_disabled(f"{panel} button")
        for panel in ("#panel-pos", "#panel-polarity"):
            assert "unavailable" not in (await page.get_attribute(panel, "class") or "")
        # The API says the same to a client that calls it anyway.
        status, body = await post_json(page, srv.url + "/v1/detect/explain", text="hello")
        assert status == 404 and "detect" in body["error"]["message"]
        await page.screenshot(path=str(tmp_path / "demo-missing.png"), full_page=True)
        assert page_errors == []
        await page.close()


async def test_a_server_with_api_keys_asks_for_one_and_uses_it(browser, model_repo, tmp_path):
    """NLPSERVE_API_KEYS_FILE: the page (which needs no key) says the API wants one, offers a
    labelled field, and once given a key of the file sends it with every call."""
    key = "demo-page-key-0123456789abcdef"
    keys = tmp_path / "api-keys"
    keys.write_text(f"demo {key}\n")
    settings = make_settings(
        model_repo, load_models=f"{POS_MODEL},{POLARITY_MODEL}", warmup=False, api_keys_file=keys
    )
    async with live_server(settings) as srv:
        page, page_errors = await open_page(browser, srv.url)
        status = await page.text_content("#models-status") or ""
        assert "requires an API key" in status
        field = page.get_by_label("API key", exact=True)
        assert await field.is_visible()
        assert await field.get_attribute("type") == "password"
        await field.fill("not-the-key-0000000000")
        await page.click("#key-form button")
        await page.wait_for_function(
            "document.getElementById('models-status').textContent.includes('not accepted')"
        )
        await field.fill(key)
        await field.press("Enter")
        await page.wait_for_function(
            "document.getElementById('models-status').textContent.startsWith('Models loaded')"
        )
        assert await page.is_hidden("#key-form")
        assert await page.evaluate("sessionStorage.getItem('nlpserve-api-key')") == key
        await page.fill("#pos-text", POS_TEXT)
        await page.click("#pos-form button")
        await page.wait_for_selector("#pos-tagged .word")
        # a reload keeps the key for this tab
        await page.reload()
        await page.wait_for_function(
            "document.getElementById('models-status').textContent.startsWith('Models loaded')"
        )
        # a key withdrawn meanwhile: a panel's call says so and the field comes back
        await page.evaluate("sessionStorage.setItem('nlpserve-api-key', 'revoked-key-00000000')")
        await page.click("#pos-form button")
        error = page.locator("#panel-pos .error")
        await error.wait_for(state="visible")
        assert "API key was not accepted" in (await error.text_content() or "")
        assert await field.is_visible()
        assert page_errors == []
        await page.close()


async def test_offsets_count_code_points_not_utf16_units(browser, inprocess_service, model_repo):
    # The API's offsets count code points (Python); a JS string counts UTF-16 units, so an
    # emoji (two units) before a token or an answer shifted every later span by one.
    for name in (QA_MODEL, POLARITY_MODEL):
        require_model(model_repo, name)
    srv = inprocess_service
    page, page_errors = await open_page(browser, srv.url)

    await page.fill("#polarity-text", EMOJI_REVIEW)
    await page.click("#polarity-form button")
    await page.wait_for_selector("#polarity-tokens .tok")
    _, api = await post_json(page, srv.url + "/v1/polarity/explain", text=EMOJI_REVIEW)
    rendered = await page.locator("#polarity-tokens .tok").all_text_contents()
    assert rendered == [EMOJI_REVIEW[s:e] for s, e in api["offsets"]] == api["tokens"]
    assert await page.text_content("#polarity-tokens") == EMOJI_REVIEW

    await page.fill("#qa-context", EMOJI_PASSAGE)
    await page.fill("#qa-question", EMOJI_QUESTION)
    await page.click("#qa-form button")
    await page.wait_for_selector("#qa-result:not([hidden])")
    _, api = await post_json(
        page, srv.url + "/v1/qa", question=EMOJI_QUESTION, context=EMOJI_PASSAGE
    )
    assert api["answer"] and api["end"] > api["start"]
    assert await page.text_content("#qa-passage mark.answer") == api["answer"]
    before = await page.evaluate(
        "document.querySelector('#qa-passage mark').previousSibling?.textContent ?? ''"
    )
    assert before == EMOJI_PASSAGE[: api["start"]]
    assert await page.text_content("#qa-passage") == EMOJI_PASSAGE
    assert page_errors == []
    await page.close()


async def test_shap_values_reach_keyboard_and_screen_readers(
    browser, inprocess_service, model_repo
):
    require_model(model_repo, POLARITY_MODEL)
    srv = inprocess_service
    page, page_errors = await open_page(browser, srv.url)
    await page.fill("#polarity-text", POLARITY_TEXT)
    await page.click("#polarity-form button")
    await page.wait_for_selector("#polarity-tokens .tok")
    _, api = await post_json(page, srv.url + "/v1/polarity/explain", text=POLARITY_TEXT)

    tokens = page.locator("#polarity-tokens .tok")
    n = await tokens.count()
    values = []
    for i in range(n):
        tok = tokens.nth(i)
        text = await tok.text_content()
        value = float(await tok.get_attribute("data-value"))
        values.append(value)
        towards = "positive" if value >= 0 else "negative"
        # The value in words for screen readers, the sign without colour.
        assert await tok.get_attribute("aria-label") == f"{text}: {value:+.4f}, towards {towards}"
        assert await tok.get_attribute("tabindex") == ("0" if i == 0 else "-1")
        style = await tok.evaluate(
            "e => { const s = getComputedStyle(e); "
            "return [s.backgroundColor, s.borderBottomStyle]; }"
        )
        rgb = tuple(int(x) for x in re.findall(r"\d+", style[0])[:3])
        # Polarity's own pair: "positive" is not the detector's "towards machine" red.
        assert rgb == ((58, 125, 28) if value >= 0 else (197, 27, 125)), (value, style)
        assert style[1] == ("solid" if value >= 0 else "dotted")
    legend = await page.text_content("#polarity-legend")
    assert legend and "focus a token" in legend

    # Keyboard: Tab from the button enters the text, the arrows move, Tab leaves it.
    await page.focus("#polarity-form button")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement === document.querySelector('.tok')")
    await page.keyboard.press("ArrowRight")
    focused = await page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert focused == await tokens.nth(1).get_attribute("aria-label")
    card = await tokens.nth(1).evaluate("e => getComputedStyle(e, '::after').content")
    assert "SHAP" in card  # the focus shows the same card as a hover
    await page.keyboard.press("Tab")
    assert await page.evaluate("!document.activeElement.classList.contains('tok')")

    # The strongest tokens, as a table: by |value|, the sign in text.
    await page.click("#polarity-top summary")
    rows = page.locator("#polarity-top tbody tr")
    expected = sorted(range(n), key=lambda i: (-abs(values[i]), i))[:10]
    assert await rows.count() == len(expected)
    for row, i in enumerate(expected):
        cells = await rows.nth(row).locator("td").all_text_contents()
        assert cells[0] == api["tokens"][i]
        assert cells[1] == f"{values[i]:+.4f}"
        assert cells[2].endswith("positive" if values[i] >= 0 else "negative")
    assert page_errors == []
    await page.close()


async def test_stale_error_cleared_and_evaluations_bounded(browser, inprocess_service, model_repo):
    require_model(model_repo, POLARITY_MODEL)
    page, page_errors = await open_page(browser, inprocess_service.url)
    for evals in ("#detect-evals", "#polarity-evals"):
        assert await page.get_attribute(evals, "min") == "4"
        assert await page.get_attribute(evals, "max") == str(
            inprocess_service.settings.explain_max_evals_limit
        )
    await page.fill("#polarity-text", "   ")
    await page.click("#polarity-form button")
    error = page.locator("#panel-polarity .error")
    await error.wait_for(state="visible")
    # The browser's validation blocks the next attempt: the old error must go.
    await page.fill("#polarity-text", POLARITY_TEXT)
    await page.fill("#polarity-evals", "3")
    await page.click("#polarity-form button")
    await error.wait_for(state="hidden")
    assert not await page.evaluate("document.getElementById('polarity-evals').validity.valid")
    # The polarity panel sends its evaluations, as the detector's does.
    await page.fill("#polarity-evals", "40")
    async with page.expect_request(lambda r: r.url.endswith("/v1/polarity/explain")) as req:
        await page.click("#polarity-form button")
    assert (await req.value).post_data_json == {"text": POLARITY_TEXT, "max_evals": 40}
    await page.wait_for_selector("#polarity-tokens .tok")
    status = await page.text_content("#polarity-explain-status")
    assert status and "model evaluations" in status
    assert page_errors == []
    await page.close()


async def test_phone_width_does_not_overflow(browser, inprocess_service, model_repo):
    require_model(model_repo, POLARITY_MODEL)
    page = await browser.new_page(viewport={"width": 390, "height": 844})
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(inprocess_service.url + "/")
    await page.wait_for_function(
        "!document.getElementById('models-status').textContent.startsWith('Loading')"
    )
    width = "document.documentElement.scrollWidth"
    assert await page.evaluate(width) <= 390
    await page.fill("#polarity-text", EMOJI_REVIEW + " " + POLARITY_TEXT)
    await page.click("#polarity-form button")
    await page.wait_for_selector("#polarity-tokens .tok")
    assert await page.evaluate(width) <= 390
    tokens = page.locator("#polarity-tokens .tok")
    for i in range(await tokens.count()):  # the value card of a token at the right edge
        await tokens.nth(i).focus()
        assert await page.evaluate(width) <= 390, await tokens.nth(i).text_content()
    await page.close()


async def test_a_long_text_is_read_whole_and_its_windows_listed(
    browser, inprocess_service, model_repo
):
    require_model(model_repo, DETECT_MODEL)
    srv = inprocess_service
    await warm_up_explain(srv.app)
    page, page_errors = await open_page(browser, srv.url)
    # emoji: each window's first 40 characters are code points, as its offsets, not UTF-16
    # units (40 units cut a surrogate pair in two, and shorter than the API's text)
    text = " ".join([f"👍🏽 {DETECT_TEXT}"] * 12)
    await page.fill("#detect-text", text)
    await page.fill("#detect-evals", "8")
    async with page.expect_request(lambda r: r.url.endswith("/v1/detect")) as req:
        await page.click("#detect-form button")
    assert (await req.value).post_data_json == {"text": text, "windows": True}
    await page.wait_for_selector("#detect-windows:not([hidden])")
    r = await page.request.post(srv.url + "/v1/detect", data={"text": text, "windows": True})
    api = await r.json()
    assert len(api["windows"]) > 1
    assert await page.text_content("#detect-prob") == f"{100 * api['machine_probability']:.1f}%"
    listed = await page.text_content("#detect-windows")
    assert listed and listed.startswith(f"Read whole, in {len(api['windows'])} windows")
    for i, w in enumerate(api["windows"], start=1):
        assert f"{i}. “{text[w['start'] : w['end']][:40]}" in listed
        assert f"{w['label']} {100 * w['machine_probability']:.1f}%" in listed
    # a short text: one window, no list
    await page.fill("#detect-text", DETECT_TEXT)
    await page.click("#detect-form button")
    await page.wait_for_selector("#detect-windows[hidden]", state="attached")
    assert page_errors == []
    await page.close()
