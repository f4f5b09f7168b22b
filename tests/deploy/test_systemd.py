"""deploy/systemd: the unit verifies with systemd-analyze, is hardened, and agrees with the agent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from edge_agent.cli.main import build_parser
from edge_agent.config import parse_config
from tests.conftest import REPO_ROOT

UNIT = REPO_ROOT / "deploy" / "systemd" / "edge-agent.service"
SYSUSERS = REPO_ROOT / "deploy" / "systemd" / "edge-agent.sysusers.conf"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package systemd; scripts/install-deps.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def directives(path: Path) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (unit files may repeat keys), comments dropped."""
    result: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        result.setdefault(key.strip(), []).append(value.strip())
    return result


def installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's edge-agent (verify checks it exists)."""
    executable = Path(sys.executable).with_name("edge-agent")
    if not executable.exists():
        executable = Path(shutil.which("edge-agent") or "/usr/local/bin/edge-agent")
    assert executable.exists(), "edge-agent is not installed (pip install -e .)"
    text = UNIT.read_text(encoding="utf-8").replace("/opt/edge-agent/bin/edge-agent", str(executable))
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(installed_copy(tmp_path))], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on directives it ignores, but names them on stderr: both must be clean.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_exposure_score_is_ok(tmp_path: Path) -> None:
    """systemd's own exposure score (0 safe .. 10 unsafe; 1.9 now) stays at "OK" or better."""
    analyze = tool("systemd-analyze")
    # --threshold counts tenths: 30 means an overall exposure of 3.0.
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            "--threshold=30",
            "--no-pager",
            str(installed_copy(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "Overall exposure level" in result.stdout


def test_restart_policy_user_and_hardening() -> None:
    unit = directives(UNIT)
    expected = {
        "User": "edge-agent",
        "Group": "edge-agent",
        "SupplementaryGroups": "audio",
        "Restart": "on-failure",
        "StateDirectory": "edge-agent",
        "ConfigurationDirectory": "edge-agent",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
        "DeviceAllow": "char-alsa rw",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["RestartSec"] == ["5s"]
    assert unit["CapabilityBoundingSet"] == [""]
    # Longer than the agent's own shutdown (10 s: finish streams, flush the outbox).
    assert int(unit["TimeoutStopSec"][0].removesuffix("s")) > 10


def test_the_outbox_and_model_cache_are_writable() -> None:
    unit = directives(UNIT)
    writable = [PurePosixPath(p) for entry in unit["ReadWritePaths"] for p in entry.split()]
    state = PurePosixPath("/var/lib") / unit["StateDirectory"][0]
    assert state in writable
    # The agent puts its outbox in $STATE_DIRECTORY, which systemd sets from StateDirectory=.
    outbox = PurePosixPath(parse_config({}).outbox_path({"STATE_DIRECTORY": str(state)}))
    assert any(outbox.is_relative_to(path) for path in writable)
    environment = dict(entry.split("=", 1) for entry in unit["Environment"])
    cache = PurePosixPath(environment["MODELSCOPE_CACHE"])
    assert cache.is_relative_to(PurePosixPath("/var/cache") / unit["CacheDirectory"][0])
    assert any(cache.is_relative_to(path) for path in writable)


def test_exec_start_is_a_real_command_reading_the_configuration_directory() -> None:
    unit = directives(UNIT)
    executable, *argv = unit["ExecStart"][0].split()
    assert executable == "/opt/edge-agent/bin/edge-agent"
    args = build_parser().parse_args(argv)
    assert args.command == "run"
    assert PurePosixPath(args.config).parent == PurePosixPath("/etc") / unit["ConfigurationDirectory"][0]


def test_sysusers_creates_the_user_in_the_audio_group(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text(encoding="utf-8")
    group = (tmp_path / "etc" / "group").read_text(encoding="utf-8").splitlines()
    assert passwd.startswith("edge-agent:x:") and ":/var/lib/edge-agent:/usr/sbin/nologin" in passwd
    audio = next(line for line in group if line.startswith("audio:"))
    assert audio.split(":")[3].split(",") == ["edge-agent"]
