"""Batched inference for many streams (feed_many) gives exactly the per-stream results on real
audio. The decoder's own batching, on synthetic posteriors: test_decoder_batch.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.decoder import Detection
from edge_agent.engine.detector import feed_many
from edge_agent.engine.model import KeywordSpec


@pytest.fixture(scope="module")
def recordings(dev_audio: Path) -> list[np.ndarray]:
    files = sorted(dev_audio.glob("pos/*.wav"))[:8] + sorted(dev_audio.glob("neg/*.wav"))[:8]
    return [to_mono_16k(read_wav(p)) for p in files]


def fed_alone_and_together(
    model, recordings: list[np.ndarray], specs: list[KeywordSpec], sizes: Callable[[], list[int]]
) -> tuple[list[list[Detection]], list[list[Detection]]]:  # type: ignore[no-untyped-def]
    """Every recording fed to a detector of its own chunk by chunk (``sizes()``: each stream's
    next chunk size, step by step), and the same chunks through :func:`feed_many` together:
    (detections alone, detections together), per recording, each stream finished."""
    alone = [model.detector(specs) for _ in recordings]
    together = [model.detector(specs) for _ in recordings]
    expected: list[list[Detection]] = [[] for _ in recordings]
    got: list[list[Detection]] = [[] for _ in recordings]
    offsets = [0] * len(recordings)
    while any(offset < r.shape[0] for offset, r in zip(offsets, recordings, strict=True)):
        chunks = []
        for i, (samples, size) in enumerate(zip(recordings, sizes(), strict=True)):
            chunks.append(samples[offsets[i] : offsets[i] + size])
            offsets[i] += size
        for i, chunk in enumerate(chunks):
            expected[i] += alone[i].feed(chunk)
        for i, found in enumerate(feed_many(together, chunks)):
            got[i] += found
    for i in range(len(recordings)):
        expected[i] += alone[i].finish()
        got[i] += together[i].finish()
    return expected, got


def assert_same_detections(
    got: list[list[Detection]], expected: list[list[Detection]], confidence_atol: float = 1e-5
) -> None:
    """The same keywords at the same times, stream by stream, with the same confidence to float32
    rounding: how OpenBLAS sums a product may depend on its number of rows with some of its
    kernels (its Haswell ones on a Zen 5, for one), so a batch's scores can differ from a lone
    stream's in the last bits."""
    assert [[(d.keyword, d.start, d.end) for d in e] for e in got] == [
        [(d.keyword, d.start, d.end) for d in e] for e in expected
    ]
    for have, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(
            [d.confidence for d in have], [d.confidence for d in want], rtol=0, atol=confidence_atol
        )


def test_feed_many_equals_feed_per_stream_on_real_audio(numpy_model, recordings) -> None:  # type: ignore[no-untyped-def]
    specs = [KeywordSpec("小云小云"), KeywordSpec("八角岭", 0.002)]
    rng = np.random.default_rng(3)
    expected, got = fed_alone_and_together(
        numpy_model, recordings, specs, lambda: [int(rng.choice([320, 1600, 1601, 4800])) for _ in recordings]
    )
    assert_same_detections(got, expected, confidence_atol=1e-4)
    assert sum(len(e) for e in expected) >= 8


def test_streams_fed_in_step_find_what_each_finds_alone(numpy_model, recordings) -> None:  # type: ignore[no-untyped-def]
    """Every stream brings 100 ms at every step, as the agent's worker feeds live streams (their
    bounds are then split with one reshape); a stream that is idle sets its chunk aside, so the
    batch changes from step to step. The detections are those of each stream fed alone."""
    expected, got = fed_alone_and_together(
        numpy_model, recordings, [KeywordSpec("小云小云")], lambda: [1600] * len(recordings)
    )
    assert_same_detections(got, expected)
    assert sum(len(e) for e in expected) >= 8


def test_a_batch_larger_than_a_group_runs_in_groups_and_finds_what_each_finds_alone(
    numpy_model, recordings, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """16 streams in groups of 5 (5, 5, 5, 1): no network pass sees more streams than a group,
    and the detections are those of each stream fed alone."""
    from edge_agent.engine import detector

    monkeypatch.setattr(detector, "BATCH_GROUP_STREAMS", 5)
    network = type(numpy_model.network)
    passes: list[int] = []
    original = network.hidden_many

    def counted(self, states, features):  # type: ignore[no-untyped-def]
        passes.append(len(states))
        return original(self, states, features)

    monkeypatch.setattr(network, "hidden_many", counted)
    expected, got = fed_alone_and_together(
        numpy_model, recordings, [KeywordSpec("小云小云")], lambda: [1600] * len(recordings)
    )
    assert_same_detections(got, expected)
    assert sum(len(e) for e in expected) >= 8
    assert max(passes) == 5 and 1 in passes


def exact_detections(model, specs: list[KeywordSpec], samples: np.ndarray):  # type: ignore[no-untyped-def]
    """The reference: exact posteriors of every frame (the whole output layer), then the decoder."""
    decoder = model.decoder([model.compile(spec) for spec in specs])
    posteriors = model.posteriors(samples, decoder.columns)
    return decoder.process(posteriors) + decoder.finish()


def key(found):  # type: ignore[no-untyped-def]
    return sorted((d.keyword, d.peak_frames, round(d.start, 6), round(d.end, 6)) for d in found)


def test_detectors_computing_the_output_layer_lazily_find_what_exact_posteriors_find(
    numpy_model, dev_audio: Path
) -> None:  # type: ignore[no-untyped-def]
    """A detector asks for exact posteriors only where a keyword may be under way; on every
    recording of audio/dev it finds what the whole output layer on every frame finds."""
    specs = [KeywordSpec("小云小云"), KeywordSpec("如家酒店"), KeywordSpec("八角岭", 0.002)]
    total = 0
    for path in sorted(dev_audio.glob("*/*.wav")):
        samples = to_mono_16k(read_wav(path))
        expected = exact_detections(numpy_model, specs, samples)
        got = numpy_model.detector(specs).finish(samples)
        assert key(got) == key(expected), path.name
        np.testing.assert_allclose(
            sorted(d.confidence for d in got), sorted(d.confidence for d in expected), rtol=1e-5
        )
        total += len(expected)
    assert total >= 30  # 25 wake words and the custom keywords


def test_finish_with_the_last_samples_equals_feed_then_finish(numpy_model, recordings) -> None:  # type: ignore[no-untyped-def]
    long = np.concatenate(recordings[:6])  # longer than one block of the one-pass path
    assert long.shape[0] > 16000 * 8
    for samples in (recordings[0], long):
        detector = numpy_model.detector([KeywordSpec("小云小云")])
        stepwise = detector.feed(samples) + detector.finish()
        in_one_pass = detector.finish(samples)
        assert key(in_one_pass) == key(stepwise) and len(stepwise) >= 1
        assert detector.audio_seconds == 0.0  # finished: ready for the next recording
