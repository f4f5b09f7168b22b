"""Two running agents with one device id: a clear error and a back-off, not a takeover loop."""

from __future__ import annotations

from pathlib import Path

from edge_agent.agent.identity import ERROR_CODE
from edge_agent.config.schema import default_device_id, machine_suffix
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
