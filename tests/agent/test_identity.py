"""Two running agents with one device id: a clear error and a back-off, not a takeover loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edge_agent.agent.errors import ErrorReporter, Refusal
from edge_agent.agent.identity import (
    CONFLICT_BACKOFF_SECONDS,
    CONFLICT_CLEAR_SECONDS,
    ERROR_CODE,
    SESSION_TAKEN_OVER,
    IdentityGuard,
)
from edge_agent.config.schema import default_device_id, machine_suffix
from edge_agent.mqtt.transport import InboundMessage
from tests.broker import Received
from tests.support import agent_config, wait_until

PREFIX = "edge_agent/twin"
# Availability messages two agents may cause before one of them backs off: each takeover is
# an `online` and the other's last will `offline`; one or two rounds of them.
MAX_AVAILABILITY_MESSAGES = 12


def test_two_agents_with_one_id_end_in_an_error_naming_both_boots_not_a_loop(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    client.subscribe(f"{PREFIX}/availability")
    client.subscribe(f"{PREFIX}/error")
    client.subscribe(f"{PREFIX}/health")
    agents = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        agents.append(make_agent(agent_config(broker.port, folder, device="twin")))
    errors = client.wait_for(
        f"{PREFIX}/error", lambda m: any(e.json()["code"] == ERROR_CODE for e in m), timeout=30
    )

    # One of them backs off (disconnected, waiting minutes); the other keeps the connection.
    def settled() -> bool:
        one, two = agents
        return any(
            a.identity.in_conflict and not a.transport.connected and b.transport.connected
            for a, b in ((one, two), (two, one))
        )

    wait_until(settled, timeout=30)
    backing_off = next(a for a in agents if a.identity.in_conflict and not a.transport.connected)
    survivor = next(a for a in agents if a is not backing_off)
    assert backing_off.identity.conflict_with == survivor.boot_id
    error = next(e.json() for e in errors if e.json()["code"] == ERROR_CODE)
    assert survivor.boot_id in error["message"] and backing_off.boot_id in error["message"]
    assert "device.id" in error["message"]
    # Three more health reports from the survivor: the connection holds meanwhile (a loop
    # would have knocked it off within a second or two, as it did before the back-off).
    seen = len(client.on(f"{PREFIX}/health"))

    def survivor_reports(messages: list[Received]) -> bool:
        later = [m.json() for m in messages[seen:] if m.payload]
        return sum(1 for report in later if report["boot_id"] == survivor.boot_id) >= 3

    client.wait_for(f"{PREFIX}/health", survivor_reports, timeout=30)
    availability = client.on(f"{PREFIX}/availability")
    assert len(availability) <= MAX_AVAILABILITY_MESSAGES, [m.payload for m in availability]
    assert availability[-1].payload == b"online" and survivor.transport.connected


def test_a_restart_of_the_same_device_is_no_conflict(  # type: ignore[no-untyped-def]
    broker, make_agent, client, tmp_path: Path
) -> None:
    """The retained info of the previous start has another boot id: that is no other agent."""
    client.subscribe(f"{PREFIX}/error")
    client.subscribe(f"{PREFIX}/info")
    first = make_agent(agent_config(broker.port, tmp_path, device="twin"))
    client.wait_for(f"{PREFIX}/info", lambda m: any(x.json()["boot_id"] == first.boot_id for x in m))
    first.stop(timeout=5)
    second = make_agent(agent_config(broker.port, tmp_path, device="twin"))
    client.wait_for(f"{PREFIX}/info", lambda m: any(x.json()["boot_id"] == second.boot_id for x in m))
    second.presence.publish_state()  # another round of its own info
    client.wait_for(f"{PREFIX}/info", lambda m: sum(x.json()["boot_id"] == second.boot_id for x in m) >= 2)
    assert not second.identity.in_conflict
    assert client.on(f"{PREFIX}/error") == []


def test_the_default_id_is_the_host_name_and_a_stable_machine_suffix(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    suffix = machine_suffix((str(tmp_path / "missing"), str(machine_id)))
    assert suffix is not None and len(suffix) == 6 and suffix not in machine_id.read_text()
    assert suffix == machine_suffix((str(machine_id),))  # stable
    other = tmp_path / "other-id"
    other.write_text("fedcba9876543210fedcba9876543210\n")
    assert machine_suffix((str(other),)) != suffix
    assert default_device_id("raspberrypi", suffix) == f"raspberrypi-{suffix}"
    assert default_device_id("my.pi.local", "abc123") == "my-abc123"  # the first label only
    assert default_device_id("raspberrypi", "") == "raspberrypi"  # no machine id: the host name
    assert len(default_device_id("x" * 100, "abc123")) == 64
    assert machine_suffix((str(tmp_path / "missing"),)) is None


# --- the rules, one at a time (a stand-in for the transport: mosquitto 2.0 here never sends the
# MQTT 5 "Session taken over" reason, and the rules need an injected clock) ---------------------


class TransportHooks:
    """What IdentityGuard uses of MqttTransport: subscribe, the two hooks, the back-off floor."""

    def __init__(self) -> None:
        self.handler: Callable[[InboundMessage], None] | None = None
        self.connected_hook: Callable[[], None] | None = None
        self.disconnected_hook: Callable[[int | None, str], None] | None = None
        self.floor = 0.0

    def subscribe(self, topic: str, handler: Callable[[InboundMessage], None], qos: int = 0) -> None:
        self.handler = handler

    def on_connected(self, hook: Callable[[], None]) -> None:
        self.connected_hook = hook

    def on_disconnected(self, hook: Callable[[int | None, str], None]) -> None:
        self.disconnected_hook = hook

    def set_backoff_floor(self, seconds: float) -> None:
        self.floor = seconds


def guarded() -> tuple[IdentityGuard, TransportHooks, list[Refusal], list[float]]:
    hooks, published, now = TransportHooks(), [], [0.0]
    guard = IdentityGuard(
        "twin",
        "mine",
        f"{PREFIX}/info",
        hooks,
        ErrorReporter(published.append),
        clock=lambda: now[0],  # type: ignore[arg-type]
    )
    guard.attach()
    assert hooks.connected_hook is not None
    hooks.connected_hook()
    return guard, hooks, published, now


def info_from(hooks: TransportHooks, boot_id: str, retained: bool) -> None:
    assert hooks.handler is not None
    payload = json.dumps({"device": "twin", "boot_id": boot_id}).encode()
    hooks.handler(InboundMessage(f"{PREFIX}/info", payload, 1, retained))


def test_the_info_of_an_earlier_start_before_ours_is_no_conflict() -> None:
    guard, hooks, published, _ = guarded()
    info_from(hooks, "earlier", retained=True)  # what the last start left
    info_from(hooks, "mine", retained=False)  # ours replaces it
    assert not guard.in_conflict and hooks.floor == 0 and published == []


def test_one_live_foreign_info_after_ours_is_a_conflict() -> None:
    guard, hooks, published, _ = guarded()
    info_from(hooks, "mine", retained=False)
    info_from(hooks, "theirs", retained=False)
    assert guard.conflict_with == "theirs" and hooks.floor == CONFLICT_BACKOFF_SECONDS
    (refusal,) = published
    assert refusal.code == ERROR_CODE and "theirs" in refusal.message and "mine" in refusal.message


def test_a_retained_foreign_info_needs_a_second_sighting() -> None:
    guard, hooks, published, _ = guarded()
    info_from(hooks, "mine", retained=False)
    info_from(hooks, "theirs", retained=True)  # perhaps a broker restored from an old snapshot
    assert not guard.in_conflict and hooks.floor == 0
    info_from(hooks, "theirs", retained=True)
    assert guard.in_conflict and len(published) == 1
    info_from(hooks, "theirs", retained=True)
    assert len(published) == 1  # reported once per other boot


def test_a_session_taken_over_is_a_conflict_at_once() -> None:
    guard, hooks, published, _ = guarded()
    assert hooks.disconnected_hook is not None
    hooks.disconnected_hook(128, "Unspecified error")  # a lost connection says nothing
    assert not guard.in_conflict
    hooks.disconnected_hook(SESSION_TAKEN_OVER, "Session taken over")
    assert guard.conflict_with == "unknown" and guard.takeovers == 1 and len(published) == 1


def test_a_long_calm_connection_ends_the_conflict() -> None:
    guard, hooks, _, now = guarded()
    info_from(hooks, "mine", retained=False)
    info_from(hooks, "theirs", retained=False)
    assert hooks.connected_hook is not None and hooks.disconnected_hook is not None
    hooks.connected_hook()
    now[0] += CONFLICT_CLEAR_SECONDS / 2
    hooks.disconnected_hook(128, "lost")
    assert guard.in_conflict  # too short to tell
    hooks.connected_hook()
    now[0] += CONFLICT_CLEAR_SECONDS
    hooks.disconnected_hook(128, "lost")
    assert not guard.in_conflict and hooks.floor == 0
