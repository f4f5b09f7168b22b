"""The engine worker with the real model: conversion per stream, stream limits, live changes
applied on its own thread, the bounded wait for the sink, and its queue's byte bound."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.errors import ErrorReporter, Refusal
from edge_agent.agent.items import (
    QUEUED_ITEM_BYTES,
    AudioChunk,
    Detected,
    EngineSettings,
    PcmChunk,
    StreamClosed,
    StreamEnd,
    StreamStart,
    WavChunk,
)
from edge_agent.agent.worker import EngineWorker, WorkQueue
from edge_agent.audio.pcm import PcmFormat
from edge_agent.audio.resample import resample
from edge_agent.audio.wav import encode_wav, read_wav, to_mono_16k
from edge_agent.engine.decoder import DecoderSettings
from edge_agent.engine.model import KeywordSpec
from edge_agent.recording import detect_recording

CHUNK = 1600  # 100 ms at 16 kHz


class Results:
    """The detection sink's side of the worker, recorded; ``handed_over`` is what its waits say."""

    def __init__(self, handed_over: bool = True) -> None:
        self.items: list[Detected | StreamClosed] = []
        self.waits: list[int] = []  # tickets the worker waited for
        self.handed_over = handed_over
        self._tickets = 0
        self._changed = threading.Condition()

    def put(self, results: list[Detected | StreamClosed]) -> int:
        with self._changed:
            self.items.extend(results)
            self._tickets += 1
            self._changed.notify_all()
            return self._tickets

    def wait_handed_over(self, ticket: int, timeout: float) -> bool:
        self.waits.append(ticket)
        return self.handed_over

    def wait_for(
        self, condition: Callable[[list[Detected | StreamClosed]], bool], timeout: float = 30
    ) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: condition(self.items), timeout), self.items

    def detected(self) -> list[Detected]:
        return [item for item in self.items if isinstance(item, Detected)]


@pytest.fixture(scope="module")
def example(example_wav: Path) -> np.ndarray:
    return to_mono_16k(read_wav(example_wav))


@pytest.fixture()
def parts(numpy_model) -> Iterator[tuple[EngineWorker, WorkQueue, Results, list[Refusal]]]:  # type: ignore[no-untyped-def]
    refusals: list[Refusal] = []
    results = Results()
    queue = WorkQueue(64 * 1024 * 1024)
    keywords = (numpy_model.compile(KeywordSpec("小云小云")),)
    settings = EngineSettings(keywords, DecoderSettings(), muted=False, max_streams=2, idle_timeout=30.0)
    worker = EngineWorker(numpy_model, settings, queue, results, ErrorReporter(refusals.append))
    worker.start()
    yield worker, queue, results, refusals
    worker.stop()


def reference(numpy_model, samples: np.ndarray) -> list[tuple[str, float, float]]:  # type: ignore[no-untyped-def]
    whole = detect_recording(
        numpy_model, [numpy_model.compile(KeywordSpec("小云小云"))], DecoderSettings(), samples
    )
    return [(d.keyword, d.start, d.end) for d in whole.detections]


def spans(found: list[Detected]) -> list[tuple[str, float, float]]:
    return [(d.detection.keyword, d.detection.start, d.detection.end) for d in found]


def samples_of(samples: np.ndarray, stream: str, kind: str = "file") -> list[AudioChunk]:
    pieces = [samples[i : i + CHUNK] for i in range(0, samples.shape[0], CHUNK)]
    return [
        AudioChunk(stream, kind, piece, 0.0, final=n == len(pieces) - 1) for n, piece in enumerate(pieces)
    ]


def test_local_audio_gives_the_whole_file_detections(parts, numpy_model, example: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    worker, queue, results, refusals = parts
    for chunk in samples_of(example, "mic"):
        assert queue.put(chunk)
    results.wait_for(lambda items: len(items) >= 1)
    assert worker.drain(10)
    assert spans(results.detected()) == reference(numpy_model, example)
    assert {(d.stream, d.kind) for d in results.detected()} == {("mic", "file")}
    assert refusals == []


def test_declared_pcm_is_converted_on_the_worker(parts, numpy_model, example: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    _worker, queue, results, refusals = parts
    stereo48 = np.repeat(resample(example, 16000, 48000)[:, None], 2, axis=1)
    pcm = np.clip(np.round(stereo48), -32768, 32767).astype("<i2").tobytes()
    fmt = PcmFormat(48000, 2, 2)
    queue.put(StreamStart("door", "mqtt", fmt, "t/control"))
    step = 48000 * 2 * 2 // 10
    for offset in range(0, len(pcm), step):
        queue.put(PcmChunk("door", "mqtt", pcm[offset : offset + step], None, 0.0, "t/audio"))
    queue.put(StreamEnd("door", "mqtt", "t/control"))
    results.wait_for(lambda items: any(isinstance(i, StreamClosed) for i in items))
    ((keyword, start, end),) = spans(results.detected())
    ((_, reference_start, reference_end),) = reference(numpy_model, example)
    assert keyword == "小云小云" and abs(start - reference_start) < 0.1 and abs(end - reference_end) < 0.1
    assert results.items[-1] == StreamClosed("door", "mqtt") and refusals == []


@pytest.mark.parametrize("rate", [16000, 44100])
def test_wav_frames_are_decoded_on_the_worker_and_a_bad_one_is_reported(
    parts, numpy_model, example: np.ndarray, rate: int
) -> None:  # type: ignore[no-untyped-def]
    _worker, queue, results, refusals = parts
    audio = example if rate == 16000 else resample(example, 16000, rate)
    step = rate // 10
    for index, offset in enumerate(range(0, audio.shape[0], step)):
        if index == 3:
            queue.put(
                WavChunk(
                    "hermes-hall", "hermes", b"RIFF junk", 0.1, 0.0, "hermes/audioServer/hall/audioFrame"
                )
            )
        frame = encode_wav(audio[offset : offset + step], rate)
        queue.put(WavChunk("hermes-hall", "hermes", frame, 0.1, 0.0, "hermes/audioServer/hall/audioFrame"))
    queue.put(StreamEnd("hermes-hall", "hermes", "toggleOff"))
    results.wait_for(lambda items: any(isinstance(i, StreamClosed) for i in items))
    assert [d.detection.keyword for d in results.detected()] == ["小云小云"]
    assert [(r.code, r.stream) for r in refusals] == [("bad_wav", "hermes-hall")]


def test_streams_of_a_network_kind_are_limited_and_ids_are_not_shared(parts) -> None:  # type: ignore[no-untyped-def]
    worker, queue, _results, refusals = parts
    silence = bytes(3200)
    for stream in ("a", "b", "c"):
        queue.put(PcmChunk(stream, "mqtt", silence, None, 0.0, f"t/{stream}"))
    queue.put(PcmChunk("h1", "hermes", silence, None, 0.0, "t/h1"))  # another kind: its own limit
    queue.put(AudioChunk("a", "microphone", np.zeros(CHUNK, np.float32), 0.0))
    assert worker.drain(10)
    assert sorted(worker.stream_ids()) == ["a", "b", "h1"]
    assert [(r.code, r.stream) for r in refusals] == [("too_many_streams", "c"), ("stream_conflict", "a")]


def test_live_changes_are_applied_between_passes(parts, numpy_model, example: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    worker, queue, results, refusals = parts
    settings = worker.settings
    assert worker.apply(EngineSettings(settings.keywords, settings.decoder, True, 2, 30.0))
    for chunk in samples_of(example, "mic"):
        queue.put(chunk)
    assert worker.drain(10) and results.detected() == []  # muted: skipped, not queued up
    assert worker.stats.muted_seconds == pytest.approx(example.shape[0] / 16000)
    other = (numpy_model.compile(KeywordSpec("如家酒店")),)
    assert worker.apply(EngineSettings(other, settings.decoder, False, 2, 30.0))
    assert [k.text for k in worker.keywords] == ["如家酒店"]
    for chunk in samples_of(example, "mic"):
        queue.put(chunk)
    assert worker.drain(10) and results.detected() == []  # 小云小云 is no longer a keyword
    assert worker.apply(settings)
    for chunk in samples_of(example, "mic"):
        queue.put(chunk)
    results.wait_for(lambda items: len(items) >= 1)
    assert refusals == [] and worker.stats.item_errors == 0


def test_network_streams_that_go_quiet_are_closed_local_ones_not(parts) -> None:  # type: ignore[no-untyped-def]
    worker, queue, results, _ = parts
    queue.put(PcmChunk("door", "mqtt", bytes(3200), None, 0.0, "t/door"))
    queue.put(AudioChunk("mic", "microphone", np.zeros(CHUNK, np.float32), 0.0))
    assert worker.drain(10)
    settings = worker.settings
    worker.apply(EngineSettings(settings.keywords, settings.decoder, False, 2, idle_timeout=0.0))
    results.wait_for(lambda items: StreamClosed("door", "mqtt") in items)
    assert worker.stream_ids() == ["mic"]


def test_after_a_hand_over_that_timed_out_the_worker_does_not_wait_again(
    numpy_model, example: np.ndarray
) -> None:  # type: ignore[no-untyped-def]
    """A sink that cannot hand detections over (a broker that stopped acknowledging) costs the
    worker one bounded wait; the next batches none, for a while, so audio does not back up."""
    results = Results(handed_over=False)
    queue = WorkQueue(64 * 1024 * 1024)
    settings = EngineSettings(
        (numpy_model.compile(KeywordSpec("小云小云")),), DecoderSettings(), False, 8, 30.0
    )
    worker = EngineWorker(numpy_model, settings, queue, results, ErrorReporter())
    worker.start()
    try:
        for stream in ("one", "two"):
            for chunk in samples_of(example, stream):
                queue.put(chunk)
            assert worker.drain(10)
        assert len(results.detected()) == 2
        assert len(results.waits) == 1  # the first batch only
    finally:
        worker.stop()


def test_the_queue_is_bounded_by_what_waiting_chunks_hold_and_controls_always_pass() -> None:
    """A waiting chunk holds its bytes (and the item itself), whether or not it declares its
    format: 0.1 s of 16 kHz s16le is 3,200 bytes; its samples exist only while it is scored."""
    declared = PcmChunk("s", "mqtt", bytes(3200), PcmFormat(), 0.0, "t")
    undeclared = PcmChunk("s", "mqtt", bytes(3200), None, 0.0, "t")
    assert declared.nbytes == undeclared.nbytes == 3200 + QUEUED_ITEM_BYTES
    queue = WorkQueue(max_bytes=2 * declared.nbytes + 100)
    dropped: list[object] = []
    queue.on_evicted(dropped.append)
    oldest = replace(declared, received_at=1.0)
    assert queue.put(oldest) and queue.put(declared)
    assert queue.put(declared) and dropped == [oldest]  # the oldest waiting audio made room
    assert queue.put(StreamEnd("s", "mqtt", "t"))  # no audio: always admitted
    assert queue.queued_bytes == queue.high_water == 2 * declared.nbytes
    assert queue.queued_seconds == 0.2
    taken = queue.take(0)
    assert len(taken) == 3 and queue.refused == 0
    # What the worker took is being scored: it cannot make room, so new audio is refused.
    assert not queue.put(declared) and queue.refused == 1
    queue.release(taken[0])
    assert queue.queued_bytes == declared.nbytes


def test_settings_and_audio_from_many_threads_at_once(parts, numpy_model) -> None:  # type: ignore[no-untyped-def]
    """Reconfiguration from several threads while audio streams in: every change is applied
    whole, on the worker's thread, and nothing fails."""
    worker, queue, _results, refusals = parts
    base = worker.settings
    variants = [
        EngineSettings(base.keywords, base.decoder, muted=bool(n % 2), max_streams=2 + n, idle_timeout=30.0)
        for n in range(4)
    ]
    start = threading.Barrier(6)
    applied: list[bool] = []

    def reconfigure(n: int) -> None:
        start.wait()
        for index in range(50):
            applied.append(worker.apply(variants[(n + index) % 4], 10))

    def stream(name: str) -> None:
        start.wait()
        for _ in range(200):
            queue.put(AudioChunk(name, "file", np.zeros(CHUNK, np.float32), 0.0))

    threads = [threading.Thread(target=reconfigure, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=stream, args=(f"s{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert worker.drain(10)
    assert all(applied) and len(applied) == 200
    assert worker.settings in variants
    assert worker.stats.item_errors == 0 and refusals == []


def test_recordings_are_scored_a_block_at_a_time_between_live_passes(
    parts, numpy_model, example_wav: Path, example: np.ndarray
) -> None:  # type: ignore[no-untyped-def]
    """A long recording and live audio at once: the live detection comes out while the
    recording is still being scored, and both give what they give alone."""
    from edge_agent.agent.items import RecordingRequest
    from edge_agent.recording import Recording

    worker, queue, results, refusals = parts
    long = encode_wav(np.tile(example, 40))  # three minutes of the keyword, again and again
    done = threading.Event()
    answers: list = []  # type: ignore[type-arg]

    def reply(result) -> None:  # type: ignore[no-untyped-def]
        answers.append(result)
        done.set()

    queue.put(RecordingRequest(long, "long.wav", reply))
    for chunk in samples_of(example, "mic"):
        queue.put(chunk)
    results.wait_for(lambda items: len(items) >= 1)
    assert not done.is_set()  # the live keyword did not wait for the recording
    assert done.wait(60)
    (result,) = answers
    alone = detect_recording(numpy_model, worker.keywords, worker.settings.decoder, Recording(long))
    assert [(d.keyword, d.start, d.end) for d in result.detections] == [
        (d.keyword, d.start, d.end) for d in alone.detections
    ]
    assert len(result.detections) == 40 and refusals == []


def test_recordings_beyond_the_limit_are_busy_and_bad_ones_answered_at_once(
    parts, example: np.ndarray
) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.agent.items import RecordingRequest
    from edge_agent.agent.worker import MAX_RECORDINGS
    from edge_agent.audio.wav import WavError
    from edge_agent.recording import RecordingBusy

    worker, queue, _results, _refusals = parts
    answers: list = []  # type: ignore[type-arg]
    long = encode_wav(np.tile(example, 20))
    hold = threading.Event()
    # The worker kept busy on its thread while the requests queue up behind it.
    blocker = threading.Thread(target=worker.call, args=(hold.wait, 30))
    blocker.start()
    queue.put(RecordingRequest(b"RIFF junk", "bad.wav", answers.append))
    for index in range(MAX_RECORDINGS + 1):
        queue.put(RecordingRequest(long, f"r{index}.wav", answers.append))
    hold.set()
    blocker.join(30)
    assert worker.drain(30)
    assert isinstance(answers[0], WavError) and str(answers[0]).startswith("bad.wav: ")  # at once
    busy = [a for a in answers if isinstance(a, RecordingBusy)]
    assert len(busy) == 1 and str(busy[0]).startswith(f"r{MAX_RECORDINGS}.wav: ")


def test_the_slot_of_a_stream_that_never_sent_audio_goes_to_a_real_one(parts) -> None:  # type: ignore[no-untyped-def]
    worker, queue, _results, refusals = parts
    for name in ("idle1", "idle2"):  # the limit here is two per kind
        queue.put(StreamStart(name, "mqtt", None, f"t/{name}"))
    queue.put(PcmChunk("real", "mqtt", bytes(3200), None, 0.0, "t/real"))
    assert worker.drain(10)
    assert sorted(worker.stream_ids()) == ["idle2", "real"]
    assert [(r.code, r.stream) for r in refusals] == [("stream_reclaimed", "idle1")]


def test_a_near_miss_in_a_streams_first_batch_is_not_lost(numpy_model, dev_audio: Path) -> None:  # type: ignore[no-untyped-def]
    """The near-miss pass runs from a stream's first audio: a whole utterance queued before the
    worker takes anything (one pass) still leaves its near miss for health."""
    samples = to_mono_16k(read_wav(sorted(dev_audio.glob("pos/*.wav"))[1]))  # scores 0.934
    pcm = np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()
    queue = WorkQueue(64 * 1024 * 1024)
    for offset in range(0, len(pcm), CHUNK * 2):
        assert queue.put(PcmChunk("near", "mqtt", pcm[offset : offset + CHUNK * 2], None, 0.0, "t"))
    queue.put(StreamEnd("near", "mqtt", "t"))
    results = Results()
    keywords = (numpy_model.compile(KeywordSpec("小云小云", threshold=0.95)),)
    settings = EngineSettings(
        keywords, DecoderSettings(), muted=False, max_streams=2, idle_timeout=30.0, near_misses=True
    )
    worker = EngineWorker(numpy_model, settings, queue, results, ErrorReporter())
    worker.start()
    try:
        results.wait_for(lambda items: any(isinstance(i, StreamClosed) for i in items))
    finally:
        worker.stop()
    assert results.detected() == []
    assert 0.9 < worker.false_alarms.near_misses()["小云小云"] < 0.95
