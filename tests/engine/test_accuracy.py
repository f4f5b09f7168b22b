"""The engine on the real recordings of ../shared/audio/dev: what the README promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine import features
from edge_agent.engine.model import KeywordSpec
from tests.conftest import require_module

WAKE = "小云小云"


def run(model, keywords: list[KeywordSpec], samples: np.ndarray, chunk: int = 0):  # type: ignore[no-untyped-def]
    detector = model.detector(keywords)
    found = []
    if chunk:
        for start in range(0, samples.shape[0], chunk):
            found += detector.feed(samples[start : start + chunk])
    else:
        found += detector.feed(samples)
    return found + detector.finish()


@pytest.fixture(scope="module")
def recordings(dev_audio: Path) -> dict[str, np.ndarray]:
    files = sorted(dev_audio.glob("pos/*.wav")) + sorted(dev_audio.glob("neg/*.wav"))
    assert len(files) == 58
    return {f"{p.parent.name}/{p.name}": to_mono_16k(read_wav(p)) for p in files}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_wake_word_recall_and_false_alarms_at_default_threshold(
    backend, numpy_model, torch_model, recordings
) -> None:  # type: ignore[no-untyped-def]
    model = numpy_model if backend == "numpy" else torch_model
    detected = {name: run(model, [KeywordSpec(WAKE)], samples) for name, samples in recordings.items()}
    misses = [n for n, found in detected.items() if n.startswith("pos/") and len(found) != 1]
    alarms = [(n, found) for n, found in detected.items() if n.startswith("neg/") and found]
    assert misses == [], "every positive holds exactly one 小云小云"
    assert alarms == []


@pytest.mark.slow
def test_numpy_and_scipy_ffts_give_the_same_detections(numpy_model, recordings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    require_module("scipy.fft")
    specs = [KeywordSpec(WAKE), KeywordSpec("如家酒店", 0.05)]

    def detections(fft: str) -> dict[str, list[tuple[str, float, float, float]]]:
        # What every detector's front-end asks for.
        monkeypatch.setattr(features, "default_fft", lambda: fft)
        return {
            name: [(d.keyword, d.start, d.end, d.confidence) for d in run(numpy_model, specs, samples)]
            for name, samples in recordings.items()
        }

    with_scipy, with_numpy = detections("scipy"), detections("numpy")
    assert sum(len(found) for found in with_numpy.values()) >= 25
    for name, found in with_numpy.items():
        # The same detections at the same frames; confidences equal up to float32 rounding.
        assert [f[:3] for f in with_scipy[name]] == [f[:3] for f in found], name
        for (*_, ours), (*_, theirs) in zip(with_scipy[name], found, strict=True):
            assert ours == pytest.approx(theirs, rel=1e-4), name


@pytest.mark.parametrize(
    "keyword, threshold",
    [("如家酒店", 0.05), ("瑞宝分理处", 0.002), ("八角岭", 0.002)],
)
@pytest.mark.slow
def test_custom_keywords_found_exactly_where_the_transcript_has_them(  # type: ignore[no-untyped-def]
    keyword, threshold, numpy_model, recordings, transcripts
) -> None:
    expected = {name for name, text in transcripts.items() if keyword in text}
    assert len(expected) in (2, 3)
    found = {
        name
        for name, samples in recordings.items()
        if run(numpy_model, [KeywordSpec(keyword, threshold)], samples)
    }
    assert found == expected


def test_several_keywords_at_once_keep_their_own_results(numpy_model, recordings, transcripts) -> None:  # type: ignore[no-untyped-def]
    specs = [KeywordSpec(WAKE), KeywordSpec("如家酒店"), KeywordSpec("瑞宝分理处", 0.002)]
    for name, samples in recordings.items():
        found = sorted({d.keyword for d in run(numpy_model, specs, samples)})
        expected = sorted(
            {
                k.text
                for k in specs
                if k.text in transcripts[name] or (k.text == WAKE and name.startswith("pos/"))
            }
        )
        assert found == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 160, 1600, 16000])
def test_streaming_chunk_sizes_give_the_whole_file_detections(chunk, numpy_model, recordings) -> None:  # type: ignore[no-untyped-def]
    names = sorted(recordings)
    # One sample at a time costs ~20 us per sample in Python: use 3 files there, all files otherwise.
    chosen = [names[0], names[30], names[40]] if chunk == 1 else names
    specs = [KeywordSpec(WAKE), KeywordSpec("八角岭", 0.002)]
    for name in chosen:
        whole = run(numpy_model, specs, recordings[name])
        streamed = run(numpy_model, specs, recordings[name], chunk)
        assert [(d.keyword, round(d.start, 3), round(d.end, 3)) for d in streamed] == [
            (d.keyword, round(d.start, 3), round(d.end, 3)) for d in whole
        ], name
        np.testing.assert_allclose([d.confidence for d in streamed], [d.confidence for d in whole], atol=1e-4)


def test_detection_times_lie_inside_the_recording(numpy_model, recordings) -> None:  # type: ignore[no-untyped-def]
    for name, samples in recordings.items():
        if not name.startswith("pos/"):
            continue
        (found,) = run(numpy_model, [KeywordSpec(WAKE)], samples)
        duration = samples.shape[0] / 16000
        assert 0 <= found.start < found.end <= duration
        assert 0.25 <= found.end - found.start <= 2.5
