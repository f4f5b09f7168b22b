"""The package as a whole: a leaf that loads nothing of the engine, and its public names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import edge_agent
import edge_agent.config

# The checkout whose edge_agent this test imported, so that the subprocess imports the same one.
SOURCE_ROOT = Path(edge_agent.__file__).resolve().parent.parent


def test_importing_config_loads_no_engine_module_and_no_numpy() -> None:
    script = (
        "import json, sys\n"
        "import edge_agent.config\n"
        "print(json.dumps([edge_agent.config.__file__, sorted(sys.modules)]))\n"
    )
    path = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": path},
        check=True,
    )
    config_file, modules = json.loads(result.stdout)
    assert Path(config_file).resolve() == Path(edge_agent.config.__file__).resolve()
    assert [m for m in modules if m == "edge_agent.engine" or m.startswith("edge_agent.engine.")] == []
    assert [m for m in modules if m == "numpy" or m.startswith("numpy.")] == []


def test_every_public_name_is_exported() -> None:
    for name in edge_agent.config.__all__:
        assert getattr(edge_agent.config, name) is not None, name
