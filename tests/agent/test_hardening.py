"""The agent as an attacker or a broken network meets it: a real ``edge-agent run`` process and a
real mosquitto, driven from outside only (topics, commands, files, signals).

Each test is one way a device was found to fail (stale wake-ups, starvation, bricking commands,
unbounded input, reflected requests, client-id takeover, credentials), and checks what the
device does now instead.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agent.streaming import pcm16, stream_files
from tests.broker import Broker, Client
from tests.support import start_agent_process

DEVICE = "dev1"
PREFIX = f"edge_agent/{DEVICE}"


@dataclass
class RunningAgent:
    process: subprocess.Popen[str]
    log: queue.Queue[str]
    config: Path
    reader: threading.Thread

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.reader.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def wait_log(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until ``count`` lines holding ``text`` were logged (the process's stderr)."""
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the agent did not log {text!r} {count} times"
            try:
                line = self.log.get(timeout=remaining)
            except queue.Empty:
                continue
            seen += text in line


def run_agent(
    model_dir: Path, broker: Broker, tmp_path: Path, config: dict[str, Any] | None = None, **env: str
) -> RunningAgent:
    """``edge-agent run -c config.yaml`` against ``broker``; its log lines are collected."""
    import yaml

    path = tmp_path / "agent.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(config or {}, allow_unicode=True), encoding="utf-8")
    process = start_agent_process(
        model_dir,
        broker.port,
        DEVICE,
        tmp_path / "outbox.db",
        "-c",
        str(path),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return RunningAgent(process, lines, path, reader)


@pytest.fixture()
def agents() -> Iterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for agent in started:
        agent.stop()


def online(client: Client, timeout: float = 60) -> None:
    client.wait_for(f"{PREFIX}/availability", lambda m: bool(m) and m[-1].payload == b"online", timeout)


def command(client: Client, name: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """A command with an MQTT 5 response topic; its one answer."""
    reply = f"replies/{uuid.uuid4().hex}"
    client.subscribe(reply)
    client.publish(
        f"{PREFIX}/cmd/{name}",
        json.dumps(arguments or {}, ensure_ascii=False),
        qos=1,
        ResponseTopic=reply,
    )
    return client.wait_for(reply, timeout=timeout)[-1].json()


def boot_of(client: Client) -> str:
    return client.wait_for(f"{PREFIX}/info")[-1].json()["boot_id"]


# --- stale wake-ups ----------------------------------------------------------------------------


@pytest.mark.slow
def test_detections_made_while_the_broker_is_frozen_never_arrive_flagged_live(  # type: ignore[no-untyped-def]
    agents, model_dir: Path, dev_audio: Path, tmp_path: Path
) -> None:
    """A frozen broker process (its kernel still takes our packets, to deliver them whenever it
    resumes): a wake word spoken meanwhile must not reach an automation as live, late."""
    folder = tmp_path / "positives"
    folder.mkdir()
    for path in sorted(dev_audio.glob("pos/*.wav"))[:6]:
        shutil.copy(path, folder / path.name)
    broker = Broker(tmp_path).start()
    watcher = Client(broker.port).connect().subscribe(f"{PREFIX}/detection")
    source = {"type": "file", "id": "mic", "path": str(folder), "realtime": True, "gap_seconds": 1.0}
    agent = run_agent(model_dir, broker, tmp_path, {"audio": {"sources": [source]}})
    agents.append(agent)
    try:
        watcher.wait_for(f"{PREFIX}/detection", timeout=60)
        agent.wait_log("detected 小云小云")  # the one just received
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)
        try:
            agent.wait_log("detected 小云小云", count=3)  # three more spoken in the freeze
        finally:
            broker.process.send_signal(signal.SIGCONT)
        received = watcher.wait_for(
            f"{PREFIX}/detection",
            lambda m: len({(x.json()["boot_id"], x.json()["seq"]) for x in m}) >= 6,
            timeout=120,
        )
    finally:
        watcher.close()
        broker.stop()
    for message in received:
        event = message.json()
        late = message.at - parse_time(event["time"])
        # Live means: delivered within the live window of the moment it was decided.
        assert event["replayed"] or late < 5.0, (event, late)
        assert isinstance(event["delay_ms"], (int, float))


def parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- whole files do not starve live audio -----------------------------------------------------


def long_wav(seconds: float, rate: int = 1000) -> bytes:
    import struct

    frames = int(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate, 1, 8)
    header = b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + frames) + b"WAVE"
    return (
        header
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", frames)
        + b"\x80" * frames
    )


@pytest.mark.slow
def test_hour_long_requests_do_not_hold_up_a_live_keyword(  # type: ignore[no-untyped-def]
    agents, model_dir: Path, example_wav: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/#")
    agents.append(run_agent(model_dir, broker, tmp_path))
    try:
        online(client)
        hour, long = long_wav(3600), long_wav(590)
        for index in range(3):  # 3.6 MB each: under the payload limit
            client.publish(f"{PREFIX}/detect/request/hour{index}", hour, qos=1)
        for index in range(2):
            client.publish(f"{PREFIX}/detect/request/long{index}", long, qos=1)
        started = time.time()
        stream_files(client, {"door": pcm16(example_wav)}, realtime=True)
        (event,) = client.wait_for(f"{PREFIX}/detection", timeout=60)
        arrived = event.at
        detection = event.json()
        assert arrived - (started + detection["end"]) < 1.5  # the look-ahead and a little more
        answers = client.wait_for(f"{PREFIX}/detect/response/+", lambda m: len(m) >= 5, timeout=120)
        by_request = {m.topic.rsplit("/", 1)[-1]: m.json() for m in answers}
        assert all(
            not by_request[f"hour{i}"]["ok"] and "600" in by_request[f"hour{i}"]["error"] for i in range(3)
        )
        assert all(by_request[f"long{i}"]["ok"] for i in range(2))
    finally:
        client.close()
        broker.stop()


# --- no remote change can brick a device -----------------------------------------------------

BRICKS = {
    "model directory": {"model": {"dir": "/nonexistent/model"}},
    "unwritable outbox": {"outbox": {"path": "/proc/edge-agent/outbox.db"}},
    "broker port": {"mqtt": {"port": 1}},
    "TLS to a plain broker": {"mqtt": {"tls": {"enabled": True}}},
    "MQTT off": {"mqtt": {"enabled": False}},
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(BRICKS), ids=list(BRICKS))
def test_a_set_config_that_would_brick_the_device_is_refused_or_reverted(  # type: ignore[no-untyped-def]
    change: str, agents, model_dir: Path, tmp_path: Path
) -> None:
    """Each change is refused before it is kept, or tried and put back; after a restart the
    device is online with what it had."""
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/availability")
    client.subscribe(f"{PREFIX}/info")
    agents.append(run_agent(model_dir, broker, tmp_path, {"commands": {"connection_trial": 5}}))
    try:
        online(client)
        before = command(client, "get_config")["result"]["config"]
        answer = command(client, "set_config", BRICKS[change], timeout=60)
        assert answer["ok"] is False and answer["error"], answer
        online(client)
        first_boot = boot_of(client)
        assert command(client, "restart")["ok"] is True
        client.wait_for(f"{PREFIX}/info", lambda m: m[-1].json()["boot_id"] != first_boot, timeout=60)
        online(client)
        after = command(client, "get_config")["result"]["config"]
        assert after == before
    finally:
        client.close()
        broker.stop()


@pytest.mark.slow
def test_a_kept_change_that_stops_the_start_is_reverted_and_reported(  # type: ignore[no-untyped-def]
    agents, model_dir: Path, tmp_path: Path
) -> None:
    """Remote changes on disk that no longer start (here a keyword the model cannot say, as after
    a model update): the agent starts with the last configuration that did, and says what
    happened once online."""
    (tmp_path / "agent.yaml").write_text("health:\n  interval: 5\n", encoding="utf-8")
    (tmp_path / "agent.remote.yaml").write_text("keywords: [小云龘]\n", encoding="utf-8")
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/#")
    agents.append(run_agent(model_dir, broker, tmp_path))
    try:
        online(client)
        errors = client.wait_for(
            f"{PREFIX}/error", lambda m: any(x.json()["code"] == "config_reverted" for x in m), timeout=30
        )
        report = next(x.json() for x in errors if x.json()["code"] == "config_reverted")
        assert "龘" in report["message"]
        assert (tmp_path / "agent.remote.rejected.yaml").exists()
        assert not (tmp_path / "agent.remote.yaml").exists()
    finally:
        client.close()
        broker.stop()


def test_keywords_are_bounded_in_length(agents, model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/availability")
    agents.append(run_agent(model_dir, broker, tmp_path))
    try:
        online(client)
        answer = command(client, "set_config", {"keywords": ["小" * 20_000]})
        assert answer["ok"] is False and "at most 16" in answer["error"]
        keywords = command(client, "get_config")["result"]["config"]["keywords"]
        assert [k["text"] for k in keywords] == ["小云小云"]
    finally:
        client.close()
        broker.stop()


# --- requests cannot command -------------------------------------------------------------------


def test_a_request_cannot_answer_into_the_command_topics(  # type: ignore[no-untyped-def]
    agents, model_dir: Path, example_wav: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/availability")
    client.subscribe(f"{PREFIX}/error")
    client.subscribe(f"{PREFIX}/health", qos=0)
    agents.append(run_agent(model_dir, broker, tmp_path, {"health": {"interval": 1}}))
    try:
        online(client)
        for target in (f"{PREFIX}/cmd/mute", "edge_agent/all/cmd/restart", "edge_agent/other/cmd/mute"):
            client.publish(f"{PREFIX}/detect/request", example_wav.read_bytes(), qos=1, ResponseTopic=target)
        error = client.wait_for(f"{PREFIX}/error")[0]  # one report for the three: one cause
        assert error.json()["code"] == "bad_request" and "command space" in error.json()["message"]
        answer = command(client, "get_config")
        assert answer["result"]["muted"] is False
        client.wait_for(f"{PREFIX}/health", lambda m: m[-1].json()["refused"].get("bad_request") == 3)
    finally:
        client.close()
        broker.stop()


# --- bounded input -------------------------------------------------------------------------------


def test_floods_of_bad_input_are_counted_but_reported_within_a_budget(  # type: ignore[no-untyped-def]
    agents, model_dir: Path, example_wav: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/availability")
    client.subscribe(f"{PREFIX}/error")
    client.subscribe(f"{PREFIX}/detection")
    client.subscribe(f"{PREFIX}/health", qos=0)
    agents.append(run_agent(model_dir, broker, tmp_path, {"health": {"interval": 1}}))
    try:
        online(client)
        started = time.monotonic()
        for index in range(20_000):  # an empty payload on a topic of its own each
            client.client.publish(f"{PREFIX}/audio/e{index}", b"")
        for index in range(200):  # names that never send audio
            client.client.publish(f"{PREFIX}/audio/j{index}/control", b'{"action": "start"}')
        big = bytes(3_900_000)
        for index in range(16):  # almost 500 s of audio each, declared 8-bit 8 kHz
            client.publish(f"{PREFIX}/audio/big{index}", big, UserProperty=[("rate", "8000"), ("width", "1")])
        stream_files(client, {"legit": pcm16(example_wav)})
        (event,) = client.wait_for(f"{PREFIX}/detection", timeout=60)
        assert event.json()["stream"] == "legit"  # a real stream is not locked out
        elapsed = time.monotonic() - started
        health = client.wait_for(
            f"{PREFIX}/health",
            lambda m: m[-1].json()["refused"].get("bad_audio_chunk", 0) >= 20_016,
            timeout=30,
        )[-1].json()
        errors = client.on(f"{PREFIX}/error")
        assert len(errors) <= 20 + 10 * (elapsed + 5)  # the burst, then ten a second
        assert health["memory_rss_mb"] < 200
    finally:
        client.close()
        broker.stop()


# --- credentials ---------------------------------------------------------------------------------


def test_credentials_stay_where_they_were_put(  # type: ignore[no-untyped-def]
    agents, model_dir: Path, tmp_path: Path
) -> None:
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/availability")
    # mosquitto here accepts anyone: the agent sends its password in clear all the same.
    agent = run_agent(model_dir, broker, tmp_path, {"mqtt": {"username": "kitchen", "password": "secret"}})
    agents.append(agent)
    try:
        online(client)
        agent.wait_log("unencrypted")
        for change in (
            {"mqtt": {"password": "other"}},
            {"mqtt": {"tls": {"insecure": True}}},
            {"http": {"host": "0.0.0.0"}},
        ):
            answer = command(client, "set_config", change)
            assert answer["ok"] is False and "cannot be changed remotely" in answer["error"], change
        assert command(client, "set_config", {"keywords": ["小云小云", "如家酒店"]})["ok"] is True
        overrides = tmp_path / "agent.remote.yaml"
        assert overrides.exists() and (os.stat(overrides).st_mode & 0o077) == 0
    finally:
        client.close()
        broker.stop()


# --- the outbox survives damage --------------------------------------------------------------------


def test_a_damaged_outbox_file_is_set_aside_and_the_agent_runs(  # type: ignore[no-untyped-def]
    agents, model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "outbox.db").write_bytes(b"not a database at all " * 200)
    broker = Broker(tmp_path).start()
    client = Client(broker.port).connect()
    client.subscribe(f"{PREFIX}/#")
    agents.append(run_agent(model_dir, broker, tmp_path))
    try:
        online(client)
        errors = client.wait_for(
            f"{PREFIX}/error", lambda m: any(x.json()["code"] == "outbox_recovered" for x in m), timeout=30
        )
        report = next(x.json() for x in errors if x.json()["code"] == "outbox_recovered")
        assert "moved to" in report["message"]
        assert list(tmp_path.glob("outbox.db.corrupt-*"))
    finally:
        client.close()
        broker.stop()
