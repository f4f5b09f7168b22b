"""``edge-agent wyoming``: the agent as a Wyoming wake-word service only (MQTT off unless
``--broker``), for Home Assistant's Assist. The same as ``edge-agent run --no-mqtt --wyoming``."""

from __future__ import annotations

import argparse

from edge_agent.cli.common import add_keyword_options, add_model_options
from edge_agent.cli.run import add_log_options, add_wyoming_options, run_agent


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "wyoming",
        help="serve Home Assistant's Wyoming wake-word protocol (no MQTT unless --broker)",
        description="Run the agent as a Wyoming wake-word service for Home Assistant's Assist "
        "(docs/wyoming.md): listens on wyoming.host:wyoming.port (0.0.0.0:10400) and announces "
        "itself over mDNS. MQTT stays off unless --broker is given; then detections are also "
        "published as usual. Settings come from -c FILE, then EDGE_AGENT_* variables, then "
        "these options.",
    )
    add_model_options(parser)
    add_keyword_options(parser)
    add_wyoming_options(parser, switch=False)
    parser.add_argument(
        "--broker", metavar="HOST[:PORT]", help="also connect to this MQTT broker (overrides mqtt.host/port)"
    )
    parser.add_argument("--device-id", metavar="ID", help="device id (overrides device.id)")
    add_log_options(parser)
    parser.set_defaults(handler=_run_wyoming)


def _run_wyoming(args: argparse.Namespace) -> int:
    args.wyoming = True
    args.no_mqtt = not args.broker
    return run_agent(args)
