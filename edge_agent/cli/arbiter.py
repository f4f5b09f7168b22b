"""``edge-agent arbiter``: one wake per room, from the detections of every agent in it.

::

    edge-agent arbiter --broker broker.lan                       # rooms from each agent's device.room
    edge-agent arbiter --room satellite-1=kitchen --room server/hall-mic=hall --homeassistant
    mosquitto_sub -v -t 'edge_agent/room/+/wake'

Runs until SIGTERM or Ctrl-C. Several may run at once: the live one with the smallest
``--instance`` publishes, the others take over when it goes (:mod:`edge_agent.fleet.arbiter`).
Exit codes: 0 stopped, 2 usage or connection error. See docs/fleet.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import ssl
import threading
import uuid
from types import FrameType
from typing import Any

from edge_agent.cli.common import fail
from edge_agent.cli.fleet import parse_broker
from edge_agent.config.schema import ID_PATTERN
from edge_agent.fleet.arbiter import HOLDOFF_SECONDS, WINDOW_SECONDS, ArbiterService, RoomArbiter
from edge_agent.logs import configure_logging
from edge_agent.mqtt.client import MqttClient, MqttClientError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "arbiter",
        help="one wake per room: pick the loudest of the devices that heard the same wake word",
        description="Read every agent's detections; per room (device.room, or --room), collect the "
        "detections of one utterance for --window ms after the first and publish one wake on "
        "{prefix}/room/{room}/wake naming the loudest device (level_dbfs, then confidence). "
        "Several instances may run: the live one with the smallest --instance publishes.",
        epilog="exit codes: 0 stopped, 2 usage or connection error",
    )
    parser.add_argument("--broker", default="localhost", metavar="HOST[:PORT]", help="MQTT broker")
    parser.add_argument("--prefix", default="edge_agent", help="topic prefix (default edge_agent)")
    parser.add_argument("--username", metavar="U", help="MQTT user name")
    parser.add_argument("--password-file", metavar="F", help="file whose first line is the password")
    parser.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, verifying with this CA")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    parser.add_argument(
        "--window",
        type=float,
        default=WINDOW_SECONDS * 1000,
        metavar="MS",
        help=f"collect an utterance's detections this long after the first ({WINDOW_SECONDS * 1000:g})",
    )
    parser.add_argument(
        "--holdoff",
        type=float,
        default=HOLDOFF_SECONDS,
        metavar="S",
        help="after a wake, later detections of the same room and keyword this soon are the same "
        f"utterance (default {HOLDOFF_SECONDS:g})",
    )
    parser.add_argument(
        "--room",
        action="append",
        default=[],
        metavar="DEVICE[/STREAM]=ROOM",
        help="put a device, or one stream of it, in a room (over its device.room); repeatable",
    )
    parser.add_argument(
        "--instance",
        metavar="ID",
        help="this instance's id (default arbiter-HOST-RANDOM); the smallest live id publishes",
    )
    parser.add_argument(
        "--homeassistant",
        action="store_true",
        help="publish Home Assistant discovery of a wake-word event entity per room",
    )
    parser.add_argument(
        "--discovery-prefix", default="homeassistant", help="Home Assistant's discovery prefix"
    )
    parser.add_argument(
        "--keepalive",
        type=int,
        default=10,
        metavar="S",
        help="MQTT keep-alive; a dead instance's stand-in takes over after 1.5 times this (default 10)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.set_defaults(handler=run_arbiter)


def parse_rooms(pairs: list[str]) -> dict[str, str]:
    """``DEVICE[/STREAM]=ROOM`` pairs; raises ValueError naming a bad one."""
    rooms: dict[str, str] = {}
    for pair in pairs:
        key, sep, room = pair.partition("=")
        device, _, stream = key.partition("/")
        if (
            not sep
            or not ID_PATTERN.match(device)
            or (stream and "/" in stream)
            or not ID_PATTERN.match(room)
        ):
            raise ValueError(
                f"--room {pair!r}: expected DEVICE[/STREAM]=ROOM (ids of letters, digits, _ and -)"
            )
        rooms[key] = room
    return rooms


def default_instance() -> str:
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname().split(".")[0])
    return f"arbiter-{host or 'host'}-{uuid.uuid4().hex[:4]}"


def run_arbiter(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.window < 0 or args.holdoff < 0:
        fail("--window and --holdoff must not be negative")
    if not 5 <= args.keepalive <= 3600:
        fail("--keepalive must be between 5 and 3600")
    try:
        rooms = parse_rooms(args.room)
        host, port = parse_broker(args.broker, bool(args.tls or args.tls_ca))
    except ValueError as error:
        fail(str(error))
    instance = args.instance or default_instance()
    if not ID_PATTERN.match(instance):
        fail(f"--instance {instance!r}: letters, digits, _ and - only")
    password = _read_password(args.password_file) if args.username else None
    context = None
    if args.tls or args.tls_ca:
        try:
            context = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as error:
            fail(f"--tls-ca {args.tls_ca}: not a readable PEM CA certificate ({error})")

    def make_client(**options: Any) -> MqttClient:
        return MqttClient(
            host,
            port,
            client_id=f"edge-agent-{instance}",
            username=args.username,
            password=password,
            tls=context,
            keepalive=args.keepalive,
            **options,
        )

    service = ArbiterService(
        make_client,
        args.prefix,
        instance,
        RoomArbiter(args.window / 1000.0, args.holdoff, rooms),
        discovery_prefix=args.discovery_prefix if args.homeassistant else None,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("arbiter %s on %s:%d, window %g ms", instance, host, port, args.window)
    try:
        service.run(stop)
    except MqttClientError as error:
        fail(str(error))
    log.info("arbiter %s stopped: %s", instance, service.arbiter.counts)
    return 0


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")
    except OSError as error:
        fail(f"--password-file: cannot read {path}: {error.strerror or error}")
