"""Property-based tests of the whole API from its OpenAPI document (schemathesis, all checks).

One check is left out: positive_data_acceptance expects every schema-valid request to succeed,
but a schema cannot say "a valid WAV file", "characters of the model's lexicon" or "threshold
in the form or the query, not both"; those requests are rightly 400s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_module
from tests.http.client import Client


@pytest.mark.slow
def test_schemathesis_finds_nothing(client: Client, tmp_path: Path) -> None:
    require_module("schemathesis")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"http://{client.host}:{client.port}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "100",
            "--seed",
            "1",
            "--workers",
            "1",
            "--max-response-time",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # it keeps a .schemathesis/ folder in the working directory
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # Every operation but /openapi.json itself, which schemathesis leaves out.
    assert "Tested: 7" in result.stdout, result.stdout[-3000:]
