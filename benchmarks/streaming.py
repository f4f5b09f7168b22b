"""One live stream: real-time factor by chunk size, next to openWakeWord's streaming loop.

    python -m benchmarks.streaming [--repeat 5] [--oww-python PATH]

A 120-second clip (recordings of audio/dev back to back, the wake word and other speech in
turn) through one detector on one thread, fed in chunks of 20, 100 and 1000 ms as a microphone
would, and whole: the best of ``--repeat`` passes each,
and whether every chunking gives the whole file's detections. Then the same clip through
openWakeWord 0.4.0 (one ONNX model, 80 ms chunks, one thread) run by ``--oww-python`` (a
Python with ``openwakeword==0.4.0`` and ``onnxruntime``; default: ``$EDGE_AGENT_OWW_PYTHON``,
or ``--make-oww-venv`` creates one under ~/.cache/edge-agent), alternating with ours, so that
the ratio of the two comes from one run on one machine. Times are CPU time of the process
(one thread each): on a shared machine, other work inflates wall-clock time far more.

Results: benchmarks/results/streaming.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

from benchmarks.common import dev_audio, machine, model_dir, write_result  # noqa: E402
from edge_agent.audio.wav import read_wav, to_mono_16k  # noqa: E402
from edge_agent.engine.model import KeywordSpec, KwsModel  # noqa: E402
from edge_agent.system import tune_allocator  # noqa: E402

CLIP_SECONDS = 120
CHUNKS_MS = (20, 100, 1000)
OWW_VENV = Path.home() / ".cache" / "edge-agent" / "oww-venv"
OWW_LOOP = Path(__file__).with_name("oww_loop.py")


def clip() -> np.ndarray:
    """Recordings of the wake word and of other speech, one of each in turn."""
    positives = sorted(dev_audio().glob("pos/*.wav"))
    negatives = sorted(dev_audio().glob("neg/*.wav"))
    files = [path for pair in zip(positives, negatives, strict=False) for path in pair]
    audio = np.concatenate([to_mono_16k(read_wav(path)) for path in files])
    return np.round(audio[: CLIP_SECONDS * 16000]).astype(np.int16)


def one_pass(
    model: KwsModel, audio: np.ndarray, chunk_ms: int
) -> tuple[float, list[tuple[float, float, float]]]:
    """Seconds for the clip in chunks of ``chunk_ms`` (0: whole), and its detections."""
    detector = model.detector([KeywordSpec("小云小云")])
    chunk = chunk_ms * 16
    started = time.process_time()
    if chunk:
        found = []
        for offset in range(0, audio.shape[0], chunk):
            found += detector.feed(audio[offset : offset + chunk])
        found += detector.finish()
    else:
        found = detector.finish(audio)
    seconds = time.process_time() - started
    return seconds, [(round(d.confidence, 4), round(d.start, 3), round(d.end, 3)) for d in found]


def make_oww_venv() -> Path:
    python = OWW_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OWW_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "openwakeword==0.4.0", "onnxruntime"], check=True
        )
    return python


def oww_seconds(python: str, raw: Path) -> float:
    result = subprocess.run(
        [python, str(OWW_LOOP), str(raw), "--repeat", "1"], capture_output=True, text=True, check=True
    )
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--oww-python", default=os.environ.get("EDGE_AGENT_OWW_PYTHON"))
    parser.add_argument("--make-oww-venv", action="store_true", help=f"create {OWW_VENV} if missing")
    args = parser.parse_args()
    tune_allocator()
    oww_python = str(make_oww_venv()) if args.make_oww_venv else args.oww_python
    if oww_python is None and (OWW_VENV / "bin" / "python").exists():  # "" leaves it out
        oww_python = str(OWW_VENV / "bin" / "python")
    model = KwsModel.load(model_dir())
    audio = clip()
    seconds = audio.shape[0] / 16000
    _, whole_detections = one_pass(model, audio, 0)
    times: dict[int, list[float]] = {ms: [] for ms in (0, *CHUNKS_MS)}
    same: dict[int, bool] = {}
    ratios: list[float] = []
    oww_times: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "clip.raw"
        audio.tofile(raw)
        for _ in range(args.repeat):
            for ms in (0, *CHUNKS_MS):
                elapsed, found = one_pass(model, audio, ms)
                times[ms].append(elapsed)
                same[ms] = same.get(ms, True) and found == whole_detections
            if oww_python:
                theirs = oww_seconds(oww_python, raw)
                oww_times.append(theirs)
                ratios.append(times[100][-1] / theirs)
    rows = {
        ("whole" if ms == 0 else f"{ms} ms"): {
            "rtf_best": round(min(values) / seconds, 6),
            "rtf_median": round(statistics.median(values) / seconds, 6),
            "same_detections_as_whole": same[ms],
        }
        for ms, values in times.items()
    }
    result: dict[str, object] = {
        "benchmark": "streaming",
        "machine": machine(),
        "clip_seconds": seconds,
        "repeat": args.repeat,
        "detections": len(whole_detections),
        "single_stream": rows,
    }
    if oww_times:
        result["openwakeword"] = {
            "version": "0.4.0",
            "chunk_ms": 80,
            "model": "hey_jarvis_v0.1.onnx",
            "rtf_best": round(min(oww_times) / seconds, 6),
            "rtf_median": round(statistics.median(oww_times) / seconds, 6),
            "ours_100ms_over_theirs_median": round(statistics.median(ratios), 4),
            "rounds": [round(r, 4) for r in ratios],
        }
    path = write_result("streaming", result)
    print(f"{'chunks':>8}  {'RTF best':>9}  {'median':>9}  same as whole")
    for name, row in rows.items():
        print(f"{name:>8}  {row['rtf_best']:>9}  {row['rtf_median']:>9}  {row['same_detections_as_whole']}")
    if oww_times:
        oww = result["openwakeword"]
        print(
            f"openWakeWord 0.4.0, 80 ms: RTF {oww['rtf_best']} (median {oww['rtf_median']}); "  # type: ignore[index]
            f"ours at 100 ms / theirs: {oww['ours_100ms_over_theirs_median']}"  # type: ignore[index]
        )
    else:
        print("openWakeWord: skipped (--oww-python, $EDGE_AGENT_OWW_PYTHON or --make-oww-venv)")
    print(path)


if __name__ == "__main__":
    main()
