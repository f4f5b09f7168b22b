from __future__ import annotations

import itertools
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from edge_agent.engine import features
from edge_agent.engine.features import (
    FEATURE_DIM,
    FFT_LIBRARIES,
    NUM_MEL_BINS,
    Cmvn,
    FeatureStream,
    KaldiFbank,
    default_fft,
)
from tests.conftest import require_module

knf = pytest.importorskip("kaldi_native_fbank")


@pytest.fixture(params=FFT_LIBRARIES)
def fft(request: pytest.FixtureRequest) -> str:
    """Every FFT library the front-end can use (scipy: the ``fast`` extra, installed in CI)."""
    if request.param == "scipy":
        require_module("scipy.fft")
    return str(request.param)


def kaldi_fbank(samples: np.ndarray) -> np.ndarray:
    """The reference: kaldi-native-fbank, the C++ port of Kaldi's compute-fbank-feats."""
    options = knf.FbankOptions()
    options.frame_opts.dither = 0
    options.frame_opts.window_type = "hamming"
    options.mel_opts.num_bins = NUM_MEL_BINS
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(16000, np.asarray(samples, dtype=np.float32).tolist())
    fbank.input_finished()
    return np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)], dtype=np.float32)


def identity_cmvn() -> Cmvn:
    return Cmvn(np.zeros(FEATURE_DIM, np.float32), np.ones(FEATURE_DIM, np.float32))


def read_samples(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def test_fbank_matches_kaldi_on_synthetic_audio(fft: str) -> None:
    rng = np.random.default_rng(1)
    t = np.arange(16000 * 2) / 16000
    signal = 3000 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 300, t.shape)
    samples = np.round(signal).astype(np.int16)
    ours = KaldiFbank(fft).frames(samples)
    reference = kaldi_fbank(samples)
    assert ours.shape == reference.shape == (198, NUM_MEL_BINS)
    np.testing.assert_allclose(ours, reference, atol=2e-3)


def test_fbank_matches_kaldi_on_a_real_recording(example_wav: Path, fft: str) -> None:
    samples = read_samples(example_wav)
    ours = KaldiFbank(fft).frames(samples)
    reference = kaldi_fbank(samples)
    assert ours.shape == reference.shape
    # Both in float32, with other FFTs: differences stay in the fourth decimal of a log energy.
    assert np.abs(ours - reference).max() < 5e-4
    assert np.abs(ours - reference).mean() < 2e-5


def test_numpy_and_scipy_ffts_give_the_same_filterbank(example_wav: Path) -> None:
    require_module("scipy.fft")
    samples = read_samples(example_wav)
    scipy_frames = KaldiFbank("scipy").frames(samples)
    numpy_frames = KaldiFbank("numpy").frames(samples)
    # float32 transforms computed in different orders: rounding, nothing more.
    np.testing.assert_allclose(scipy_frames, numpy_frames, atol=1e-4)


def test_the_default_fft_is_scipy_when_installed() -> None:
    require_module("scipy.fft")
    assert default_fft() == "scipy"
    assert KaldiFbank().fft == "scipy"


def test_without_scipy_the_front_end_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a board installed without the `fast` extra: importing scipy fails.
    monkeypatch.setitem(sys.modules, "scipy", None)
    features._real_fft.cache_clear()
    try:
        assert default_fft() == "numpy"
        assert KaldiFbank().fft == "numpy"
        with pytest.raises(ValueError, match=r"'scipy' is not installed.*edge-agent\[fast\]"):
            KaldiFbank("scipy")
    finally:
        features._real_fft.cache_clear()  # the next test sees the real installation again


def test_an_unknown_fft_library_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="one of scipy, numpy, got 'fftw'"):
        KaldiFbank("fftw")


def test_fbank_of_digital_silence_is_the_floor_not_minus_infinity(fft: str) -> None:
    frames = KaldiFbank(fft).frames(np.zeros(1600, np.int16))
    assert np.isfinite(frames).all()
    np.testing.assert_allclose(frames, np.log(np.finfo(np.float32).eps), rtol=1e-6)


def test_fewer_samples_than_a_window_give_no_frames() -> None:
    assert KaldiFbank().frames(np.zeros(399, np.int16)).shape == (0, NUM_MEL_BINS)


def whole(stream: FeatureStream, samples: np.ndarray) -> np.ndarray:
    return np.concatenate([stream.accept(samples), stream.finish()])


def chunked(stream: FeatureStream, samples: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, offset, i = [], 0, 0
    while offset < samples.shape[0]:
        size = sizes[i % len(sizes)]
        out.append(stream.accept(samples[offset : offset + size]))
        offset += size
        i += 1
    out.append(stream.finish())
    return np.concatenate(out)


@pytest.mark.parametrize("sizes", [[1], [160], [1600], [16000], [7, 401, 3, 999, 160 * 3 + 1]])
def test_any_chunking_gives_exactly_the_whole_signal_features(sizes: list[int]) -> None:
    rng = np.random.default_rng(2)
    samples = rng.integers(-8000, 8000, size=16000 * 2 + 123).astype(np.int16)
    if sizes == [1]:
        samples = samples[:6000]  # one sample at a time is slow; 0.375 s is plenty of frames
    expected = whole(FeatureStream(identity_cmvn()), samples)
    got = chunked(FeatureStream(identity_cmvn()), samples, sizes)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_context_and_decimation_layout() -> None:
    """Output j = fbank frames 3j-2 .. 3j+2 (edges repeated), every third frame kept."""
    rng = np.random.default_rng(3)
    samples = rng.integers(-8000, 8000, size=400 + 160 * 10).astype(np.int16)  # 11 fbank frames
    fbank = KaldiFbank().frames(samples)
    assert fbank.shape[0] == 11
    spliced = whole(FeatureStream(identity_cmvn()), samples)
    assert spliced.shape == (4, FEATURE_DIM)  # centres 0, 3, 6, 9
    for j, centre in enumerate([0, 3, 6, 9]):
        expected = np.concatenate([fbank[min(max(centre + k, 0), 10)] for k in range(-2, 3)])
        np.testing.assert_allclose(spliced[j], expected, atol=1e-5)


def test_cmvn_is_add_then_scale() -> None:
    shift = np.full(FEATURE_DIM, 2.0, np.float32)
    scale = np.full(FEATURE_DIM, 0.5, np.float32)
    samples = np.random.default_rng(4).integers(-8000, 8000, size=4000).astype(np.int16)
    raw = whole(FeatureStream(identity_cmvn()), samples)
    normalised = whole(FeatureStream(Cmvn(shift, scale)), samples)
    np.testing.assert_allclose(normalised, (raw + 2.0) * 0.5, atol=1e-5)


def test_stream_resets_after_finish() -> None:
    samples = np.random.default_rng(5).integers(-8000, 8000, size=8000).astype(np.int16)
    stream = FeatureStream(identity_cmvn())
    first = whole(stream, samples)
    second = whole(stream, samples)
    np.testing.assert_array_equal(first, second)


def test_wrong_cmvn_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match=r"400 dimensions"):
        FeatureStream(Cmvn(np.zeros(80, np.float32), np.ones(80, np.float32)))


def test_stereo_array_is_refused() -> None:
    with pytest.raises(ValueError, match=r"1-D"):
        FeatureStream(identity_cmvn()).accept(np.zeros((100, 2), np.int16))


def test_many_streams_in_one_batch_equal_each_stream_alone() -> None:
    from edge_agent.engine.features import accept_many

    rng = np.random.default_rng(6)
    signals = [rng.integers(-8000, 8000, size=int(n)).astype(np.int16) for n in (9000, 123, 401, 16000, 0)]
    alone = [FeatureStream(identity_cmvn()) for _ in signals]
    batched = [FeatureStream(identity_cmvn()) for _ in signals]
    sizes = [1600, 7, 160 * 3 + 1, 399]
    offsets = [0] * len(signals)
    for step in range(40):
        chunks = []
        for index, samples in enumerate(signals):
            size = sizes[(step + index) % len(sizes)]
            chunks.append(samples[offsets[index] : offsets[index] + size])
            offsets[index] += size
        expected = [stream.accept(chunk) for stream, chunk in zip(alone, chunks, strict=True)]
        got = accept_many(batched, chunks)
        for want, have in zip(expected, got, strict=True):
            np.testing.assert_allclose(have, want, atol=1e-4)
    for stream_alone, stream_batched in zip(alone, batched, strict=True):
        np.testing.assert_allclose(stream_batched.finish(), stream_alone.finish(), atol=1e-4)


def test_streams_out_of_phase_take_their_frames_in_one_run_per_number_of_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streams sent in chunks that are not a whole number of frame shifts (1,024 samples, as
    wyoming-satellite's default) hold a few samples more or less than each other at every
    step: streams with as many new frames are still one run of the batched filterbank, not a
    run each, and every stream gets its frames alone."""
    from edge_agent.engine.features import accept_many

    rng = np.random.default_rng(11)
    streams = 32
    signals = [rng.integers(-8000, 8000, size=16000).astype(np.int16) for _ in range(streams)]
    alone = [FeatureStream(identity_cmvn()) for _ in signals]
    batched = [FeatureStream(identity_cmvn()) for _ in signals]
    taken: list[list[tuple[int, int, int]]] = []
    log_mel_of_runs = KaldiFbank.log_mel_of_runs

    def recording(
        self: KaldiFbank, signal: np.ndarray, runs: list[tuple[int, int, int]], energies: np.ndarray
    ) -> None:
        taken.append(list(runs))
        log_mel_of_runs(self, signal, runs, energies)

    monkeypatch.setattr(KaldiFbank, "log_mel_of_runs", recording)
    # Each stream's own phase first, then 100 ms chunks for all.
    offsets = [int(n) for n in rng.integers(0, 480, size=streams)]
    steps = [[samples[:offset] for samples, offset in zip(signals, offsets, strict=True)]]
    for start in range(0, 8000, 1600):
        steps.append(
            [
                samples[offset + start : offset + start + 1600]
                for samples, offset in zip(signals, offsets, strict=True)
            ]
        )
    for chunks in steps:
        expected = [stream.accept(chunk) for stream, chunk in zip(alone, chunks, strict=True)]
        got = accept_many(batched, chunks)
        for want, have in zip(expected, got, strict=True):
            np.testing.assert_allclose(have, want, atol=1e-4)
    for runs in taken[1:]:
        counts = [features.frame_count(length) for _, _, length in runs]
        assert len(set(counts)) == len(counts)  # one run per number of frames
        assert len(runs) <= 3  # 100 ms is 10 frame shifts: 9, 10 or 11 frames by what was held
        assert sum(members for _, members, _ in runs) == streams
    assert len({length for runs in taken[1:] for _, _, length in runs}) > 1  # out of phase indeed


def test_accepting_the_last_samples_equals_accept_then_finish() -> None:
    samples = np.random.default_rng(7).integers(-8000, 8000, size=16000 + 321).astype(np.int16)
    stream = FeatureStream(identity_cmvn())
    stepwise = np.concatenate([stream.accept(samples[:5000]), stream.accept(samples[5000:]), stream.finish()])
    head = stream.accept(samples[:5000])
    in_one_pass = np.concatenate([head, stream.accept(samples[5000:], final=True)])
    np.testing.assert_array_equal(in_one_pass, stepwise)
    np.testing.assert_array_equal(whole(stream, samples), whole(FeatureStream(identity_cmvn()), samples))


def noise_samples(count: int) -> np.ndarray:
    return np.random.default_rng(8).integers(-8000, 8000, size=count).astype(np.int16)


def fed_alone_and_in_batches(
    streams: list[FeatureStream], samples: list[np.ndarray], sizes: list[int]
) -> list[np.ndarray]:
    """Every stream's frames when fed chunks of ``sizes`` in turn, step by step: on even steps
    each stream alone, on odd steps all of them in one batch; then finished."""
    from edge_agent.engine.features import accept_many

    out: list[list[np.ndarray]] = [[] for _ in streams]
    offsets = [0] * len(streams)
    step = 0
    while any(offset < signal.shape[0] for offset, signal in zip(offsets, samples, strict=True)):
        chunks = []
        for index, signal in enumerate(samples):
            size = sizes[(step + index) % len(sizes)]
            chunks.append(signal[offsets[index] : offsets[index] + size])
            offsets[index] += size
        if step % 2:
            results = accept_many(streams, chunks)
        else:
            results = [stream.accept(chunk) for stream, chunk in zip(streams, chunks, strict=True)]
        for frames, result in zip(out, results, strict=True):
            frames.append(result)
        step += 1
    return [np.concatenate([*frames, stream.finish()]) for frames, stream in zip(out, streams, strict=True)]


@pytest.mark.parametrize(
    "sizes", [[160], [320], [1600], [16000], [16000 + 400], [7, 401, 3, 999, 160 * 3 + 1], [1600, 4000, 160]]
)
def test_a_stream_fed_alone_computes_the_same_bits_in_its_scratch_arrays(  # type: ignore[no-untyped-def]
    sizes: list[int], numpy_model, example_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream fed alone works in its thread's scratch arrays (_Scratch); with new arrays for every
    call (as for long inputs) each of its frames is the same, bit for bit, also when the stream
    goes from being fed alone to being fed in a batch and back, and at every chunk size."""
    samples = [read_samples(example_wav), noise_samples(16000 * 3 + 123), np.zeros(5000, np.int16)]

    def frames() -> list[np.ndarray]:
        streams = [FeatureStream(numpy_model.cmvn) for _ in samples]
        return fed_alone_and_in_batches(streams, samples, sizes)

    in_scratch = frames()
    monkeypatch.setattr(features, "_SCRATCH_MAX_SAMPLES", 0)
    in_new_arrays = frames()
    for kept, new in zip(in_scratch, in_new_arrays, strict=True):
        assert kept.shape[0] > 0
        np.testing.assert_array_equal(kept, new)


def test_a_batch_applies_the_cmvn_of_each_spliced_dimension() -> None:
    from edge_agent.engine.features import accept_many

    rng = np.random.default_rng(9)
    cmvn = Cmvn(
        rng.normal(size=FEATURE_DIM).astype(np.float32), rng.uniform(0.5, 2, FEATURE_DIM).astype(np.float32)
    )
    signals = [noise_samples(8000), noise_samples(12000)[::-1].copy()]
    batched = [FeatureStream(cmvn) for _ in signals]
    got = accept_many(batched, signals)
    for stream, signal, have in zip(batched, signals, got, strict=True):
        raw = FeatureStream(identity_cmvn()).accept(signal)
        np.testing.assert_allclose(have, (raw + cmvn.shift) * cmvn.scale, rtol=1e-5, atol=1e-4)
        assert stream.finish().shape[1] == FEATURE_DIM


def test_a_few_frames_take_one_whole_mel_product_within_float32_rounding_of_the_slices(
    example_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to _WHOLE_MEL_MAX_ROWS frames (a live chunk's) go through one product with the whole
    mel matrix, more through its slices: the sums differ in order only, so the log energies
    agree to float32 rounding, and both stay as close to Kaldi as the tests above hold."""
    samples = read_samples(example_wav)
    fbank = KaldiFbank()
    windows = fbank.windows(samples)
    rows = features._WHOLE_MEL_MAX_ROWS
    starts = range(0, windows.shape[0] - rows, 37)
    in_one_product = [
        fbank.log_mel(windows[start : start + count]) for start in starts for count in range(1, rows + 1)
    ]
    monkeypatch.setattr(features, "_WHOLE_MEL_MAX_ROWS", 0)
    sliced = [
        fbank.log_mel(windows[start : start + count]) for start in starts for count in range(1, rows + 1)
    ]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(in_one_product, sliced, strict=True))
    assert worst < 1e-5
    reference = kaldi_fbank(samples)
    for start, block in zip(starts, in_one_product[rows - 1 :: rows], strict=True):
        assert np.abs(block - reference[start : start + rows]).max() < 5e-4


def test_streams_fed_alone_on_several_threads_get_the_bits_of_new_arrays(  # type: ignore[no-untyped-def]
    numpy_model, example_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each thread has its own scratch arrays, handed from stream to stream: two threads, each
    feeding two streams alone in turn at once, get every frame of new arrays."""
    import threading

    wav = read_samples(example_wav)
    pairs = [[wav, noise_samples(40000)], [noise_samples(30000), wav[::-1].copy()]]

    def alone_in_turn(samples: list[np.ndarray], start: threading.Barrier | None) -> list[np.ndarray]:
        streams = [FeatureStream(numpy_model.cmvn) for _ in samples]
        if start is not None:
            start.wait(timeout=30)
        out: list[list[np.ndarray]] = [[] for _ in samples]
        for offset in range(0, max(signal.shape[0] for signal in samples), 1600):
            for stream, signal, frames in zip(streams, samples, out, strict=True):
                frames.append(stream.accept(signal[offset : offset + 1600]))
        return [
            np.concatenate([*frames, stream.finish()]) for frames, stream in zip(out, streams, strict=True)
        ]

    start = threading.Barrier(len(pairs))
    results: dict[int, list[np.ndarray]] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, alone_in_turn(pairs[i], start)))
        for i in range(len(pairs))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [0, 1]
    monkeypatch.setattr(features, "_SCRATCH_MAX_SAMPLES", 0)
    for index, samples in enumerate(pairs):
        for got, expected in zip(results[index], alone_in_turn(samples, None), strict=True):
            np.testing.assert_array_equal(got, expected)


def streams_back_to_back(
    samples: np.ndarray,
) -> tuple[np.ndarray, list[tuple[int, int, int]], list[np.ndarray]]:
    """Pieces of a recording as a batch's streams, laid back to back as accept_many lays them:
    runs of streams as long as each other (a live step's, a stream of one frame alone, streams
    longer than a block), their float32 signal, runs and pieces."""
    lengths = [1840] * 37 + [400] * 3 + [560] + [16000 * 2 + 123] * 2 + [399] + [1840] * 5
    samples = np.resize(samples, 997 * len(lengths) + max(lengths))  # the recording repeated
    pieces, runs, first, position = [], [], 0, 0
    for length, run in itertools.groupby(lengths):
        members = len(list(run))
        runs.append((first, members, length))
        for _ in range(members):
            pieces.append(samples[position : position + length].astype(np.float32))
            position += 997
        first += members * length
    return np.concatenate(pieces), runs, pieces


@pytest.mark.parametrize("block_rows", [1, 2, 9, 160, 100_000])
def test_a_batch_in_blocks_of_any_size_gets_each_streams_log_mel_energies(
    block_rows: int, example_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched filterbank (log_mel_of_runs) takes a batch's frames in blocks of _BLOCK_ROWS:
    whatever their size, every frame of every stream gets the energies of that stream's windows
    taken at once, to float32 rounding (a BLAS may sum a large product's rows in another order
    than a small one's)."""
    signal, runs, pieces = streams_back_to_back(read_samples(example_wav))
    fbank = KaldiFbank()
    expected = np.concatenate([fbank.log_mel(fbank.windows(piece)) for piece in pieces])
    monkeypatch.setattr(features, "_BLOCK_ROWS", block_rows)
    energies = np.full_like(expected, np.nan)
    fbank.log_mel_of_runs(signal, runs, energies)
    assert np.abs(energies - expected).max() < 1e-5


def test_a_frames_log_mel_energies_do_not_depend_on_the_block_it_is_in(
    example_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step up to the mel product is row by row, and blocks are small products; a block of
    one row (a product numpy would make a matrix-vector one) is taken as two. So a frame's energies
    are the same in a block of its own, in a small block or in the largest: the same bits where
    OpenBLAS sums a product's rows alike whatever their number (as the kernels it picks for the
    CPU itself do), to float32 rounding where it does not (its Haswell kernels on a Zen 5)."""
    signal, runs, _ = streams_back_to_back(read_samples(example_wav))
    fbank = KaldiFbank()
    results = []
    rows = sum(streams * features.frame_count(length) for _, streams, length in runs)
    for block_rows in (1, 2, 9, features._BLOCK_ROWS):
        monkeypatch.setattr(features, "_BLOCK_ROWS", block_rows)
        energies = np.full((rows, NUM_MEL_BINS), np.nan, dtype=np.float32)
        fbank.log_mel_of_runs(signal, runs, energies)
        results.append(energies)
    for energies in results[1:]:
        np.testing.assert_allclose(energies, results[0], rtol=4 * np.finfo(np.float32).eps, atol=0)
