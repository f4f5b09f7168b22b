"""The /ui page end to end in headless Chromium (Debian's, driven by Playwright).

A real recording of 小云小云 goes through the page's file input to a real server and model; the
result is read from the page and a screenshot is saved to artifacts/ui-detect.png. The record
button is tested with Chromium's fake microphone playing the model's example recording, so the
whole capture -> 16 kHz WAV -> upload path of the page runs too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.http.standalone import LoadedEngine
from tests.conftest import REPO_ROOT, require_module
from tests.http.conftest import StartServer, ready_backend

WAKE = "小云小云"
ARTIFACTS = REPO_ROOT / "artifacts"
SCREENSHOT = ARTIFACTS / "ui-detect.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def chromium_path() -> str:
    path = os.environ.get("EDGE_AGENT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        message = "Debian's chromium is not installed (apt-get install chromium; scripts/install-deps.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture()
def playwright() -> Iterator[Any]:
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as instance:
        yield instance


def launch(playwright: Any, *extra: str) -> Any:
    # Never `playwright install`: the system browser, with the flags the lead chose for CI.
    return playwright.chromium.launch(executable_path=chromium_path(), args=[*CHROMIUM_ARGS, *extra])


def wait_done(page: Any) -> None:
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=TIMEOUT_MS)


def test_upload_a_recording_and_read_the_detection(
    playwright: Any, engine: LoadedEngine, start_server: StartServer, dev_audio: Path
) -> None:
    recording = sorted(dev_audio.glob("pos/*.wav"))[0]
    handle, _ = start_server(ready_backend(engine))
    browser = launch(playwright)
    try:
        page = browser.new_page(viewport={"width": 900, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{handle.url}/ui")
        page.wait_for_selector("#health.ok", timeout=TIMEOUT_MS)
        page.wait_for_selector("#model-info:not(:empty)", timeout=TIMEOUT_MS)

        page.set_input_files("#file", str(recording))
        wait_done(page)
        assert page.get_attribute("#status", "data-state") == "done", page.text_content("#error")
        assert page.text_content("#detected") == "yes"
        assert page.text_content("#keyword") == WAKE
        confidence = float(page.text_content("#confidence") or "nan")
        assert 0.05 <= confidence <= 1
        start, _, end = (page.text_content("#timestamp") or "").removesuffix(" s").partition(" – ")
        assert 0 <= float(start) < float(end)
        assert page.locator("#detections tbody tr").count() == 1
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # Settings are sent with the file: an impossible threshold finds nothing.
        page.fill("#threshold", "1")
        page.click("#detect")
        wait_done(page)
        assert page.text_content("#detected") == "no" and page.text_content("#keyword") == "–"

        # A refusal is shown with the server's reason.
        page.fill("#threshold", "")
        page.fill("#keywords", "小☃")
        page.click("#detect")
        wait_done(page)
        assert page.get_attribute("#status", "data-state") == "error"
        assert "U+2603" in (page.text_content("#error") or "")
        assert errors == []
    finally:
        browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


def test_record_from_the_microphone(
    playwright: Any, engine: LoadedEngine, start_server: StartServer, example_wav: Path
) -> None:
    handle, _ = start_server(ready_backend(engine))
    browser = launch(
        playwright,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={example_wav}",
    )
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        # localhost is a secure context: the page may open the microphone.
        page.goto(f"http://localhost:{handle.port}/ui")
        page.wait_for_selector("#health.ok", timeout=TIMEOUT_MS)
        assert page.is_enabled("#record")
        page.click("#record")
        # Selectors, not wait_for_function: the page's CSP forbids the eval that would need.
        page.wait_for_selector("#record-status:has-text('recording…')", timeout=TIMEOUT_MS)
        page.wait_for_timeout(6000)  # the fake microphone plays the 4.5 s example in real time
        page.click("#record")
        wait_done(page)
        assert page.get_attribute("#status", "data-state") == "done", page.text_content("#error")
        assert "recording.wav" in (page.text_content("#status") or "")
        assert "sent as 16 kHz mono WAV" in (page.text_content("#record-status") or "")
        assert page.text_content("#detected") == "yes"
        assert page.text_content("#keyword") == WAKE
        assert errors == []
    finally:
        browser.close()


def test_the_docs_page_sends_each_operation_to_the_server(
    playwright: Any, engine: LoadedEngine, start_server: StartServer, example_wav: Path
) -> None:
    """/docs as Swagger UI's "Try it out": a form per operation, sent to the running server."""
    handle, _ = start_server(ready_backend(engine))
    browser = launch(playwright)
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{handle.url}/docs")
        page.click("#try-healthz button")
        page.wait_for_selector("#try-healthz[data-state=done]", timeout=TIMEOUT_MS)
        assert page.get_attribute("#try-healthz", "data-status") == "200"
        assert '"status": "ok"' in (page.text_content("#try-healthz pre.answer") or "")

        page.set_input_files("#detect-audio_file", str(example_wav))
        page.fill("#detect-threshold", "0.5")
        page.click("#try-detect button")
        page.wait_for_selector("#try-detect[data-state=done]", timeout=TIMEOUT_MS)
        assert page.get_attribute("#try-detect", "data-status") == "200"
        answer = page.text_content("#try-detect pre.answer") or ""
        assert f'"keyword": "{WAKE}"' in answer and '"threshold": 0.5' in answer

        # A refusal is shown with its status and reason.
        page.fill("#detect-threshold", "2")
        page.click("#try-detect button")
        page.wait_for_selector("#try-detect[data-status='422']", timeout=TIMEOUT_MS)
        assert "threshold must be a number" in (page.text_content("#try-detect pre.answer") or "")
        # The curl examples name the address the page was opened at.
        assert f"{handle.url}/detect" in (page.text_content("#detect") or "")
        assert errors == []
    finally:
        browser.close()
