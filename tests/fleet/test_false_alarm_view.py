"""`edge-agent fleet` shows detections per hour and near misses, and flags rate outliers."""

from __future__ import annotations

from edge_agent.fleet.monitor import (
    RATE_HIGH,
    RATE_LOW,
    format_table,
)
from tests.fleet.test_monitor import NOW, feed, fleet, health, info


def view_with(  # type: ignore[no-untyped-def]
    rates: dict[str, float | None], groups: dict[str, list[str]] | None = None, uptime_s: float = 3600.0
):
    view = fleet()
    for name, rate in rates.items():
        extra = {} if rate is None else {"detections_per_hour": rate, "near_miss": {"小云小云": 0.031}}
        feed(
            view,
            name,
            info=info(name, groups=(groups or {}).get(name, ["hall"])),
            health=health(name, at=NOW - 5, uptime_s=uptime_s, **extra),
        )
    return view


def flags(view) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    return {row.device: row.flags for row in view.rows()}


def test_rates_and_near_misses_reach_the_row_and_the_table() -> None:
    view = view_with({"a": 2.0, "b": 2.0, "c": 3.0})
    row = view.row("a")
    assert row is not None and row.detections_per_hour == 2.0 and row.near_miss == {"小云小云": 0.031}
    (rated,) = [r for r in view.rows() if r.device == "c"]
    assert rated.group_detections_per_hour == 2.0
    table = format_table(view.rows()).splitlines()
    assert "DET/H" in table[0] and "NEAR" in table[0]
    assert "3.0" in table[3].split() and "0.03" in table[3].split()


def test_a_device_far_above_its_group_is_flagged_high_and_one_far_below_low() -> None:
    view = view_with({"a": 30.0, "b": 32.0, "c": 31.0, "loud": 200.0, "deaf": 0.0})
    assert flags(view) == {"a": [], "b": [], "c": [], "loud": [RATE_HIGH], "deaf": [RATE_LOW]}
    # Over a group of ten an hour, silence for an hour is still within chance (e^-3.3).
    assert flags(view_with({"a": 10.0, "b": 12.0, "c": 11.0, "deaf": 0.0}))["deaf"] == []


def test_small_differences_and_small_groups_are_not_flagged() -> None:
    quiet = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 4.0}
    assert all(not f for f in flags(view_with(quiet)).values())  # a few an hour over a quiet group
    # Young devices: one detection in their first minute is 60 an hour, and means nothing yet.
    young = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 60.0, "e": 120.0}
    assert all(not f for f in flags(view_with(young, uptime_s=30.0)).values())
    assert flags(view_with(young))["e"] == [RATE_HIGH]  # the same rates over a whole hour
    assert all(not f for f in flags(view_with({"a": 1.0, "loud": 90.0})).values())  # two devices
    # Groups are compared apart: a busy group does not make the other's devices outliers.
    groups = {"k1": ["kitchen"], "k2": ["kitchen"], "k3": ["kitchen"]}
    mixed = view_with({"a": 1.0, "b": 1.0, "c": 1.0, "k1": 50.0, "k2": 55.0, "k3": 60.0}, groups)
    assert all(not f for f in flags(mixed).values())


def test_devices_without_the_telemetry_or_offline_are_left_out() -> None:
    view = view_with({"a": 10.0, "b": 10.0, "c": 10.0, "old": None})
    feed(view, "gone", availability=b"offline", info=info("gone", groups=["hall"]))
    assert flags(view)["old"] == [] and view.row("old").detections_per_hour is None  # type: ignore[union-attr]
    assert flags(view)["gone"] == []
