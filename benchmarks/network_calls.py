"""What one call of the network costs: a live stream's chunk, and a batched step.

    python -m benchmarks.network_calls [--rounds 5] [--against PATH]

On one thread, in CPU time (``time.process_time``: on a shared machine, other work inflates
wall-clock time far more), the best of a few passes each:

* ``hidden``: ``NumpyNetwork.hidden`` per 100 ms chunk of one stream (3 or 4 frames), over a
  120-second clip (the recordings of audio/dev back to back, as ``benchmarks.streaming`` plays);
  ``hidden, 20 ms``: the same at 20 ms chunks (0 or 1 frame: the detector runs 1);
* ``bounds``: ``OutputLayer.bounds`` of each such chunk's rows for the wake word's columns;
* ``posteriors, N rows``: ``OutputLayer.posteriors`` (exact, the wake word's columns) of N rows;
* ``hidden_many, S streams``: one ``NumpyNetwork.hidden_many`` step for S streams of 100 ms
  chunks, fed in step (all 3 or all 4 frames) and with their phases spread (3 and 4 mixed).

With ``--against PATH`` (another checkout of the project, e.g. the branch point), every round
measures this checkout and that one in turn, each in a process of its own with its own
``edge_agent``, and the report gives each figure's ratio (this / that, best of the rounds).

Results: benchmarks/results/network_calls.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from edge_agent.engine.network import NumpyNetwork

CHUNK_SAMPLES = 1600  # 100 ms
STREAMS = (32, 256)
POSTERIOR_ROWS = (1, 3, 4, 6, 8, 40, 256)
PASSES = 3  # per figure and round: the best is kept


def best_microseconds(run: Callable[[], object], calls: int) -> float:
    """µs per call: ``run`` makes ``calls`` calls; the best of PASSES."""
    times = []
    for _ in range(PASSES):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return round(1e6 * min(times) / calls, 2)


def measure() -> dict[str, float]:
    """Every figure once, with whichever ``edge_agent`` this process imports."""
    from benchmarks.common import model_dir
    from benchmarks.streaming import clip
    from edge_agent.engine.features import FeatureStream, KaldiFbank, default_fft
    from edge_agent.engine.model import KeywordSpec, KwsModel
    from edge_agent.system import tune_allocator

    tune_allocator()
    model = KwsModel.load(model_dir(), backend="numpy", threads=1)
    network, output = model.network, model.network.output
    columns = model.detector([KeywordSpec("小云小云")])._decoder.columns
    audio = clip()
    figures: dict[str, float] = {}

    for name, chunk in (("hidden", CHUNK_SAMPLES), ("hidden, 20 ms", CHUNK_SAMPLES // 5)):
        stream = FeatureStream(model.cmvn, KaldiFbank(default_fft()))
        features = [stream.accept(audio[o : o + chunk]) for o in range(0, audio.shape[0], chunk)]
        features = [f for f in features if f.shape[0]]  # as the detector: no empty chunks

        def body(features: list[np.ndarray] = features) -> list[np.ndarray]:
            state = network.new_state()
            return [network.hidden(state, f) for f in features]

        rows = body()
        figures[f"{name} µs/call"] = best_microseconds(body, len(features))
        if name == "hidden":
            chunks = [r for r in rows if r.shape[0]]
            figures["bounds µs/call"] = best_microseconds(
                lambda chunks=chunks: [output.bounds(r, columns) for r in chunks], len(chunks)
            )
            every = np.concatenate(rows)

    for count in POSTERIOR_ROWS:
        blocks = [every[o : o + count] for o in range(0, min(every.shape[0], 64 * count), count)]
        figures[f"posteriors, {count} rows µs/call"] = best_microseconds(
            lambda blocks=blocks: [output.posteriors(b, columns) for b in blocks], len(blocks)
        )

    rng = np.random.default_rng(0)
    # 100 ms is 3 1/3 network frames: one chunk in three brings 4.
    frames = [rng.standard_normal((4 - min(k, 1), network.input_dim)).astype(np.float32) for k in range(3)]
    for streams in STREAMS:
        for layout, in_step in (("in step", True), ("spread", False)):
            key = f"hidden_many, {streams} streams {layout} µs/step"
            figures[key] = batch_step_microseconds(network, frames, streams, in_step)
    return figures


def batch_step_microseconds(
    network: NumpyNetwork, frames: list[np.ndarray], streams: int, in_step: bool
) -> float:
    """µs per ``hidden_many`` step of ``streams`` new streams, each bringing ``frames`` in turn
    (all the same at each step if ``in_step``)."""
    states = [network.new_state() for _ in range(streams)]
    calls = [0]

    def steps(count: int) -> None:
        for _ in range(count):
            call = calls[0]
            calls[0] += 1
            chunks = [frames[(call if in_step else call + i) % 3] for i in range(streams)]
            network.hidden_many(states, chunks)

    steps(6)  # past the first calls, while the layers' buffers fill up
    return best_microseconds(lambda: steps(12), 12)


def measure_in(checkout: Path) -> dict[str, float]:
    """:func:`measure` in a process importing ``checkout``'s ``edge_agent``."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure"],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        check=True,
        capture_output=True,
        text=True,
    )
    answer = json.loads(done.stdout)
    if Path(answer["edge_agent"]) != checkout / "edge_agent":
        raise SystemExit(f"{checkout}: measured {answer['edge_agent']} instead")
    return answer["figures"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, help="another checkout, measured in turn with this one")
    parser.add_argument(
        "--note", default="", help="what the figures should be read with (e.g. a shared machine)"
    )
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        import edge_agent

        print(json.dumps({"edge_agent": str(Path(edge_agent.__file__).parent), "figures": measure()}))
        return

    from benchmarks.common import REPO, machine, write_result

    checkouts = {"this": REPO} | ({"against": args.against.resolve()} if args.against else {})
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():  # in turn: a drift of the machine hits both
            rounds[name].append(measure_in(checkout))
    best = {name: {key: min(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    report: dict[str, object] = {
        "benchmark": "network_calls",
        "machine": machine(),
        "rounds": args.rounds,
        "note": args.note,
        "this": best["this"],
    }
    if args.against:
        report["against"] = {"checkout": str(args.against), "figures": best["against"]}
        report["ratio_this_over_against"] = {
            key: round(value / best["against"][key], 3) for key, value in best["this"].items()
        }
    path = write_result("network_calls", report)
    print(f"machine: {report['machine']['cpu']}; one thread; CPU time, best of {args.rounds} rounds")  # type: ignore[index]
    header = f"{'':44} {'this':>10}" + (f" {'against':>10} {'ratio':>7}" if args.against else "")
    print(header)
    for key, value in best["this"].items():
        line = f"{key:44} {value:10.1f}"
        if args.against:
            line += f" {best['against'][key]:10.1f} {value / best['against'][key]:7.3f}"
        print(line)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
