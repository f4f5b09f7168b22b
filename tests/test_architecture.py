"""docs/architecture.md names real functions: every ``Class.method`` of its path tables exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
# Where each class named in the tables lives.
MODULES = {
    "MqttTransport": "edge_agent.mqtt.transport",
    "MqttInbound": "edge_agent.agent.mqtt_inbound",
    "Ingest": "edge_agent.agent.ingest",
    "EngineWorker": "edge_agent.agent.worker",
    "DetectionSink": "edge_agent.agent.sink",
    "Delivery": "edge_agent.agent.delivery",
    "DetectionWire": "edge_agent.agent.sink",
    "MicrophoneAudioSource": "edge_agent.audio.microphone",
    "Partition": "edge_agent.agent.engine_pool",
    "WorkerProcess": "edge_agent.agent.engine_pool",
}
# Crossing to a worker process and back costs three hand-overs: the sender, the worker
# process's reader and the results' reader.
PROCESS_BOUNDARY_FUNCTIONS = 3
ROW = re.compile(r"^\| (\d+) \| `(\w+)\.(\w+)` \| ([\w' -]+) \|", re.MULTILINE)


def path_tables() -> list[list[tuple[int, str, str, str]]]:
    text = DOC.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    tables = []
    for section in sections:
        if section.startswith("From "):
            rows = [(int(n), cls, method, thread) for n, cls, method, thread in ROW.findall(section)]
            tables.append(rows)
    return tables


def test_paths_of_at_most_ten_functions_in_one_process() -> None:
    tables = path_tables()
    assert len(tables) == 3
    for rows in tables:
        crosses = any(cls in ("Partition", "WorkerProcess") for _, cls, _, _ in rows)
        assert 1 <= len(rows) <= 10 + (PROCESS_BOUNDARY_FUNCTIONS if crosses else 0)
        assert [n for n, *_ in rows] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize(
    "row", [row for rows in path_tables() for row in rows], ids=lambda r: f"{r[1]}.{r[2]}"
)
def test_every_function_named_exists(row: tuple[int, str, str, str]) -> None:
    _, cls, method, _ = row
    module = importlib.import_module(MODULES[cls])
    assert callable(getattr(getattr(module, cls), method))


# ``import a._b`` / ``from a._b import c`` / ``from a import _b`` of another package.
_PRIVATE_IMPORT = re.compile(
    r"^\s*(?:import\s+(?P<a>[\w.]*\._\w+[\w.]*)|from\s+(?P<b>[\w.]*\._\w+[\w.]*)\s+import|from\s+(?P<c>[\w.]+)\s+import\s+\(?\s*_\w+)",
    re.MULTILINE,
)


def test_no_library_is_reached_through_its_private_modules() -> None:
    """The engine and the agent use the libraries' public APIs only: a private module (numpy's
    ``_core``, scipy's ``_pocketfft``, ...) may change in any release, and on some platforms
    not exist."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*(root / "edge_agent").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]):
        for match in _PRIVATE_IMPORT.finditer(path.read_text(encoding="utf-8")):
            module = next(group for group in match.groups() if group)
            if not module.startswith(("edge_agent", "benchmarks", ".")):
                found.append(f"{path.relative_to(root)}: {match.group(0).strip()}")
    assert found == []
