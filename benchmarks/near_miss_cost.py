"""What near-miss telemetry costs the engine: one stream in 100 ms chunks, with and without it.

    python -m benchmarks.near_miss_cost [--rounds 3]

The agent asks every stream's detector for its near misses (``take_near_misses``), which starts
a second decoding pass at a quarter of each keyword's threshold. Here every recording of
audio/dev goes through a detector in 100 ms chunks, as a live microphone's does, without and
with near misses back to back (the order alternating between rounds), on one thread; the
figure is the median of the per-round ratios (a shared machine's speed drifts within seconds).
The detections are checked to be the same both ways. Result: ``benchmarks/results/near_miss_cost.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402 - after the thread settings

from benchmarks.common import dev_audio, machine, model_dir, write_result  # noqa: E402
from edge_agent.audio.wav import read_wav, to_mono_16k  # noqa: E402
from edge_agent.engine.model import KeywordSpec, KwsModel  # noqa: E402

CHUNK = 1600  # 100 ms


def one_recording(model: KwsModel, samples: np.ndarray, near_misses: bool) -> tuple[float, list, int]:
    """Engine seconds for one recording in 100 ms chunks, its detections, near misses seen."""
    detector = model.detector([KeywordSpec("小云小云")])
    if near_misses:
        detector.take_near_misses()
    found: list = []
    near = 0
    started = time.perf_counter()
    for offset in range(0, samples.shape[0], CHUNK):
        found += detector.feed(samples[offset : offset + CHUNK])
        if near_misses:
            near += len(detector.take_near_misses())
    found += detector.finish()
    if near_misses:
        near += len(detector.take_near_misses())
    elapsed = time.perf_counter() - started
    return elapsed, [(d.keyword, d.confidence, d.start, d.end) for d in found], near


def one_round(
    model: KwsModel, recordings: list[np.ndarray], first_plain: bool
) -> tuple[float, float, int, int]:
    """Every recording both ways back to back (the order alternating between rounds), so that
    the machine's drift falls on both: engine seconds without and with, detections, near misses."""
    plain_s = near_s = 0.0
    detections = near = 0
    for samples in recordings:
        runs = {}
        for watched in (not first_plain, first_plain):
            runs[watched] = one_recording(model, samples, near_misses=watched)
        if runs[True][1] != runs[False][1]:
            raise SystemExit("near-miss decoding changed the detections")
        plain_s += runs[False][0]
        near_s += runs[True][0]
        detections += len(runs[False][1])
        near += runs[True][2]
    return plain_s, near_s, detections, near


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.near_miss_cost")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = KwsModel.load(model_dir(), backend="numpy")
    paths = sorted(dev_audio().glob("pos/*.wav")) + sorted(dev_audio().glob("neg/*.wav"))
    recordings = [to_mono_16k(read_wav(path)) for path in paths]
    audio_s = sum(r.shape[0] for r in recordings) / 16_000
    rounds = []
    detections = 0
    for index in range(args.rounds):
        plain_s, near_s, detections, near = one_round(model, recordings, first_plain=index % 2 == 0)
        rounds.append(
            {"plain_rtf": plain_s / audio_s, "near_miss_rtf": near_s / audio_s, "ratio": near_s / plain_s}
        )
        print(f"round {index + 1}: {rounds[-1]}, near misses reported {near}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    result = {
        "benchmark": "near_miss_cost",
        "machine": machine(),
        "note": "a shared machine: compare the ratios measured in the same round",
        "audio_seconds": round(audio_s, 1),
        "chunk_ms": 100,
        "rounds": [{k: round(v, 5) for k, v in r.items()} for r in rounds],
        "median_ratio": round(ratio, 3),
        "detections": detections,
    }
    path = write_result("near_miss_cost", result)
    print(f"near-miss decoding: {ratio:.3f}x the engine time without it; wrote {path}")


if __name__ == "__main__":
    main()
