"""The front-end's cost per call: one live stream's chunk, and one step of a batch of streams.

    python -m benchmarks.frontend [--rounds 9] [--against DIR] [--numpy-fft] [--shared]

CPU time (``time.process_time``, one thread) of the front-end alone, from samples to the
normalised network input frames, on the 120-second clip of ``benchmarks.streaming``:

* one stream (``FeatureStream.accept``) in chunks of 10, 20, 100 and 1000 ms: µs per chunk;
* 32, 256 and 1,024 streams fed in step (``features.accept_many``), 100 ms each, as the MQTT and
  Wyoming servers feed them: µs per step (a batch's frames outgrow a core's cache well before
  1,024 streams, which is why the front-end works through a batch in blocks).

The front-end's share of a live stream's engine time is its cost per call, not per sample: a
whole file costs a third as much per second of audio as 100 ms chunks.

``--against DIR``: the same front-end code of another checkout (``DIR/edge_agent/engine/
features.py``, e.g. the commit a change starts from) is loaded into this process and timed in
the same rounds, the two alternating in each round, so that a drift of a shared machine's
speed hits both alike; each row then gives the ratio of the medians (this / DIR).

``--numpy-fft``: this front-end with numpy's FFT instead of the default (scipy's, with the
``fast`` extra) is timed in the same rounds too; each row then gives ``numpy_fft_ratio_median``
(numpy's FFT / the default): what the scipy import an engine process pays for buys.

Results: benchmarks/results/frontend.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

from benchmarks.common import machine, model_dir, write_result  # noqa: E402
from benchmarks.streaming import clip  # noqa: E402
from edge_agent.engine import features  # noqa: E402
from edge_agent.engine.model import KwsModel  # noqa: E402
from edge_agent.system import tune_allocator  # noqa: E402

SINGLE_CHUNKS_MS = (10, 20, 100, 1000)
BATCH_STREAMS = (32, 256, 1024)
BATCH_CHUNK_MS = 100
SINGLE_SECONDS = 120  # the whole clip, per round
BATCH_STEPS = {32: 300, 256: 60, 1024: 15}


def front_end_of(checkout: Path) -> ModuleType:
    """``edge_agent/engine/features.py`` of another checkout, as a module of its own."""
    path = checkout / "edge_agent" / "engine" / "features.py"
    if not path.is_file():
        raise SystemExit(f"no front-end at {path}")
    spec = importlib.util.spec_from_file_location("benchmarked_features", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def commit_of(checkout: Path) -> str:
    """The commit a checkout is at (short), or "" when git cannot say."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def single_stream(
    module: ModuleType, cmvn: object, audio: np.ndarray, chunk_ms: int, fft: str | None = None
) -> float:
    """µs of CPU per chunk of one stream (``fft``: the FFT library; None: the default)."""
    chunk = chunk_ms * 16
    count = SINGLE_SECONDS * 1000 // chunk_ms
    stream = module.FeatureStream(cmvn, module.KaldiFbank(fft))
    started = time.process_time()
    for index in range(count):
        stream.accept(audio[index * chunk : (index + 1) * chunk])
    return (time.process_time() - started) / count * 1e6


def batch(module: ModuleType, cmvn: object, audio: np.ndarray, streams: int, fft: str | None = None) -> float:
    """µs of CPU per step of ``streams`` streams fed 100 ms each, at spread places of the clip."""
    chunk = BATCH_CHUNK_MS * 16
    steps = BATCH_STEPS[streams]
    fbank = module.KaldiFbank(fft)
    states = [module.FeatureStream(cmvn, fbank) for _ in range(streams)]
    span = audio.shape[0] - (steps + 3) * chunk
    offsets = [(index * 7919 * chunk) % span for index in range(streams)]

    def step(index: int) -> None:
        module.accept_many(states, [audio[o + index * chunk : o + (index + 1) * chunk] for o in offsets])

    for index in range(3):  # past each stream's first frames, as a live batch is
        step(index)
    started = time.process_time()
    for index in range(3, 3 + steps):
        step(index)
    return (time.process_time() - started) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--against", type=Path, help="another checkout whose front-end to time alongside")
    parser.add_argument("--numpy-fft", action="store_true", help="also time this front-end with numpy's FFT")
    parser.add_argument("--shared", action="store_true", help="record that other work shared the machine")
    args = parser.parse_args()
    tune_allocator()
    model = KwsModel.load(model_dir())
    audio = clip()
    modules = {"this": features}
    ffts: dict[str, str | None] = {"this": None}
    if args.against is not None:
        modules["against"] = front_end_of(args.against.resolve())
        ffts["against"] = None
    if args.numpy_fft:
        modules["numpy_fft"] = features
        ffts["numpy_fft"] = "numpy"
    cmvns = {name: module.Cmvn(model.cmvn.shift, model.cmvn.scale) for name, module in modules.items()}
    cases = [(f"1 stream, {ms} ms", "single", ms) for ms in SINGLE_CHUNKS_MS]
    cases += [(f"{n} streams, {BATCH_CHUNK_MS} ms", "batch", n) for n in BATCH_STREAMS]
    times: dict[str, dict[str, list[float]]] = {
        label: {name: [] for name in modules} for label, _, _ in cases
    }
    for round_index in range(args.rounds):
        names = list(modules) if round_index % 2 == 0 else list(reversed(modules))
        for label, kind, size in cases:
            for name in names:
                run = single_stream if kind == "single" else batch
                times[label][name].append(run(modules[name], cmvns[name], audio, size, ffts[name]))
    rows = {}
    for label, _, _ in cases:
        row: dict[str, object] = {"unit": "us per chunk" if "1 stream" in label else "us per step"}
        for name in modules:
            row[f"{name}_median_us"] = round(statistics.median(times[label][name]), 1)
            row[f"{name}_best_us"] = round(min(times[label][name]), 1)
        if "against" in modules:
            row["ratio_median"] = round(
                statistics.median(times[label]["this"]) / statistics.median(times[label]["against"]), 3
            )
        if "numpy_fft" in modules:
            row["numpy_fft_ratio_median"] = round(
                statistics.median(times[label]["numpy_fft"]) / statistics.median(times[label]["this"]), 3
            )
        rows[label] = row
    result = {
        "machine": machine(),
        "rounds": args.rounds,
        "clock": "process CPU time, one thread",
        "shared_machine": args.shared,
        "against": str(args.against) if args.against else None,
        "against_commit": commit_of(args.against) if args.against else None,
        "fft": features.default_fft(),
        "front_end": rows,
    }
    path = write_result("frontend", result)
    header = f"{'':>20}  {'median µs':>10}  {'best µs':>9}"
    if "against" in modules:
        header += f"  {'against median':>14}  {'ratio':>6}"
    if "numpy_fft" in modules:
        header += f"  {'numpy FFT median':>16}  {'ratio':>6}"
    print(header)
    for label, row in rows.items():
        line = f"{label:>20}  {row['this_median_us']:>10}  {row['this_best_us']:>9}"
        if "against" in modules:
            line += f"  {row['against_median_us']:>14}  {row['ratio_median']:>6}"
        if "numpy_fft" in modules:
            line += f"  {row['numpy_fft_median_us']:>16}  {row['numpy_fft_ratio_median']:>6}"
        print(line)
    print(path)


if __name__ == "__main__":
    main()
