"""Engine benchmark: single-stream real-time factor, start-up time and peak RSS, per backend.

    python -m benchmarks.engine [--repeat 3]

For each backend (numpy, torch):

* **RTF, whole files**: engine time (features + network + decoder) over all of audio/dev,
  divided by its duration, on one thread (OPENBLAS/OMP/MKL threads and torch threads = 1);
  best of ``--repeat`` passes, so a busy neighbour does not inflate the figure.
* **RTF, streaming**: the same audio fed in 100 ms chunks, as the agent feeds a microphone.
* **Decision delay**: each recording of the wake word fed in 100 ms chunks (then 1 s of
  silence); for every detection, the end of the chunk that produced it minus the keyword's
  ``end``: the model's look-ahead, the chunking and, for a weak match that a later one could
  still beat by the settle ratio, the decoder's wait (until ``engine.pause`` passes with
  nothing said, ``engine.hold`` at most). The part of the MQTT delay that no speed-up removes.
  The same in the staggered MQTT run's 25 continuous streams (:func:`continuous_streams`),
  without the network (``decision_delay_continuous``). Then each of the three settings of that
  wait at other values (``hold_trade_off``, ``pause_trade_off``, ``settle_trade_off``): the
  delay they save and the recordings (streams) whose detections they change.
* **`edge-agent detect` over audio/dev** as a subprocess: wall time, start-up time (the same
  command on one 1-second file), and peak RSS (the child's ru_maxrss), plus whether torch
  was imported (it must not be, with numpy).

The same audio through the plain reference (``benchmarks/reference.py``: whole recordings,
numpy float32, the full output layer on every frame), one reference pass before each of our
whole-file passes, and each backend's speed as the median of the per-round ratios: the figure
that holds on a noisy machine.

Results go to benchmarks/results/engine.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    dev_audio,
    machine,
    model_dir,
    played_stream,
    positives_back_to_back,
    stream_offsets,
    write_result,
)
from benchmarks.reference import PlainReference  # noqa: E402
from edge_agent.audio.wav import encode_wav, read_wav, to_mono_16k  # noqa: E402
from edge_agent.engine.model import (  # noqa: E402
    DEFAULT_HOLD_SECONDS,
    DEFAULT_PAUSE_SECONDS,
    DEFAULT_SETTLE_RATIO,
    DecoderSettings,
    KeywordSpec,
    KwsModel,
)
from edge_agent.system import tune_allocator  # noqa: E402

CHUNK_SAMPLES = 1600  # 100 ms
# A decision delay beyond the look-ahead (285 ms) and one chunk: the decoder waited for a
# better match (up to engine.hold).
HELD_MS = 400.0


def load_recordings() -> list[np.ndarray]:
    files = sorted(dev_audio().glob("*/*.wav"))
    return [to_mono_16k(read_wav(path)) for path in files]


def engine_pass(model: KwsModel, recordings: list[np.ndarray], chunk: int) -> float:
    """Seconds for one pass over the recordings, whole (``chunk`` 0) or in chunks."""
    started = time.perf_counter()
    detector = model.detector([KeywordSpec("小云小云")])  # finish() leaves it ready for the next
    for samples in recordings:
        if chunk:
            for offset in range(0, samples.shape[0], chunk):
                detector.feed(samples[offset : offset + chunk])
            detector.finish()
        else:
            detector.finish(samples)
    return time.perf_counter() - started


def decision_delays(
    model: KwsModel, positives: list[np.ndarray], settings: DecoderSettings | None = None
) -> list[dict[str, float]]:
    """Per detection in the recordings of the wake word, fed as a live stream: how long after
    the keyword's end the detection came out, in ms, with its confidence and timing (and which
    recording it came from)."""
    found = []
    silence = np.zeros(16000, dtype=np.float32)
    for index, samples in enumerate(positives):
        detector = model.detector([KeywordSpec("小云小云")], settings)
        audio = np.concatenate([samples, silence])
        for offset in range(0, audio.shape[0], CHUNK_SAMPLES):
            chunk_end = min(offset + CHUNK_SAMPLES, audio.shape[0]) / 16000
            for detection in detector.feed(audio[offset : offset + CHUNK_SAMPLES]):
                found.append(
                    {
                        "recording": index,
                        "delay_ms": round((chunk_end - detection.end) * 1000, 1),
                        "confidence": round(detection.confidence, 3),
                        "start": round(detection.start, 2),
                        "end": round(detection.end, 2),
                    }
                )
    return found


def continuous_streams(streams: int = 25, seconds: float = 40.0) -> list[np.ndarray]:
    """The staggered MQTT run's streams (``benchmarks.mqtt_latency --stagger``): the recordings
    of the wake word back to back, stream k starting at recording k, ``seconds`` of each. In a
    continuous stream a recording is framed at another phase, after other audio, so its scores
    differ a little from those of the file alone."""
    audio, starts = positives_back_to_back()
    played = int(seconds * 16000)
    return [played_stream(audio, offset, played) for offset in stream_offsets(streams, starts, stagger=True)]


def policy_trade_off(
    model: KwsModel, streams: list[np.ndarray], setting: str, values: tuple[float, ...]
) -> list[dict[str, object]]:
    """The decoder setting ``setting`` (a DecoderSettings field) at each of ``values``, the
    others at their defaults: the decision delay, and the recordings (streams) whose detections
    differ from those at the first value (an earlier, weaker match reported instead of the
    keyword, or more than one detection), with how much more confident than each such match the
    keyword it overlaps was."""

    def keyed(found: list[dict[str, float]]) -> dict[int, list[tuple[float, float, float]]]:
        by_recording: dict[int, list[tuple[float, float, float]]] = {}
        for f in found:
            by_recording.setdefault(int(f["recording"]), []).append((f["start"], f["end"], f["confidence"]))
        return by_recording

    rows = []
    reference: dict[int, list[tuple[float, float, float]]] = {}
    for index, value in enumerate(values):
        found = decision_delays(model, streams, replace(DecoderSettings(), **{setting: value}))
        now = keyed(found)
        if index == 0:
            reference = now
        changed = [i for i in range(len(streams)) if now.get(i, []) != reference.get(i, [])]
        delays = [f["delay_ms"] for f in found]
        # Each detection reported instead: how much more confident the keyword it overlaps was.
        ratios = []
        for i in changed:
            for start, end, confidence in now.get(i, []):
                overlapped = [c for s, e, c in reference.get(i, []) if s < end and start < e]
                if overlapped and (start, end, confidence) not in reference[i]:
                    ratios.append(max(overlapped) / confidence)
        rows.append(
            {
                setting: value,
                "detections": len(found),
                "ms_p95": round(float(np.percentile(delays, 95)), 1) if delays else None,
                "ms_max": max(delays) if delays else None,
                "held_for_a_better_match": sum(1 for d in delays if d > HELD_MS),
                "recordings_changed": len(changed),
                "keyword_vs_early_match_min": round(min(ratios), 2) if ratios else None,
            }
        )
    return rows


def hold_trade_off(model: KwsModel, positives: list[np.ndarray]) -> list[dict[str, object]]:
    """``engine.hold`` shorter than its default: the decision delay it saves, and the recordings
    whose detections change: what the wait buys."""
    return policy_trade_off(model, positives, "hold_seconds", (DEFAULT_HOLD_SECONDS, 0.3, 0.2, 0.1))


def settle_trade_off(model: KwsModel, streams: list[np.ndarray]) -> list[dict[str, object]]:
    """The settle ratio (how much more confident a later match must be able to get for a weak
    detection to wait for it): 2, the most cautious tried, then the default and wider ones: the
    detections that wait, and the streams whose detections change from those at 2."""
    return policy_trade_off(model, streams, "settle_ratio", (2.0, DEFAULT_SETTLE_RATIO, 3.0, 4.0))


# A pause longer than any keyword's window and hold: the rule never ends a wait (no pause rule).
NO_PAUSE_SECONDS = 10.0


def pause_trade_off(model: KwsModel, streams: list[np.ndarray]) -> list[dict[str, object]]:
    """``engine.pause``: none (a weak match waits the whole hold, as before the pause rule),
    the default and shorter ones: the delay the pause saves, and the streams whose detections
    change from those of the whole hold (none at the default)."""
    return policy_trade_off(
        model, streams, "pause_seconds", (NO_PAUSE_SECONDS, DEFAULT_PAUSE_SECONDS, 0.3, 0.27, 0.24)
    )


def engine_rtf(model: KwsModel, recordings: list[np.ndarray], chunk: int, repeat: int) -> float:
    audio_seconds = sum(r.shape[0] for r in recordings) / 16000
    return min(engine_pass(model, recordings, chunk) for _ in range(repeat)) / audio_seconds


def output_layer_share(model: KwsModel, recordings: list[np.ndarray]) -> float:
    """Share of the frames on which the output layer ran exactly (the rest got bounds)."""
    output = model.network.output
    output.rows_bounded = output.rows_exact = 0
    engine_pass(model, recordings, 0)
    return output.rows_exact / max(1, output.rows_bounded)


def paired_with_reference(
    model: KwsModel, reference: PlainReference, recordings: list[np.ndarray], repeat: int
) -> tuple[float, float, float]:
    """Whole-file passes alternating with reference passes: (our best RTF, the reference's best
    RTF, the median of the per-round speed ratios). Pairing each of our passes with a reference
    pass right before it keeps the ratio honest while the machine's speed drifts."""
    audio_seconds = sum(r.shape[0] for r in recordings) / 16000
    ours, theirs = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        for samples in recordings:
            reference.score(samples)
        theirs.append(time.perf_counter() - started)
        ours.append(engine_pass(model, recordings, 0))
    ratios = sorted(t / o for t, o in zip(theirs, ours, strict=True))
    return min(ours) / audio_seconds, min(theirs) / audio_seconds, ratios[len(ratios) // 2]


def cli_run(backend: str, files: list[str]) -> dict[str, float | bool]:
    """Run `edge-agent detect` in a fresh process; wall time, peak RSS, torch imported?"""
    probe = (
        "import runpy, sys, resource\n"
        "sys.argv = ['edge-agent'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('edge_agent', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules))\n"
        "sys.stderr.write('MAXRSS_KB=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "detect",
            "--model-dir",
            str(model_dir()),
            *(["--int8"] if backend.endswith("-int8") else ["--backend", backend]),
            *files,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - started
    peak_kb = int(result.stderr.split("MAXRSS_KB=")[1].split()[0])
    return {
        "seconds": elapsed,
        "peak_rss_mb": peak_kb / 1024,
        "torch_imported": "TORCH=True" in result.stderr,
        "files": len(result.stdout.splitlines()),
    }


def summarise_delays(found: list[dict[str, float]]) -> dict[str, object]:
    delays = sorted(f["delay_ms"] for f in found)
    return {
        "detections": len(found),
        "ms_p50": round(float(np.percentile(delays, 50)), 1) if delays else None,
        "ms_p95": round(float(np.percentile(delays, 95)), 1) if delays else None,
        "ms_max": max(delays) if delays else None,
        "held_for_a_better_match": sum(1 for f in found if f["delay_ms"] > HELD_MS),
        "each": found,
    }


def print_trade_off(rows: list[dict[str, object]], setting: str) -> None:
    for row in rows:
        print(
            f"  {row[setting]:4.2f} {row['detections']:5d} {row['ms_p95']:8} {row['ms_max']:8}"
            f" held {row['held_for_a_better_match']:3d} {row['recordings_changed']:4d}"
            f" {row['keyword_vs_early_match_min']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backends", default="numpy,torch,torch-int8")
    args = parser.parse_args()
    tune_allocator()
    recordings = load_recordings()
    audio_seconds = sum(r.shape[0] for r in recordings) / 16000
    files = [str(p) for p in sorted(dev_audio().glob("*/*.wav"))]
    kinds = [Path(f).parent.name for f in files]  # pos: the wake word is spoken; neg: it is not
    numpy_model = KwsModel.load(model_dir(), backend="numpy", threads=1)
    keyword_tokens = [t for group in numpy_model.lexicon.spell("小云小云") for t in group]
    reference = PlainReference(model_dir(), keyword_tokens)
    reference_best = float("inf")
    with tempfile.TemporaryDirectory() as folder:
        one_second = Path(folder) / "one-second.wav"
        one_second.write_bytes(encode_wav(np.zeros(16000)))
        results = {}
        for backend in args.backends.split(","):
            quantize = backend.endswith("-int8")
            model = KwsModel.load(
                model_dir(), backend=backend.removesuffix("-int8"), threads=1, quantize=quantize
            )
            whole_file, reference_rtf, ratio = paired_with_reference(
                model, reference, recordings, args.repeat
            )
            reference_best = min(reference_best, reference_rtf)
            results[backend] = {
                "rtf_whole_file": whole_file,
                "speedup_vs_reference": round(ratio, 2),
                "rtf_streaming_100ms": engine_rtf(model, recordings, CHUNK_SAMPLES, args.repeat),
                "startup_seconds": min(
                    cli_run(backend, [str(one_second)])["seconds"] for _ in range(args.repeat)
                ),
                "detect_all": cli_run(backend, files),
                "decision_delay": summarise_delays(
                    decision_delays(model, [r for r, k in zip(recordings, kinds, strict=True) if k == "pos"])
                ),
                "output_layer_share": {
                    "all": round(output_layer_share(model, recordings), 4),
                    **{
                        kind: round(
                            output_layer_share(
                                model, [r for r, k in zip(recordings, kinds, strict=True) if k == kind]
                            ),
                            4,
                        )
                        for kind in ("pos", "neg")
                    },
                },
            }
    positives = [r for r, k in zip(recordings, kinds, strict=True) if k == "pos"]
    trade_off = hold_trade_off(numpy_model, positives)
    streams = continuous_streams()
    pause = {
        "recordings": pause_trade_off(numpy_model, positives),
        "continuous": pause_trade_off(numpy_model, streams),
    }
    settle = {
        "recordings": settle_trade_off(numpy_model, positives),
        "continuous": settle_trade_off(numpy_model, streams),
    }
    continuous = summarise_delays(decision_delays(numpy_model, streams))
    report = {
        "benchmark": "engine",
        "machine": machine(),
        "audio_seconds": round(audio_seconds, 1),
        "files": len(files),
        "reference": {
            "what": "plain numpy float32, whole recordings, full output layer (benchmarks/reference.py)",
            "rtf": reference_best,
            "ratio": "median over rounds of (reference pass time / our pass time), passes alternating",
        },
        "results": results,
        "hold_trade_off": trade_off,
        "pause_trade_off": pause,
        "settle_trade_off": settle,
        "decision_delay_continuous": {
            "what": "numpy; 25 streams of 40 s, the recordings of the wake word back to back, "
            "stream k starting at recording k (benchmarks.mqtt_latency --stagger without the network)",
            **continuous,
        },
    }
    path = write_result("engine", report)
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; one thread per process")
    print(f"audio: {len(files)} files, {audio_seconds:.1f} s (audio/dev)")
    print(f"plain reference (benchmarks/reference.py), whole files: RTF {reference_best:.5f}")
    print(
        f"{'backend':10} {'RTF whole':>10} {'vs ref':>7} {'RTF 100ms':>10} {'start-up s':>10} {'detect s':>9}"
        f" {'peak RSS MB':>11} torch?"
    )
    for backend, r in results.items():
        run = r["detect_all"]
        print(
            f"{backend:10} {r['rtf_whole_file']:10.5f} {r['speedup_vs_reference']:6.2f}x"
            f" {r['rtf_streaming_100ms']:10.5f}"
            f" {r['startup_seconds']:10.2f}"
            f" {run['seconds']:9.2f} {run['peak_rss_mb']:11.1f} {run['torch_imported']}"
        )
    for backend, r in results.items():
        share, delay = r["output_layer_share"], r["decision_delay"]
        print(
            f"{backend}: output layer on {share['all']:.1%} of the frames"
            f" ({share['pos']:.1%} in the {kinds.count('pos')} recordings of the wake word,"
            f" {share['neg']:.1%} in the {kinds.count('neg')} without it); decision delay in 100 ms"
            f" chunks, {delay['detections']} detections of the wake word: p50 {delay['ms_p50']} ms,"
            f" p95 {delay['ms_p95']} ms, max {delay['ms_max']} ms"
            f" ({delay['held_for_a_better_match']} held for a better match, up to engine.hold)"
        )
    print(
        "engine.hold (numpy): s, detections of the 25, decision delay p95 / max ms, recordings changed,"
        " least confidence ratio keyword / early match"
    )
    print_trade_off(trade_off, "hold_seconds")
    for what, rows in pause.items():
        print(
            f"engine.pause (numpy), {what} ({NO_PAUSE_SECONDS:.0f} s: no pause rule): s, detections,"
            " decision delay p95 / max ms, recordings changed, least confidence ratio keyword / early match"
        )
        print_trade_off(rows, "pause_seconds")
    for what, rows in settle.items():
        print(
            f"settle ratio (numpy), {what}: ratio, detections, decision delay p95 / max ms,"
            " recordings changed from 2, least confidence ratio keyword / early match"
        )
        print_trade_off(rows, "settle_ratio")
    print(
        f"decision delay in 25 continuous streams (numpy), {continuous['detections']} detections:"
        f" p50 {continuous['ms_p50']} ms, p95 {continuous['ms_p95']} ms, max {continuous['ms_max']} ms"
        f" ({continuous['held_for_a_better_match']} held for a better match)"
    )
    print(f"written: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    print(json.dumps({b: round(r["rtf_whole_file"], 6) for b, r in results.items()}))


if __name__ == "__main__":
    main()
