"""``edge-agent run``: the long-running agent (sources + MQTT), until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_agent.cli.common import add_model_options, apply_command_line, fail, load_model
from edge_agent.config import (
    AgentConfig,
    ConfigError,
    FileSource,
    keep_last_good,
    load_config,
    merge_update,
    revert_remote_overrides,
)
from edge_agent.engine.lexicon import LexiconError
from edge_agent.engine.model import ModelError
from edge_agent.keywords import compile_config_keywords
from edge_agent.logs import configure_logging
from edge_agent.system import tune_allocator

if TYPE_CHECKING:
    from edge_agent.agent.app import Agent
    from edge_agent.agent.services import Integration
    from edge_agent.audio.sources import AudioSource

log = logging.getLogger("edge_agent")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "run",
        help="run the agent: listen, spot keywords, report over MQTT",
        description="Run the agent until SIGINT/SIGTERM: audio sources and MQTT audio streams in, "
        "detections, availability and health out. Settings come from -c FILE, then "
        "EDGE_AGENT_* environment variables, then these options.",
    )
    add_model_options(parser)
    parser.add_argument("--broker", metavar="HOST[:PORT]", help="MQTT broker (overrides mqtt.host/mqtt.port)")
    parser.add_argument("--device-id", metavar="ID", help="device id (overrides device.id)")
    parser.add_argument(
        "--file",
        metavar="PATH",
        action="append",
        default=[],
        help="also play a WAV file or folder as a stream",
    )
    parser.add_argument("--no-mqtt", action="store_true", help="no broker: log detections only")
    parser.add_argument("--pool", metavar="NAME", help="server mode: share streams with a pool of agents")
    add_wyoming_options(parser, switch=True)
    add_log_options(parser)
    parser.set_defaults(handler=run_agent)


def add_wyoming_options(parser: argparse.ArgumentParser, switch: bool) -> None:
    """The Wyoming server's options (``edge-agent run --wyoming``, ``edge-agent wyoming``)."""
    if switch:
        parser.add_argument(
            "--wyoming",
            action="store_true",
            help="also serve Home Assistant's Wyoming wake-word protocol (wyoming.enabled)",
        )
    parser.add_argument(
        "--wyoming-host", metavar="ADDRESS", help="Wyoming: address to listen on (wyoming.host)"
    )
    parser.add_argument(
        "--wyoming-port", type=int, metavar="PORT", help="Wyoming: TCP port (wyoming.port, default 10400)"
    )
    parser.add_argument(
        "--no-zeroconf", action="store_true", help="Wyoming: no mDNS announcement (wyoming.zeroconf)"
    )


def add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    update: dict[str, Any] = {}
    if args.broker:
        host, _, port = args.broker.partition(":")
        update.setdefault("mqtt", {})["host"] = host
        if port:
            try:
                update["mqtt"]["port"] = int(port)
            except ValueError:
                fail(f"--broker: port {port!r} is not a number")
    if args.device_id:
        update["device"] = {"id": args.device_id}
    if getattr(args, "no_mqtt", False):
        update.setdefault("mqtt", {})["enabled"] = False
    if getattr(args, "pool", None):
        update["pool"] = {"enabled": True, "name": args.pool}
    wyoming: dict[str, Any] = {}
    if getattr(args, "wyoming", False):
        wyoming["enabled"] = True
    if getattr(args, "wyoming_host", None):
        wyoming["host"] = args.wyoming_host
    if getattr(args, "wyoming_port", None) is not None:
        wyoming["port"] = args.wyoming_port
    if getattr(args, "no_zeroconf", False):
        wyoming["zeroconf"] = False
    if wyoming:
        update["wyoming"] = wyoming
    if args.log_level or args.log_json:
        update["logging"] = {}
        if args.log_level:
            update["logging"]["level"] = args.log_level
        if args.log_json:
            update["logging"]["format"] = "json"
    return update


def build_sources(config: AgentConfig, extra_files: list[str]) -> list[AudioSource]:
    from edge_agent.audio.sources import FileAudioSource, create_source

    sources: list[AudioSource] = [create_source(entry) for entry in config.audio.sources]
    for index, path in enumerate(extra_files):
        stream_id = (
            "file" if index == 0 and not any(s.stream_id == "file" for s in sources) else f"file{index}"
        )
        sources.append(FileAudioSource(FileSource(id=stream_id, path=path)))
    return sources


class StartFailed(Exception):
    """The agent could not be built from its configuration (the message says why)."""


def run_agent(args: argparse.Namespace) -> int:
    tune_allocator()
    config_path = Path(args.config).resolve() if args.config else None
    reverted: str | None = None
    try:
        agent, config = start_agent(args, config_path)
    except StartFailed as failure:
        # A remote change kept for this start may be what broke it: go back to the last start
        # that worked rather than fail on every start (and say so once online).
        rejected = revert_remote_overrides(config_path) if config_path is not None else None
        if rejected is None:
            fail(str(failure))
        reverted = (
            f"did not start with the configuration changed remotely ({failure}); the change was moved "
            f"to {rejected.name} and the last configuration that started is back"
        )
        print(f"edge-agent: {reverted}", file=sys.stderr)
        try:
            agent, config = start_agent(args, config_path)
        except StartFailed as again:
            fail(str(again))
    try:
        for integration in build_integrations(config, agent):
            agent.add_integration(integration)
    except (ImportError, RuntimeError) as error:
        agent.stop()
        fail(str(error))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        agent.stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http_server = None
    if config.http.enabled:
        from edge_agent.http.agent_backend import AgentBackend
        from edge_agent.http.server import start_http_server

        backend = AgentBackend()
        agent.add_integration(backend)  # before start(): every live detection is counted
        try:
            http_server = start_http_server(config.http, backend)
        except OSError as error:
            fail(f"http: cannot listen on {config.http.host}:{config.http.port}: {error.strerror or error}")
    agent.start()
    if config_path is not None:
        keep_last_good(config_path)
    if reverted is not None:
        agent.errors.report("config_reverted", reverted)  # published once the broker takes it
    try:
        agent.wait(keep_running=http_server is not None or config.wyoming.enabled)
    finally:
        if http_server is not None:
            http_server.stop()  # before the agent closes its outbox
        agent.stop()
    if agent.restart_requested:
        log.info("restarting")
        # The same command line, in a fresh process image: new config, new model, same PID.
        os.execv(sys.executable, [sys.executable, "-m", "edge_agent", *sys.argv[1:]])
    return 0


def start_agent(args: argparse.Namespace, config_path: Path | None) -> tuple[Agent, AgentConfig]:
    """The configured agent, built (not started): its model loaded, its keywords compiled, its
    outbox opened. Raises StartFailed naming what is wrong."""
    # Imported here: `edge-agent detect` should not pay for paho, psutil and SQLite.
    from edge_agent.agent.app import Agent
    from edge_agent.agent.outbox import OutboxError

    try:
        config = merge_update(load_config(args.config), _overrides(args))
        config = apply_command_line(config, args)
    except ConfigError as error:
        raise StartFailed(str(error)) from None
    configure_logging(config.logging.level, config.logging.format == "json")
    try:
        model = load_model(config)
        compile_config_keywords(model, config)  # a keyword the model cannot say fails here
        sources = build_sources(config, getattr(args, "file", []))
        agent = Agent(config, model, sources, config_path=config_path)
    except (ConfigError, OutboxError, ModelError, LexiconError, ImportError, ValueError, OSError) as error:
        raise StartFailed(str(error)) from None
    return agent, config


def build_integrations(config: AgentConfig, agent: Agent) -> list[Integration]:
    """What plugs into the agent, as the configuration asks: the Wyoming server with or without
    MQTT, the rest only with it."""
    integrations: list[Integration] = []
    if config.wyoming.enabled:
        try:
            from edge_agent.wyoming.server import WyomingServer
        except ImportError as error:
            raise ImportError(
                f"wyoming.enabled needs the wyoming extra (pip install 'edge-agent[wyoming]'): {error}"
            ) from error
        integrations.append(WyomingServer())
    if config.mqtt.enabled:
        integrations += _mqtt_integrations(config, agent)
    return integrations


def _mqtt_integrations(config: AgentConfig, agent: Agent) -> list[Integration]:
    from edge_agent.fleet.commands import CommandProcessor
    from edge_agent.fleet.homeassistant import HomeAssistantDiscovery

    # Home Assistant discovery is always attached: when disabled it removes what it published.
    integrations: list[Integration] = [
        CommandProcessor(agent),
        HomeAssistantDiscovery(commands_attached=True),
    ]
    if config.hermes.enabled:
        from edge_agent.fleet.hermes import HermesBridge

        integrations.append(HermesBridge())
    if config.pool.enabled:
        from edge_agent.fleet.pool import PoolWorker

        integrations.append(PoolWorker(config.pool.name))
    return integrations
