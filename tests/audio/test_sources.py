"""FileAudioSource with real WAV files in tmp_path, real threads and real time (short files)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.sources import (
    SAMPLE_RATE_HZ,
    AudioChunk,
    AudioSource,
    FileAudioSource,
    FixedChunker,
    LossLog,
    create_source,
)
from edge_agent.audio.wav import encode_wav
from edge_agent.config import FileSource

WAIT_SECONDS = 5.0  # upper bound for anything that should take well under a second


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE_HZ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_wav(samples, sample_rate))
    return path


def constant(value: float, seconds: float) -> np.ndarray:
    """A file whose every sample is `value`, so the stream shows which file played when."""
    return np.full(round(seconds * SAMPLE_RATE_HZ), value, dtype=np.float32)


class Collector:
    """A sink that keeps what it accepts; `accept` decides, per call, whether the queue has room."""

    def __init__(self, accept: Callable[[int], bool] = lambda call: True) -> None:
        self.accept = accept
        self.calls = 0
        self.chunks: list[AudioChunk] = []
        self.arrived_at: list[float] = []  # time.monotonic() of each accepted chunk
        self.final = threading.Event()
        self.first = threading.Event()

    def __call__(self, chunk: AudioChunk) -> bool:
        self.calls += 1
        self.first.set()
        if not self.accept(self.calls):
            return False
        self.chunks.append(chunk)
        self.arrived_at.append(time.monotonic())
        if chunk.final:
            self.final.set()
        return True

    def stream(self) -> np.ndarray:
        return np.concatenate([c.samples for c in self.chunks]) if self.chunks else np.zeros(0)

    def wait_for_chunks(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(self.chunks) < count:
            assert time.monotonic() < deadline, f"only {len(self.chunks)} of {count} chunks arrived"
            time.sleep(0.002)


def play(config: FileSource, sink: Collector) -> FileAudioSource:
    """Start a source, wait for its final chunk (or for it to give up), and stop it."""
    source = FileAudioSource(config)
    source.start(sink)
    deadline = time.monotonic() + WAIT_SECONDS
    while not source.finished:
        assert time.monotonic() < deadline, "the source did not finish"
        time.sleep(0.002)
    source.stop()
    return source


def test_realtime_paces_one_second_of_audio_over_one_second_on_an_absolute_schedule(tmp_path: Path) -> None:
    samples = np.arange(SAMPLE_RATE_HZ, dtype=np.float32) % 20000
    path = write_wav(tmp_path / "one_second.wav", samples)
    sink = Collector()
    started = time.monotonic()
    source = play(FileSource(path=str(path), chunk_ms=100, realtime=True), sink)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.9  # paced: never faster than real time (how late it may run is load's business)
    assert [c.samples.size for c in sink.chunks] == [1600] * 10
    np.testing.assert_array_equal(sink.stream(), samples)
    # Chunk k (0-based) is released when its last sample has played: ~(k + 1) * 100 ms after the
    # first release minus one chunk; measured from the first chunk so start-up time does not count.
    offsets = np.array(sink.arrived_at) - sink.arrived_at[0]
    np.testing.assert_allclose(offsets, np.arange(10) * 0.1, atol=0.08)
    captured = [c.captured_at for c in sink.chunks]
    assert captured == sorted(captured) and captured[-1] - captured[0] == pytest.approx(0.9, abs=0.05)
    assert [c.final for c in sink.chunks] == [False] * 9 + [True]
    assert source.stats().dropped_chunks == 0 and source.stats().chunks == 10


def test_chunks_are_exactly_chunk_ms_and_the_final_one_carries_the_rest(tmp_path: Path) -> None:
    samples = np.linspace(-1000, 1000, 20_000).astype(np.float32)  # 1.25 s
    path = write_wav(tmp_path / "a.wav", samples)
    sink = Collector()
    play(FileSource(path=str(path), chunk_ms=100, realtime=False), sink)

    assert [c.samples.size for c in sink.chunks] == [1600] * 12 + [800]
    assert all(c.samples.dtype == np.float32 and c.samples.ndim == 1 for c in sink.chunks)
    assert all(c.stream == "file" for c in sink.chunks)
    np.testing.assert_array_equal(sink.stream(), np.rint(samples))
    assert [c.final for c in sink.chunks].count(True) == 1 and sink.chunks[-1].final
    with pytest.raises(ValueError, match="read-only"):
        sink.chunks[0].samples[0] = 1.0


def test_other_rates_and_channels_are_converted_to_16k_mono(tmp_path: Path) -> None:
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(44_100) / 44_100)).astype(np.float32)
    path = write_wav(tmp_path / "tone44k.wav", tone, sample_rate=44_100)
    sink = Collector()
    play(FileSource(path=str(path), chunk_ms=20, realtime=False), sink)

    stream = sink.stream()
    assert stream.size == SAMPLE_RATE_HZ  # one second stays one second
    assert {c.samples.size for c in sink.chunks} == {320}
    spectrum = np.abs(np.fft.rfft(stream))
    assert np.argmax(spectrum) == 440  # 1 Hz bins for one second of audio


def test_gap_of_silence_between_files_but_not_after_the_last(tmp_path: Path) -> None:
    write_wav(tmp_path / "1.wav", constant(1000, 0.3))
    write_wav(tmp_path / "2.wav", constant(2000, 0.2))
    sink = Collector()
    play(FileSource(path=str(tmp_path), chunk_ms=50, gap_seconds=0.25, realtime=False), sink)

    expected = np.concatenate([constant(1000, 0.3), np.zeros(4000), constant(2000, 0.2)])
    np.testing.assert_array_equal(sink.stream(), expected)
    assert sink.chunks[-1].final


def test_loop_restarts_forever_with_the_gap_across_the_restart(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", constant(500, 0.1))
    sink = Collector()
    source = FileAudioSource(
        FileSource(path=str(path), loop=True, chunk_ms=50, gap_seconds=0.05, realtime=False)
    )
    source.start(sink)
    sink.wait_for_chunks(30)  # 10 passes of 100 ms audio + 50 ms gap
    source.stop()

    period = np.concatenate([constant(500, 0.1), np.zeros(800)])
    stream = sink.stream()
    np.testing.assert_array_equal(stream[: 10 * period.size], np.tile(period, 10))
    assert not any(c.final for c in sink.chunks)
    assert not source.finished and not source.stats().running


def test_folder_plays_every_wav_recursively_in_name_order(tmp_path: Path) -> None:
    write_wav(tmp_path / "b.wav", constant(2, 0.05))
    write_wav(tmp_path / "sub" / "c.WAV", constant(3, 0.05))
    write_wav(tmp_path / "a.wav", constant(1, 0.05))
    write_wav(tmp_path / "sub" / "a" / "d.wav", constant(4, 0.05))
    (tmp_path / "notes.txt").write_text("not audio")
    sink = Collector()
    source = play(FileSource(path=str(tmp_path), chunk_ms=50, gap_seconds=0, realtime=False), sink)

    # Relative paths a.wav < b.wav < sub/a/d.wav < sub/c.WAV
    assert [float(c.samples[0]) for c in sink.chunks] == [1, 2, 4, 3]
    assert source.describe()["files"] == 4


def test_a_bad_file_is_skipped_with_its_error_recorded(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", constant(1000, 0.1))
    (tmp_path / "b.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    write_wav(tmp_path / "c.wav", constant(3000, 0.1))
    sink = Collector()
    source = play(FileSource(path=str(tmp_path), chunk_ms=50, gap_seconds=0.05, realtime=False), sink)

    # One gap between the two good files, not one per file tried.
    expected = np.concatenate([constant(1000, 0.1), np.zeros(800), constant(3000, 0.1)])
    np.testing.assert_array_equal(sink.stream(), expected)
    stats = source.stats()
    assert stats.error is not None and "b.wav" in stats.error
    assert source.finished and not stats.running and sink.chunks[-1].final


def test_the_final_flag_lands_on_the_last_good_file_when_the_last_file_is_bad(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", constant(1000, 0.1))
    (tmp_path / "z.wav").write_bytes(b"not a wav at all")
    sink = Collector()
    play(FileSource(path=str(tmp_path), chunk_ms=100, gap_seconds=0.5, realtime=False), sink)

    assert [(c.samples.size, c.final) for c in sink.chunks] == [(1600, True)]


def test_a_folder_of_only_bad_files_stops_with_an_error_even_when_looping(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"RIFF")
    sink = Collector()
    source = play(FileSource(path=str(tmp_path), loop=True, realtime=False), sink)

    stats = source.stats()
    assert sink.chunks == [] and source.finished and not stats.running
    assert stats.error is not None and "none of the 2 WAV file(s) could be read" in stats.error


@pytest.mark.parametrize(
    ("name", "message"), [("missing", "no such file or folder"), ("empty", "holds no .wav files")]
)
def test_missing_path_or_empty_folder_is_an_error(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    source = play(FileSource(path=str(tmp_path / name), realtime=False), Collector())
    stats = source.stats()
    assert stats.error is not None and message in stats.error
    assert source.finished and stats.chunks == 0


def test_batch_replay_never_drops_when_the_sink_is_temporarily_full(tmp_path: Path) -> None:
    samples = np.arange(16_000, dtype=np.float32)
    path = write_wav(tmp_path / "a.wav", samples)
    # Full on 2 calls out of 3, and for a longer stretch in the middle.
    sink = Collector(accept=lambda call: call % 3 == 0 and not 10 <= call < 20)
    source = play(FileSource(path=str(path), chunk_ms=50, realtime=False), sink)

    np.testing.assert_array_equal(sink.stream(), samples)
    assert source.stats().dropped_chunks == 0 and source.stats().chunks == 20
    assert sink.calls > 60


def test_realtime_counts_refused_chunks_as_dropped_and_moves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_wav(tmp_path / "a.wav", constant(100, 0.3))
    sink = Collector(accept=lambda call: call != 2)
    source = play(FileSource(path=str(path), chunk_ms=100, realtime=True), sink)

    stats = source.stats()
    assert (stats.chunks, stats.dropped_chunks, sink.calls) == (2, 1, 3)
    assert sink.chunks[-1].final
    assert "audio source file: 1 chunks dropped" in caplog.text


def test_stop_is_prompt_while_pacing(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "long.wav", constant(1, 10.0))
    sink = Collector()
    source = FileAudioSource(FileSource(path=str(path), chunk_ms=50, realtime=True))
    source.start(sink)
    assert sink.first.wait(WAIT_SECONDS)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 0.2
    assert not source.stats().running and not source.finished
    source.stop()  # idempotent


def test_stop_is_prompt_while_a_batch_replay_waits_for_a_full_sink(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", constant(1, 1.0))
    sink = Collector(accept=lambda call: False)
    source = FileAudioSource(FileSource(path=str(path), realtime=False))
    source.start(sink)
    assert sink.first.wait(WAIT_SECONDS)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 0.2
    stats = source.stats()
    assert not stats.running and stats.dropped_chunks == 0 and stats.chunks == 0


def test_a_sink_that_raises_stops_the_source_with_the_error_visible(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", constant(1, 0.5))

    def broken_sink(chunk: AudioChunk) -> bool:
        raise KeyError("engine bug")

    source = FileAudioSource(FileSource(path=str(path), realtime=False))
    source.start(broken_sink)
    deadline = time.monotonic() + WAIT_SECONDS
    while source.stats().running:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    source.stop()
    error = source.stats().error
    assert error is not None and "engine bug" in error and not source.finished


def test_start_twice_is_refused_and_stop_before_start_is_harmless(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", constant(1, 5.0))
    source = FileAudioSource(FileSource(path=str(path), realtime=True))
    source.stop()
    source.start(Collector())
    with pytest.raises(RuntimeError, match="already running"):
        source.start(Collector())
    source.stop()


def test_describe_is_json_and_the_source_meets_the_protocol(tmp_path: Path) -> None:
    config = FileSource(id="replay", path=str(tmp_path), loop=True, chunk_ms=30, gap_seconds=1.5)
    source = create_source(config)
    assert isinstance(source, FileAudioSource) and isinstance(source, AudioSource)
    description = json.loads(json.dumps(source.describe()))
    assert description == {
        "type": "file",
        "id": "replay",
        "path": str(tmp_path),
        "files": None,
        "loop": True,
        "realtime": True,
        "sample_rate_hz": 16000,
        "chunk_ms": 30,
        "gap_seconds": 1.5,
    }
    assert source.stream_id == "replay" and not source.finished


def test_loss_log_logs_the_first_loss_at_once_then_at_most_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = LossLog("mic", "chunks dropped", interval_seconds=60)
    for total in (0, 1, 2, 3):
        log.update(total)
    assert [r.getMessage() for r in caplog.records] == ["audio source mic: 1 chunks dropped so far"]


def test_fixed_chunker_carries_the_remainder_across_pushes() -> None:
    chunker = FixedChunker(4)
    pieces = [np.arange(3), np.arange(3, 5), np.arange(5, 14)]
    chunks = [c for piece in pieces for c in chunker.push(piece.astype(np.float32))]
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert chunker.pending_samples == 2
    assert [c.tolist() for c in chunker.finish()] == [[12, 13]]
    assert chunker.finish() == []
