"""Where one stream's engine time goes, stage by stage, and what one batched network step costs.

    python -m benchmarks.stages [--repeat 7] [--streams 128]

On one thread, over the recordings of audio/dev, whole, in the detector's 8-second blocks:

* ``features``: the front-end (``FeatureStream.accept``), once per FFT library installed (numpy,
  and scipy with the ``fast`` extra);
* ``body``: the network body (``NumpyNetwork.hidden``) on those features;
* ``bounds``: the output layer's upper bounds for the wake word's outputs on every frame;
* ``whole``: ``KeywordDetector.finish`` on every recording, everything included (front-end with
  the default FFT, body, exact output layer where needed, decoder); what ``whole`` has beyond
  ``features`` + ``body`` + ``bounds`` is the exact output layer and the decoder.

Each as a real-time factor (seconds / audio seconds), best and median of ``--repeat`` rounds, the
stages alternating within each round so that a drift of the machine's speed hits them alike.

Then one batched network step (``NumpyNetwork.hidden_many``) for ``--streams`` streams of 100 ms
chunks: fed in step (every stream 3 or 4 new frames at once) and with their phases spread (3 and
4 mixed), in ms per call, best and median of 300 calls.

Results: benchmarks/results/stages.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

from benchmarks.common import dev_audio, machine, model_dir, write_result  # noqa: E402
from edge_agent.audio.wav import read_wav, to_mono_16k  # noqa: E402
from edge_agent.engine.features import FeatureStream, KaldiFbank, default_fft, installed_ffts  # noqa: E402
from edge_agent.engine.model import KeywordSpec, KwsModel  # noqa: E402
from edge_agent.engine.network import NumpyNetwork  # noqa: E402
from edge_agent.system import tune_allocator  # noqa: E402

BLOCK_SAMPLES = 8 * 16_000  # as the detector cuts whole recordings
WAKE_WORD = "小云小云"


def stage_timings(model: KwsModel, recordings: list[np.ndarray], repeat: int) -> dict[str, dict[str, float]]:
    network = model.network
    assert isinstance(network, NumpyNetwork)
    audio_seconds = sum(r.shape[0] for r in recordings) / 16_000
    blocks = [[r[o : o + BLOCK_SAMPLES] for o in range(0, r.shape[0], BLOCK_SAMPLES)] for r in recordings]
    detector = model.detector([KeywordSpec(WAKE_WORD)])
    columns = detector._decoder.columns

    def features(fft: str) -> list[list[np.ndarray]]:
        out = []
        for pieces in blocks:
            stream = FeatureStream(model.cmvn, KaldiFbank(fft))
            out.append([stream.accept(b, final=i == len(pieces) - 1) for i, b in enumerate(pieces)])
        return out

    computed = features(default_fft())

    def body() -> list[list[np.ndarray]]:
        out = []
        for pieces in computed:
            state = network.new_state()
            out.append([network.hidden(state, f, final=i == len(pieces) - 1) for i, f in enumerate(pieces)])
        return out

    hidden = body()

    def bounds() -> None:
        for pieces in hidden:
            for rows in pieces:
                network.output.bounds(rows, columns)

    def whole() -> None:
        for recording in recordings:
            detector.finish(recording)

    stages: dict[str, Callable[[], object]] = {
        **{f"features ({fft} FFT)": (lambda fft=fft: features(fft)) for fft in installed_ffts()},
        "body": body,
        "bounds": bounds,
        f"whole ({default_fft()} FFT)": whole,
    }
    timings: dict[str, list[float]] = {name: [] for name in stages}
    whole()  # warm-up: caches, allocator
    for _ in range(repeat):
        for name, run in stages.items():
            started = time.perf_counter()
            run()
            timings[name].append((time.perf_counter() - started) / audio_seconds)
    return {
        name: {"rtf_best": round(min(values), 6), "rtf_median": round(statistics.median(values), 6)}
        for name, values in timings.items()
    }


def batch_step(model: KwsModel, streams: int, in_step: bool, calls: int = 300) -> dict[str, float]:
    """ms per ``hidden_many`` call for ``streams`` streams of 100 ms chunks (3 or 4 frames)."""
    network = model.network
    rng = np.random.default_rng(0)
    # 100 ms is 3 1/3 network frames: one chunk in three brings 4.
    frames = [rng.standard_normal((4 - min(k, 1), network.input_dim)).astype(np.float32) for k in range(3)]
    states = [network.new_state() for _ in range(streams)]
    seconds = []
    for call in range(calls + 5):
        chunks = [frames[(call if in_step else call + i) % 3] for i in range(streams)]
        started = time.perf_counter()
        network.hidden_many(states, chunks)
        if call >= 5:  # past the first calls, while the layers' buffers fill up
            seconds.append(time.perf_counter() - started)
    return {
        "ms_best": round(1000 * min(seconds), 3),
        "ms_median": round(1000 * statistics.median(seconds), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--streams", type=int, default=128)
    args = parser.parse_args()
    tune_allocator()
    model = KwsModel.load(model_dir(), backend="numpy", threads=1)
    recordings = [to_mono_16k(read_wav(path)) for path in sorted(dev_audio().glob("*/*.wav"))]
    stages = stage_timings(model, recordings, args.repeat)
    batch = {
        "fed in step": batch_step(model, args.streams, in_step=True),
        "phases spread": batch_step(model, args.streams, in_step=False),
    }
    report = {
        "benchmark": "stages",
        "machine": machine(),
        "audio_seconds": round(sum(r.shape[0] for r in recordings) / 16_000, 1),
        "repeat": args.repeat,
        "stages": stages,
        "hidden_many": {"streams": args.streams, **batch},
    }
    path = write_result("stages", report)
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; one thread")
    print(f"{'stage (one stream, whole files)':36} {'RTF best':>9} {'median':>9}")
    for name, row in stages.items():
        print(f"{name:36} {row['rtf_best']:9.6f} {row['rtf_median']:9.6f}")
    print(f"hidden_many, {args.streams} streams of 100 ms: ms per call, best / median")
    for name, row in batch.items():
        print(f"  {name:14} {row['ms_best']:7.2f} {row['ms_median']:7.2f}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
