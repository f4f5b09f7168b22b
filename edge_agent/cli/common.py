"""Options and start-up steps shared by sub-commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from edge_agent.config import AgentConfig, ConfigError, load_config, merge_update
from edge_agent.engine.decoder import CompiledKeyword
from edge_agent.engine.lexicon import LexiconError
from edge_agent.engine.model import KwsModel, ModelError
from edge_agent.keywords import compile_config_keywords
from edge_agent.model_store import ModelSource, resolve_model_dir

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"edge-agent: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file (see config.yaml)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    parser.add_argument(
        "--model-dir", metavar="DIR", help="directory with the model files (overrides model.dir)"
    )
    parser.add_argument(
        "--backend", choices=("numpy", "torch"), help="network backend (overrides engine.backend)"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads (overrides engine.threads)")
    parser.add_argument(
        "--int8", action="store_true", help="torch backend: int8 dynamic quantization (engine.quantize)"
    )


def add_keyword_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keywords",
        metavar="K1,K2",
        help="comma-separated keywords, each optionally TEXT:THRESHOLD (default: the config's, 小云小云)",
    )
    parser.add_argument("--threshold", type=float, metavar="T", help="threshold for every keyword")
    parser.add_argument(
        "--homophones", action="store_true", help="also accept characters that sound the same (pinyin extra)"
    )


def load_settings(args: argparse.Namespace) -> AgentConfig:
    """The config file (if any) with command-line overrides, validated like the file."""
    try:
        return apply_command_line(load_config(getattr(args, "config", None)), args)
    except ConfigError as error:
        fail(str(error))


def apply_command_line(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    """``config`` with the shared command-line options applied; raises ConfigError."""
    update: dict[str, Any] = {}
    if getattr(args, "model_dir", None):
        update.setdefault("model", {})["dir"] = args.model_dir
    if getattr(args, "backend", None):
        update.setdefault("engine", {})["backend"] = args.backend
    if getattr(args, "threads", None) is not None:
        update.setdefault("engine", {})["threads"] = args.threads
    if getattr(args, "int8", False):
        update.setdefault("engine", {}).update({"quantize": True, "backend": "torch"})
    if (
        getattr(args, "keywords", None)
        or getattr(args, "threshold", None) is not None
        or getattr(args, "homophones", False)
    ):
        update["keywords"] = [_keyword_update(k, args) for k in _keyword_texts(args, config)]
    return merge_update(config, update) if update else config


def _keyword_texts(args: argparse.Namespace, config: AgentConfig) -> list[str]:
    if getattr(args, "keywords", None):
        texts = [k.strip() for k in args.keywords.split(",") if k.strip()]
        if not texts:
            fail("--keywords: no keyword given")
        return texts
    return [k.text for k in config.keywords]


def _keyword_update(text: str, args: argparse.Namespace) -> dict[str, Any]:
    entry: dict[str, Any] = {"text": text}
    if args.threshold is not None:
        entry["threshold"] = args.threshold
    if ":" in text:
        entry["text"], _, threshold = text.partition(":")
        try:
            entry["threshold"] = float(threshold)
        except ValueError:
            fail(f"--keywords: {text!r}: the part after ':' must be a threshold")
    if getattr(args, "homophones", False):
        entry["homophones"] = True
    return entry


def model_source(config: AgentConfig) -> ModelSource:
    return ModelSource(
        model_id=config.model.id,
        revision=config.model.revision,
        directory=config.model.dir,
        cache_dir=config.model.cache_dir,
        download=config.model.download,
    )


def open_model(config: AgentConfig) -> KwsModel:
    try:
        return load_model(config)
    except (ModelError, ImportError) as error:
        fail(str(error))


def load_model(config: AgentConfig) -> KwsModel:
    """The configured model, found (or downloaded) and loaded; raises ModelError, ImportError."""
    directory = resolve_model_dir(model_source(config))
    return KwsModel.load(
        directory,
        backend=config.engine.backend,
        threads=config.engine.threads,
        quantize=config.engine.quantize,
    )


def compile_keywords(model: KwsModel, config: AgentConfig) -> list[CompiledKeyword]:
    try:
        return compile_config_keywords(model, config)
    except (LexiconError, ValueError, ImportError) as error:
        fail(f"keywords: {error}")
