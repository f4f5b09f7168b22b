from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from edge_agent.engine.model import REQUIRED_FILES
from edge_agent.model_store import ModelNotFound, ModelSource, cache_candidates, resolve_model_dir
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


@pytest.mark.slow
def test_download_without_network_fails_with_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real hub client against no network: the hubs are unreachable from these machines."""
    require_module("modelscope")
    monkeypatch.setenv("MODELSCOPE_API_MAX_RETRIES", "1")
    started = time.monotonic()
    with pytest.raises(ModelNotFound) as error:
        resolve_model_dir(ModelSource(cache_dir=str(tmp_path / "cache")), env={})
    message = str(error.value)
    assert "download of damo/speech_charctc_kws_phone-xiaoyun@master from ModelScope" in message
    assert "Error" in message  # the hub's exception type is named
    assert "model.dir" in message and "EDGE_AGENT_MODEL_DIR" in message
    assert time.monotonic() - started < 120
