"""`edge-agent devices` against real PortAudio devices (ALSA PCMs from an asound.conf)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import devices
from tests.conftest import REPO_ROOT, require_module

DEVICES_CONF = """
pcm.!default { type plug; slave { pcm { type null }; rate 48000 } }
pcm.usb_mic { type null }
"""
# A PCM on a missing card: PortAudio lists no device (and does not abort, see test_microphone).
NO_DEVICES_CONF = "pcm.missing_card { type hw; card 99 }\n"


def use_alsa_config(directory: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    require_module("pyaudio")
    path = directory / "asound.conf"
    path.write_text(text)
    env = {"ALSA_CONFIG_PATH": str(path), "JACK_NO_START_SERVER": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent")
    devices.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["devices", *argv])
    return int(args.handler(args))


def test_table_lists_each_input_device_and_marks_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    use_alsa_config(tmp_path, DEVICES_CONF, monkeypatch)
    assert run() == 0
    out, err = capfd.readouterr()
    header, *rows = out.splitlines()
    assert header.split() == ["INDEX", "NAME", "CHANNELS", "DEFAULT", "RATE", "DEFAULT"]
    cells = {row.split()[1]: row.split() for row in rows}
    assert set(cells) == {"usb_mic", "default"}
    assert cells["default"][3:] == ["48000", "Hz", "*"]
    assert cells["usb_mic"][3:] == ["44100", "Hz"]
    # ALSA/JACK probing chatter on file descriptor 2 is hidden unless asked for.
    assert err == ""


def test_json_lists_the_same_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_alsa_config(tmp_path, DEVICES_CONF, monkeypatch)
    assert run("--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {d["name"]: (d["default_sample_rate"], d["is_default"]) for d in listed} == {
        "default": (48000, True),
        "usb_mic": (44100, False),
    }
    assert set(listed[0]) == {"index", "name", "max_input_channels", "default_sample_rate", "is_default"}


@pytest.mark.parametrize(("argv", "expected"), [((), "no input devices found"), (("--json",), "[]")])
def test_no_devices_is_said_plainly_and_is_not_an_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    expected: str,
) -> None:
    use_alsa_config(tmp_path, NO_DEVICES_CONF, monkeypatch)
    assert run(*argv) == 0
    assert capsys.readouterr().out.startswith(expected)


def test_missing_pyaudio_exits_2_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyaudio", None)
    with pytest.raises(SystemExit) as caught:
        run()
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-agent: error: ") and "pip install 'edge-agent[mic]'" in err
    assert "portaudio19-dev" in err


def test_edge_agent_devices_as_a_user_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "devices" not in commands.choices:
        pytest.skip("edge_agent.cli.main does not register the devices command yet")
    env = use_alsa_config(tmp_path, DEVICES_CONF, monkeypatch)
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "devices", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(d["name"] for d in json.loads(result.stdout)) == ["default", "usb_mic"]
