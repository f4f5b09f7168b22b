"""The engine on every core: worker processes give the same detections as one worker, keep each
stream's detections in order, bound their backlog, and a dead worker is reported and replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.engine_pool import EnginePool, ModelSource, partition_of
from edge_agent.agent.errors import ErrorReporter, Refusal
from edge_agent.agent.items import EngineSettings, PcmChunk, StreamClosed, StreamEnd
from edge_agent.agent.worker import EngineWorker, WorkQueue
from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.decoder import DecoderSettings
from edge_agent.engine.model import KeywordSpec
from tests.agent.test_worker import Results

CHUNK_BYTES = 3200  # 100 ms of 16 kHz s16le


class Refusals:
    """The agent's error reporter, recorded; waits on what it was told."""

    def __init__(self) -> None:
        self.items: list[Refusal] = []
        self._changed = threading.Condition()
        self.reporter = ErrorReporter(self._add)

    def _add(self, refusal: Refusal) -> None:
        with self._changed:
            self.items.append(refusal)
            self._changed.notify_all()

    def wait_for(self, code: str, timeout: float = 60) -> Refusal:
        with self._changed:
            assert self._changed.wait_for(lambda: any(r.code == code for r in self.items), timeout)
            return next(r for r in self.items if r.code == code)


def settings(numpy_model, max_streams: int = 64) -> EngineSettings:  # type: ignore[no-untyped-def]
    keywords = (numpy_model.compile(KeywordSpec("小云小云")),)
    return EngineSettings(
        keywords, DecoderSettings(), muted=False, max_streams=max_streams, idle_timeout=60.0
    )


def pcm(path: Path) -> bytes:
    return np.clip(to_mono_16k(read_wav(path)), -32768, 32767).astype("<i2").tobytes()


def interleaved(streams: dict[str, bytes]) -> Iterator[PcmChunk | StreamEnd]:
    """Every stream's chunks in turn (as many devices talking at once), then their ends."""
    longest = max(len(data) for data in streams.values())
    for offset in range(0, longest, CHUNK_BYTES):
        for name, data in streams.items():
            if offset < len(data):
                yield PcmChunk(name, "mqtt", data[offset : offset + CHUNK_BYTES], None, 0.0, f"t/{name}")
    for name in streams:
        yield StreamEnd(name, "mqtt", f"t/{name}")


def outcome(results: Results) -> dict[str, list[tuple[str, float, float, float]]]:
    found: dict[str, list[tuple[str, float, float, float]]] = {}
    for item in results.detected():
        d = item.detection
        found.setdefault(item.stream, []).append((d.keyword, d.start, d.end, round(d.confidence, 4)))
    return found


@pytest.fixture
def pool(numpy_model) -> Iterator[tuple[EnginePool, Results, Refusals]]:  # type: ignore[no-untyped-def]
    results, refusals = Results(), Refusals()
    engine = EnginePool(
        ModelSource(numpy_model.directory), settings(numpy_model), 2, 64 << 20, results, refusals.reporter
    )
    engine.start()
    yield engine, results, refusals
    engine.stop(timeout=30)


@pytest.mark.slow
def test_two_workers_give_the_same_detections_as_one(numpy_model, dev_audio: Path, pool) -> None:  # type: ignore[no-untyped-def]
    """24 streams at once (positives and negatives, as 12 devices each): the same detections
    (stream, keyword, start, end, confidence) from two worker processes as from one thread."""
    engine, results, refusals = pool
    files = sorted(dev_audio.glob("pos/*.wav"))[:12] + sorted(dev_audio.glob("neg/*.wav"))[:12]
    streams = {f"{n:02d}-{path.stem}": pcm(path) for n, path in enumerate(files)}
    single_results = Results()
    single_queue = WorkQueue(1 << 30)
    single = EngineWorker(numpy_model, settings(numpy_model), single_queue, single_results, ErrorReporter())
    single.start()
    try:
        for item in interleaved(streams):
            assert single_queue.put(item)
            assert engine.inbox.put(item)
        assert single.drain(120) and engine.drain(120)
    finally:
        single.stop()
    assert {partition_of(name, 2) for name in streams} == {0, 1}  # both workers had streams
    assert outcome(results) == outcome(single_results)
    assert len(results.detected()) >= 12
    closed = [item.stream for item in results.items if isinstance(item, StreamClosed)]
    assert sorted(closed) == sorted(streams)  # each once; its detections came before (per stream)
    for name in streams:
        positions = [i for i, item in enumerate(results.items) if item.stream == name]
        assert isinstance(results.items[positions[-1]], StreamClosed)
    assert refusals.items == []
    backlog = engine.backlog()
    assert [b.worker for b in backlog] == [0, 1] and all(b.alive and b.queued_bytes == 0 for b in backlog)


@pytest.mark.slow
def test_a_dead_worker_is_reported_and_replaced_and_the_agent_goes_on(  # type: ignore[no-untyped-def]
    numpy_model, example_wav: Path, pool
) -> None:
    """Its streams are lost (closed, their state gone); the new worker serves them afresh."""
    engine, results, refusals = pool
    name = "device-1"
    victim = engine.partitions[partition_of(name, 2)]
    example = pcm(example_wav)
    assert engine.inbox.put(PcmChunk(name, "mqtt", example[:CHUNK_BYTES], None, 0.0, "t"))
    assert engine.drain(60)  # the worker's state now names the stream
    assert engine.stream_ids() == [name]
    assert victim.process is not None and victim.process.pid is not None
    os.kill(victim.process.pid, signal.SIGKILL)
    refusal = refusals.wait_for("internal_error")
    assert "died" in refusal.message
    results.wait_for(lambda items: StreamClosed(name, "mqtt") in items)  # its state is gone
    assert victim.ready.wait(60)
    for item in interleaved({name: example}):
        assert engine.inbox.put(item)
    results.wait_for(lambda items: len([i for i in items if i.stream == name]) >= 3)
    assert engine.drain(60)
    assert [d.detection.keyword for d in results.detected()] == ["小云小云"]
    assert victim.restarts == 1 and engine.alive


def test_streams_are_partitioned_stably_across_processes() -> None:
    assert [partition_of(f"s{n}", 4) for n in range(8)] == [partition_of(f"s{n}", 4) for n in range(8)]
    assert len({partition_of(f"s{n}", 2) for n in range(64)}) == 2


@pytest.mark.slow
def test_health_reads_the_workers_false_alarm_windows_as_one(  # type: ignore[no-untyped-def]
    numpy_model, example_wav: Path, pool
) -> None:
    engine, results, _ = pool
    streams = {"kitchen": pcm(example_wav), "hall": pcm(example_wav)}
    assert {partition_of(name, 2) for name in streams} == {0, 1}  # one stream on each worker
    for item in interleaved(streams):
        assert engine.inbox.put(item)
    results.wait_for(lambda items: len(results.detected()) >= 2)
    assert engine.drain(60)  # each worker's state, sent after its results, is in
    assert engine.false_alarms.detections_per_hour() == pytest.approx(2 * 60.0)  # 2 in the first minute
    assert engine.false_alarms.near_misses() == {}  # heard clearly: nothing came close


def test_a_worker_process_reads_no_more_than_its_read_ahead_and_keeps_the_order() -> None:
    """A batch from the agent (raw PCM chunks as tuples, items, in order) is queued a
    read-ahead's worth of audio at a time: what the worker has not taken stays with the agent,
    where the oldest audio can be dropped."""
    from edge_agent.agent import engine_pool

    chunk = PcmChunk("s", "mqtt", bytes(3200), None, 0.0, "t")
    read_ahead = 5 * chunk.seconds
    process = engine_pool.WorkerProcess.__new__(engine_pool.WorkerProcess)
    process._inbox = inbox = engine_pool._ReadAheadQueue()
    process._read_ahead = read_ahead
    wire = engine_pool._to_wire
    chunks = [wire(PcmChunk(f"s{n % 3}", "mqtt", bytes([n]) * 3200, None, float(n), "t")) for n in range(40)]
    entries = (*chunks, wire(StreamEnd("s0", "mqtt", "t")))
    reader = threading.Thread(target=process._handle_batch, args=(entries,))
    reader.start()
    taken: list[object] = []
    most = 0
    while len(taken) < len(entries):
        most = max(most, inbox.queued_seconds)
        batch = inbox.take(10.0)
        assert batch, "the reader stopped queueing"
        taken += batch
        inbox.release_amount(
            sum(getattr(i, "nbytes", 0) for i in batch), sum(getattr(i, "seconds", 0) for i in batch)
        )
    reader.join(10)
    assert most <= read_ahead + chunk.seconds + 1e-9
    assert [(i.stream, i.data[:1]) for i in taken[:-1]] == [(f"s{n % 3}", bytes([n])) for n in range(40)]
    assert [i.received_at for i in taken[:-1]] == [float(n) for n in range(40)]
    assert taken[-1] == StreamEnd("s0", "mqtt", "t")
    assert inbox.handled_bytes == 40 * chunk.nbytes


def test_the_sender_gathers_what_its_live_streams_send_into_one_batch_in_order() -> None:
    """A worker steps once per batch it is sent: the sender adds to a batch the chunks of the
    worker's other live streams (and whatever else is queued, in order) until each of them has
    one, or a few milliseconds passed; a stream that went quiet holds nothing up for long."""
    from edge_agent.agent import engine_pool

    partition = engine_pool.Partition.__new__(engine_pool.Partition)
    partition.queue = engine_pool.PartitionQueue(1 << 20)
    waiting = partition.queue.waiting

    def chunk(stream: str) -> PcmChunk:
        return PcmChunk(stream, "mqtt", bytes(3200), None, 0.0, f"t/{stream}")

    live: dict[str, float] = {}
    assert partition._gather([chunk("s0")], live) == [chunk("s0")]  # nothing else was live
    assert set(live) == {"s0"}
    for stream in ("s1", "s2"):
        live[stream] = live["s0"]
    # The rest of the round is queued: it joins the batch, in the order it came.
    for item in (StreamEnd("s2", "mqtt", "t/s2"), chunk("s0"), chunk("s2")):
        waiting.put(item)
    batch = partition._gather([chunk("s1")], live)
    assert batch == [chunk("s1"), StreamEnd("s2", "mqtt", "t/s2"), chunk("s0"), chunk("s2")]
    # s0 and s2 are awaited but silent: the batch goes with what came.
    assert partition._gather([chunk("s1")], live) == [chunk("s1")]
    assert len(waiting) == 0


def test_a_worker_process_loads_the_engine_and_not_the_agents_other_parts() -> None:
    """Every engine process is a fresh interpreter: what its entry point imports is paid once
    per core (the configuration, yaml, MQTT, the outbox are the agent's own process's)."""
    code = (
        "import sys; from edge_agent.agent.engine_pool import serve; "
        "print(sorted(m for m in ('edge_agent.config', 'yaml', 'hashlib', 'paho', 'sqlite3', 'psutil') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert loaded.strip() == "[]"


def test_the_agents_process_keeps_the_model_without_its_network_when_engine_processes_run_it(  # type: ignore[no-untyped-def]
    numpy_model, tmp_path: Path
) -> None:
    """With engine processes the agent's own process scores no live audio: it keeps what
    compiles keywords and describes the model, not the network's weights. With one worker
    (in-process) the model is the one it was given."""
    from edge_agent.agent.app import Agent
    from edge_agent.engine.model import NetworkOnDemand
    from tests.support import agent_config

    def config(workers: int, device: str):  # type: ignore[no-untyped-def]
        return agent_config(1883, tmp_path, device, mqtt={"enabled": False}, engine={"workers": workers})

    pooled = Agent(config(2, "pooled"), numpy_model)
    in_process = Agent(config(1, "alone"), numpy_model)
    assert isinstance(pooled.model.network, NetworkOnDemand) and not pooled.model.network.held
    assert pooled.model.lexicon is numpy_model.lexicon
    assert pooled.worker.keywords == in_process.worker.keywords
    assert in_process.model is numpy_model


def test_a_pooled_agent_reloading_its_model_keeps_it_without_the_network(  # type: ignore[no-untyped-def]
    numpy_model, tmp_path: Path, example_wav: Path
) -> None:
    """``reload_model`` with engine processes: they load the new model, and the agent's own
    process again keeps it without the network's weights; the streams detect with it."""
    from edge_agent.agent.app import Agent
    from edge_agent.engine.model import NetworkOnDemand
    from tests.support import agent_config

    config = agent_config(1883, tmp_path, "pooled", mqtt={"enabled": False}, engine={"workers": 2})
    agent = Agent(config, numpy_model)
    agent.start()
    try:
        old = agent.model
        reloaded = agent.reload_model()
        assert reloaded is agent.model and reloaded is not old
        assert isinstance(reloaded.network, NetworkOnDemand) and not reloaded.network.held
        result = agent.services.score_recording(example_wav.read_bytes(), "after-reload")
        assert [d.keyword for d in result.detections] == ["小云小云"]
    finally:
        agent.stop(timeout=10)


def test_worker_processes_run_one_blas_thread_unless_the_environment_says_otherwise(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An agent embedded in a program that did not set the BLAS thread count (``edge-agent``
    does) still starts its worker processes with one BLAS thread each; a count the environment
    gives is kept."""
    from edge_agent.agent import engine_pool

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    environment = engine_pool._worker_environment()
    assert environment["OPENBLAS_NUM_THREADS"] == "1" and environment["OMP_NUM_THREADS"] == "3"
    assert environment["PYTHONPATH"].split(os.pathsep)[0] == str(Path(engine_pool.__file__).parents[2])
