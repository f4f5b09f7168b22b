"""FleetView, CommandRound and the table, with synthetic messages and a fake clock: no broker."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from edge_agent.fleet.monitor import (
    COLUMNS,
    DEFAULT_GRACE_S,
    OVERDUE_FACTOR,
    CommandRound,
    DeviceRow,
    FleetView,
    Target,
    display_width,
    format_age,
    format_summary,
    format_table,
    iso_time,
    parse_time,
    state_filters,
)
from edge_agent.mqtt.messages import CommandResult, DeviceInfo, HealthReport

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def info(device: str = "dev-1", started: float = NOW - 3600, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "device": device,
        "name": "Kitchen",
        "version": "0.1.0",
        "boot_id": "boot-1",
        "started": iso_time(started),
        "model": {"id": "damo/speech_charctc_kws_phone-xiaoyun", "revision": "v1.0.0", "backend": "numpy"},
        "keywords": [{"text": "小云小云", "threshold": 0.05}, {"text": "如家酒店", "threshold": 0.1}],
        "sources": [],
        "platform": {"machine": "aarch64"},
        "topics": {},
        "groups": ["upstairs"],
    }
    return DeviceInfo(**{**fields, **changes}).to_payload()


def health(device: str = "dev-1", at: float = NOW, interval: float = 60.0, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "device": device,
        "boot_id": "boot-1",
        "time": iso_time(at),
        "uptime_s": 3600.0,
        "cpu_percent": 3.14,
        "memory_rss_mb": 58.2,
        "temperature_c": 51.5,
        "detections": 12,
        "mqtt_reconnects": 2,
        "streams": {
            "mic": {"kind": "microphone", "rtf": 0.0121},
            "door": {"kind": "mqtt", "rtf": 0.034},
            "idle": {"kind": "mqtt", "rtf": None},
        },
        "outbox_depth": 5,
        "outbox_dropped": 1,
        "interval_s": interval,
        "worker": {"alive": True},
    }
    return HealthReport(**{**fields, **changes}).to_payload()


def fleet(clock: Clock | None = None, **kwargs: Any) -> FleetView:
    return FleetView("edge_agent", clock=clock or Clock(), **kwargs)


def feed(view: FleetView, device: str, availability: bytes | None = b"online", **parts: bytes) -> None:
    if availability is not None:
        view.handle(f"edge_agent/{device}/availability", availability, retained=True)
    for kind, payload in parts.items():
        view.handle(f"edge_agent/{device}/{kind}", payload, retained=True)


def test_folds_availability_info_and_health_into_one_row() -> None:
    view = fleet()
    feed(view, "dev-1", info=info(), health=health(at=NOW - 5))
    (row,) = view.rows()
    assert (row.device, row.status, row.overdue, row.flags) == ("dev-1", "online", False, [])
    assert (row.name, row.version, row.boot_id) == ("Kitchen", "0.1.0", "boot-1")
    assert (row.model, row.model_revision, row.backend) == (
        "damo/speech_charctc_kws_phone-xiaoyun",
        "v1.0.0",
        "numpy",
    )
    assert row.keywords == ["小云小云", "如家酒店"] and row.groups == ["upstairs"]
    assert (row.cpu_percent, row.memory_rss_mb, row.temperature_c) == (3.14, 58.2, 51.5)
    assert (row.detections, row.outbox_depth, row.outbox_dropped, row.mqtt_reconnects) == (12, 5, 1, 2)
    assert row.rtf == 0.034 and row.streams == 3  # the slowest stream; one without audio is skipped
    assert row.health_time == iso_time(NOW - 5) and row.health_age_s == 5.0
    assert row.last_seen == iso_time(NOW - 5) and row.last_seen_age_s == 5.0
    assert row.worker_alive is True and row.muted is False and row.problems == []
    assert json.loads(json.dumps(row.to_dict()))["keywords"] == ["小云小云", "如家酒店"]


def test_messages_in_any_order_give_the_same_row() -> None:
    first, second = fleet(), fleet()
    feed(first, "dev-1", info=info(), health=health())
    second.handle("edge_agent/dev-1/health", health(), retained=True)
    second.handle("edge_agent/dev-1/info", info(), retained=True)
    second.handle("edge_agent/dev-1/availability", b"online", retained=True)
    assert first.rows() == second.rows()


def test_the_last_will_marks_a_device_offline_and_offline_is_never_overdue() -> None:
    clock = Clock()
    view = fleet(clock)
    feed(view, "dev-1", info=info(), health=health(at=NOW, interval=1.0))
    view.handle("edge_agent/dev-1/availability", b"offline")  # the broker sends the will
    clock.now += 3600
    (row,) = view.rows()
    assert row.status == "offline" and row.overdue is False and row.overdue_reason is None
    assert row.version == "0.1.0" and row.keywords  # still known from the retained info
    assert row.last_seen == iso_time(NOW)  # the will is not the device speaking
    assert view.summary() == {"devices": 1, "online": 0, "offline": 1, "unknown": 0, "overdue": 0}


@pytest.mark.parametrize(
    ("interval", "age", "overdue"),
    [(60.0, 149.0, False), (60.0, 151.0, True), (1.0, 2.4, False), (1.0, 2.6, True), (10.0, 0.0, False)],
)
def test_health_is_overdue_after_two_and_a_half_intervals(interval: float, age: float, overdue: bool) -> None:
    view = fleet()
    feed(view, "dev-1", info=info(), health=health(at=NOW - age, interval=interval))
    (row,) = view.rows()
    assert row.overdue is overdue
    assert ("OVERDUE" in row.flags) is overdue
    if overdue:
        assert row.overdue_reason is not None and "expected every" in row.overdue_reason


def test_the_interval_of_the_latest_report_counts() -> None:
    view = fleet()
    feed(view, "dev-1", health=health(at=NOW - 30, interval=60.0))
    assert view.rows()[0].overdue is False
    view.handle("edge_agent/dev-1/health", health(at=NOW - 30, interval=5.0), retained=True)
    assert view.rows()[0].overdue is True  # set_config health.interval=5: 30 s is now overdue


def test_an_online_device_without_health_is_overdue_after_the_grace_period() -> None:
    clock = Clock()
    view = fleet(clock, grace_s=10.0)
    feed(view, "fresh", info=info("fresh", started=NOW - 2))
    feed(view, "old", info=info("old", started=NOW - 3600))
    feed(view, "bare")  # availability only: counted from when the view first saw it
    rows = {row.device: row for row in view.rows()}
    assert not rows["fresh"].overdue and not rows["bare"].overdue
    assert rows["old"].overdue and rows["old"].overdue_reason == "no health report"
    clock.now += 11
    rows = {row.device: row for row in view.rows()}
    assert rows["fresh"].overdue and rows["bare"].overdue


def test_a_live_report_counts_from_its_arrival_when_the_device_clock_is_behind() -> None:
    clock = Clock()
    view = fleet(clock)
    skewed = health(at=NOW - 600, interval=60.0)  # the device's clock is ten minutes behind
    view.handle("edge_agent/dev-1/availability", b"online", retained=True)
    view.handle("edge_agent/dev-1/health", skewed, retained=True)
    assert view.rows()[0].overdue is True  # retained: only the device's time is known
    view.handle("edge_agent/dev-1/health", skewed, retained=False)  # but it arrived just now
    (row,) = view.rows()
    assert row.overdue is False and row.health_age_s == 0.0
    clock.now += 151
    assert view.rows()[0].overdue is True


def test_last_seen_is_the_latest_sign_of_life() -> None:
    clock = Clock()
    view = fleet(clock)
    feed(view, "dev-1", info=info(started=NOW - 100))
    assert view.rows()[0].last_seen == iso_time(NOW - 100)  # retained info: since it started
    feed(view, "dev-1", health=health(at=NOW - 50))
    assert view.rows()[0].last_seen == iso_time(NOW - 50)
    clock.now += 20
    view.handle("edge_agent/dev-1/availability", b"online")  # live
    assert view.rows()[0].last_seen == iso_time(NOW + 20)
    assert view.rows()[0].last_seen_age_s == 0.0


def test_availability_other_than_online_or_offline_is_unknown_and_reported() -> None:
    view = fleet()
    feed(view, "dev-1", availability=b"Online")  # Tasmota spelling, not ours
    feed(view, "dev-2", availability=None, info=info("dev-2"))
    rows = {row.device: row for row in view.rows()}
    assert rows["dev-1"].status == "unknown" and "unexpected payload 'Online'" in rows["dev-1"].problems[0]
    assert rows["dev-2"].status == "unknown" and rows["dev-2"].problems == []
    assert view.summary()["unknown"] == 2


def test_unreadable_payloads_become_problems_and_the_rest_still_shows() -> None:
    view = fleet()
    feed(view, "dev-1", info=info(), health=health())
    view.handle("edge_agent/dev-1/health", b"not json", retained=True)
    view.handle("edge_agent/dev-2/info", b'{"device": "dev-2"}', retained=True)
    view.handle("edge_agent/dev-3/info", info("somebody-else"), retained=True)
    rows = {row.device: row for row in view.rows()}
    assert rows["dev-1"].version == "0.1.0" and rows["dev-1"].cpu_percent == 3.14  # the last good one
    assert "not JSON" in rows["dev-1"].problems[0] and "bad-payload" in rows["dev-1"].flags
    assert "DeviceInfo" in rows["dev-2"].problems[0] and rows["dev-2"].version is None
    assert rows["dev-3"].problems == ["info: payload says device 'somebody-else'"]
    view.handle("edge_agent/dev-1/health", health(), retained=True)
    assert view.row("dev-1").problems == []  # type: ignore[union-attr]


def test_fields_from_a_newer_agent_are_ignored_and_odd_values_do_not_break_the_row() -> None:
    view = fleet()
    newer = json.loads(health())
    newer.update({"schema": 2, "gpu_percent": 12.0, "cpu_percent": "high", "streams": [], "time": 5})
    view.handle("edge_agent/dev-1/availability", b"online", retained=True)
    view.handle("edge_agent/dev-1/health", json.dumps(newer).encode(), retained=True)
    (row,) = view.rows()
    assert row.problems == [] and row.cpu_percent is None and row.rtf is None and row.streams is None
    assert row.overdue_reason == "health report without a readable time"


def test_an_empty_retained_payload_clears_and_an_empty_device_is_forgotten() -> None:
    view = fleet()
    feed(view, "dev-1", info=info(), health=health())
    view.handle("edge_agent/dev-1/health", b"", retained=False)
    assert view.rows()[0].cpu_percent is None and view.rows()[0].version == "0.1.0"
    view.handle("edge_agent/dev-1/info", b"")
    view.handle("edge_agent/dev-1/availability", b"")
    assert view.devices() == [] and view.rows() == []


def test_topics_outside_the_prefix_or_not_state_are_ignored() -> None:
    view = FleetView("home/edge", clock=Clock())
    assert view.handle("edge_agent/dev-1/availability", b"online") is None
    assert view.handle("home/edge/dev-1/detection", b"{}") is None
    assert view.handle("home/edge/dev-1/availability", b"online") == "dev-1"  # a two-level prefix
    assert view.devices() == ["dev-1"] and view.ignored == 2
    assert state_filters("home/edge") == [
        "home/edge/+/availability",
        "home/edge/+/info",
        "home/edge/+/health",
    ]


def test_flags_for_a_dead_worker_muting_and_stale_health() -> None:
    view = fleet()
    feed(view, "dev-1", info=info(), health=health(worker={"alive": False}, muted=True, boot_id="boot-0"))
    (row,) = view.rows()
    assert row.flags == ["worker-dead", "muted", "boot-mismatch"]
    assert row.worker_alive is False and row.muted is True


def test_flag_for_an_outbox_that_cannot_be_written() -> None:
    view = fleet()
    feed(view, "dev-1", info=info(), health=health(outbox_unwritten=3))
    feed(view, "dev-2", info=info("dev-2"), health=health("dev-2", outbox_unwritten=0))
    assert [row.flags for row in view.rows()] == [["outbox-unwritable"], []]


def test_expected_answers_for_each_target() -> None:
    view = fleet()
    feed(view, "a", info=info("a", groups=["upstairs"]), health=health("a"))
    feed(view, "b", info=info("b", groups=[]), health=health("b"))
    feed(view, "c", availability=b"offline", info=info("c", groups=["upstairs"]))
    feed(view, "d", availability=None, info=info("d", groups=["upstairs"]))
    assert view.expected(Target.parse("all")) == {"a", "b"}  # offline and unknown are not expected
    assert view.expected(Target.parse("group:upstairs")) == {"a"}
    assert view.expected(Target.parse("group:nobody")) == set()
    assert view.expected(Target.parse("c")) == {"c"}  # asked by name: expected even when offline
    assert view.expected(Target.parse("never-seen")) == {"never-seen"}


@pytest.mark.parametrize(
    ("text", "kind", "topic"),
    [
        ("all", "all", "edge_agent/all/cmd/ping"),
        ("kitchen", "device", "edge_agent/kitchen/cmd/ping"),
        ("group:upstairs", "group", "edge_agent/group/upstairs/cmd/ping"),
    ],
)
def test_targets_use_the_command_topics(text: str, kind: str, topic: str) -> None:
    target = Target.parse(text)
    assert target.kind == kind and str(target) == text
    assert target.command_topic("edge_agent", "ping") == topic


@pytest.mark.parametrize("text", ["", "group:", "a/b", "dev+", "#", " dev", "group:a/b"])
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a device id"):
        Target.parse(text)


def test_a_bad_command_name_is_refused_by_the_topic() -> None:
    with pytest.raises(ValueError, match="cannot be a topic level"):
        Target.parse("all").command_topic("edge_agent", "a/b")


def answer(device: str, ok: bool = True) -> CommandResult:
    return CommandResult(device=device, command="ping", ok=ok, error=None if ok else "no")


def test_command_round_is_complete_when_everyone_expected_answered() -> None:
    command = CommandRound(Target.parse("all"), "ping")
    assert not command.complete({"a", "b"}) and command.exit_code({"a", "b"}) == 1
    assert command.add(answer("a")) and not command.add(answer("a", ok=False))
    assert command.duplicates == 1 and command.answers["a"].ok  # the first answer counts
    assert command.missing({"a", "b"}) == ["b"]
    assert command.add(answer("b"))
    assert command.complete({"a", "b"}) and command.exit_code({"a", "b"}) == 0
    assert command.add(answer("z"))  # not expected (e.g. no availability yet): still counted
    assert command.exit_code({"a", "b"}) == 0
    assert command.add(answer("y", ok=False))
    assert command.failed() == ["y"] and command.exit_code({"a", "b"}) == 1


def test_command_round_with_nobody_expected_is_ok() -> None:
    assert CommandRound(Target.parse("group:none"), "ping").exit_code(set()) == 0


def test_table_aligns_columns_with_chinese_keywords() -> None:
    view = fleet()
    feed(view, "kitchen", info=info("kitchen"), health=health("kitchen", at=NOW - 400))
    feed(
        view,
        "a-much-longer-device",
        availability=b"offline",
        info=info("a-much-longer-device", keywords=[{"text": "小云"}]),
    )
    lines = format_table(view.rows()).splitlines()
    assert lines[0].split() == [
        "DEVICE",
        "STATUS",
        "LAST",
        "SEEN",
        "VERSION",
        "MODEL",
        "KEYWORDS",
        "CPU%",
        "MEM",
        "MB",
        "TEMP°C",
        "RTF",
        "DET",
        "DET/H",
        "NEAR",
        "OUTBOX",
        "RECONN",
        "FLAGS",
    ]
    assert all(line == line.rstrip() for line in lines)
    longer, kitchen = lines[1], lines[2]
    assert kitchen.startswith("kitchen ") and "OVERDUE" in kitchen and "6m ago" in kitchen
    assert "小云小云,如家酒店" in kitchen and "speech_charctc_kws_phone-xiaoyun" in kitchen
    assert "offline" in longer and "-" in longer

    def column(line: str, text: str) -> int:  # where text starts, in terminal columns
        return display_width(line[: line.index(text)])

    assert column(lines[0], "CPU%") + len("CPU%") == column(kitchen, "3.1") + len("3.1")  # right-aligned
    assert column(lines[0], "RTF") + len("RTF") == column(kitchen, "0.034") + len("0.034")
    assert column(lines[0], "FLAGS") == column(kitchen, "OVERDUE")


def test_table_clips_long_cells_by_display_width() -> None:
    view = fleet()
    many = [{"text": "小云小云"}, {"text": "如家酒店"}, {"text": "你好问问"}, {"text": "天猫精灵"}]
    feed(view, "dev-1", info=info(keywords=many, model={"id": "org/" + "x" * 50}))
    cells = format_table(view.rows()).splitlines()[1]
    assert "…" + "x" * 31 in cells and "x" * 33 not in cells
    assert "小云小云,如家酒店,你好问问,天…  " in cells  # 30 columns: CJK characters count two
    assert display_width("小云小云,如家酒店,你好问问,天…") == 30


def test_small_helpers() -> None:
    assert [format_age(s) for s in (0, 59.9, 60, 3599, 7200, 200000)] == [
        "0s",
        "59s",
        "1m",
        "59m",
        "2h",
        "2d",
    ]
    assert display_width("小云a") == 5
    assert parse_time("2027-01-15T08:00:00.000Z") == NOW
    assert parse_time("2027-01-15T08:00:00") == NOW  # naive means UTC
    assert parse_time("yesterday") is None and parse_time(None) is None
    assert iso_time(NOW) == "2027-01-15T08:00:00.000Z" and iso_time(None) is None
    summary = {"devices": 3, "online": 1, "offline": 1, "unknown": 1, "overdue": 1}
    assert format_summary(summary) == "3 device(s): 1 online, 1 offline, 1 unknown, 1 overdue"


def test_docs_describe_every_column_field_and_rule() -> None:
    """docs/fleet.md must not drift from the code: every column, JSON field, flag and threshold."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "fleet.md").read_text(encoding="utf-8")
    for header, _, _ in COLUMNS:
        assert f"| `{header}` |" in docs, header
    for row_field in fields(DeviceRow):
        assert f"`{row_field.name}`" in docs, row_field.name
    for flag in ("OVERDUE", "worker-dead", "muted", "boot-mismatch", "bad-payload", "outbox-unwritable"):
        assert f"`{flag}`" in docs, flag
    assert f"**{OVERDUE_FACTOR} × `health.interval_s`**" in docs
    assert f"never published a health report, {DEFAULT_GRACE_S:g} s after it started" in docs
