"""`edge-agent detect` with unrounded output, to compare machines (scripts/test-arm.sh).

Takes the same arguments as `edge-agent detect` and runs the same steps (the CLI's own parser,
settings, model, keywords and `detect_file`), but prints each detection's confidence, start and
end as Python floats (repr, every digit) with the network frames of its characters' peaks:
`edge-agent detect` rounds the confidence to 4 decimals, which can hide a difference or turn one
in the last bit into a different last digit.

    python scripts/detect_exact.py --keywords 小云小云 --chunk-ms 100 a.wav b.wav
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edge_agent.cli.common import compile_keywords, load_settings, open_model
from edge_agent.cli.detect import detect_file
from edge_agent.cli.main import build_parser
from edge_agent.engine.features import SAMPLE_RATE_HZ
from edge_agent.keywords import decoder_settings_from


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(["detect", *argv])
    config = load_settings(args)
    model = open_model(config)
    keywords = compile_keywords(model, config)
    settings = decoder_settings_from(config)
    chunk_samples = int(round(args.chunk_ms * SAMPLE_RATE_HZ / 1000)) if args.chunk_ms > 0 else 0
    failed = False
    for name in args.files:
        result = detect_file(model, keywords, Path(name), settings, chunk_samples)
        failed |= result.error is not None
        row: dict[str, object] = {"file": name, "error": result.error}
        row["detections"] = [
            {
                "keyword": d.keyword,
                "confidence": d.confidence,
                "start": d.start,
                "end": d.end,
                "peak_frames": list(d.peak_frames),
            }
            for d in result.detections
        ]
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
