"""``edge-agent model``: where the model is, fetch it, describe it."""

from __future__ import annotations

import argparse
import json

from edge_agent.cli.common import add_config_option, fail, load_settings, model_source, open_model
from edge_agent.engine.model import ModelError
from edge_agent.model_store import resolve_model_dir


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("model", help="locate, download or describe the model")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    path = actions.add_parser("path", help="print the model directory (resolving or downloading it)")
    download = actions.add_parser("download", help="download the model into the ModelScope cache if missing")
    info = actions.add_parser("info", help="print the model's structure and keyword defaults as JSON")
    for action in (path, download, info):
        add_config_option(action)
        action.add_argument("--model-dir", metavar="DIR", help="directory with the model files")
    path.set_defaults(handler=_path)
    download.set_defaults(handler=_path)
    info.set_defaults(handler=_info)


def _path(args: argparse.Namespace) -> int:
    config = load_settings(args)
    try:
        print(resolve_model_dir(model_source(config)))
    except ModelError as error:
        fail(str(error))
    return 0


def _info(args: argparse.Namespace) -> int:
    config = load_settings(args)
    model = open_model(config)
    print(
        json.dumps(
            {
                "directory": str(model.directory),
                "model_id": config.model.id,
                "revision": config.model.revision,
                "backend": model.backend,
                "fft": model.fft,
                "inputs": model.network.input_dim,
                "outputs": model.network.output_dim,
                "characters": len(model.lexicon.char_to_tokens),
                "lookahead_frames": model.network.lookahead_frames,
                "latency_seconds": round(model.latency_seconds, 3),
                "min_duration": model.default_min_duration,
                "max_duration": model.default_max_duration,
            },
            ensure_ascii=False,
        )
    )
    return 0
