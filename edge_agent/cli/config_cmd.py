"""``edge-agent config``: validate a configuration or print the reference of every key."""

from __future__ import annotations

import argparse

import yaml

from edge_agent.cli.common import add_config_option, load_settings
from edge_agent.config import config_reference, example_yaml, to_dict

REFERENCE_HEADER = """# Configuration reference

Generated from the code by `edge-agent config reference` (a test keeps this file identical to
its output). Every key can also be set in the environment as `EDGE_AGENT_<SECTION>__<KEY>`,
for example `EDGE_AGENT_MQTT__HOST=broker.lan` or `EDGE_AGENT_MQTT__TLS__CA_FILE=/etc/ca.pem`;
values are parsed as YAML. `config.yaml` at the repository root shows every key with a comment.

"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("config", help="check a configuration or print the key reference")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate the config (file + environment); print the result")
    add_config_option(check)
    check.set_defaults(handler=_check)
    reference = actions.add_parser("reference", help="print the Markdown reference of every key")
    reference.set_defaults(handler=_reference)
    example = actions.add_parser(
        "example", help="print a commented config.yaml with every key at its default"
    )
    example.set_defaults(handler=_example)


def _check(args: argparse.Namespace) -> int:
    config = load_settings(args)  # exits 2 with "key: problem" when invalid
    print(yaml.safe_dump(to_dict(config), allow_unicode=True, sort_keys=False), end="")
    return 0


def _example(args: argparse.Namespace) -> int:
    print(example_yaml(), end="")
    return 0


def _reference(args: argparse.Namespace) -> int:
    print(REFERENCE_HEADER + config_reference(), end="")
    return 0
