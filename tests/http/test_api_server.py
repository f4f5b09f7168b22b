"""The HTTP API over a real socket with the real model: every endpoint and every error code.

Every JSON answer is checked against the OpenAPI document by the client (tests/http/client.py),
so an undocumented status or a body that drifts from its schema fails here too.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from edge_agent.audio.wav import encode_wav
from edge_agent.http.backend import DetectResult, KeywordRequest, MetricFamily
from edge_agent.http.standalone import LoadedEngine, LoadError, StandaloneBackend
from tests.conftest import require_module
from tests.http.client import Client, multipart
from tests.http.conftest import StartServer, ready_backend

WAKE = "小云小云"


# --- the happy paths ---------------------------------------------------------------------------


def test_health_on_root_and_healthz(client: Client) -> None:
    for path in ("/", "/healthz"):
        reply = client.get(path)
        assert reply.status == 200
        body = reply.json()
        assert body["status"] == "ok" and body["model_loaded"] is True
        assert body["broker_connected"] is None and body["mqtt_enabled"] is False
        assert body["uptime_s"] >= 0
        assert "edge-agent" in body["service"]
        assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    head = client.request("HEAD", "/healthz")
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0


def test_info_names_model_keywords_input_and_version(client: Client) -> None:
    info = client.get("/info").json()
    assert info["model"]["id"] == "damo/speech_charctc_kws_phone-xiaoyun"
    assert info["model"]["revision"] == "master"
    assert info["keyword_settings"] == [
        {"text": WAKE, "threshold": 0.05, "min_duration": 0.25, "max_duration": 2.5}
    ]
    # The REST service's fields.
    assert info["model_id"] == "damo/speech_charctc_kws_phone-xiaoyun"
    assert info["keywords"] == [WAKE] and info["threshold_range"] == [0.0, 1.0]
    assert "WAV" in info["input_format"] and info["description"]
    assert "latency_typical_ms" in info
    # No path of the device in an unauthenticated answer (http.show_paths).
    assert "directory" not in info["model"]
    assert info["input"]["sample_rate_hz"] == 16000 and info["input"]["field"] == "audio_file"
    assert info["input"]["max_upload_bytes"] == 20 * 1024 * 1024
    assert info["version"]


def test_detect_finds_the_wake_word_in_the_model_example(client: Client, example_wav: Path) -> None:
    reply = client.detect(example_wav.read_bytes())
    assert reply.status == 200
    result = reply.json()
    assert result["detected"] is True
    assert result["keyword"] == WAKE
    assert 0.5 < result["confidence"] <= 1
    start, end = result["start"], result["end"]
    assert 0 <= start < end <= result["duration_s"]
    assert result["success"] is True and WAKE in result["message"]
    assert datetime.fromisoformat(result["timestamp"]).tzinfo is not None
    (detection,) = result["detections"]
    level = {"level_dbfs": detection["level_dbfs"], "snr_db": detection["snr_db"]}
    assert detection == {
        "keyword": WAKE,
        "confidence": result["confidence"],
        "start": start,
        "end": end,
        **level,
    }
    assert -40.0 < level["level_dbfs"] < -10.0 and level["snr_db"] > 10.0  # a clean, close recording
    assert result["processing_time_ms"] > 0
    assert abs(result["duration_s"] - 4.529) < 0.01


def test_detect_on_speech_without_the_keyword(client: Client, dev_audio: Path) -> None:
    negative = sorted(dev_audio.glob("neg/*.wav"))[0]
    result = client.detect(negative.read_bytes()).json()
    assert result["detected"] is False
    assert result["keyword"] is None and result["start"] is None and result["end"] is None
    assert result["detections"] == []
    assert result["success"] is True and result["message"] == "no keyword detected"
    # The best score even so: how close the keyword came, below the threshold.
    assert 0 <= result["confidence"] < 0.05


def test_threshold_0_reports_the_best_match(client: Client, dev_audio: Path) -> None:
    negative = sorted(dev_audio.glob("neg/*.wav"))[0]
    plain = client.detect(negative.read_bytes()).json()
    best = client.detect(negative.read_bytes(), {"threshold": "0"}).json()
    assert best["best_match"] is True and plain["best_match"] is False
    assert best["detected"] is True and best["keyword"] == WAKE
    assert best["confidence"] == pytest.approx(plain["confidence"], rel=0.05, abs=1e-4)
    assert best["start"] < best["end"] and len(best["detections"]) == 1
    assert client.detect(negative.read_bytes(), query="?threshold=0").json()["detected"] is True


def test_threshold_and_keywords_from_form_or_query(client: Client, example_wav: Path) -> None:
    wav = example_wav.read_bytes()
    assert client.detect(wav, {"threshold": "1.0"}).json()["detected"] is False
    assert client.detect(wav, query="?threshold=1").json()["detected"] is False
    strict = client.detect(wav, {"threshold": "0.9"}).json()
    assert strict["detected"] is True and strict["keywords"] == [{"text": WAKE, "threshold": 0.9}]
    # Blank fields are what a browser form sends when left empty: they mean "not given".
    assert client.detect(wav, {"threshold": " ", "keywords": ""}).json()["detected"] is True
    # Full-width comma and colon, as a Chinese keyboard types them.
    custom = client.detect(wav, {"keywords": "小云小云：0.5，如家酒店"}).json()
    assert custom["keywords"] == [{"text": WAKE, "threshold": 0.5}, {"text": "如家酒店", "threshold": 0.05}]
    assert [d["keyword"] for d in custom["detections"]] == [WAKE]


def test_raw_wav_body(client: Client, example_wav: Path) -> None:
    reply = client.request(
        "POST",
        "/detect?keywords=" + quote("小云小云:0.2"),
        example_wav.read_bytes(),
        {"Content-Type": "audio/wav"},
    )
    assert reply.status == 200 and reply.json()["keyword"] == WAKE


def test_any_rate_and_channel_count_is_converted(client: Client, example_wav: Path) -> None:
    from edge_agent.audio.wav import read_wav

    samples = read_wav(example_wav).samples[:, 0]
    # 8 kHz stereo float32: decimated by 2, two identical channels.
    low = samples[::2].astype(np.float32) / 32768.0
    stereo = np.stack([low, low], axis=1).reshape(-1)
    fmt = struct.pack("<HHIIHH", 3, 2, 8000, 8000 * 8, 8, 32)
    data = stereo.astype("<f4").tobytes()
    wav = b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
    wav += b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    result = client.detect(wav).json()
    assert abs(result["duration_s"] - 4.529) < 0.01


def test_metrics_parse_with_prometheus_client(client: Client, example_wav: Path) -> None:
    parser = require_module("prometheus_client.parser")
    client.detect(example_wav.read_bytes())
    client.detect(b"not a wav")
    reply = client.get("/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in parser.text_string_to_metric_families(reply.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("edge_agent_detections_total", (("keyword", WAKE), ("source", "http")))] == 1
    assert samples[("edge_agent_http_detect_requests_total", (("outcome", "ok"),))] == 1
    assert samples[("edge_agent_http_detect_requests_total", (("outcome", "bad_request"),))] == 1
    assert abs(samples[("edge_agent_http_detect_audio_seconds_total", ())] - 4.529) < 0.01
    assert 0 < samples[("edge_agent_http_detect_rtf", ())] < 1
    assert samples[("edge_agent_ready", ())] == 1
    assert samples[("edge_agent_mqtt_connected", ())] == 0
    assert samples[("edge_agent_outbox_depth", ())] == 0
    assert samples[("edge_agent_http_responses_total", (("code", "400"), ("path", "/detect")))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 10e6
    assert families["edge_agent_detections"].type == "counter"
    assert families["edge_agent_ready"].type == "gauge"


def test_openapi_docs_and_ui_pages(client: Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.0")
    assert set(document["paths"]) == {
        "/",
        "/healthz",
        "/info",
        "/detect",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/ui",
    }
    for path in ("/docs", "/ui"):
        reply = client.get(path)
        assert reply.status == 200 and reply.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in reply.headers["content-security-policy"]
    assert 'id="status"' in client.get("/ui").text


def test_keep_alive_serves_several_requests_on_one_connection(client: Client, example_wav: Path) -> None:
    connection = http.client.HTTPConnection(client.host, client.port, timeout=30)
    try:
        body, content_type = multipart({}, {"audio_file": ("a.wav", example_wav.read_bytes())})
        first = client.request("POST", "/detect", body, {"Content-Type": content_type}, connection)
        second = client.request("GET", "/healthz", connection=connection)
        third = client.request("GET", "/nope", connection=connection)
    finally:
        connection.close()
    assert (first.status, second.status, third.status) == (200, 200, 404)


def test_each_response_leaves_in_one_send_on_a_nodelay_socket(
    client: Client, example_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers and body in one write, on a TCP_NODELAY socket: in two writes with Nagle on, every
    keep-alive request after the first would wait for the client's delayed ACK."""
    writes: list[tuple[int, int]] = []  # (bytes, TCP_NODELAY) of each send by the server's threads

    def recording(send: Any) -> Any:
        def recorded(self: socket.socket, data: Any, *args: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():  # the client's run here
                writes.append((len(data), self.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
            return send(self, data, *args)

        return recorded

    monkeypatch.setattr(socket.socket, "send", recording(socket.socket.send))
    monkeypatch.setattr(socket.socket, "sendall", recording(socket.socket.sendall))
    connection = http.client.HTTPConnection(client.host, client.port, timeout=30)
    body, content_type = multipart({}, {"audio_file": ("a.wav", example_wav.read_bytes())})
    try:
        replies = [
            client.request("GET", "/healthz", connection=connection),
            client.request("GET", "/healthz", connection=connection),
            client.request("POST", "/detect", body, {"Content-Type": content_type}, connection),
            client.request("GET", "/docs", connection=connection),
        ]
    finally:
        connection.close()
    assert [reply.status for reply in replies] == [200, 200, 200, 200]
    assert len(writes) == len(replies)
    assert all(nodelay for _, nodelay in writes)
    assert writes[3][0] > len(replies[3].body)  # the whole page, headers included, in one write


def test_detections_run_concurrently(client: Client, dev_audio: Path) -> None:
    files = sorted(dev_audio.glob("pos/*.wav"))[:6]
    results: dict[Path, Any] = {}

    def post(path: Path) -> None:
        results[path] = client.detect(path.read_bytes()).json()

    threads = [threading.Thread(target=post, args=(path,)) for path in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == len(files)
    sequential = {path: client.detect(path.read_bytes()).json()["detections"] for path in files}
    assert {path: result["detections"] for path, result in results.items()} == sequential


# --- 400 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wav", "reason"),
    [
        (b"", "empty (0 bytes)"),
        (b"ID3\x04 this is an mp3", "not a WAV file"),
        (encode_wav(np.zeros(0, np.float32)), "empty: the data chunk holds no samples"),
        (encode_wav(np.zeros(16000, np.float32))[:1000], "truncated"),
        (
            b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x55\x00\x01\x00\x80\x3e\x00\x00"
            b"\x00\x7d\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00",
            "unsupported encoding",
        ),
    ],
)
def test_bad_audio_is_400_with_the_reason(client: Client, wav: bytes, reason: str) -> None:
    reply = client.detect(wav)
    assert reply.status == 400
    message = reply.json()["error"]
    assert message.startswith("audio_file: ") and reason in message


@pytest.mark.parametrize(
    ("fields", "query", "fragment"),
    [
        ({"keywords": "小☃"}, "", "character '☃' (U+2603) is not in the model's lexicon"),
        (
            {"keywords": "如家酒店:2"},
            "",
            "keywords: '如家酒店': the threshold must be a number in [1e-06, 1]",
        ),
        ({"keywords": ":0.1"}, "", "has no keyword before ':'"),
        ({"keywords": "小云小云,小云 小云"}, "", "listed twice"),
        ({"keywords": ",".join(f"小云{i}" for i in range(17))}, "", "at most 16"),
        ({"threshold": "0.5"}, "?threshold=0.5", "both in the form and in the query"),
    ],
)
def test_bad_fields_are_400(
    client: Client, example_wav: Path, fields: dict[str, str], query: str, fragment: str
) -> None:
    reply = client.detect(example_wav.read_bytes(), fields, query)
    assert reply.status == 400
    assert fragment in reply.json()["error"] and reply.json()["detail"] == reply.json()["error"]


@pytest.mark.parametrize(
    ("fields", "query", "fragment"),
    [
        (
            {"threshold": "abc"},
            "",
            "threshold must be a number in [1e-06, 1] (0: report the best match), got 'abc'",
        ),
        ({"threshold": "1e-7"}, "", "got 1e-07"),
        ({"threshold": "5e-324"}, "", "got 4.94066e-324"),
        ({"threshold": "1.5"}, "", "got 1.5"),
        ({"threshold": "nan"}, "", "got nan"),
        ({}, "?threshold=-1", "got -1"),
    ],
)
def test_an_invalid_threshold_is_422_as_fastapi_answers(
    client: Client, example_wav: Path, fields: dict[str, str], query: str, fragment: str
) -> None:
    reply = client.detect(example_wav.read_bytes(), fields, query)
    assert reply.status == 422
    assert fragment in reply.json()["detail"] and reply.json()["success"] is False


def test_malformed_forms_are_400(client: Client, example_wav: Path) -> None:
    wav = example_wav.read_bytes()
    body, content_type = multipart({"threshold": "0.1"}, {})
    missing = client.request("POST", "/detect", body, {"Content-Type": content_type})
    assert (
        missing.status == 422 and "no audio_file file field (fields: threshold)" in missing.json()["detail"]
    )

    body, content_type = multipart({}, {"audio_file": ("a.wav", wav)})
    truncated = client.request("POST", "/detect", body[:-40], {"Content-Type": content_type})
    assert truncated.status == 400 and "truncated" in truncated.json()["error"]

    no_boundary = client.request("POST", "/detect", body, {"Content-Type": "multipart/form-data"})
    assert no_boundary.status == 400 and "no boundary" in no_boundary.json()["error"]

    boundary = content_type.split("boundary=")[1]
    disposition = 'Content-Disposition: form-data; name="audio_file"; filename="a.wav"'
    part = f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
    double = part + wav + b"\r\n" + part + wav + f"\r\n--{boundary}--\r\n".encode()
    duplicate = client.request("POST", "/detect", double, {"Content-Type": content_type})
    assert duplicate.status == 400 and "given 2 times" in duplicate.json()["error"]

    bad_length = client.request(
        "POST", "/detect", b"x", {"Content-Type": "audio/wav", "Content-Length": "x1"}
    )
    assert bad_length.status == 400


# --- 404, 405, 411, 413, 415 ---------------------------------------------------------------------


def test_unknown_path_is_404_and_wrong_method_405_with_allow(client: Client) -> None:
    missing = client.get("/nope")
    assert missing.status == 404 and "no such path: /nope" in missing.json()["error"]
    for method, path, allow in [
        ("GET", "/detect", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/info", "GET, HEAD"),
    ]:
        reply = client.request(method, path, b"{}" if method != "GET" else None)
        assert reply.status == 405, (method, path)
        assert reply.headers["allow"] == allow
    assert client.request("DELETE", "/metrics").status == 405
    # Methods the stdlib does not know are routed too (it would say 501).
    for method in ("QUERY", "BREW"):
        reply = client.request(method, "/healthz")
        assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    assert client.request("QUERY", "/nope").status == 404


def test_wrong_content_type_is_415(client: Client, example_wav: Path) -> None:
    reply = client.request(
        "POST", "/detect", example_wav.read_bytes(), {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert reply.status == 415 and "curl -F audio_file=@file.wav" in reply.json()["error"]


def test_upload_without_length_is_411(client: Client) -> None:
    with socket.create_connection((client.host, client.port), timeout=10) as sock:
        sock.sendall(
            b"POST /detect HTTP/1.1\r\nHost: localhost\r\nContent-Type: audio/wav\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"4\r\nRIFF\r\n0\r\n\r\n"
        )
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 411 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"].startswith(
        "send the upload with a Content-Length"
    )


def test_oversized_uploads_are_413(engine: LoadedEngine, start_server: StartServer, dev_audio: Path) -> None:
    _, client = start_server(ready_backend(engine), max_upload_mb=0.1)
    limit = int(0.1 * 1024 * 1024)
    big = sorted(dev_audio.glob("neg/*.wav"))[0].read_bytes()  # ~200 KB
    assert len(big) > limit + 64 * 1024
    # Body over the limit by more than the form overhead: refused before it is read (and drained).
    reply = client.detect(big)
    assert reply.status == 413 and "larger than the 0.1 MB limit" in reply.json()["error"]
    # A WAV just over the limit inside a body that passes the first check: refused after parsing.
    just_over = encode_wav(np.zeros((limit - 44) // 2 + 100, np.float32))
    reply = client.detect(just_over)
    assert reply.status == 413 and f"larger than the {limit}-byte limit" in reply.json()["error"]
    raw = client.request("POST", "/detect", just_over, {"Content-Type": "audio/wav"})
    assert raw.status == 413
    # Under the limit is fine.
    assert client.detect(encode_wav(np.zeros(16000, np.float32))).status == 200


def test_audio_longer_than_ten_minutes_is_413(client: Client) -> None:
    # 601 s of 8-bit audio at 1 kHz: 601 KB, far below the byte limit, 38 MB once at 16 kHz.
    frames = 601 * 1000
    fmt = struct.pack("<HHIIHH", 1, 1, 1000, 1000, 1, 8)
    wav = b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + frames) + b"WAVE"
    wav += (
        b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", frames) + b"\x80" * frames
    )
    reply = client.detect(wav)
    assert reply.status == 413
    assert reply.json()["error"] == (
        "audio_file: 601.0 s of audio, more than the 600 s one request may hold; split the recording"
    )


def test_413_comes_before_100_continue(engine: LoadedEngine, start_server: StartServer) -> None:
    _, client = start_server(ready_backend(engine), max_upload_mb=0.1)
    with socket.create_connection((client.host, client.port), timeout=10) as sock:
        sock.sendall(
            b"POST /detect HTTP/1.1\r\nHost: localhost\r\nContent-Type: audio/wav\r\n"
            b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = _read_all(sock)  # the server answers and closes without waiting for the body
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer


def test_100_continue_for_an_acceptable_upload(client: Client, example_wav: Path) -> None:
    wav = example_wav.read_bytes()
    with socket.create_connection((client.host, client.port), timeout=10) as sock:
        sock.sendall(
            b"POST /detect HTTP/1.1\r\nHost: localhost\r\nContent-Type: audio/wav\r\nConnection: close\r\n"
            + f"Content-Length: {len(wav)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(wav)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["keyword"] == WAKE


def test_what_the_stdlib_parser_refuses_is_json_too(client: Client) -> None:
    def exchange(raw: bytes) -> bytes:
        with socket.create_connection((client.host, client.port), timeout=10) as sock:
            sock.sendall(raw)
            return _read_all(sock)

    # A one-word line is an HTTP/0.9 request: the answer is the body alone, still JSON.
    assert json.loads(exchange(b"HELLO\r\n\r\n"))["detail"] == "Bad request syntax ('HELLO')"
    headers = b"".join(f"X-{i}: y\r\n".encode() for i in range(101))
    for raw, status in [
        (b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n", b"431"),
    ]:
        head, _, body = exchange(raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), head
        assert b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"]


# --- 503 and 500 ---------------------------------------------------------------------------------


def test_503_while_the_model_loads_then_200(
    engine: LoadedEngine, start_server: StartServer, example_wav: Path
) -> None:
    gate = threading.Event()

    def slow_load() -> LoadedEngine:
        assert gate.wait(30), "the test never opened the gate"
        return engine

    backend = StandaloneBackend(slow_load, "damo/speech_charctc_kws_phone-xiaoyun", "master")
    _, client = start_server(backend)
    backend.start()
    loading = client.get("/healthz")
    assert loading.status == 503 and loading.headers["retry-after"] == "1"
    body = loading.json()
    assert (
        body["status"] == "loading"
        and body["model_loaded"] is False
        and body["error"] == "the model is loading"
    )
    # The root answers 200 whatever the state, as the REST service's does: its fields say it.
    root = client.get("/")
    assert root.status == 200 and root.json()["status"] == "loading" and root.json()["model_loaded"] is False
    assert client.get("/info").status == 503
    busy = client.detect(example_wav.read_bytes())
    assert busy.status == 503 and "loading" in busy.json()["error"]
    assert client.get("/metrics").status == 200  # readiness is a metric: scrapes work while loading
    assert "edge_agent_ready 0" in client.get("/metrics").text
    for path in ("/docs", "/ui", "/openapi.json"):
        assert client.get(path).status == 200

    gate.set()
    assert backend.wait(30)
    assert client.get("/healthz").status == 200
    assert client.detect(example_wav.read_bytes()).json()["detected"] is True


def test_503_after_the_model_failed_to_load(start_server: StartServer, example_wav: Path) -> None:
    def broken() -> LoadedEngine:
        raise LoadError("model directory /nowhere does not exist")

    backend = StandaloneBackend(broken, "damo/speech_charctc_kws_phone-xiaoyun", "master").start()
    assert backend.wait(10) is False and backend.failed
    _, client = start_server(backend)
    reply = client.get("/healthz")
    assert reply.status == 503
    # The reason names a directory: it stays in the log unless http.show_paths allows it.
    assert reply.json()["status"] == "failed" and "/nowhere" not in reply.text
    assert "the server's log says why" in reply.json()["error"]
    detect = client.detect(example_wav.read_bytes())
    assert detect.status == 503 and detect.headers["retry-after"] == "60" and "/nowhere" not in detect.text

    shown = StandaloneBackend(broken, "m", "master", show_paths=True).start()
    assert shown.wait(10) is False
    _, client = start_server(shown, show_paths=True)
    assert "/nowhere does not exist" in client.get("/healthz").json()["error"]


def test_a_path_in_any_backends_health_error_stays_in_the_log(start_server: StartServer) -> None:
    """The agent's backend reports its engine worker's error as it is: a path in it is hidden
    unless http.show_paths allows it."""

    class StoppedEngine(_BrokenBackend):
        def ready(self) -> bool:
            return False

        def status(self) -> dict[str, Any]:
            return {
                "status": "error",
                "model_loaded": True,
                "uptime_s": 1.0,
                "broker_connected": True,
                "version": "0",
                "error": "the engine worker is not running: cannot read /srv/models/kwsr.net: truncated",
            }

    _, client = start_server(StoppedEngine())
    reply = client.get("/healthz")
    assert reply.status == 503 and "/srv" not in reply.text
    assert reply.json()["error"] == "the engine worker is not running: cannot read <path>: truncated"
    assert "/srv" not in client.get("/").text
    _, client = start_server(StoppedEngine(), show_paths=True)
    assert "/srv/models/kwsr.net" in client.get("/healthz").json()["error"]


def test_503_when_every_detection_slot_stays_busy(
    engine: LoadedEngine, start_server: StartServer, example_wav: Path
) -> None:
    backend = StandaloneBackend(lambda: engine, "m", "r", max_concurrent=1).start()
    assert backend.wait(10)
    assert backend.service is not None
    backend.service.wait_seconds = 0.2
    _, client = start_server(backend)
    assert backend.service._slots.acquire(timeout=1)  # occupy the only slot
    try:
        reply = client.detect(example_wav.read_bytes())
    finally:
        backend.service._slots.release()
    assert reply.status == 503 and reply.json()["error"].startswith("busy:")
    assert "retry-after" in reply.headers
    assert client.detect(example_wav.read_bytes()).status == 200


class _BrokenBackend:
    """A backend with a bug: the client must get a generic 500, the log the traceback."""

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        raise KeyError("secret internal detail")

    def info(self) -> dict[str, Any]:
        raise RuntimeError("secret internal detail")

    def detect(
        self, wav: bytes, threshold: float | None, keywords: list[KeywordRequest] | None
    ) -> DetectResult:
        raise ZeroDivisionError("secret internal detail")

    def metrics(self) -> list[MetricFamily]:
        raise RuntimeError("secret internal detail")


def test_a_backend_bug_is_a_generic_500_and_logged(
    start_server: StartServer, example_wav: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, client = start_server(_BrokenBackend())
    caplog.set_level("ERROR", logger="edge_agent.http")
    for method, path in [("GET", "/healthz"), ("GET", "/info"), ("GET", "/metrics")]:
        reply = client.request(method, path)
        assert reply.status == 500
        assert reply.json()["detail"] == "internal error; the device's log has the details"
    reply = client.detect(example_wav.read_bytes())
    assert reply.status == 500 and "secret" not in reply.text
    assert "ZeroDivisionError: secret internal detail" in caplog.text
    assert "Traceback" in caplog.text


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
