"""The detector's own bookkeeping: the hidden rows it keeps for exact re-scoring."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.detector import _HiddenRows


def test_hidden_rows_hold_what_the_decoder_may_ask_for_whatever_the_chunk_sizes() -> None:
    """Against the plain definition: after each append, the last ``keep`` rows from before plus
    the new ones, by absolute frame; chunks from 1 row (streaming) to 500 (whole files), with
    the ring wrapping round and made anew in between; any frames asked for, in any order."""
    rng = np.random.default_rng(5)
    held = _HiddenRows(3)
    reference = np.zeros((0, 3), dtype=np.float32)
    first = 0  # absolute frame of reference[0]
    frame = 0
    for _ in range(400):
        count = int(rng.choice([0, 1, 3, 4, 33, 500]))
        keep = int(rng.choice([0, 5, 103, 400]))
        rows = rng.standard_normal((count, 3)).astype(np.float32)
        rows[:, 0] = np.arange(frame, frame + count)  # each row names its frame
        frame += count
        source = rows.copy()
        held.append(rows, keep)
        rows[:] = -1.0  # the batch's matrix is reused: what was appended must be a copy
        if count:
            old = reference[-keep:] if keep else reference[:0]
            first += reference.shape[0] - old.shape[0]
            reference = np.concatenate([old, source])
        frames = np.arange(first, first + reference.shape[0])
        np.testing.assert_array_equal(held.rows(frames), reference)
        if reference.shape[0]:  # a run of frames, some frames in order, some in any order
            low, high = sorted(rng.integers(0, reference.shape[0], 2).tolist())
            np.testing.assert_array_equal(held.rows(frames[low : high + 1]), reference[low : high + 1])
            some = np.flatnonzero(rng.random(reference.shape[0]) < 0.3)
            np.testing.assert_array_equal(held.rows(frames[some]), reference[some])
            shuffled = rng.permutation(reference.shape[0])[:5]
            np.testing.assert_array_equal(held.rows(frames[shuffled]), reference[shuffled])
        if first > 0:
            with pytest.raises(IndexError):
                held.rows(np.array([first - 1]))
        with pytest.raises(IndexError):
            held.rows(np.array([first + reference.shape[0]]))


def _chunks_and_detections(detector, samples: np.ndarray, chunk: int) -> list[tuple[int, str, float, float]]:  # type: ignore[no-untyped-def]
    """(index of the chunk whose feed returned it, keyword, start, end) of every detection."""
    found = []
    for index, offset in enumerate(range(0, samples.shape[0], chunk)):
        found += [
            (index, d.keyword, round(d.start, 3), round(d.end, 3))
            for d in detector.feed(samples[offset : offset + chunk])
        ]
    found += [(-1, d.keyword, round(d.start, 3), round(d.end, 3)) for d in detector.finish()]
    return found


@pytest.mark.parametrize("chunk", [320, 1600])
def test_an_idle_stream_sets_short_chunks_aside_without_delaying_any_detection(
    chunk: int, numpy_model, dev_audio
) -> None:  # type: ignore[no-untyped-def]
    """Silence, the keyword, silence, the keyword: with nothing under way a stream runs its short
    chunks together, and every detection comes out of the same chunk's feed as when each chunk is
    run at once."""
    from edge_agent.audio.wav import read_wav, to_mono_16k
    from edge_agent.engine.model import KeywordSpec

    keyword = to_mono_16k(read_wav(sorted(dev_audio.glob("pos/*.wav"))[0]))
    silence = np.zeros(3 * 16000, dtype=np.int16)
    samples = np.concatenate([silence, keyword, silence, keyword, silence])
    deferring = numpy_model.detector([KeywordSpec("小云小云")])
    assert deferring._defer_limit > 1600  # 小云小云 lasts at least 0.25 s
    set_aside = 0
    original = deferring._defers

    def counting(samples: np.ndarray):  # type: ignore[no-untyped-def]
        nonlocal set_aside
        ready = original(samples)
        set_aside += ready is None
        return ready

    deferring._defers = counting  # type: ignore[method-assign]
    eager = numpy_model.detector([KeywordSpec("小云小云")])
    eager._defer_limit = 0
    expected = _chunks_and_detections(eager, samples, chunk)
    assert len([d for d in expected if d[0] >= 0]) >= 2
    assert _chunks_and_detections(deferring, samples, chunk) == expected
    assert set_aside > 10


@pytest.mark.parametrize(("streams", "sets_aside"), [(2, True), (32, False)])
def test_idle_streams_set_chunks_aside_only_in_small_batches(
    streams: int, sets_aside: bool, numpy_model, dev_audio
) -> None:  # type: ignore[no-untyped-def]
    """In a batch of more than IDLE_DEFERRAL_MAX_STREAMS streams every 100 ms chunk is run at
    once; in a small one idle streams still set chunks aside. Either way each stream's detections
    come out of the same chunk's feed as when it is fed alone, at once."""
    from edge_agent.audio.wav import read_wav, to_mono_16k
    from edge_agent.engine.detector import IDLE_DEFERRAL_MAX_STREAMS, feed_many
    from edge_agent.engine.model import KeywordSpec

    assert (streams > IDLE_DEFERRAL_MAX_STREAMS) != sets_aside
    keyword = to_mono_16k(read_wav(sorted(dev_audio.glob("pos/*.wav"))[0]))
    silence = np.zeros(2 * 16000, dtype=np.int16)
    samples = np.concatenate([silence, keyword, silence])
    eager = numpy_model.detector([KeywordSpec("小云小云")])
    eager._defer_limit = 0
    # What feed returns, chunk by chunk (the batch below is never finished).
    alone = [found for found in _chunks_and_detections(eager, samples, 1600) if found[0] >= 0]
    assert alone
    batch = [numpy_model.detector([KeywordSpec("小云小云")]) for _ in range(streams)]
    found: list[list[tuple[int, str, float, float]]] = [[] for _ in batch]
    set_aside = 0
    for index, offset in enumerate(range(0, samples.shape[0], 1600)):
        results = feed_many(batch, [samples[offset : offset + 1600]] * streams)
        set_aside += sum(detector._deferred.size > 0 for detector in batch)
        for mine, detections in zip(found, results, strict=True):
            mine += [(index, d.keyword, round(d.start, 3), round(d.end, 3)) for d in detections]
    assert (set_aside > 0) == sets_aside
    assert found == [alone] * streams


@pytest.mark.parametrize("dtype", [np.int16, np.float64])
def test_audio_set_aside_is_a_float32_copy_of_what_was_fed(dtype, numpy_model) -> None:  # type: ignore[no-untyped-def]
    """An idle stream sets its chunk aside as float32, as the front-end takes it, whatever the
    caller's type; a copy: the caller may reuse its buffer. The next chunk runs both."""
    from edge_agent.engine.model import KeywordSpec

    detector = numpy_model.detector([KeywordSpec("小云小云")])
    rng = np.random.default_rng(2)
    first = (rng.standard_normal(1600) * 300).astype(dtype)
    second = (rng.standard_normal(1600) * 300).astype(dtype)
    assert detector._defers(first) is None
    expected = first.astype(np.float32)
    first[:] = 0
    np.testing.assert_array_equal(detector._deferred, expected)
    assert detector._deferred.dtype == np.float32
    ready = detector._defers(second)
    assert ready is not None and ready.dtype == np.float32
    np.testing.assert_array_equal(ready, np.concatenate([expected, second.astype(np.float32)]))
    assert detector._deferred.size == 0
