"""``info`` parses with the ``wyoming`` release Home Assistant 2024.3 pins (1.5.3) and with the
one installed here (the newest when installed), each as a real client of the real server.

1.5.3 is installed by this test, with pip, into a folder of pytest's cache (of the run's
temporary folders without one) with ``pip install --no-deps --target`` (the package is pure
Python without dependencies) and put first on the ``PYTHONPATH`` of a subprocess, so nothing is
vendored and the test process keeps its own release. The subprocess does what Home Assistant's
``load_wyoming_info`` does: ``describe`` over TCP, ``Info.from_event``; then prints what Home
Assistant reads of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wyoming

from tests.wyoming.helpers import KEYWORD, wyoming_agent

HOME_ASSISTANT_2024_3_WYOMING = "1.5.3"

DESCRIBE_AND_PRINT = """
import asyncio, json, sys
import wyoming
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

async def main():
    async with AsyncTcpClient("127.0.0.1", int(sys.argv[1])) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
    info = Info.from_event(event)
    program = info.wake[0]
    print(json.dumps({
        "wyoming": wyoming.__version__,
        "name": program.name,
        "installed": program.installed,
        "attribution": [program.attribution.name, program.attribution.url],
        "models": [
            {"name": m.name, "phrase": m.phrase, "languages": m.languages, "installed": m.installed,
             "description": m.description, "attribution": m.attribution.url}
            for m in program.models
        ],
    }, ensure_ascii=False))

asyncio.run(main())
"""


@pytest.fixture(scope="session")
def old_wyoming(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding wyoming 1.5.3, installed once per cache (once per run without one:
    ``-p no:cacheprovider``)."""
    folder = f"wyoming-{HOME_ASSISTANT_2024_3_WYOMING}"
    cache = getattr(pytestconfig, "cache", None)  # absent with -p no:cacheprovider
    target = cache.mkdir(folder) if cache is not None else tmp_path_factory.mktemp(folder)
    if not (target / "wyoming" / "info.py").exists():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        result = subprocess.run(
            [*command, f"wyoming=={HOME_ASSISTANT_2024_3_WYOMING}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            message = f"could not install wyoming {HOME_ASSISTANT_2024_3_WYOMING}: {result.stderr[-2000:]}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)
    return target


def describe_with(port: int, pythonpath: Path | None) -> dict:  # type: ignore[type-arg]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", DESCRIBE_AND_PRINT, str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_info_parses_with_wyoming_1_5_3_and_the_installed_release(  # type: ignore[no-untyped-def]
    make_agent, tmp_path: Path, old_wyoming: Path
) -> None:
    _, server, _ = wyoming_agent(make_agent, tmp_path, name="edge-agent")
    old = describe_with(server.port, old_wyoming)
    new = describe_with(server.port, None)
    assert old.pop("wyoming") == HOME_ASSISTANT_2024_3_WYOMING
    assert new.pop("wyoming") == wyoming.__version__
    assert old == new
    assert old["name"] == "edge-agent" and old["installed"] is True
    assert old["models"] == [
        {
            "name": KEYWORD,
            "phrase": KEYWORD,
            "languages": ["zh"],
            "installed": True,
            "description": f"{KEYWORD} (threshold 0.05)",
            "attribution": "https://modelscope.cn/models/damo/speech_charctc_kws_phone-xiaoyun",
        }
    ]
