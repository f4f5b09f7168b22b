"""Where one engine process's time goes in the steps around a keyword that every stream says.

    python -m benchmarks.lockstep_steps [--streams 256] [--seconds 40]

The audio of ``benchmarks.throughput``'s lockstep row (the positive recordings back to back,
every stream from the same start, as ``benchmarks.mqtt_latency`` plays them: with two engine
processes at 512 streams, each runs 256 of them) goes through
:func:`edge_agent.engine.detector.feed_many` in 100 ms steps on one thread. Each step's CPU time
is split, by timing the engine's own public calls (each part's time without the parts it calls),
into:

* ``exact_output_ms``: the output layer on every column for the frames resolved exactly
  (:meth:`OutputLayer.posteriors` and :meth:`OutputLayer.posteriors_of`);
* ``search_ms``: the decoder's per-stream search (:class:`KeywordSearch`'s ``process``,
  ``frames_read``, ``runs_to_prime`` and ``on_track_start``, one stream at a time);
* ``other_ms``: the rest (front-end, network, the filter over every stream at once).

Reported: every step that took more than twice the median or in which streams fired, with its
exact rows per stream and the delay its detections had (each step starting once its chunk is in
and the step before is done, as in the throughput benchmark's lockstep row), and the parts'
totals over those steps. This is what decides how long after the keyword's end a burst of
detections leaves the engine. Results: benchmarks/results/lockstep_steps.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

from benchmarks.common import machine, model_dir, positives_back_to_back, write_result  # noqa: E402
from benchmarks.throughput import CHUNK, LOCKSTEP_SECONDS  # noqa: E402
from edge_agent.engine.decoder.search import KeywordSearch  # noqa: E402
from edge_agent.engine.detector import feed_many  # noqa: E402
from edge_agent.engine.model import KeywordSpec, KwsModel  # noqa: E402
from edge_agent.engine.network import OutputLayer  # noqa: E402

PARTS: dict[str, list[tuple[type, str]]] = {
    "exact_output_ms": [(OutputLayer, "posteriors"), (OutputLayer, "posteriors_of")],
    "search_ms": [
        (KeywordSearch, "process"),
        (KeywordSearch, "frames_read"),
        (KeywordSearch, "runs_to_prime"),
        (KeywordSearch, "on_track_start"),
    ],
}


class PartClock:
    """CPU time spent in the timed calls, per part, each without the timed calls it makes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self._nested: list[float] = []  # per open call: the time of the timed calls inside it

    def timed(self, part: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            self._nested.append(0.0)
            try:
                return call(*args, **kwargs)
            finally:
                inside = self._nested.pop()
                elapsed = time.process_time() - started
                self.seconds[part] += elapsed - inside
                if self._nested:
                    self._nested[-1] += elapsed

        return wrapper

    def reset(self) -> dict[str, float]:
        """The parts' times since the last reset (ms), and zero them."""
        taken = {part: round(seconds * 1000, 1) for part, seconds in self.seconds.items()}
        self.seconds = dict.fromkeys(PARTS, 0.0)
        return taken


@contextlib.contextmanager
def timing_parts(clock: PartClock) -> Iterator[None]:
    """The engine's methods of :data:`PARTS` timed by ``clock`` (restored on leaving)."""
    originals = [(owner, name, getattr(owner, name)) for methods in PARTS.values() for owner, name in methods]
    for part, methods in PARTS.items():
        for owner, name in methods:
            setattr(owner, name, clock.timed(part, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def lockstep_steps(model: KwsModel, streams: int, seconds: float) -> dict[str, Any]:
    audio, _ = positives_back_to_back()
    audio = audio[: int(seconds * 16000)]
    detectors = [model.detector([KeywordSpec("小云小云")]) for _ in range(streams)]
    output = model.network.output
    clock = PartClock()
    steps = []
    finished = 0.0
    with timing_parts(clock):
        for index, start in enumerate(range(0, audio.shape[0] - CHUNK + 1, CHUNK)):
            rows_before = output.rows_exact
            clock.reset()
            started = time.process_time()
            found = feed_many(detectors, [audio[start : start + CHUNK]] * streams)
            spent = time.process_time() - started
            parts = clock.reset()
            arrived = (start + CHUNK) / 16000
            finished = max(arrived, finished) + spent
            ends = [detection.end for detections in found for detection in detections]
            total_ms = round(spent * 1000, 1)
            steps.append(
                {
                    "step": index,
                    "cpu_ms": total_ms,
                    **parts,
                    "other_ms": round(total_ms - sum(parts.values()), 1),
                    "exact_rows_per_stream": round((output.rows_exact - rows_before) / streams, 1),
                    "detections": len(ends),
                    "delay_ms_max": round(1000 * (finished - min(ends)), 1) if ends else None,
                }
            )
    median = float(np.median([step["cpu_ms"] for step in steps]))
    shown = [step for step in steps if step["cpu_ms"] > 2 * median or step["detections"]]
    totals = {key: round(sum(step[key] for step in shown), 1) for key in ("cpu_ms", *PARTS, "other_ms")}
    return {"streams": streams, "median_step_ms": round(median, 1), "steps": shown, "totals": totals}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=LOCKSTEP_SECONDS, help="audio per stream")
    args = parser.parse_args()
    model = KwsModel.load(model_dir(), backend="numpy", threads=1)
    result = lockstep_steps(model, args.streams, args.seconds)
    report = {"benchmark": "lockstep_steps", "machine": machine(), "seconds": args.seconds, **result}
    path = write_result("lockstep_steps", report)
    print(f"{args.streams} streams, median step {result['median_step_ms']} ms; heavy and firing steps:")
    columns = ("step", "CPU ms", "exact", "search", "other", "rows", "fired", "delay")
    print(" ".join(f"{name:>7}" for name in columns))
    for step in result["steps"]:
        delay = step["delay_ms_max"]
        cells = [step[key] for key in ("step", "cpu_ms", "exact_output_ms", "search_ms", "other_ms")]
        cells += [step["exact_rows_per_stream"], step["detections"], "" if delay is None else delay]
        print(" ".join(f"{cell:>7.0f}" if isinstance(cell, float) else f"{cell:>7}" for cell in cells))
    print("totals over those steps (ms):", result["totals"])
    print(f"written: {path}")


if __name__ == "__main__":
    main()
