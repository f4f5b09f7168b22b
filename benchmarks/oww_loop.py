"""openWakeWord's streaming loop on a clip, for ``benchmarks.streaming``: run by the Python that
has ``openwakeword==0.4.0`` and onnxruntime (its own venv; this file imports nothing of ours).

    python benchmarks/oww_loop.py CLIP.raw [--repeat N]

CLIP.raw: 16 kHz mono int16. Prints one JSON object: the best CPU seconds over ``--repeat`` passes
of the whole clip in 80 ms chunks (1280 samples, what openWakeWord expects) through one model
(hey_jarvis) on one thread (openWakeWord's sessions are single-threaded).
"""

from __future__ import annotations

import argparse
import json
import os
import time

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402

CHUNK = 1280


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("clip")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import openwakeword
    from openwakeword.model import Model

    models = os.path.join(os.path.dirname(openwakeword.__file__), "resources", "models")
    audio = np.fromfile(args.clip, dtype=np.int16)
    best = float("inf")
    for _ in range(args.repeat):
        model = Model(wakeword_model_paths=[os.path.join(models, "hey_jarvis_v0.1.onnx")])
        started = time.process_time()
        for offset in range(0, audio.shape[0] - CHUNK + 1, CHUNK):
            model.predict(audio[offset : offset + CHUNK])
        best = min(best, time.process_time() - started)
    print(json.dumps({"seconds": best}))


if __name__ == "__main__":
    main()
