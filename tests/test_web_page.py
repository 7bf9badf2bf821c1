"""The web page in a real browser (Debian's chromium, driven by Playwright) against the real stack: a RabbitMQ node,
the product's processor with tiny models, the embedded store and vector engine.

The tests walk one page through a session, in file order: upload, search, find similar, delete, generate, speak.
A failing test leaves a screenshot of the page in test-artifacts/.
"""

from __future__ import annotations

import re
import shutil
import threading
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Route, async_playwright, expect

from contract.clock import iso_from_us
from infra.vectors import ImageRecord
from tests.support.amqp import wait_until
from tests.support.audio import speech_clip
from tests.support.images import encoded
from tests.support.server import RunningServer, running_server

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "admin-key-for-the-page-test"
REF_TEXT = "Hello there. This is the reference voice, speaking clearly for a few seconds."

# generation on, at the smallest size and fewest steps the page's tests need
SMALL_IMAGES = {
    "IMAGE_ENABLED": "1",
    "IMAGE_DEFAULT_WIDTH": "64",
    "IMAGE_DEFAULT_HEIGHT": "64",
    "IMAGE_DEFAULT_STEPS": "2",
}

expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
async def server(make_settings) -> AsyncIterator[RunningServer]:
    async with running_server(make_settings(VOICE_ENABLED="1", **SMALL_IMAGES)) as running:
        yield running


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # the fake microphone plays a tone and needs no permission prompt
        fake_microphone = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", *fake_microphone])
        yield launched
        await launched.close()


class Session:
    """The page, every request it made and the script errors it raised."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        # the browser logs every 4xx answer as an error; the tests that expect one check what the page shows
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)


@pytest.fixture(scope="module")
async def session(browser, server) -> AsyncIterator[Session]:
    context = await browser.new_context(base_url=server.base_url, viewport={"width": 1280, "height": 900})
    opened = Session(await context.new_page())
    await opened.page.goto("/")
    yield opened
    await context.close()


@pytest.fixture(autouse=True)
async def screenshot_on_failure(request) -> AsyncIterator[None]:
    yield
    report = getattr(request.node, "report_call", None)
    if report is None or not report.failed:
        return
    for name in ("session", "keyed_page", "elsewhere"):
        if name in request.fixturenames:
            found = request.getfixturevalue(name)
            page = found.page if isinstance(found, Session) else found
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)


def image_files() -> list[dict]:
    return [
        {"name": f"drawing-{seed}.png", "mimeType": "image/png", "buffer": encoded(seed, size=(320, 240))}
        for seed in (11, 12, 13)
    ]


async def scores(page: Page) -> list[float]:
    return [float(text) for text in await page.locator("#gallery .score").all_inner_texts()]


def test_every_page_file_is_in_the_package():
    """`pip install .` (the Docker images) ships api/ui/ only through pyproject's package-data globs."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    files = [path.relative_to(ROOT / "api") for path in (ROOT / "api" / "ui").rglob("*") if path.is_file()]
    assert files
    assert [str(path) for path in files if not any(path.match(glob) for glob in globs)] == []


async def test_the_page_is_served_with_its_own_assets_only(session, server):
    page = session.page
    await expect(page).to_have_title("AI model server")
    await expect(page.locator("#gallery-status")).to_have_text("No images yet: add some.")
    assert session.requests, "the page made no requests"
    assert all(url.startswith(server.base_url) for url in session.requests), session.requests
    answer = await server.client.get("/")
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    asset = re.search(r'src="(/ui/[0-9a-f]+/js/app\.js)"', answer.text)
    assert asset is not None
    cached = await server.client.get(asset.group(1))
    assert cached.headers["content-type"].startswith("text/javascript")
    assert "immutable" in cached.headers["cache-control"]
    stale = await server.client.get("/ui/0000000000000000/js/app.js")
    assert stale.status_code == 404
    assert stale.json()["code"] == "not_found"
    assert session.errors == []


DROP = """([name, bytes]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
    const zone = document.getElementById("dropzone");
    zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
}"""


async def test_upload_three_images_and_see_them_in_the_gallery(session, server):
    """Two picked in the file dialog, one dropped on the page."""
    page = session.page
    picked, dropped = image_files()[:2], image_files()[2]
    await page.locator("#upload-input").set_input_files(picked)
    await page.evaluate(DROP, [dropped["name"], list(dropped["buffer"])])
    await expect(page.locator("#uploads .upload.ok")).to_have_count(3)
    await expect(page.locator("#gallery .card")).to_have_count(3)
    for picture in await page.locator("#gallery .card img").all():
        await expect(picture).to_have_js_property("complete", True)
        assert await picture.evaluate("image => image.naturalWidth") > 0
    listed = (await server.client.get("/v1/images")).json()
    assert {image["filename"] for image in listed} == {"drawing-11.png", "drawing-12.png", "drawing-13.png"}
    await page.get_by_role("link", name=re.compile("^Jobs")).click()
    await expect(page.locator("#jobs-list .state-succeeded")).to_have_count(3)
    await page.get_by_role("link", name="Images").click()


async def test_a_file_that_is_not_an_image_shows_the_servers_reason(session):
    page = session.page
    not_image = {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"these are my notes, not a picture"}
    await page.locator("#upload-input").set_input_files([not_image])
    failed = page.locator("#uploads .upload.failed")
    await expect(failed).to_have_count(1)
    await expect(failed).to_contain_text("Not added: the bytes are not an image")
    await expect(page.locator("#gallery .card")).to_have_count(3)


@pytest.mark.parametrize("query", ["a red square on a blue background", "파란 배경 위의 빨간 사각형"])
async def test_search_in_english_and_korean_shows_ranked_results(session, query):
    page = session.page
    await page.get_by_label("Search in any language").fill(query)
    await page.get_by_role("button", name="Search", exact=True).click()
    await expect(page.locator("#gallery-status")).to_have_text(f"3 images for “{query}”, closest first")
    found = await scores(page)
    assert len(found) == 3
    assert found == sorted(found, reverse=True)


async def test_find_similar_ranks_the_other_images(session):
    page = session.page
    first = page.locator("#gallery .card").first
    name = await first.locator("img").get_attribute("alt")
    await first.get_by_role("button", name="Similar").click()
    await expect(page.locator("#gallery-status")).to_have_text(f"2 images like {name}, closest first")
    assert name not in await page.locator("#gallery img").evaluate_all("images => images.map(image => image.alt)")
    found = await scores(page)
    assert found == sorted(found, reverse=True)


async def test_delete_one_after_confirming(session, server):
    page = session.page
    await page.get_by_role("button", name="Show all images").click()
    await expect(page.locator("#gallery .card")).to_have_count(3)
    first = page.locator("#gallery .card").first
    name = await first.locator("img").get_attribute("alt")
    await first.locator(".tile").click()
    viewer = page.locator("#viewer")
    await expect(viewer).to_be_visible()
    await expect(viewer.locator("#viewer-image")).to_have_js_property("complete", True)
    assert await viewer.locator("#viewer-image").evaluate("image => image.naturalWidth") == 320
    await viewer.get_by_role("button", name="Delete…").click()
    await page.locator("#confirm-delete").get_by_role("button", name="Cancel").click()
    await expect(page.locator("#gallery .card")).to_have_count(3)
    await viewer.get_by_role("button", name="Delete…").click()
    await page.locator("#confirm-delete").get_by_role("button", name="Delete", exact=True).click()
    await expect(viewer).to_be_hidden()
    await expect(page.locator("#gallery .card")).to_have_count(2)
    await expect(page.locator("#gallery-status")).to_contain_text(f"Deleted {name}.")
    listed = (await server.client.get("/v1/images")).json()
    assert name not in {image["filename"] for image in listed}
    assert len(listed) == 2

    # Escape closes the confirmation without deleting (not even right after a confirmed delete)
    await page.locator("#gallery .card .tile").first.click()
    await viewer.get_by_role("button", name="Delete…").click()
    await page.keyboard.press("Escape")
    await expect(page.locator("#confirm-delete")).to_be_hidden()
    await page.keyboard.press("Escape")
    await expect(viewer).to_be_hidden()
    await expect(page.locator("#gallery .card")).to_have_count(2)
    assert len((await server.client.get("/v1/images")).json()) == 2


async def test_filters_narrow_the_gallery(session):
    page = session.page
    await page.get_by_text("Filters").click()
    await page.get_by_label("Format").select_option("image/jpeg")
    await expect(page.locator("#gallery-status")).to_have_text("No images match the filters.")
    await page.get_by_label("Format").select_option("image/png")
    await page.get_by_label("Source").select_option("upload")
    await expect(page.locator("#gallery .card")).to_have_count(2)
    await page.get_by_label("Added until").fill("2000-01-01")
    await expect(page.locator("#gallery-status")).to_have_text("No images match the filters.")
    await page.get_by_label("Added until").fill("")
    await page.get_by_label("Format").select_option("")
    await page.get_by_label("Source").select_option("")
    await expect(page.locator("#gallery-status")).to_have_text("2 images, newest first")


async def test_generate_shows_the_image_and_the_seed(session, server):
    page = session.page
    await page.get_by_role("link", name="Generate").click()
    await page.get_by_label("Prompt", exact=True).fill("a lighthouse at dawn")
    await page.get_by_label(re.compile("^Seed")).fill("42")
    await page.get_by_role("button", name="Generate").click()
    await expect(page.locator("#generate-caption")).to_have_text("Seed 42 · 64 × 64 · 2 steps")
    await expect(page.locator("#generate-image")).to_have_js_property("naturalWidth", 64)

    # a seed drawn by the server is a 64-bit integer: shown exactly, not rounded to a JavaScript number
    await page.get_by_label(re.compile("^Seed")).fill("")
    await page.get_by_role("button", name="Generate").click()
    await expect(page.locator("#jobs-list .job")).to_have_count(6)
    newest = page.locator("#jobs-list .job").first
    await expect(newest).to_have_class(re.compile("state-succeeded"))
    job_id = await newest.locator(".job-id").inner_text()
    seed = (await server.client.get(f"/v1/jobs/{job_id}")).json()["result"]["seed"]
    await expect(page.locator("#generate-caption")).to_have_text(f"Seed {seed} · 64 × 64 · 2 steps")


async def test_a_generated_image_is_deleted_from_the_jobs_panel(session, server):
    """The newest job, the generation just shown: Delete… asks first, then the server deletes the PNG, the entry says
    so without its link or button, and the Generate section no longer shows it."""
    page = session.page
    await page.get_by_role("link", name="Jobs").click()
    newest = page.locator("#jobs-list .job").first
    job_id = await newest.locator(".job-id").inner_text()
    label = await newest.locator(".job-label").inner_text()
    await newest.get_by_role("button", name=f"Delete the PNG of {label}").click()
    dialog = page.locator("#confirm-output-delete")
    await expect(dialog).to_contain_text(f"deletes the PNG of {label} now")
    await dialog.get_by_role("button", name="Cancel").click()
    assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["output_deleted"] is None
    await newest.get_by_role("button", name=f"Delete the PNG of {label}").click()
    await dialog.get_by_role("button", name="Delete").click()
    await expect(newest.locator(".job-detail")).to_have_text("PNG deleted")
    await expect(newest.get_by_role("link")).to_have_count(0)
    await expect(newest.get_by_role("button")).to_have_count(0)
    assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["output_deleted"]["reason"] == "deleted"
    await page.get_by_role("link", name="Generate").click()
    await expect(page.locator("#generate-result")).to_be_hidden()


async def test_a_refused_generation_says_why(session):
    page = session.page
    await page.get_by_label("Width").fill("2048")
    await page.get_by_label("Height").fill("2048")
    await page.get_by_label("Steps").fill("100")
    await page.get_by_role("button", name="Generate").click()
    await expect(page.locator("#generate-error")).to_contain_text("pixel-steps, over this server's budget")


async def test_a_queued_generation_is_cancelled_from_the_jobs_panel(session, server, monkeypatch):
    """The processor is held on another generation (its model call waits for the test), so the page's job stays
    queued: its Cancel button cancels it, and the entry ends failed, saying so."""
    page = session.page
    release = threading.Event()
    generate = server.processor.runtime.generator.generate

    def held(*args, **kwargs):
        release.wait(60)
        return generate(*args, **kwargs)

    monkeypatch.setattr(server.processor.runtime.generator, "generate", held)
    try:
        blocker = await server.client.post("/v1/jobs", json={"type": "image.generate", "params": {"prompt": "hold"}})
        blocker_url = f"/v1/jobs/{blocker.json()['job_id']}"

        async def blocker_running() -> bool:
            return (await server.client.get(blocker_url)).json()["status"] == "running"

        await wait_until(blocker_running, timeout=30)
        await page.get_by_role("link", name="Generate").click()
        await page.get_by_label("Prompt", exact=True).fill("a job nobody wants")
        for field, value in (("Width", "64"), ("Height", "64"), ("Steps", "2")):
            await page.get_by_label(field).fill(value)
        await page.get_by_role("button", name="Generate").click()
        await page.get_by_role("link", name="Jobs").click()
        newest = page.locator("#jobs-list .job").first
        await expect(newest).to_have_class(re.compile("state-queued"))
        await newest.get_by_role("button", name="Cancel Generate “a job nobody wants”").click()
        await expect(newest).to_have_class(re.compile("state-failed"))
        await expect(newest.locator(".job-detail")).to_contain_text("was cancelled while queued")
        await expect(newest.get_by_role("button")).to_have_count(0)
        job_id = await newest.locator(".job-id").inner_text()
        assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["error"]["code"] == "cancelled"
    finally:
        release.set()

    async def blocker_done() -> bool:
        return (await server.client.get(blocker_url)).json()["status"] == "succeeded"

    await wait_until(blocker_done, timeout=30)
    await page.get_by_role("link", name="Generate").click()


async def test_clone_a_voice_and_play_it(session):
    page = session.page
    await page.get_by_role("link", name="Voice").click()
    clip = {"name": "ref.wav", "mimeType": "audio/wav", "buffer": speech_clip("wav")}
    await page.get_by_label("A file (MP3, WAV, FLAC, OGG, M4A)").set_input_files([clip])
    await page.get_by_label("Transcript of the clip").fill(REF_TEXT)
    await page.get_by_label("Text to speak").fill("Good morning. The meeting moved to the afternoon.")
    await page.get_by_label("Language", exact=True).select_option("English")
    await page.get_by_role("button", name="Speak").click()
    await expect(page.locator("#voice-caption")).to_have_text(re.compile(r"^\d+\.\d s of speech$"))
    audio = page.locator("#voice-audio")
    await audio.evaluate("audio => new Promise(done => audio.readyState > 0 ? done() : audio.onloadedmetadata = done)")
    assert await audio.evaluate("audio => audio.duration") > 0
    await page.get_by_role("link", name=re.compile("^Jobs")).click()
    await expect(page.locator("#jobs-list .job").first).to_have_class(re.compile("state-succeeded"))


async def test_a_voice_recorded_in_the_browser_is_sent_as_wav(session, server):
    page = session.page
    await page.get_by_role("link", name="Voice").click()
    record = page.get_by_role("button", name="Record in the browser")
    await record.click()
    await expect(page.locator("#voice-record-status")).to_have_text("Recording… speak the transcript, then stop")
    await page.wait_for_timeout(2500)
    await page.get_by_role("button", name="Stop recording").click()
    await expect(page.locator("#voice-record-status")).to_have_text(re.compile(r"^Recorded \d+ KB: it will be"))
    await page.get_by_role("button", name="Speak").click()
    newest = page.locator("#jobs-list .job").first
    await expect(newest).to_have_class(re.compile("state-succeeded"))
    job = (await server.client.get(f"/v1/jobs/{await newest.locator('.job-id').inner_text()}")).json()
    assert job["params"]["ref_audio"]["filename"] == "recording.wav"  # decoded by the server: a clip it takes


async def test_every_control_is_named_and_the_page_fits_a_phone_in_dark(session, browser, server):
    unnamed = await session.page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea, button")]
            .filter(control => !(control.labels?.length || control.getAttribute("aria-label")
                                 || control.textContent.trim()))
            .map(control => control.outerHTML)"""
    )
    assert unnamed == []
    context = await browser.new_context(
        base_url=server.base_url, viewport={"width": 375, "height": 740}, color_scheme="dark"
    )
    phone = await context.new_page()
    await phone.goto("/")
    await expect(phone.locator("#gallery .card")).to_have_count(2)
    assert await phone.evaluate("document.documentElement.scrollWidth") <= 375
    background = await phone.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 21, 24)"
    await phone.keyboard.press("Tab")
    assert await phone.evaluate("document.activeElement.textContent") == "Skip to content"
    await context.close()
    assert session.errors == []


@pytest.fixture(scope="module")
async def keyed_server(make_settings) -> AsyncIterator[RunningServer]:
    async with running_server(make_settings(API_KEYS=f"admin:{KEY}")) as running:
        yield running


@pytest.fixture
async def keyed_page(browser, keyed_server) -> AsyncIterator[Page]:
    context = await browser.new_context(base_url=keyed_server.base_url)
    yield await context.new_page()
    await context.close()


async def test_with_api_keys_the_page_asks_for_one_and_keeps_it_for_the_tab(keyed_page, keyed_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    stored = await keyed_server.client.post(
        "/v1/images", files={"file": ("kept.png", encoded(21), "image/png")}, headers=headers
    )
    assert stored.status_code == 201, stored.text
    page = keyed_page
    await page.goto("/")
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await dialog.get_by_label("Key").fill("not-the-key-at-all-really")
    await dialog.get_by_role("button", name="Use this key").click()
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("the API key is not valid")
    await dialog.get_by_label("Key").fill(KEY)
    await dialog.get_by_role("button", name="Use this key").click()
    thumbnail = page.locator("#gallery .card img")
    await expect(thumbnail).to_have_count(1)
    await expect(thumbnail).to_have_attribute("src", re.compile("^blob:"))
    assert await thumbnail.evaluate("image => image.decode().then(() => image.naturalWidth)") > 0
    assert await page.evaluate("sessionStorage.getItem('ams-api-key')") == KEY
    assert await page.evaluate("localStorage.length") == 0
    await page.reload()
    await expect(page.locator("#gallery .card")).to_have_count(1)
    await expect(dialog).to_be_hidden()


async def test_the_gallery_loads_more_as_it_scrolls(keyed_page, keyed_server):
    """60 more images than the one there (written straight into the store and the index: their thumbnails are made
    on request): the first page shows 48, scrolling to the end brings the rest."""
    services = keyed_server.services
    vectors = np.random.default_rng(1).standard_normal((60, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = []
    for number, vector in enumerate(vectors):
        image_id = str(uuid.uuid4())
        key = f"images/originals/{image_id}.png"
        await services.store.put(key, encoded(100 + number, size=(64, 48)), "image/png")
        created_us = 1_790_000_000_000_000 + number
        record = ImageRecord(
            id=image_id,
            r2_key=key,
            content_type="image/png",
            size=1,
            width=64,
            height=48,
            created_at=iso_from_us(created_us),
            created_us=created_us,
            source="upload",
            filename=f"scrolled-{number}.png",
        )
        records.append((record, vector.tolist()))
    await services.index.upsert(records)
    page = keyed_page
    await page.goto("/")
    await page.locator("#key-dialog").get_by_label("Key").fill(KEY)
    await page.locator("#key-dialog").get_by_role("button", name="Use this key").click()
    await expect(page.locator("#gallery .card")).to_have_count(48)
    await expect(page.locator("#gallery-status")).to_have_text("48 images, newest first (more below)")
    await page.locator("#gallery .card").last.scroll_into_view_if_needed()
    await page.mouse.wheel(0, 100_000)
    await expect(page.locator("#gallery .card")).to_have_count(61)
    await expect(page.locator("#gallery-status")).to_have_text("61 images, newest first")


async def test_a_window_taller_than_a_page_of_images_loads_the_next_ones_at_once(browser, keyed_server):
    """The 61 images of the test before: 48 cards leave the gallery's end in view, so the page loads the rest
    without waiting for a scroll that would never come."""
    context = await browser.new_context(base_url=keyed_server.base_url, viewport={"width": 1440, "height": 2600})
    page = await context.new_page()
    try:
        await page.goto("/")
        await page.locator("#key-dialog").get_by_label("Key").fill(KEY)
        await page.locator("#key-dialog").get_by_role("button", name="Use this key").click()
        await expect(page.locator("#gallery .card")).to_have_count(61)
        await expect(page.locator("#gallery-status")).to_have_text("61 images, newest first")
    finally:
        await context.close()


# a PUBLIC_BASE_URL that is not where the page is opened (nor reachable): the API's links name it
ELSEWHERE = "http://ams.invalid:8000"


@pytest.fixture(scope="module")
async def elsewhere_server(make_settings) -> AsyncIterator[RunningServer]:
    async with running_server(make_settings(PUBLIC_BASE_URL=ELSEWHERE, **SMALL_IMAGES)) as running:
        yield running


@pytest.fixture(scope="module")
async def elsewhere(browser, elsewhere_server) -> AsyncIterator[Session]:
    context = await browser.new_context(base_url=elsewhere_server.base_url, viewport={"width": 1280, "height": 900})
    yield Session(await context.new_page())
    await context.close()


@pytest.fixture
async def answers(elsewhere) -> AsyncIterator[Page]:
    """The page, whose test puts its own answers in place of some of the server's (page.route) for its span."""
    yield elsewhere.page
    await elsewhere.page.unroute_all()


async def upload_to(server: RunningServer, name: str, data: bytes, content_type: str) -> dict:
    stored = await server.client.post("/v1/images", files={"file": (name, data, content_type)})
    assert stored.status_code == 201, stored.text
    return stored.json()


async def test_the_page_works_opened_at_another_address_than_public_base_url(elsewhere, elsewhere_server):
    """Thumbnails, the viewer, a generation followed to its end: every API link names PUBLIC_BASE_URL, and the page
    uses them as paths on the server it was opened at (its Content-Security-Policy refuses the other address)."""
    record = await upload_to(elsewhere_server, "far.png", encoded(51, size=(320, 240)), "image/png")
    assert record["thumbnail_url"].startswith(ELSEWHERE)
    page = elsewhere.page
    await page.goto("/")
    card = page.locator("#gallery .card img")
    await expect(card).to_have_count(1)
    await expect(card).to_have_js_property("complete", True)
    assert await card.evaluate("image => image.naturalWidth") > 0
    await page.locator("#gallery .tile").click()
    await expect(page.locator("#viewer-image")).to_have_js_property("naturalWidth", 320)
    assert await page.locator("#viewer-original").get_attribute("href") == f"/v1/images/{record['id']}/file"
    await page.keyboard.press("Escape")

    await page.get_by_role("link", name="Generate").click()
    await page.get_by_label("Prompt", exact=True).fill("a harbour at night")
    await page.get_by_label(re.compile("^Seed")).fill("5")
    await page.get_by_role("button", name="Generate").click()
    await expect(page.locator("#generate-caption")).to_have_text("Seed 5 · 64 × 64 · 2 steps")
    await expect(page.locator("#generate-image")).to_have_js_property("naturalWidth", 64)
    await page.get_by_role("link", name=re.compile("^Jobs")).click()
    newest = page.locator("#jobs-list .job").first
    await expect(newest).to_have_class(re.compile("state-succeeded"))
    assert (await newest.get_by_role("link", name="PNG").get_attribute("href")).startswith("/v1/files/")
    assert all(url.startswith(elsewhere_server.base_url) for url in elsewhere.requests), elsewhere.requests
    assert elsewhere.errors == []


async def test_a_tiff_is_shown_by_its_preview_and_an_image_that_fails_says_so(elsewhere_server, answers):
    """Browsers do not show TIFF: the viewer shows its thumbnail, says why, and offers the original as a download.
    An original the browser cannot show after all gets a message, not a broken picture."""
    tiff = await upload_to(elsewhere_server, "scan.tiff", encoded(52, "TIFF", size=(320, 240)), "image/tiff")
    await upload_to(elsewhere_server, "near.png", encoded(53), "image/png")
    page = answers
    await page.goto("/")
    await page.get_by_role("button", name="Open scan.tiff").click()
    viewer = page.locator("#viewer")
    await expect(viewer.locator("#viewer-note")).to_have_text(
        "Browsers do not show TIFF images: this is its preview. Open the original to download it."
    )
    await expect(viewer.locator("#viewer-image")).to_have_js_property("complete", True)
    assert await viewer.locator("#viewer-image").evaluate("image => image.naturalWidth") > 0
    assert await viewer.locator("#viewer-image").get_attribute("src") == f"/v1/images/{tiff['id']}/thumbnail"
    original = viewer.get_by_role("link", name="Open the original")
    assert await original.get_attribute("download") == "scan.tiff"
    await expect(viewer.locator("#viewer-error")).to_be_hidden()
    await page.keyboard.press("Escape")
    await expect(viewer).to_be_hidden()

    await page.route(
        re.compile(r"/v1/images/[0-9a-f-]{36}/file$"),
        lambda route: route.fulfill(status=200, content_type="image/png", body=b"not a picture after all"),
    )
    await page.get_by_role("button", name="Open near.png").click()
    await expect(viewer.locator("#viewer-error")).to_have_text(
        "This browser cannot show the image: open the original to see it in another program"
    )
    await expect(viewer.locator("#viewer-note")).to_be_hidden()
    assert await original.get_attribute("download") is None
    await page.keyboard.press("Escape")
    await expect(viewer).to_be_hidden()


async def test_the_skip_link_keeps_the_section_shown(elsewhere):
    page = elsewhere.page
    await page.goto("/#voice")
    await expect(page.locator("#voice")).to_be_visible()
    await page.get_by_role("link", name="Skip to content").focus()
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(re.compile("#main$"))
    await expect(page.locator("#main")).to_be_focused()
    await expect(page.locator("#voice")).to_be_visible()
    await expect(page.locator("#images")).to_be_hidden()


BUSY = {"status": 503, "code": "broker_unavailable", "message": "the broker is unavailable right now; retry shortly"}
SLOW_DOWN = {"status": 429, "code": "too_many_requests", "message": "rate limit reached (RATE_LIMIT_PER_MINUTE)"}


async def test_an_upload_refused_for_now_says_when_to_try_again(answers):
    page = answers
    await page.goto("/")
    await page.route(
        re.compile(r"/v1/images\?wait=true$"),
        lambda route: route.fulfill(status=503, headers={"Retry-After": "5"}, json=BUSY),
    )
    await page.locator("#upload-input").set_input_files(image_files()[:1])
    failed = page.locator("#uploads .upload.failed")
    await expect(failed).to_contain_text(f"Not added: {BUSY['message']} (try again in 5 s)")


async def test_a_429_while_following_a_job_waits_and_follows_on(answers):
    """The job runs on whatever the page was told: after the Retry-After, the page asks again and sees it end."""
    page = answers
    await page.goto("/#generate")
    refused: list[str] = []

    async def slow_down_once(route: Route) -> None:
        if refused:
            await route.continue_()
            return
        refused.append(route.request.url)
        await route.fulfill(status=429, headers={"Retry-After": "1"}, json=SLOW_DOWN)

    await page.route(re.compile(r"/v1/jobs/[0-9a-f-]{36}(\?.*)?$"), slow_down_once)
    await page.get_by_label("Prompt", exact=True).fill("a job told to slow down")
    await page.get_by_role("button", name="Generate").click()
    await expect(page.locator("#generate-caption")).to_have_text(re.compile(r"^Seed \d+ · 64 × 64 · 2 steps$"))
    assert len(refused) == 1
    await expect(page.locator("#generate-error")).to_be_hidden()
    await page.get_by_role("link", name=re.compile("^Jobs")).click()
    await expect(page.locator("#jobs-list .job").first).to_have_class(re.compile("state-succeeded"))
