"""``edge-agent fleet rollout``: a ``set_config`` change to a canary first, watched, then to the rest.

::

    edge-agent fleet rollout --group kitchen --set keywords='[{"text":"小云小云","threshold":0.04}]' \\
        --canary 10% --watch 30m --broker broker.lan

The rules (canary choice, the comparison, device states) are :mod:`edge_agent.fleet.rollout`;
this module sends the commands and folds what comes back. Every command goes to one device
(``{prefix}/{device}/cmd/{name}``) with MQTT 5 correlation data, so each answer is matched to
its device and every device's state is known at every moment. Exit codes: 0 the change reached
every device, 1 it was rolled back or some devices did not take it, 2 usage or connection error,
130 interrupted (after restoring what was changed). See docs/fleet.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.cli.common import fail
from edge_agent.fleet.monitor import OFFLINE, ONLINE, FleetView, Target, lenient_parse
from edge_agent.fleet.rollout import (
    DEFAULT_MAX_RATE_RATIO,
    DEFAULT_SIGNIFICANCE,
    DeviceState,
    HealthMark,
    Ledger,
    Verdict,
    choose_canary,
    exposure_of,
    flatten,
    judge,
    nest,
    parse_duration,
    parse_fraction,
    previous_values,
)
from edge_agent.mqtt.client import MqttClient, MqttClientError
from edge_agent.mqtt.messages import CommandResult, CommandTopic, ErrorReport, PayloadError

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
JUDGE_EVERY_S = 1.0  # how often the watch re-judges the canary (a failure stops it early)
# After --wait, how much longer to collect the retained state while online devices still lack
# their info or health (a large fleet's retained messages take a while to arrive).
SETTLE_LIMIT_S = 60.0


def register(
    actions: argparse._SubParsersAction,  # type: ignore[type-arg]
    connection_options: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    parser = actions.add_parser(
        "rollout",
        help="apply a set_config change to a canary part of a group, watch it, then continue or roll back",
        usage="edge-agent fleet rollout --group G --set KEY=VALUE [--set ...] [--canary N%%] "
        "[--watch DURATION] [--json] [options]",
        description="Stage a set_config change: snapshot the group's current values (get_config), "
        "apply the change to a canary fraction, compare the canary's health, detections per hour "
        "and errors with the rest's for --watch, then apply it to the rest or give the canary its "
        "previous values back. Ctrl-C restores every device changed so far and prints each "
        "device's state.",
        epilog="exit codes: 0 the change reached every device, 1 rolled back or not taken everywhere, "
        "2 usage or connection error, 130 interrupted (changes restored)",
    )
    parser.add_argument("--group", required=True, metavar="G", help="the devices' group (device.groups)")
    parser.add_argument(
        "--set",
        dest="pairs",
        action="append",
        required=True,
        metavar="KEY=VALUE",
        help="a set_config argument, as for `fleet cmd` (repeat for several)",
    )
    parser.add_argument("--canary", default="10%", metavar="N%", help="the canary's share (default 10%%)")
    parser.add_argument("--watch", default="10m", metavar="DURATION", help="how long to watch (90s, 15m, 2h)")
    parser.add_argument(
        "--max-rate-ratio",
        type=float,
        default=DEFAULT_MAX_RATE_RATIO,
        metavar="R",
        help=f"roll back when the canary detects more than R times as often as the rest, beyond "
        f"chance (default {DEFAULT_MAX_RATE_RATIO:g})",
    )
    parser.add_argument(
        "--significance",
        type=float,
        default=DEFAULT_SIGNIFICANCE,
        metavar="P",
        help=f"the Poisson test's level for 'beyond chance' (default {DEFAULT_SIGNIFICANCE:g})",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for each round of answers"
    )
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print a JSON report")
    connection_options(parser, True)
    parser.set_defaults(handler=run_rollout)


@dataclass
class _Round:
    """One command sent to many devices, one message each: the answers so far."""

    name: str
    correlation: dict[bytes, str] = field(default_factory=dict)  # correlation data -> device
    answers: dict[str, CommandResult] = field(default_factory=dict)

    @property
    def waiting(self) -> list[str]:
        return sorted(set(self.correlation.values()) - set(self.answers))


class RolloutSession:
    """The connection, the fleet view and the rounds of commands of one rollout."""

    def __init__(self, client: MqttClient, prefix: str, timeout: float) -> None:
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.view = FleetView(prefix)
        self.errors: dict[str, int] = {}  # device -> errors published while counting
        self.counting_errors = False
        self.rounds: list[_Round] = []

    # --- messages ------------------------------------------------------------------------
    def pump(self, seconds: float) -> None:
        """Fold in everything that arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (message := self.client.receive(max(0.0, deadline - time.monotonic()))) is not None:
            self._handle(message.topic, message.payload, message.retain, message.correlation_data)
            if time.monotonic() >= deadline:
                break

    def _handle(self, topic: str, payload: bytes, retained: bool, correlation: bytes | None) -> None:
        parts = CommandResult.TOPIC.match(topic, self.prefix)
        if parts is not None:
            self._answer(parts["device"], payload, correlation)
            return
        parts = ErrorReport.TOPIC.match(topic, self.prefix)
        if parts is not None:
            if self.counting_errors and not retained:
                self.errors[parts["device"]] = self.errors.get(parts["device"], 0) + 1
            return
        self.view.handle(topic, payload, retained)

    def _answer(self, device: str, payload: bytes, correlation: bytes | None) -> None:
        try:
            answer = lenient_parse(CommandResult, payload)
        except PayloadError:
            return
        key = correlation if correlation is not None else (answer.id or "").encode()
        for round_ in self.rounds:
            if round_.correlation.get(key) == device and device not in round_.answers:
                round_.answers[device] = answer
                return

    # --- commands ------------------------------------------------------------------------
    def send(self, name: str, arguments: dict[str, dict[str, Any]]) -> _Round:
        """``name`` with each device's own arguments, one message per device."""
        round_ = _Round(name)
        self.rounds.append(round_)
        for device, body in arguments.items():
            request_id = f"rollout-{uuid.uuid4().hex[:12]}"
            round_.correlation[request_id.encode()] = device
            topic = CommandTopic.DEVICE.format(prefix=self.prefix, device=device, command=name)
            self.client.publish(
                topic,
                json.dumps({**body, "id": request_id}, ensure_ascii=False).encode(),
                response_topic=CommandResult.TOPIC.format(prefix=self.prefix, device=device),
                correlation_data=request_id.encode(),
                wait=False,
            )
        self.client.flush(self.timeout)
        return round_

    def wait(self, round_: _Round, timeout: float | None = None) -> None:
        """Until every device of the round answered, or the timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while round_.waiting and time.monotonic() < deadline:
            self.pump(min(0.2, max(0.0, deadline - time.monotonic())))

    def settle(self, wait: float) -> None:
        """Collect the retained state: ``wait`` seconds, then on while an online device has no
        info or health yet (at most :data:`SETTLE_LIMIT_S` more): a device whose info has not
        arrived would be missing from its group."""
        self.pump(wait)
        deadline = time.monotonic() + SETTLE_LIMIT_S
        while time.monotonic() < deadline and self._incomplete():
            self.pump(0.2)

    def _incomplete(self) -> bool:
        return any(
            row.status == ONLINE and (row.started is None or row.health_time is None)
            for row in self.view.rows()
        )

    def marks(self, devices: Iterable[str]) -> dict[str, HealthMark]:
        marks = {}
        for name in devices:
            row = self.view.row(name)
            if row is not None and row.health_time is not None:
                marks[name] = HealthMark(row.boot_id, row.uptime_s, row.detections)
        return marks


def run_rollout(args: argparse.Namespace) -> int:
    from edge_agent.cli.fleet import _connect, parse_arguments  # the connection options are fleet's

    try:
        fraction = parse_fraction(args.canary)
        watch_s = parse_duration(args.watch)
        target = Target.parse(f"group:{args.group}")
        change = parse_arguments(args.pairs)
    except ValueError as error:
        fail(str(error))
    if args.timeout <= 0 or args.max_rate_ratio < 1 or not 0 < args.significance < 1:
        fail("--timeout must be positive, --max-rate-ratio at least 1, --significance in (0, 1)")
    as_json = getattr(args, "json", False)
    keys = sorted(flatten(change))
    filters = [
        *FleetView(args.prefix).filters(),
        CommandResult.TOPIC.filter(prefix=args.prefix),
        ErrorReport.TOPIC.filter(prefix=args.prefix),
    ]
    client = _connect(args, filters)
    session = RolloutSession(client, args.prefix, args.timeout)
    ledger = Ledger()
    report: dict[str, Any] = {"schema": 1, "group": args.group, "change": change, "outcome": None}
    previous: dict[str, dict[str, Any]] = {}  # device -> the set_config arguments that restore it

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        session.settle(args.wait)
        members = sorted(session.view.expected(target))
        if not members:
            fail(f"no online device in group {args.group!r} under {args.prefix}/")
        for name in members:
            ledger.set(name, DeviceState.UNCHANGED)
        # 1. Snapshot: what to put back.
        snapshot = session.send("get_config", {name: {} for name in members})
        session.wait(snapshot)
        for name in members:
            answer = snapshot.answers.get(name)
            try:
                if answer is None:
                    raise ValueError("no answer to get_config")
                if answer.ok is not True or not isinstance(answer.result, dict):
                    raise ValueError(f"get_config failed: {answer.error}")
                previous[name] = nest(previous_values(answer.result.get("config") or {}, keys))
            except ValueError as error:
                ledger.set(name, DeviceState.UNCHANGED, f"left out: {error}")
        if not previous:
            say("no device of the group can take part (see below); nothing changed")
            report["outcome"] = "nothing to do"
            return _finish(report, ledger, as_json, EXIT_FAILED)
        canary = choose_canary(previous, fraction, json.dumps([args.group, change], sort_keys=True))
        rest = sorted(set(previous) - set(canary))
        report.update(canary=canary, rest=rest)
        say(
            f"rollout to group {args.group}: {len(previous)} device(s), "
            f"canary {len(canary)}: {', '.join(canary)}"
        )
        rows = [row for name in members if (row := session.view.row(name)) is not None]
        interval = max((row.health_interval_s or 0.0) for row in rows)
        if interval and watch_s < 3 * interval:
            say(
                f"warning: --watch {args.watch} is under 3 health intervals ({interval:g} s): "
                "little to compare"
            )

        # 2. Canary.
        failures = _apply(session, ledger, canary, change, "set_config")
        verdict: Verdict | None = None
        if not failures:
            # 3. Watch.
            say(f"canary changed; watching for {watch_s:g} s")
            verdict = _watch(session, canary, rest, watch_s, args)
        else:
            verdict = judge(*_exposures(session, {}, {}, canary, rest), failures)
        report["verdict"] = verdict.to_dict()
        if verdict.passed:
            say(f"canary passed ({_describe(verdict)}); applying to the other {len(rest)} device(s)")
            refused = _apply(session, ledger, rest, change, "set_config")
            report["outcome"] = "completed" if not refused else "completed with failures"
            return _finish(report, ledger, as_json, EXIT_OK if not refused else EXIT_FAILED)
        say("canary failed: " + "; ".join(verdict.reasons))
        _restore(session, ledger, previous)
        report["outcome"] = "rolled back"
        return _finish(report, ledger, as_json, EXIT_FAILED)
    except KeyboardInterrupt:
        say("interrupted: waiting for the answers already due, then restoring every changed device")
        report["outcome"] = "interrupted"
        try:
            # Each device's state follows the last set_config sent to it: settle newest first.
            settled: set[str] = set()
            for round_ in reversed(session.rounds):
                if round_.name != "set_config":
                    continue
                devices = set(round_.correlation.values()) - settled
                session.wait(round_)
                _settle(ledger, round_, devices)
                settled |= devices
            _restore(session, ledger, previous)
        except KeyboardInterrupt:
            say("interrupted again: restoring stopped; states as known now")
        for name in ledger.with_state(DeviceState.CHANGING, DeviceState.RESTORING):
            ledger.set(name, DeviceState.UNKNOWN, "a command went unanswered")
        return _finish(report, ledger, as_json, EXIT_INTERRUPTED)
    except MqttClientError as error:
        fail(str(error))
    finally:
        client.close()


def _apply(
    session: RolloutSession, ledger: Ledger, devices: list[str], change: dict[str, Any], command: str
) -> dict[str, str]:
    """Send ``change`` to ``devices``; returns those that did not take it, and why."""
    if not devices:
        return {}
    for name in devices:
        ledger.set(name, DeviceState.CHANGING)
    round_ = session.send(command, dict.fromkeys(devices, change))
    session.wait(round_)
    return _settle(ledger, round_)


def _settle(ledger: Ledger, round_: _Round, devices: set[str] | None = None) -> dict[str, str]:
    """Devices' states from a round's answers (for ``devices`` of it, default all); returns the
    devices that failed, and why."""
    failures: dict[str, str] = {}
    restoring = ledger.with_state(DeviceState.RESTORING)
    for name in set(round_.correlation.values()) if devices is None else devices:
        state = ledger.states.get(name)
        if state not in (DeviceState.CHANGING, DeviceState.RESTORING):
            continue
        answer = round_.answers.get(name)
        if answer is None:
            ledger.set(name, DeviceState.UNKNOWN, f"no answer to {round_.name}")
            failures[name] = f"no answer to {round_.name}"
        elif answer.ok is True:
            ledger.set(name, DeviceState.RESTORED if name in restoring else DeviceState.CHANGED, "")
        else:
            # set_config checks before it changes anything: a refusal leaves the device as it was.
            kept = DeviceState.CHANGED if name in restoring else DeviceState.UNCHANGED
            ledger.set(name, kept, f"refused: {answer.error}")
            failures[name] = f"refused the change: {answer.error}"
    return failures


def _restore(session: RolloutSession, ledger: Ledger, previous: dict[str, dict[str, Any]]) -> None:
    """Give every device that is (or may be) changed its previous values back."""
    devices = [
        name for name in ledger.with_state(DeviceState.CHANGED, DeviceState.UNKNOWN) if name in previous
    ]
    if not devices:
        return
    for name in devices:
        ledger.set(name, DeviceState.RESTORING)
    round_ = session.send("set_config", {name: previous[name] for name in devices})
    session.wait(round_)
    _settle(ledger, round_)


def _exposures(
    session: RolloutSession,
    start: dict[str, HealthMark],
    end: dict[str, HealthMark],
    canary: list[str],
    rest: list[str],
) -> tuple[Any, Any]:
    marks = {name: (start[name], end[name]) for name in start if name in end}
    canary_exposure, _ = exposure_of(marks, session.errors, canary)
    rest_exposure, _ = exposure_of(marks, session.errors, rest)
    return canary_exposure, rest_exposure


def _watch(
    session: RolloutSession, canary: list[str], rest: list[str], watch_s: float, args: argparse.Namespace
) -> Verdict:
    """Compare the canary with the rest for ``watch_s``; stops early when the canary fails."""
    everyone = [*canary, *rest]
    start = session.marks(everyone)
    session.errors.clear()
    session.counting_errors = True
    started = time.monotonic()
    while True:
        left = watch_s - (time.monotonic() - started)
        session.pump(max(0.0, min(JUDGE_EVERY_S, left)))
        end = session.marks(everyone)
        failures = _canary_failures(session, canary, start, end, final=left <= 0)
        canary_exposure, rest_exposure = _exposures(session, start, end, canary, rest)
        verdict = judge(
            canary_exposure,
            rest_exposure,
            failures,
            max_rate_ratio=args.max_rate_ratio,
            significance=args.significance,
        )
        if not verdict.passed or left <= 0:
            session.counting_errors = False
            return verdict


def _canary_failures(
    session: RolloutSession,
    canary: list[str],
    start: dict[str, HealthMark],
    end: dict[str, HealthMark],
    final: bool,
) -> dict[str, str]:
    failures: dict[str, str] = {}
    for name in canary:
        row = session.view.row(name)
        if row is None or row.status == OFFLINE:
            failures[name] = "went offline"
        elif row.worker_alive is False:
            failures[name] = "its engine worker died"
        elif name in start and name in end and start[name].boot_id != end[name].boot_id:
            failures[name] = "restarted"
        elif row.overdue:
            failures[name] = f"health overdue ({row.overdue_reason})"
        elif final and (name not in start or name not in end or end[name] == start[name]):
            failures[name] = "no health report during the watch"
    return failures


def _describe(verdict: Verdict) -> str:
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}/h"

    return (
        f"detections {rate(verdict.canary.rate_per_hour)} on the canary, "
        f"{rate(verdict.rest.rate_per_hour)} on the rest; "
        f"errors {verdict.canary.errors} and {verdict.rest.errors}"
    )


def _finish(report: dict[str, Any], ledger: Ledger, as_json: bool, code: int) -> int:
    report["counts"] = ledger.counts()
    report["devices"] = {
        name: {"state": state.value, "note": ledger.notes.get(name) or None}
        for name, state in sorted(ledger.states.items())
    }
    if as_json:
        print(json.dumps(report, ensure_ascii=False), flush=True)
    else:
        print("\n".join(ledger.lines()), flush=True)
        counts = ", ".join(f"{count} {state}" for state, count in report["counts"].items() if count)
        print(f"{report['outcome']}: {counts}", flush=True)
    return code
