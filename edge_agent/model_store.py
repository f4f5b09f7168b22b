"""Finding the model files: a configured directory, the ModelScope cache, or a download.

Order, first hit wins:

1. ``model.dir`` in the config, or the ``EDGE_AGENT_MODEL_DIR`` environment variable. When set,
   it must hold the model: a wrong path is an error, never a silent download.
2. The ModelScope cache (``model.cache_dir``, else ``$MODELSCOPE_CACHE``, else
   ``~/.cache/modelscope/hub``), read directly in the layouts ModelScope uses, so that an
   offline device with a pre-filled cache never imports modelscope (1.4 s, and torch with it).
3. ``modelscope.snapshot_download(model.id, revision=model.revision)`` when the optional
   ``modelscope`` package is installed and ``model.download`` allows it, once: first a
   connection to the hub (or the HTTPS proxy) is tried for a few seconds, without importing
   modelscope, because its client retries an unreachable hub for over 20 s and leaves an empty
   snapshot folder behind. The hub's client then gets one try, and a failed one leaves no empty
   folder in the cache.

When nothing works, :class:`ModelNotFound` lists every place tried, with each failure's whole
message, and how to fix it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge_agent.engine.model import REQUIRED_FILES, ModelError

DEFAULT_MODEL_ID = "damo/speech_charctc_kws_phone-xiaoyun"
DEFAULT_REVISION = "master"
MODEL_DIR_ENV = "EDGE_AGENT_MODEL_DIR"
# The hub modelscope talks to (its MODELSCOPE_DOMAIN overrides it), and how long a first
# connection to it (or to the HTTPS proxy) may take before the hub counts as unreachable.
DEFAULT_HUB_DOMAIN = "www.modelscope.cn"
HUB_PROBE_TIMEOUT_SECONDS = 3.0
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
    elif not modelscope_installed():
        tried.append("download from ModelScope (the modelscope package is not installed)")
    elif (unreachable := hub_unreachable(env)) is not None:
        tried.append(f"download of {source.model_id}@{source.revision} from ModelScope ({unreachable})")
    else:
        try:
            downloaded = _download(source, cache_dir)
        except ImportError:
            tried.append("download from ModelScope (the modelscope package is not installed)")
        except Exception as error:  # noqa: BLE001 - any hub failure is reported, with its type
            tried.append(
                f"download of {source.model_id}@{source.revision} from ModelScope "
                f"({type(error).__name__}: {_message(error)})"
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


def modelscope_installed() -> bool:
    """Whether ``import modelscope`` can work, without importing it (seconds, and torch)."""
    if "modelscope" in sys.modules:
        return sys.modules["modelscope"] is not None
    return importlib.util.find_spec("modelscope") is not None


def hub_address(env: Mapping[str, str]) -> tuple[str, int, str]:
    """Host, port and a description of what a download connects to first: the HTTPS proxy when
    one is set (it resolves the hub's name itself), else the hub."""
    proxy = next((env[n] for n in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if env.get(n)), "")
    if proxy:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parts.hostname:
            return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), "the HTTPS proxy"
    domain = env.get("MODELSCOPE_DOMAIN") or DEFAULT_HUB_DOMAIN
    parts = urlsplit(domain if "://" in domain else f"https://{domain}")
    return (
        parts.hostname or domain,
        parts.port or (80 if parts.scheme == "http" else 443),
        "the ModelScope hub",
    )


def hub_unreachable(env: Mapping[str, str], timeout: float = HUB_PROBE_TIMEOUT_SECONDS) -> str | None:
    """Why the hub (or the proxy) cannot be reached within ``timeout``, or None when it can.

    Name resolution has no timeout of its own, so the attempt runs on a daemon thread that is
    left behind if it hangs."""
    host, port, what = hub_address(env)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as error:
            outcome.append(f"{what} {host}:{port} is unreachable: {error.strerror or error}")
        else:
            outcome.append(None)

    attempt = threading.Thread(target=connect, name="hub-probe", daemon=True)
    attempt.start()
    attempt.join(timeout)
    if not outcome:
        return f"{what} {host}:{port} did not answer within {timeout:g} s"
    return outcome[0]


def _download(source: ModelSource, cache_dir: Path) -> Path:
    """One try of the hub's client; a failed one leaves no folder of its own behind."""
    # One try: the hub answered the probe, so a failure now is not worth 20 s of retries.
    os.environ.setdefault("MODELSCOPE_API_MAX_RETRIES", "1")
    target = cache_candidates(cache_dir, source.model_id, source.revision)[0]
    existing = _existing_ancestors(target, cache_dir)
    # Imported here only: modelscope is optional and slow to import.
    from modelscope import snapshot_download

    try:
        return Path(snapshot_download(source.model_id, revision=source.revision, cache_dir=str(cache_dir)))
    except BaseException:
        _remove_empty_folders(target, cache_dir, existing)
        raise


def _existing_ancestors(target: Path, root: Path) -> set[Path]:
    folders = [target, *[p for p in target.parents if p == root or root in p.parents]]
    return {folder for folder in folders if folder.is_dir()}


def _remove_empty_folders(target: Path, root: Path, keep: set[Path]) -> None:
    """Remove the empty folders a failed download made on the way to ``target`` (an empty
    snapshot folder makes modelscope's offline mode fail with CacheNotFound)."""
    for folder in [target, *target.parents]:
        if folder == root.parent or folder in keep or not (folder == root or root in folder.parents):
            break
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break


def _message(error: BaseException) -> str:
    """The error's whole message on one line (the hub's run over several)."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    return text or "no message"
