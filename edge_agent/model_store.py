"""Finding the model files: a configured directory, the ModelScope cache, or a download.

Order, first hit wins:

1. ``model.dir`` in the config, or the ``EDGE_AGENT_MODEL_DIR`` environment variable. When set,
   it must hold the model: a wrong path is an error, never a silent download.
2. The ModelScope cache (``model.cache_dir``, else ``$MODELSCOPE_CACHE``, else
   ``~/.cache/modelscope/hub``), read directly in the layouts ModelScope uses, so that an
   offline device with a pre-filled cache never imports modelscope (1.4 s, and torch with it).
3. ``modelscope.snapshot_download(model.id, revision=model.revision)`` when the optional
   ``modelscope`` package is installed and ``model.download`` allows it.

When nothing works, :class:`ModelNotFound` lists every place tried and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.engine.model import REQUIRED_FILES, ModelError

DEFAULT_MODEL_ID = "damo/speech_charctc_kws_phone-xiaoyun"
DEFAULT_REVISION = "master"
MODEL_DIR_ENV = "EDGE_AGENT_MODEL_DIR"
# The same model is published under both organisations; ModelScope redirects one to the other.
_ALIASES = {
    "damo/speech_charctc_kws_phone-xiaoyun": ("iic/speech_charctc_kws_phone-xiaoyun",),
    "iic/speech_charctc_kws_phone-xiaoyun": ("damo/speech_charctc_kws_phone-xiaoyun",),
}


class ModelNotFound(ModelError):
    """No usable model directory; the message lists what was tried."""


@dataclass(frozen=True)
class ModelSource:
    """Where to look for the model (the ``model`` config section)."""

    model_id: str = DEFAULT_MODEL_ID
    revision: str = DEFAULT_REVISION
    directory: str | None = None
    cache_dir: str | None = None
    download: bool = True


def missing_files(directory: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (directory / name).is_file()]


def default_cache_dir(env: Mapping[str, str]) -> Path:
    if env.get("MODELSCOPE_CACHE"):
        return Path(env["MODELSCOPE_CACHE"])
    return Path(env.get("HOME", str(Path.home()))) / ".cache" / "modelscope" / "hub"


def cache_candidates(cache_dir: Path, model_id: str, revision: str) -> list[Path]:
    """Directories where ModelScope (old and new releases) keeps a downloaded model."""
    candidates = []
    for repo in (model_id, *_ALIASES.get(model_id, ())):
        owner, _, name = repo.partition("/")
        # modelscope >= 1.2x (hub client): models/<owner>--<name>/snapshots/<revision>/
        candidates.append(cache_dir / "models" / f"{owner}--{name}" / "snapshots" / revision)
        # older releases: models/<owner>/<name>/ and <owner>/<name>/
        candidates.append(cache_dir / "models" / owner / name)
        candidates.append(cache_dir / owner / name)
    return candidates


def resolve_model_dir(source: ModelSource, env: Mapping[str, str] | None = None) -> Path:
    """The directory holding the model files, downloading them if allowed and needed."""
    env = os.environ if env is None else env
    tried: list[str] = []

    explicit = source.directory or env.get(MODEL_DIR_ENV)
    if explicit:
        directory = Path(explicit).expanduser()
        where = "model.dir" if source.directory else f"${MODEL_DIR_ENV}"
        if not directory.is_dir():
            raise ModelNotFound(f"{where} is {directory}, which is not a directory")
        missing = missing_files(directory)
        if missing:
            raise ModelNotFound(
                f"{where} is {directory}, which lacks {', '.join(missing)} "
                f"(expected the files of ModelScope's {source.model_id})"
            )
        return directory

    cache_dir = Path(source.cache_dir).expanduser() if source.cache_dir else default_cache_dir(env)
    for candidate in cache_candidates(cache_dir, source.model_id, source.revision):
        if candidate.is_dir() and not missing_files(candidate):
            return candidate
    tried.append(
        f"ModelScope cache under {cache_dir} (no complete copy of {source.model_id}@{source.revision})"
    )

    if not source.download:
        tried.append("download from ModelScope (disabled by model.download: false)")
    else:
        try:
            downloaded = _download(source, cache_dir)
        except ImportError:
            tried.append("download from ModelScope (the modelscope package is not installed)")
        except Exception as error:  # noqa: BLE001 - any hub failure is reported, with its type
            tried.append(
                f"download of {source.model_id}@{source.revision} from ModelScope "
                f"({type(error).__name__}: {_first_line(error)})"
            )
        else:
            missing = missing_files(downloaded)
            if not missing:
                return downloaded
            tried.append(f"download from ModelScope to {downloaded} (it lacks {', '.join(missing)})")

    cache_target = cache_candidates(cache_dir, source.model_id, source.revision)[0]
    raise ModelNotFound(
        "cannot find the keyword-spotting model. Tried:\n  - " + "\n  - ".join(tried) + "\nFix one of:\n"
        f"  - point model.dir in the config (or ${MODEL_DIR_ENV}) at a directory holding "
        f"{', '.join(REQUIRED_FILES)};\n"
        "  - pip install 'edge-agent[modelscope]' on a machine with Internet access and run "
        "`edge-agent model download` to fill the cache;\n"
        f"  - copy a downloaded model into {cache_target}."
    )


def _download(source: ModelSource, cache_dir: Path) -> Path:
    # Imported here only: modelscope is optional and slow to import.
    from modelscope import snapshot_download

    return Path(snapshot_download(source.model_id, revision=source.revision, cache_dir=str(cache_dir)))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "no message"
