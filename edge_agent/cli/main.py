"""``edge-agent``: entry point and sub-command registry."""

from __future__ import annotations

import os

# One BLAS thread unless the user says otherwise, set before numpy loads OpenBLAS: the network's
# matrices are small, and on a 4-core board the agent should leave cores to everything else.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from edge_agent import __version__  # noqa: E402
from edge_agent.cli import (  # noqa: E402
    arbiter,
    config_cmd,
    detect,
    devices,
    fleet,
    model,
    run,
    serve,
    stream,
    wyoming_cmd,
)

# Each sub-command module has register(subparsers) and sets `handler` on its parser.
_COMMANDS = (run, detect, model, devices, stream, config_cmd, serve, fleet, arbiter, wyoming_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="On-device Chinese wake-word spotting (ModelScope 小云 model) with an MQTT agent.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `edge-agent detect ... | head`: the reader went away; not an error of ours.
        return 0


if __name__ == "__main__":
    sys.exit(main())
