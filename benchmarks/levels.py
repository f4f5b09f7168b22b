"""What measuring keyword levels costs a stream, next to what the engine costs it.

    python -m benchmarks.levels [--seconds 60] [--repeat 5]

A dev recording's audio, looped to ``--seconds``, is fed in 100 ms chunks to
:class:`~edge_agent.audio.levels.EnergyHistory` (what every live stream does with its audio
since detections carry ``level_dbfs``) and to a numpy detector (the engine's work for the same
chunks), one after the other in the same run; the best of ``--repeat`` each. Also: one
``keyword_level`` call (once per detection) and the history's memory per stream.
Results: benchmarks/results/levels.json.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from benchmarks.common import dev_audio, machine, model_dir, write_result
from edge_agent.audio.levels import EnergyHistory
from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.model import KeywordSpec, KwsModel

CHUNK = 1600  # 100 ms at 16 kHz


def best_of(repeat: int, run: Any) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    recording = to_mono_16k(read_wav(sorted(dev_audio().glob("pos/*.wav"))[0])).astype(np.float32)
    audio = np.resize(recording, int(args.seconds * 16000))
    chunks = [audio[i : i + CHUNK] for i in range(0, audio.shape[0], CHUNK)]
    model = KwsModel.load(model_dir(), backend="numpy")

    def levels() -> None:
        history = EnergyHistory()
        for chunk in chunks:
            history.push(chunk)

    def engine() -> None:
        detector = model.detector([KeywordSpec("小云小云")])
        for chunk in chunks:
            detector.feed(chunk)

    level_s = best_of(args.repeat, levels)
    engine_s = best_of(args.repeat, engine)
    history = EnergyHistory()
    history.push(audio)
    end = args.seconds - 1.0
    lookup_s = best_of(args.repeat * 20, lambda: history.keyword_level(end - 0.7, end))
    result = {
        "machine": machine(),
        "load_average": round(os.getloadavg()[0], 1),  # a shared machine: ratios, not times, carry
        "audio_seconds": args.seconds,
        "chunk_ms": 100,
        "levels_us_per_chunk": round(level_s / len(chunks) * 1e6, 2),
        "engine_us_per_chunk": round(engine_s / len(chunks) * 1e6, 1),
        "levels_over_engine": round(level_s / engine_s, 5),
        "keyword_level_us": round(lookup_s * 1e6, 1),
        "history_bytes_per_stream": history.nbytes,
    }
    share = result["levels_over_engine"] * 100
    print(
        f"levels {result['levels_us_per_chunk']} us per 100 ms chunk, "
        f"engine {result['engine_us_per_chunk']} us ({share:.2f}%); "
        f"keyword_level {result['keyword_level_us']} us; {history.nbytes} bytes per stream"
    )
    print(f"results: {write_result('levels', result)}")


if __name__ == "__main__":
    main()
