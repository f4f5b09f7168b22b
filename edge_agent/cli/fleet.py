"""``edge-agent fleet``: every agent under a topic prefix at a glance, and commands to them.

::

    edge-agent fleet --broker broker:1883               # a table of every device, once
    edge-agent fleet --watch                            # the table every second until Ctrl-C
    edge-agent fleet --json | jq '.devices[] | select(.status == "offline")'
    edge-agent fleet cmd kitchen ping
    edge-agent fleet cmd all set_config keywords='["小云小云","如家酒店"]'
    edge-agent fleet cmd group:upstairs mute --json

The table comes from the retained ``availability``, ``info`` and ``health`` messages, so a monitor
started at any time sees the whole fleet at once (:mod:`edge_agent.fleet.monitor` folds them).
Exit codes: 0 all good, 1 a command failed or an expected device did not answer, 2 usage or
connection errors. See docs/fleet.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import ssl
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from edge_agent.cli import rollout as rollout_cli
from edge_agent.cli.common import fail
from edge_agent.config import COMMAND_NAMES
from edge_agent.fleet.monitor import (
    OFFLINE,
    ONLINE,
    CommandRound,
    FleetView,
    Target,
    format_summary,
    format_table,
    iso_time,
    lenient_parse,
)
from edge_agent.mqtt.client import MqttClient, MqttClientError
from edge_agent.mqtt.messages import CommandResult, PayloadError, parse_json_object
from edge_agent.mqtt.transport import InboundMessage

EXIT_OK, EXIT_FAILED = 0, 1  # usage and connection errors: common.EXIT_USAGE (2), through fail()
CONNECT_TIMEOUT_S = 10.0
REFRESH_S = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "fleet",
        help="show every agent under a topic prefix, or send them a command",
        usage="%(prog)s [options] [--json] [--watch]\n"
        "       %(prog)s cmd TARGET NAME [KEY=VALUE ...] [--args JSON] [--timeout S] [--json] [options]\n"
        "       %(prog)s rollout --group G --set KEY=VALUE [--canary N%%] [--watch DURATION] [options]",
        description="Show every device seen under the topic prefix: online/offline (the last will "
        "marks crashed devices offline), last seen, version, model, keywords, CPU, memory, "
        "temperature, RTF, detections, outbox depth, reconnects; devices whose health is overdue "
        "are flagged. `edge-agent fleet cmd TARGET NAME` sends a command and prints the answers.",
        epilog="exit codes: 0 ok, 1 a command failed or an expected device did not answer, "
        "2 usage or connection error",
    )
    _connection_options(parser, suppress=False)
    parser.add_argument("--json", action="store_true", help="print JSON (one document per refresh)")
    parser.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    parser.set_defaults(handler=run_monitor)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    cmd = actions.add_parser(
        "cmd",
        # Its own prog: argparse would build it from the parent's two-line usage.
        prog=f"{parser.prog} cmd",
        help="send a command to a device, a group or all devices and print the answers",
        description="Send a command (MQTT 5 correlation data, and for one device a response topic) "
        "and print each device's answer as it arrives. KEY=VALUE values are JSON when they parse "
        "(muted=false, keywords='[\"小云小云\"]'), else strings; dotted keys nest (engine.muted=true). "
        f"Agents know: {', '.join(COMMAND_NAMES)}.",
        epilog="Devices known to be offline are not expected to answer `all` or a group. exit codes: "
        "0 every answer ok, 1 an answer said ok:false or an expected device did not answer, "
        "2 usage or connection error",
    )
    cmd.add_argument("target", metavar="TARGET", help="a device id, all, or group:NAME")
    cmd.add_argument("name", metavar="NAME", help="the command, e.g. ping, get_config, set_config, mute")
    cmd.add_argument("arguments", nargs="*", metavar="KEY=VALUE", help="command arguments")
    cmd.add_argument("--args", metavar="JSON", help="arguments as one JSON object (KEY=VALUE adds to it)")
    cmd.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for answers (default 10)"
    )
    cmd.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print answers as JSON")
    _connection_options(cmd, suppress=True)
    cmd.set_defaults(handler=run_command)
    rollout_cli.register(actions, _connection_options)


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """On `fleet` with defaults, and again on `fleet cmd` without (so they may come after it)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--broker",
        default=default("localhost"),
        metavar="HOST[:PORT]",
        help="MQTT broker (default localhost:1883, or :8883 with TLS)",
    )
    parser.add_argument("--prefix", default=default("edge_agent"), help="topic prefix (default edge_agent)")
    parser.add_argument("--username", default=default(None), metavar="U", help="MQTT user name")
    parser.add_argument(
        "--password-file", default=default(None), metavar="F", help="file whose first line is the password"
    )
    parser.add_argument(
        "--tls-ca", default=default(None), metavar="FILE", help="connect with TLS, verifying with this CA"
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help="connect with TLS (system CAs)"
    )
    parser.add_argument(
        "--protocol", choices=("5", "3.1.1"), default=default("5"), help="MQTT version (default 5)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=default(2.0),
        metavar="SECONDS",
        help="seconds to collect the retained state (who is online) before showing it (default 2)",
    )


# --- pure helpers --------------------------------------------------------------------------------


def parse_broker(text: str, tls: bool) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``; the port defaults to 1883 (8883 with TLS)."""
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"--broker {text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValueError(f"--broker {text!r}: no host")
    if not port_text:
        return host, 8883 if tls else 1883
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--broker {text!r}: port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def parse_arguments(pairs: Sequence[str], args_json: str | None = None) -> dict[str, Any]:
    """``--args`` JSON, then KEY=VALUE pairs (VALUE as JSON when it parses, else a string)."""
    result: dict[str, Any] = {}
    if args_json is not None:
        try:
            result = json.loads(args_json)
        except json.JSONDecodeError as error:
            raise ValueError(f"--args is not JSON ({error.msg} at position {error.pos})") from None
        if not isinstance(result, dict):
            raise ValueError(f"--args must be a JSON object, got {type(result).__name__}")
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {pair!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, last = key.split(".")
        if not all(parents) or not last:
            raise ValueError(f"argument {pair!r}: empty part in the key")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"argument {pair!r}: {part} is already set to a value")
        node[last] = value
    if "id" in result:
        raise ValueError("'id' is set by edge-agent fleet to match the answers; leave it out")
    try:
        json.dumps(result, allow_nan=False)
    except ValueError:
        raise ValueError("arguments must not contain NaN or Infinity (not valid JSON)") from None
    return result


def describe_answer(device: str, answer: CommandResult) -> str:
    """One readable line per answer."""
    if answer.ok is True:
        text = f"{device:<16} ok     {json.dumps(answer.result, ensure_ascii=False)}"
        if answer.restart_required:
            text += f"  (restart required: {', '.join(map(str, answer.restart_required))})"
        return text
    return f"{device:<16} error  {answer.error}"


# --- the connection ------------------------------------------------------------------------------


def _connect(args: argparse.Namespace, filters: list[str]) -> MqttClient:
    """Connect and subscribe, or fail with exit code 2 and the reason."""
    tls = bool(args.tls or args.tls_ca)
    try:
        host, port = parse_broker(args.broker, tls)
    except ValueError as error:
        fail(str(error))
    password = None
    if args.username:
        password = _read_password(args.password_file)
    elif args.password_file:
        fail("--password-file needs --username")
    context = None
    if tls:
        try:
            context = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as error:
            fail(f"--tls-ca {args.tls_ca}: not a readable PEM CA certificate ({error})")
    client = MqttClient(
        host,
        port,
        client_id=f"edge-agent-fleet-{uuid.uuid4().hex[:10]}",
        mqtt5=args.protocol == "5",
        username=args.username,
        password=password,
        tls=context,
    )
    try:
        client.connect(CONNECT_TIMEOUT_S)
        # QoS 0: the broker queues QoS 1 messages per client up to a bound (mosquitto's
        # max_queued_messages, 1000) and drops the rest, which would lose the retained state of
        # a fleet larger than that; this client keeps no session, so QoS 1 would buy nothing.
        refused = client.subscribe(*filters, qos=0, timeout=CONNECT_TIMEOUT_S)
    except MqttClientError as error:
        client.close()
        fail(str(error))
    if refused:
        described = ", ".join(f"{topic_filter} ({reason})" for topic_filter, reason in refused.items())
        print(f"warning: the broker refused a subscription: {described}", file=sys.stderr)
    return client


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")
    except OSError as error:
        fail(f"--password-file: cannot read {path}: {error.strerror or error}")


def _check_wait(args: argparse.Namespace) -> None:
    if args.wait < 0:
        fail("--wait must not be negative")


# --- edge-agent fleet ------------------------------------------------------------------------------


def run_monitor(args: argparse.Namespace) -> int:
    _check_wait(args)
    view = FleetView(args.prefix)
    client = _connect(args, view.filters())
    try:
        _collect(client, view, args.wait)
        clear = args.watch and not args.json and sys.stdout.isatty()
        while True:
            text = _render(view, client, args.json)
            print(("\x1b[H\x1b[2J" if clear else "") + text, flush=True)
            if not args.watch:
                if not view.devices():
                    print(f"no device seen under {args.prefix}/ (another --prefix?)", file=sys.stderr)
                return EXIT_OK
            if not args.json and not clear:
                print(flush=True)  # a blank line between tables written to a file or a pipe
            _collect(client, view, REFRESH_S)
    except KeyboardInterrupt:
        if args.watch:
            return EXIT_OK
        raise
    finally:
        client.close()


def _collect(client: MqttClient, view: FleetView, seconds: float) -> None:
    """Fold into the view what arrives within ``seconds``."""
    for message in client.messages(seconds):
        view.handle(message.topic, message.payload, message.retain)


def _render(view: FleetView, client: MqttClient, as_json: bool) -> str:
    now = view.clock()
    rows = view.rows()
    summary = view.summary()
    if as_json:
        document = {
            "schema": 1,
            "time": iso_time(now),
            "broker": client.address,
            "prefix": view.prefix,
            "connected": client.connected,
            "summary": summary,
            "devices": [row.to_dict() for row in rows],
        }
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    state = "" if client.connected else " (disconnected, reconnecting)"
    lines = [f"{view.prefix} on {client.address}{state} at {iso_time(now)}: {format_summary(summary)}"]
    lines.append(format_table(rows))
    for row in rows:
        notes = ([f"OVERDUE: {row.overdue_reason}"] if row.overdue_reason else []) + row.problems
        lines += [f"  {row.device}: {note}" for note in notes]
    return "\n".join(lines)


# --- edge-agent fleet cmd --------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    _check_wait(args)
    if args.timeout <= 0:
        fail("--timeout must be positive")
    try:
        target = Target.parse(args.target)
        topic = target.command_topic(args.prefix, args.name)
        arguments = parse_arguments(args.arguments, args.args)
        response_topic = (
            # Inside the device's own subtree, where the documented ACL lets it publish.
            CommandResult.TOPIC.format(prefix=args.prefix, device=target.name)
            if target.kind == "device"
            else None  # one topic cannot be every device's: answers come on each {device}/cmd_result
        )
    except ValueError as error:
        fail(str(error))
    request_id = f"fleet-{uuid.uuid4().hex[:12]}"
    correlation = request_id.encode()
    view = FleetView(args.prefix)
    client = _connect(args, [*view.filters(), CommandResult.TOPIC.filter(prefix=args.prefix)])
    command = CommandRound(target, args.name)
    try:
        payload = json.dumps({**arguments, "id": request_id}, ensure_ascii=False).encode("utf-8")
        try:
            client.publish(
                topic,
                payload,
                response_topic=response_topic,
                correlation_data=correlation,
                timeout=args.timeout,
            )
        except MqttClientError as error:
            fail(str(error))
        print(f"sent {args.name} to {topic}; waiting up to {args.timeout:g} s", file=sys.stderr)
        started = time.monotonic()
        settle_at = started + min(args.wait, args.timeout)  # the retained state is in by then
        give_up_at = started + args.timeout
        warned = False
        while True:
            now = time.monotonic()
            message = client.receive(max(0.0, (give_up_at if warned else settle_at) - now))
            if message is not None:
                parts = CommandResult.TOPIC.match(message.topic, args.prefix)
                if parts is not None:
                    _take_answer(command, parts["device"], message, request_id, correlation, args.json)
                else:
                    view.handle(message.topic, message.payload, message.retain)
            now = time.monotonic()
            settled = now >= settle_at
            expected = view.expected(target)
            if settled and not warned:
                warned = True
                _warn_about_target(view, target)
            if command.complete(expected) and (settled or target.kind == "device"):
                break
            if now >= give_up_at:
                break
    finally:
        client.close()
    _summarize(view, target, command, expected, args.timeout)
    return command.exit_code(expected)


def _take_answer(
    command: CommandRound,
    device: str,
    message: InboundMessage,
    request_id: str,
    correlation: bytes,
    as_json: bool,
) -> None:
    if message.retain:
        return  # an old answer somebody retained, not ours
    try:
        data = parse_json_object(message.payload, "CommandResult")
        answer = lenient_parse(CommandResult, message.payload)
    except PayloadError as error:
        if f'"{request_id}"' in message.payload.decode("utf-8", errors="replace"):
            print(f"warning: unreadable answer from {device}: {error}", file=sys.stderr)
        return
    ours = message.correlation_data == correlation or data.get("id") == request_id
    if not ours or not command.add(dataclasses.replace(answer, device=device)):
        return
    if as_json:
        print(json.dumps({**data, "device": device}, ensure_ascii=False), flush=True)
    else:
        print(describe_answer(device, answer), flush=True)


def _warn_about_target(view: FleetView, target: Target) -> None:
    if target.kind == "device":
        status = view.status(target.name)
        if status is None:
            print(f"warning: {target.name} was never seen under {view.prefix}/", file=sys.stderr)
        elif status != ONLINE:
            print(f"warning: {target.name} is {status}; waiting for an answer anyway", file=sys.stderr)
    elif not view.expected(target):
        print(f"warning: no online device in {target}", file=sys.stderr)


def _summarize(
    view: FleetView, target: Target, command: CommandRound, expected: set[str], timeout: float
) -> None:
    def names(items: Sequence[str] | set[str]) -> str:
        return ", ".join(sorted(items))

    answered = len(command.answers)
    text = f"{answered} answer(s)"
    if target.kind != "device":
        text += f", {len(expected & set(command.answers))} of {len(expected)} online device(s) expected"
    failed = command.failed()
    text += f"; failed: {names(failed)}" if failed else ("; all answers ok" if answered else "")
    print(text, file=sys.stderr)
    missing = command.missing(expected)
    if missing:
        overdue = {name for name in missing if (row := view.row(name)) is not None and row.overdue}
        described = [f"{name} (health overdue)" if name in overdue else name for name in missing]
        print(f"no answer within {timeout:g} s from: {', '.join(described)}", file=sys.stderr)
    if target.kind != "device":
        in_scope = [
            name
            for name in view.devices()
            if view.status(name) != ONLINE and (target.kind == "all" or target.name in view.groups(name))
        ]
        silent = [name for name in in_scope if name not in command.answers]
        if silent:
            offline = [n for n in silent if view.status(n) == OFFLINE]
            other = [n for n in silent if n not in offline]
            parts = ([f"{names(offline)} (offline)"] if offline else []) + (
                [f"{names(other)} (no availability)"] if other else []
            )
            print(f"not expected to answer: {'; '.join(parts)}", file=sys.stderr)
