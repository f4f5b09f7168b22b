"""The FastAPI REST service's own clients, unchanged, against `edge-agent serve --port 8000`.

Users arrive from the REST service around the ModelScope model with three clients that
hard-code http://localhost:8000 (tests/http/rest_clients/): its curl commands, a `requests`
script and a test.html page opened from a file, which posts a form and reads `keyword`,
`confidence.toFixed(3)`, `processing_time_ms`, `timestamp`, and `detail` on errors. They run
here as they are, against `edge-agent serve --port 8000 --cors-origins '*'` (the README's
command); the page in Debian's Chromium. When port 8000 is taken on this machine the clients
are copied with the port replaced, and nothing else.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http.conftest import ServeProcess, edge_agent_env, free_port, start_serve, stop_serve
from tests.http.test_ui_browser import TIMEOUT_MS, launch, playwright  # noqa: F401 - fixture

CLIENTS = Path(__file__).resolve().parent / "rest_clients"
THEIR_PORT = 8000
WAKE = "小云小云"


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def their_port() -> int:
    return THEIR_PORT if port_is_free(THEIR_PORT) else free_port()


@pytest.fixture(scope="module")
def clients(their_port: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clients' folder: theirs, or a copy whose only change is the port."""
    if their_port == THEIR_PORT:
        return CLIENTS
    copy = tmp_path_factory.mktemp("clients")
    for source in CLIENTS.iterdir():
        text = source.read_text(encoding="utf-8").replace(
            f"localhost:{THEIR_PORT}", f"localhost:{their_port}"
        )
        (copy / source.name).write_text(text, encoding="utf-8")
    return copy


@pytest.fixture(scope="module")
def serve(
    model_dir: Path, their_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process = start_serve(model_dir, log, "--cors-origins", "*", port=their_port)
    yield process
    stop_serve(process)


@pytest.fixture(scope="module")
def not_a_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "notes.wav"
    path.write_bytes(b"ID3\x04\x00 an mp3 named .wav")
    return path


def run(command: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=cwd, env=edge_agent_env()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_their_curl_commands(serve: ServeProcess, clients: Path, example_wav: Path) -> None:
    lines = run(["bash", str(clients / "curl_examples.sh"), str(example_wav)]).splitlines()
    root, info, detected, strict = (json.loads(line) for line in lines[:4])
    assert root["status"] == "ok" and root["model_loaded"] is True and root["service"] and root["timestamp"]
    assert info["model_id"] == "damo/speech_charctc_kws_phone-xiaoyun" and info["keywords"] == [WAKE]
    assert info["threshold_range"] == [0.0, 1.0] and info["input_format"] and info["description"]
    assert detected["success"] is True and detected["keyword"] == WAKE and detected["confidence"] > 0.9
    assert strict["detected"] is True and strict["keywords"] == [{"text": WAKE, "threshold": 0.3}]
    assert lines[4] == "200 text/html; charset=utf-8"
    assert int(lines[5]) > 10  # metric families


def test_their_requests_script(
    serve: ServeProcess, clients: Path, example_wav: Path, dev_audio: Path, not_a_wav: Path
) -> None:
    script = str(clients / "requests_client.py")
    positive = run([sys.executable, script, str(example_wav)])
    assert "model loaded: True" in positive and "keywords: 小云小云" in positive
    assert "keyword: 小云小云 confidence: 0.99" in positive and "processing time:" in positive
    negative = run([sys.executable, script, str(sorted(dev_audio.glob("neg/*.wav"))[0])])
    assert "no keyword detected (confidence 0.0" in negative
    refused = run([sys.executable, script, str(not_a_wav)])
    assert "error 400: audio_file: not a WAV file" in refused


@pytest.fixture()
def page(playwright: Any, serve: ServeProcess, clients: Path) -> Iterator[tuple[Any, list[str]]]:  # noqa: F811
    browser = launch(playwright)
    try:
        tab = browser.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto((clients / "test.html").as_uri())  # opened from a file, as its users do
        yield tab, errors
    finally:
        browser.close()


def submit(tab: Any, path: Path) -> None:
    tab.set_input_files("#audioFile", str(path))
    tab.click("#submit")
    tab.wait_for_selector("#outcome, #error", timeout=TIMEOUT_MS)


def test_their_page_shows_a_detection(
    page: tuple[Any, list[str]], serve: ServeProcess, example_wav: Path
) -> None:
    tab, errors = page
    submit(tab, example_wav)
    assert tab.query_selector("#error") is None, tab.text_content("#error")
    assert tab.text_content("#keyword") == WAKE
    expected = serve.client.detect(example_wav.read_bytes(), {"threshold": "0.5"}).json()["confidence"]
    assert tab.text_content("#confidence") == f"{expected:.3f}"
    assert float(tab.text_content("#time") or "nan") > 0
    assert (tab.text_content("#timestamp") or "").startswith("20")
    assert errors == []


def test_their_page_shows_a_negative_and_a_refusal_without_crashing(
    page: tuple[Any, list[str]], dev_audio: Path, not_a_wav: Path
) -> None:
    tab, errors = page
    submit(tab, sorted(dev_audio.glob("neg/*.wav"))[0])
    assert tab.text_content("#outcome") == "no keyword detected"
    assert tab.text_content("#keyword") == "-"
    assert 0 <= float(tab.text_content("#confidence") or "nan") < 0.05
    submit(tab, not_a_wav)
    assert (tab.text_content("#error") or "").startswith("错误: audio_file: not a WAV file")
    assert errors == []


def test_the_default_origins_do_not_let_a_file_page_read_answers(
    model_dir: Path,
    tmp_path: Path,
    playwright: Any,  # noqa: F811
) -> None:
    """Without --cors-origins the page from a file cannot read the API: the allow-all is one
    setting away, not the default."""
    port = free_port()
    process = start_serve(model_dir, tmp_path / "serve.log", port=port)
    page_file = tmp_path / "test.html"
    page_file.write_text(
        (CLIENTS / "test.html").read_text(encoding="utf-8").replace("localhost:8000", f"localhost:{port}"),
        encoding="utf-8",
    )
    browser = launch(playwright)
    try:
        tab = browser.new_page()
        tab.goto(page_file.as_uri())
        tab.set_input_files("#audioFile", os.fspath(next(model_dir.glob("example/*.wav"))))
        tab.click("#submit")
        tab.wait_for_selector("#outcome, #error", timeout=TIMEOUT_MS)
        assert "Failed to fetch" in (tab.text_content("#error") or "")
    finally:
        browser.close()
        stop_serve(process)
