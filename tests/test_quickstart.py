"""The README's main-job command, run as a newcomer would: it must end with a detection.

On stock Debian 12 / Ubuntu 24.04 the system Python refuses `pip install` (PEP 668): the
quickstart installs into a virtual environment of the project, which one test makes from
Debian's own /usr/bin/python3. That test also records what the script would ask apt-get for on
a machine that has nothing yet: only what the main job needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")
MAIN_JOB_PACKAGES = {"mosquitto", "mosquitto-clients"}


def quickstart_env(tmp_path: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_MODEL_DIR"] = str(model_dir)
    if sys.prefix != sys.base_prefix:  # the tests run in a virtual environment (CI's): reuse it
        env["VIRTUAL_ENV"] = sys.prefix
    else:
        env["EDGE_AGENT_VENV"] = str(tmp_path / "venv")
    env.update(extra)
    return env


def run_quickstart(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "quickstart.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_quickstart_streams_the_example_and_shows_the_detection(model_dir: Path, tmp_path: Path) -> None:
    result = run_quickstart(quickstart_env(tmp_path, model_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: 小云小云 detected and published over MQTT." in result.stdout
    assert "edge_agent/quickstart/availability online" in result.stdout
    assert "edge_agent/quickstart/availability offline" in result.stdout
    assert '"keyword": "小云小云"' in result.stdout


@pytest.fixture()
def fresh_apt(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH where dpkg knows no package and apt-get records what it is asked for: the
    machine as the script sees it on a fresh install (the packages themselves are here)."""
    shims, log = tmp_path / "shims", tmp_path / "apt-get.log"
    shims.mkdir()
    (shims / "dpkg").write_text(
        '#!/bin/sh\nif [ "$1" = "-s" ]; then exit 1; fi\nexec /usr/bin/dpkg "$@"\n', encoding="utf-8"
    )
    (shims / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\n', encoding="utf-8")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return shims, log


@pytest.mark.slow
def test_quickstart_with_debians_python_installs_into_a_virtual_environment(
    model_dir: Path, tmp_path: Path, fresh_apt: tuple[Path, Path]
) -> None:
    if not DEBIAN_PYTHON.exists():
        message = "no Debian python3 (apt-get install python3 python3-venv; scripts/install-deps.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    externally_managed = subprocess.run(
        [str(DEBIAN_PYTHON), "-m", "pip", "install", "--dry-run", "edge-agent-nothing"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "externally-managed-environment" in externally_managed.stderr + externally_managed.stdout
    shims, apt_log = fresh_apt
    venv = tmp_path / "venv"
    env = quickstart_env(tmp_path, model_dir, PYTHON=str(DEBIAN_PYTHON), EDGE_AGENT_VENV=str(venv))
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    result = run_quickstart(env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: 小云小云 detected and published over MQTT." in result.stdout
    assert f"virtual environment: {venv} (to use edge-agent afterwards: source {venv}/bin/activate)" in (
        result.stdout
    )
    assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text(encoding="utf-8")
    assert (venv / "bin" / "edge-agent").exists()
    # apt-get was asked for the main job's packages only: no chromium, compilers or headers.
    requested = set()
    for line in apt_log.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if "install" in words:
            requested.update(w for w in words[words.index("install") + 1 :] if not w.startswith("-"))
    assert requested == MAIN_JOB_PACKAGES


@pytest.mark.slow
def test_quickstart_stops_with_the_agents_log_when_the_agent_cannot_come_online(
    model_dir: Path, tmp_path: Path
) -> None:
    """A newcomer whose agent fails to start sees why, not a claim that it is online: here the
    network file is corrupt, which only loading the model (in ``edge-agent run``) finds out."""
    broken = tmp_path / "model"
    for source in [*model_dir.glob("*"), *model_dir.glob("example/*")]:
        if source.is_file():  # plain copies: the shared files are read-only
            (broken / source.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, broken / source.relative_to(model_dir))
    (broken / "kwsr.net").write_bytes(b"<Nnet> this is not a Kaldi network")
    result = run_quickstart(quickstart_env(tmp_path, broken))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "agent: online" not in result.stdout
    assert "FAILED: the agent did not come online" in result.stderr
    assert "kwsr.net" in result.stderr  # the agent's own error, naming the file


def test_the_quickstart_asks_apt_only_for_the_main_jobs_packages() -> None:
    """The tests' system packages (chromium, fonts, headers, compilers) stay in test.sh's list."""
    script = (REPO / "scripts" / "quickstart.sh").read_text(encoding="utf-8")
    listed = script.split("debian_packages=(", 1)[1].split(")", 1)[0].split()
    assert set(listed) == MAIN_JOB_PACKAGES
    assert "install-deps.sh" not in script
    tests = (REPO / "scripts" / "install-deps.sh").read_text(encoding="utf-8")
    assert {"chromium", "portaudio19-dev", "python3-venv", "curl"} <= set(
        tests.split("debian_packages=(", 1)[1].split(")", 1)[0].split()
    )


def test_a_python_without_venv_gets_python3_venv_from_apt(
    tmp_path: Path, fresh_apt: tuple[Path, Path]
) -> None:
    """A minimal Debian image has python3 without its venv module's pip (python3-venv): the
    scripts' environment step asks apt-get for it before making the virtual environment."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no Debian python3")
    shims, apt_log = fresh_apt
    # Debian's python3 as a minimal image has it: no ensurepip until python3-venv is installed.
    python = shims / "python3"
    python.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ] && [ ! -f {apt_log} ]; then exit 1; fi\nexec {DEBIAN_PYTHON} "$@"\n',
        encoding="utf-8",
    )
    python.chmod(0o755)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "EDGE_AGENT_VENV", "PYTHON")}
    env.update(PATH=f"{shims}{os.pathsep}{env['PATH']}", EDGE_AGENT_VENV=str(venv))
    result = subprocess.run(
        ["bash", "-c", 'source scripts/venv.sh && echo "PYTHON=$PYTHON"'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "install -y -qq --no-install-recommends python3 python3-venv" in apt_log.read_text(
        encoding="utf-8"
    )
    assert f"PYTHON={venv}/bin/python" in result.stdout
    assert (venv / "bin" / "pip").exists()
