from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.engine.model import REQUIRED_FILES
from edge_agent.model_store import (
    ModelNotFound,
    ModelSource,
    cache_candidates,
    hub_address,
    resolve_model_dir,
)
from tests.conftest import require_module

MODEL_ID = "damo/speech_charctc_kws_phone-xiaoyun"


def fill(folder: Path, model_dir: Path) -> Path:
    folder.mkdir(parents=True)
    for name in REQUIRED_FILES:
        shutil.copy(model_dir / name, folder / name)
    return folder


def test_configured_directory_wins(tmp_path: Path, model_dir: Path) -> None:
    folder = fill(tmp_path / "here", model_dir)
    assert resolve_model_dir(ModelSource(directory=str(folder)), env={}) == folder


def test_environment_variable_is_used(tmp_path: Path, model_dir: Path) -> None:
    folder = fill(tmp_path / "env", model_dir)
    assert resolve_model_dir(ModelSource(), env={"EDGE_AGENT_MODEL_DIR": str(folder)}) == folder


def test_configured_directory_without_files_is_an_error_not_a_download(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"model.dir is .*empty, which lacks kwsr.net, kwsr.mvn"):
        resolve_model_dir(ModelSource(directory=str(tmp_path / "empty")), env={})
    with pytest.raises(ModelNotFound, match=r"\$EDGE_AGENT_MODEL_DIR is .*nowhere, which is not a directory"):
        resolve_model_dir(ModelSource(), env={"EDGE_AGENT_MODEL_DIR": str(tmp_path / "nowhere")})


def test_prefilled_modelscope_cache_is_found_without_modelscope(tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    snapshot = fill(
        cache / "models" / "damo--speech_charctc_kws_phone-xiaoyun" / "snapshots" / "master", model_dir
    )
    found = resolve_model_dir(ModelSource(download=False), env={"MODELSCOPE_CACHE": str(cache)})
    assert found == snapshot


def test_our_cache_layout_is_the_one_modelscope_reads(tmp_path: Path, model_dir: Path) -> None:
    """The real modelscope client, offline, must return the folder we resolve."""
    modelscope = require_module("modelscope")
    cache = tmp_path / "cache"
    snapshot = fill(cache_candidates(cache, MODEL_ID, "master")[0], model_dir)
    theirs = modelscope.snapshot_download(
        MODEL_ID, revision="master", cache_dir=str(cache), local_files_only=True
    )
    assert (
        Path(theirs)
        == snapshot
        == resolve_model_dir(ModelSource(cache_dir=str(cache), download=False), env={})
    )


def test_older_cache_layout_and_alias(tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    legacy = fill(cache / "iic" / "speech_charctc_kws_phone-xiaoyun", model_dir)
    assert resolve_model_dir(ModelSource(cache_dir=str(cache), download=False), env={}) == legacy


def test_incomplete_cache_is_skipped_and_reported(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    partial = cache_candidates(cache, MODEL_ID, "master")[0]
    partial.mkdir(parents=True)
    (partial / "kwsr.net").write_bytes(b"\0B<Nnet> ")
    with pytest.raises(ModelNotFound) as error:
        resolve_model_dir(ModelSource(cache_dir=str(cache), download=False), env={})
    message = str(error.value)
    assert f"ModelScope cache under {cache}" in message
    assert "disabled by model.download: false" in message
    assert "edge-agent model download" in message


def test_without_modelscope_installed_the_error_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "modelscope", None)  # import modelscope -> ImportError
    with pytest.raises(ModelNotFound, match=r"the modelscope package is not installed"):
        resolve_model_dir(ModelSource(cache_dir=str(tmp_path / "cache")), env={})


_RESOLVE = """
import sys
from edge_agent import model_store
try:
    model_store.resolve_model_dir(model_store.ModelSource(cache_dir=sys.argv[1]), env={})
except model_store.ModelNotFound as error:
    print(error)
print("modelscope imported:", "modelscope" in sys.modules)
"""


def resolve_in_a_process(cache: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODELSCOPE", "EDGE_AGENT"))}
    return subprocess.run(
        [sys.executable, "-c", _RESOLVE, str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


def test_download_without_network_fails_at_once_with_the_whole_message(tmp_path: Path) -> None:
    """No hub reachable (none is from these machines): the probe says so within seconds, the
    hub's client (and its 20 s of retries) is never started, and the cache stays empty."""
    require_module("modelscope")
    cache = tmp_path / "cache"
    result = resolve_in_a_process(cache)
    message = result.stdout
    assert "download of damo/speech_charctc_kws_phone-xiaoyun@master from ModelScope" in message, (
        result.stderr
    )
    assert "(the ModelScope hub www.modelscope.cn:443 is unreachable: " in message
    assert "model.dir" in message and "EDGE_AGENT_MODEL_DIR" in message
    assert "modelscope imported: False" in message
    assert not cache.exists()  # no empty snapshot folder for modelscope's offline mode to trip on


def test_the_probe_goes_to_the_proxy_when_one_is_set() -> None:
    assert hub_address({"HTTPS_PROXY": "http://proxy.lan:3128"}) == ("proxy.lan", 3128, "the HTTPS proxy")
    assert hub_address({"MODELSCOPE_DOMAIN": "modelscope.ai"}) == ("modelscope.ai", 443, "the ModelScope hub")
    assert hub_address({})[:2] == ("www.modelscope.cn", 443)


_REACHABLE_HUB = """
from edge_agent import model_store
model_store.hub_unreachable = lambda env: None  # the probe passed; the hub then fails
"""


@pytest.mark.slow
def test_a_failed_download_is_tried_once_and_leaves_no_empty_folders(tmp_path: Path) -> None:
    """The hub answered the probe but the download failed (the real client, pointed at a local
    port that refuses): one bounded try, its whole message, and the cache as it was."""
    require_module("modelscope")
    with socket.socket() as listener:  # a port nobody listens on once closed
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)  # an existing cache keeps its folders
    script = tmp_path / "sitecustomize.py"  # patches the probe in the child before anything runs
    script.write_text(_REACHABLE_HUB, encoding="utf-8")
    result = resolve_in_a_process(
        cache,
        {
            "MODELSCOPE_DOMAIN": f"http://127.0.0.1:{port}",
            "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}",
        },
    )
    message = result.stdout
    assert "download of damo/speech_charctc_kws_phone-xiaoyun@master from ModelScope (" in message, (
        result.stderr
    )
    assert f"port={port})" in message  # the whole message, not cut mid-token
    assert "modelscope imported: True" in message
    assert sorted(p.name for p in cache.rglob("*")) == ["models"]


def test_the_modelscope_extra_does_not_pull_in_torch_as_the_deployment_guide_says() -> None:
    """docs/deployment.md tells Raspberry Pi users what `edge-agent[modelscope]` installs."""
    try:
        declared = importlib.metadata.requires("modelscope") or []
    except importlib.metadata.PackageNotFoundError:
        require_module("modelscope")  # fails in CI, skips elsewhere
        raise
    # What `pip install modelscope` installs: the requirements of no extra of its own.
    names = [r.split(";")[0].strip().lower() for r in declared if "extra ==" not in r.replace('"', "")]
    assert not [name for name in names if name.startswith("torch")], names
    guide = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text(encoding="utf-8")
    start = guide.index("pip install 'edge-agent[modelscope]'")
    assert "not torch" in guide[start : guide.index("\n```", start)]
