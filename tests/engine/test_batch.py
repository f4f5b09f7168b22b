"""Batched inference for many streams gives exactly the per-stream results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.decoder import CompiledKeyword, KeywordDecoder, process_many
from edge_agent.engine.detector import feed_many
from edge_agent.engine.model import KeywordSpec


@pytest.mark.parametrize("in_step", [False, True])
def test_process_many_equals_one_decoder_per_stream_on_synthetic_posteriors(in_step: bool) -> None:
    """Streams with ragged chunks (0 to 5 frames each, laid out with padding) and streams fed
    in step (as many frames each, stacked as they are)."""
    rng = np.random.default_rng(11)
    keywords = [
        CompiledKeyword("abcd", ((1,), (2,), (3,), (4,)), 0.2, 0.05, 2.5),
        CompiledKeyword("aa", ((1,), (1,)), 0.2, 0.0, 2.5),
    ]
    streams = 12
    length = 400
    signals = []
    for _ in range(streams):
        p = np.zeros((length, 6))
        p[:, 0] = 1.0
        for start in rng.integers(0, length - 40, size=4):
            for k, token in enumerate((1, 2, 3, 4)):
                prob = float(rng.uniform(0.05, 0.95))
                p[start + 6 * k, token] = prob
                p[start + 6 * k, 0] = 1 - prob
        noise = rng.integers(0, length, size=30)
        p[noise, 5] = 0.7
        p[noise, 0] = 0.3
        signals.append(p)
    alone = [KeywordDecoder(keywords, frame_seconds=0.03) for _ in range(streams)]
    together = [KeywordDecoder(keywords, frame_seconds=0.03) for _ in range(streams)]
    expected: list[list] = [[] for _ in range(streams)]
    got: list[list] = [[] for _ in range(streams)]
    position = [0] * streams
    for step in range(200):
        chunks = []
        for i in range(streams):
            # ragged: 0 to 5 frames per stream per step; in step: 3 or 4 frames for all
            size = 3 + step % 2 if in_step else int(rng.integers(0, 6))
            chunks.append(signals[i][position[i] : position[i] + size])
            position[i] += size
        for i in range(streams):
            expected[i] += alone[i].process(chunks[i])
        for i, found in enumerate(process_many(together, chunks)):
            got[i] += found
    for i in range(streams):
        expected[i] += alone[i].finish()
        got[i] += together[i].finish()
    assert got == expected
    assert sum(len(e) for e in expected) > 10  # the comparison covered real detections


@pytest.fixture(scope="module")
def recordings(dev_audio: Path) -> list[np.ndarray]:
    files = sorted(dev_audio.glob("pos/*.wav"))[:8] + sorted(dev_audio.glob("neg/*.wav"))[:8]
    return [to_mono_16k(read_wav(p)) for p in files]


def test_feed_many_equals_feed_per_stream_on_real_audio(numpy_model, recordings) -> None:  # type: ignore[no-untyped-def]
    specs = [KeywordSpec("小云小云"), KeywordSpec("八角岭", 0.002)]
    alone = [numpy_model.detector(specs) for _ in recordings]
    together = [numpy_model.detector(specs) for _ in recordings]
    rng = np.random.default_rng(3)
    offsets = [0] * len(recordings)
    expected: list[list] = [[] for _ in recordings]
    got: list[list] = [[] for _ in recordings]
    while any(offset < r.shape[0] for offset, r in zip(offsets, recordings, strict=True)):
        chunks = []
        for i, samples in enumerate(recordings):
            size = int(rng.choice([320, 1600, 1601, 4800]))
            chunks.append(samples[offsets[i] : offsets[i] + size])
            offsets[i] += size
        for i, chunk in enumerate(chunks):
            expected[i] += alone[i].feed(chunk)
        for i, found in enumerate(feed_many(together, chunks)):
            got[i] += found
    for i in range(len(recordings)):
        expected[i] += alone[i].finish()
        got[i] += together[i].finish()
    assert [[(d.keyword, d.start, d.end) for d in e] for e in got] == [
        [(d.keyword, d.start, d.end) for d in e] for e in expected
    ]
    for have, want in zip(got, expected, strict=True):
        np.testing.assert_allclose([d.confidence for d in have], [d.confidence for d in want], atol=1e-4)
    assert sum(len(e) for e in expected) >= 8


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
