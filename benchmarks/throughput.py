"""Engine throughput with many streams, against a plain per-stream baseline in the same run.

    python -m benchmarks.throughput [--streams 1,16,64,256] [--seconds 30]

Every stream plays audio/dev recordings (positives and negatives, a different offset per
stream) in 100 ms chunks, the way the agent's worker feeds them: all streams' chunks of one
100 ms step go through :func:`edge_agent.engine.detector.feed_many` together (one FFT, one
network pass, per-stream decoders). We time how long the engine needs for ``--seconds`` of
audio on every stream, on one thread, and report:

* ``rtf``: engine time / audio time, per stream (lower is better);
* ``streams_per_core``: how many real-time streams one core could carry = N / (engine time /
  audio seconds);
* ``out_of_phase_streams_per_core``: the same with streams out of phase (each holds another
  number of samples from its last frame at every step, as streams sent in chunks that are not a
  whole number of 10 ms frame shifts do);
* ``step_ms``: how long each 100 ms step (one ``feed_many`` over every stream) took, p50 / p95
  / p99 / max: the engine's share of a chunk's delay in the agent;
* ``exact_rows_per_stream``: how many frames per stream the output layer ran on in full (exact
  posteriors, for the decoder's candidates; every other frame gets cheap bounds), in that run
  and in the ``lockstep`` run below;
* ``burst``: every stream plays the same recording of the wake word, so that all of them finish
  the keyword in the same step (what ``benchmarks.mqtt_latency`` provokes through MQTT); the
  median step, the step in which they all fire and the largest step, in ms;
* ``lockstep``: every stream plays the positive recordings back to back from the same start
  (``LOCKSTEP_SECONDS`` of them, as ``benchmarks.mqtt_latency`` does), and the delay from each
  keyword's end to its detection (p50/p95/max) had one worker run the steps as the chunks came
  in, next to that delay with steps taking no time: how much the engine's steps add to it;
* ``arithmetic_ceiling``: the network body's multiply-adds per stream-second and how fast this
  machine's BLAS runs those very products, so how many streams one core could carry if it did
  nothing else: how far the engine is from the arithmetic limit;
Times are this process's CPU time (``time.process_time``: one thread, so it is the engine's
own time), not wall time: on a machine shared with other work, wall time counts the waits for
a core too. ``--clock wall`` measures wall time instead.

* the **baseline** measured in the same process: the plain reference of
  ``benchmarks/reference.py`` (one stream at a time, whole recordings, no batching, numpy
  float32, the full output layer on every frame), timed before and after every stream count,
  and our figures as ratios to the mean of those two timings, so the comparison holds on a
  noisy machine.

Results: benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

from benchmarks.common import dev_audio, machine, model_dir, positives_back_to_back, write_result  # noqa: E402
from benchmarks.reference import reference_rtf  # noqa: E402
from edge_agent.audio.wav import read_wav, to_mono_16k  # noqa: E402
from edge_agent.engine.detector import feed_many  # noqa: E402
from edge_agent.engine.features import DECIMATION, FRAME_SHIFT_SAMPLES  # noqa: E402
from edge_agent.engine.kaldi_nnet import AffineTransform, Fsmn, LinearTransform, read_nnet  # noqa: E402
from edge_agent.engine.model import NETWORK_FILE, KeywordSpec, KwsModel  # noqa: E402
from edge_agent.system import tune_allocator  # noqa: E402

CHUNK = 1600  # 100 ms
# Audio the lockstep rows play: what benchmarks.mqtt_latency is run with at 512 streams (--seconds 40).
LOCKSTEP_SECONDS = 40.0


def corpus() -> np.ndarray:
    files = sorted(dev_audio().glob("*/*.wav"))
    return np.concatenate([to_mono_16k(read_wav(p)) for p in files])


# The clock every figure is timed with (see the module's docstring); set by main().
clock: Callable[[], float] = time.process_time


def baseline_rtf(model: KwsModel, seconds: float) -> float:
    """Plain reference (benchmarks/reference.py): whole recordings, one stream at a time, no
    batching, the full output layer on every frame; over at least ``seconds`` of audio/dev."""
    recordings, total = [], 0.0
    for path in sorted(dev_audio().glob("*/*.wav")):
        recordings.append(to_mono_16k(read_wav(path)))
        total += recordings[-1].shape[0] / 16000
        if total >= seconds:
            break
    tokens = [t for group in model.lexicon.spell("小云小云") for t in group]
    return reference_rtf(model_dir(), tokens, recordings, repeat=3, clock=clock)


def batched_rtf(
    model: KwsModel, audio: np.ndarray, streams: int, seconds: float, out_of_phase: bool = False
) -> tuple[float, int, list[float], float]:
    """(RTF per stream, detections, each step's seconds, exact output-layer rows per stream)
    for ``streams`` staggered streams.

    ``out_of_phase``: each stream first gets a part of a chunk of its own length (not timed),
    so that each holds another number of samples from its last frame at every step, as streams
    sent in chunks that are not a whole number of 10 ms frame shifts do (1,024 samples:
    wyoming-satellite's default, and a common PyAudio buffer)."""
    detectors = [model.detector([KeywordSpec("小云小云")]) for _ in range(streams)]
    length = audio.shape[0]
    offsets = [(i * 7919 * CHUNK) % length for i in range(streams)]
    if out_of_phase:
        heads = [(i * 997) % CHUNK for i in range(streams)]
        pairs = list(zip(offsets, heads, strict=True))
        feed_many(detectors, [audio[offset : offset + head] for offset, head in pairs])
        offsets = [offset + head for offset, head in pairs]
    steps = int(seconds * 1000 / 100)
    detections = 0
    step_seconds = []
    rows_before = model.network.output.rows_exact
    for step in range(steps):
        chunks = []
        for offset in offsets:
            start = (offset + step * CHUNK) % (length - CHUNK)
            chunks.append(audio[start : start + CHUNK])
        started = clock()
        detections += sum(len(found) for found in feed_many(detectors, chunks))
        step_seconds.append(clock() - started)
    rows = (model.network.output.rows_exact - rows_before) / streams
    return sum(step_seconds) / (seconds * streams), detections, step_seconds, rows


def burst_steps(model: KwsModel, streams: int) -> dict[str, float]:
    """Every stream plays the same wake-word recording (with a second of silence after it):
    the median step, the step in which every stream's detection fires, and the largest (ms)."""
    recording = to_mono_16k(read_wav(sorted(dev_audio().glob("pos/*.wav"))[0]))
    audio = np.concatenate([recording, np.zeros(16000, dtype=np.float32)])
    detectors = [model.detector([KeywordSpec("小云小云")]) for _ in range(streams)]
    step_seconds, firing = [], []
    for start in range(0, audio.shape[0] - CHUNK + 1, CHUNK):
        chunk = audio[start : start + CHUNK]
        started = clock()
        found = feed_many(detectors, [chunk] * streams)
        step_seconds.append(clock() - started)
        if any(found):
            firing.append(step_seconds[-1])
    if not firing:
        raise SystemExit("burst: the wake word was not detected")
    return {
        "median_step_ms": round(1000 * float(np.median(step_seconds)), 1),
        "firing_step_ms": round(1000 * max(firing), 1),
        "largest_step_ms": round(1000 * max(step_seconds), 1),
    }


def lockstep_delay(model: KwsModel, streams: int, seconds: float = LOCKSTEP_SECONDS) -> dict[str, float]:
    """Every stream plays the same audio (the positive recordings back to back, from the start,
    as ``benchmarks.mqtt_latency`` plays them: every stream says the keyword at the same
    instant) in 100 ms chunks; had one worker run these steps as the chunks came in (each once
    its chunk is in and the step before is done), the delay from each keyword's end to its
    detection, p50/p95/max (ms): the engine's share of what ``benchmarks.mqtt_latency``
    measures, next to the same delay with steps taking no time (the chunking, the model's
    look-ahead and the decoder's hold alone)."""
    audio, _ = positives_back_to_back()
    audio = audio[: int(seconds * 16000)]
    detectors = [model.detector([KeywordSpec("小云小云")]) for _ in range(streams)]
    queued, instant = [], []
    finished = 0.0
    rows_before = model.network.output.rows_exact
    for start in range(0, audio.shape[0] - CHUNK + 1, CHUNK):
        started = clock()
        found = feed_many(detectors, [audio[start : start + CHUNK]] * streams)
        spent = clock() - started
        arrived = (start + CHUNK) / 16000
        finished = max(arrived, finished) + spent
        ends = [detection.end for detections in found for detection in detections]
        queued += [finished - end for end in ends]
        instant += [arrived - end for end in ends]
    if not queued:
        raise SystemExit("lockstep: the wake word was not detected")
    return {
        "seconds": seconds,
        "detections": len(queued),
        "exact_rows_per_stream": round((model.network.output.rows_exact - rows_before) / streams, 1),
        **{f"delay_ms_{name}": round(1000 * float(np.percentile(queued, q)), 1) for name, q in _QUANTILES},
        **{
            f"delay_ms_{name}_with_instant_steps": round(1000 * float(np.percentile(instant, q)), 1)
            for name, q in _QUANTILES
        },
    }


_QUANTILES = (("p50", 50), ("p95", 95), ("max", 100))


def arithmetic_ceiling(model: KwsModel, streams: int = 256) -> dict[str, float]:
    """How many real-time streams one core could carry if it did nothing but the network body's
    matrix products at the speed this machine's BLAS reaches on them: the model's multiply-adds
    per stream-second (every frame, every layer but the output layer, which the decoder computes
    for few columns and few rows), and the products timed with the model's own weights on a
    batch as large as a ``streams``-stream step's."""
    components = read_nnet(model.directory / NETWORK_FILE)[:-2]
    frames_per_second = 16000 / (FRAME_SHIFT_SAMPLES * DECIMATION)
    rows = int(round(streams * frames_per_second / 10))  # one 100 ms step
    products = [
        c.weight.T.astype(np.float32) for c in components if isinstance(c, (AffineTransform, LinearTransform))
    ]
    macs_per_frame = sum(w.shape[0] * w.shape[1] for w in products)
    macs_per_frame += sum(
        c.input_dim * (c.history_frames + 1 + c.lookahead_frames) for c in components if isinstance(c, Fsmn)
    )
    inputs = [
        np.random.default_rng(0).standard_normal((rows, w.shape[0]), dtype=np.float32) for w in products
    ]
    outputs = [np.empty((rows, w.shape[1]), dtype=np.float32) for w in products]
    repeats, elapsed = 0, 0.0
    while elapsed < 0.5:
        started = time.process_time()
        for x, w, out in zip(inputs, products, outputs, strict=True):
            np.dot(x, w, out=out)
        elapsed += time.process_time() - started
        repeats += 1
    product_macs = sum(w.shape[0] * w.shape[1] for w in products) * rows * repeats
    gflops = 2 * product_macs / elapsed / 1e9
    macs_per_stream_second = macs_per_frame * frames_per_second
    return {
        "body_macs_per_frame": macs_per_frame,
        "frames_per_second": round(frames_per_second, 2),
        "body_macs_per_stream_second": round(macs_per_stream_second),
        "matmul_gflops": round(gflops, 1),
        "ceiling_streams_per_core": round(gflops * 1e9 / (2 * macs_per_stream_second)),
    }


def step_percentiles(step_seconds: list[float]) -> dict[str, float]:
    milliseconds = 1000 * np.asarray(step_seconds)
    return {
        **{f"p{q}": round(float(np.percentile(milliseconds, q)), 1) for q in (50, 95, 99)},
        "max": round(float(milliseconds.max()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="1,16,64,256")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="time CPU time (default) or wall time"
    )
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    tune_allocator()
    model = KwsModel.load(model_dir(), backend=args.backend, threads=1)
    audio = corpus()
    # The reference is timed again after every stream count, and each count is compared with
    # the mean of the timings just before and just after it: this VM's speed drifts by up to half
    # within minutes, and a ratio to one timing at the start would measure the drift.
    baselines = [baseline_rtf(model, args.seconds)]
    results = []
    for count in (int(n) for n in args.streams.split(",")):
        rtf, detections, step_seconds, rows = batched_rtf(model, audio, count, args.seconds)
        rtf_out_of_phase, _, _, _ = batched_rtf(model, audio, count, args.seconds, out_of_phase=True)
        baselines.append(baseline_rtf(model, args.seconds))
        baseline_here = (baselines[-2] + baselines[-1]) / 2
        results.append(
            {
                "streams": count,
                "rtf": round(rtf, 6),
                "streams_per_core": round(1.0 / rtf, 1),
                "baseline_rtf": round(baseline_here, 6),
                "speedup_vs_baseline": round(baseline_here / rtf, 2),
                "detections": detections,
                "out_of_phase_streams_per_core": round(1.0 / rtf_out_of_phase, 1),
                "step_ms": step_percentiles(step_seconds),
                "exact_rows_per_stream": round(rows, 1),
                "burst": burst_steps(model, count),
                "lockstep": lockstep_delay(model, count),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    report = {
        "benchmark": "throughput",
        "machine": machine(),
        "backend": args.backend,
        "clock": "process CPU time" if args.clock == "cpu" else "wall time",
        "chunk_ms": 100,
        "seconds_per_stream": args.seconds,
        "baseline": {
            "what": "plain reference: whole recordings, one stream, no batching, numpy float32, "
            "full output layer (benchmarks/reference.py); timed before and after each stream count",
            "rtf": round(float(np.median(baselines)), 6),
            "timings": [round(b, 6) for b in baselines],
        },
        "results": results,
        "arithmetic_ceiling": arithmetic_ceiling(model),
    }
    path = write_result(f"throughput-{args.backend}", report)
    print(
        f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; one thread; "
        f"{report['clock']}"
    )
    baseline = report["baseline"]["rtf"]
    print(
        f"plain reference (whole files, one stream): RTF {baseline:.5f} = {1 / baseline:.0f} "
        f"streams per core (median of {len(baselines)} timings, {min(baselines):.5f}-{max(baselines):.5f})"
    )
    print(
        f"{'streams':>8} {'RTF':>9} {'streams/core':>13} {'vs baseline':>12} {'out of phase':>13}"
        f" {'step p50/p95/max ms':>20} {'burst: median/firing/largest step ms':>37}"
        f" {'lockstep delay p95 ms (instant steps)':>38} {'exact rows/stream (lockstep)':>29}"
    )
    for r in results:
        ratio, step, burst, lock = r["speedup_vs_baseline"], r["step_ms"], r["burst"], r["lockstep"]
        steps = f"{step['p50']:.1f}/{step['p95']:.1f}/{step['max']:.1f}"
        bursts = f"{burst['median_step_ms']:.1f}/{burst['firing_step_ms']:.1f}/{burst['largest_step_ms']:.1f}"
        print(
            f"{r['streams']:>8} {r['rtf']:>9.5f} {r['streams_per_core']:>13.0f} {ratio:>11.2f}x"
            f" {r['out_of_phase_streams_per_core']:>13.0f}"
            f" {steps:>20} {bursts:>37}"
            f" {lock['delay_ms_p95']:>25.0f} ({lock['delay_ms_p95_with_instant_steps']:.0f})"
            f" {r['exact_rows_per_stream']:>18.0f} ({lock['exact_rows_per_stream']:.0f})"
        )
    ceiling = report["arithmetic_ceiling"]
    print(
        f"arithmetic ceiling: {ceiling['body_macs_per_stream_second'] / 1e6:.1f} M multiply-adds per "
        f"stream-second in the network body; its products run at {ceiling['matmul_gflops']} GFLOPS "
        f"here: at most {ceiling['ceiling_streams_per_core']} streams per core doing nothing else"
    )
    print(f"written: {path}")


if __name__ == "__main__":
    main()
