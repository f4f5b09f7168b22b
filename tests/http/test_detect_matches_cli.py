"""POST /detect gives exactly what `edge-agent detect` prints, on every development recording.

One `edge-agent detect` subprocess per setting with all 58 files (the CLI a user runs, with the
model from EDGE_AGENT_MODEL_DIR and the default configuration), and one upload per file to an
`edge-agent serve` subprocess started the same way. Both are processes of the real entry point
on purpose: it pins OpenBLAS to one thread, and a multi-threaded BLAS (as in the pytest process)
sums in another order, which moves a confidence in its fourth decimal now and then.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.http.conftest import ServeProcess, edge_agent_env


def cli_detect(model_dir: Path, files: list[Path], *options: str) -> dict[str, dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "detect", *options, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
        env=edge_agent_env(EDGE_AGENT_MODEL_DIR=str(model_dir)),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {line["file"]: line for line in lines}


@pytest.mark.parametrize(
    ("options", "fields"),
    [
        ((), {}),
        (
            ("--keywords", "八角岭,如家酒店", "--threshold", "0.002"),
            {"keywords": "八角岭,如家酒店", "threshold": "0.002"},
        ),
    ],
    ids=["default-keyword", "custom-keywords"],
)
def test_every_dev_recording_matches_the_cli(
    serve_process: ServeProcess,
    model_dir: Path,
    dev_audio: Path,
    options: tuple[str, ...],
    fields: dict[str, str],
) -> None:
    files = sorted(dev_audio.glob("*/*.wav"))
    assert len(files) == 58
    expected = cli_detect(model_dir, files, *options)
    mismatches = []
    detected = 0
    for path in files:
        answer = serve_process.client.detect(path.read_bytes(), fields)
        assert answer.status == 200, (path, answer.body)
        result = answer.json()
        cli = expected[str(path)]
        got = {"file": str(path), "detected": result["detected"], "detections": result["detections"]}
        if got != cli:
            mismatches.append((cli, got))
        detected += result["detected"]
    assert mismatches == []
    # Not vacuous: the default keyword is found in the positives, the custom ones in a few negatives.
    assert detected >= (20 if not options else 2)
