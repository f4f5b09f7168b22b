"""The staged rollout's rules (edge_agent/fleet/rollout.py): pure, synthetic numbers."""

from __future__ import annotations

import math

import pytest

from edge_agent.fleet.rollout import (
    DeviceState,
    Exposure,
    HealthMark,
    Ledger,
    choose_canary,
    exceeds,
    exposure_of,
    flatten,
    judge,
    nest,
    parse_duration,
    parse_fraction,
    poisson_tail,
    previous_values,
)

DEVICES = [f"dev-{i:02d}" for i in range(50)]


def test_fraction_and_duration_parse_and_refuse() -> None:
    assert parse_fraction("10%") == pytest.approx(0.1)
    assert parse_fraction("0.25") == pytest.approx(0.25)
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("2h") == 7200
    for bad in ("0%", "100%", "ten", "-5%"):
        with pytest.raises(ValueError, match="--canary"):
            parse_fraction(bad)
    for bad in ("0s", "soon", "-1m", "infm"):
        with pytest.raises(ValueError, match="--watch"):
            parse_duration(bad)


def test_canary_is_the_share_rounded_up_stable_and_never_everyone() -> None:
    canary = choose_canary(DEVICES, 0.1, "change-a")
    assert len(canary) == 5 and set(canary) <= set(DEVICES)
    assert choose_canary(reversed(DEVICES), 0.1, "change-a") == canary  # order does not matter
    assert choose_canary(DEVICES, 0.1, "change-b") != canary  # another change, another canary
    assert len(choose_canary(DEVICES[:3], 0.01, "x")) == 1  # at least one
    assert len(choose_canary(DEVICES[:2], 0.9, "x")) == 1  # at least one left out
    assert choose_canary(DEVICES[:1], 0.5, "x") == DEVICES[:1]
    assert choose_canary([], 0.5, "x") == []


def test_dotted_keys_round_trip_and_previous_values_are_read_from_get_config() -> None:
    change = {"engine": {"muted": True}, "keywords": [{"text": "小云小云", "threshold": 0.03}]}
    assert flatten(change) == {"engine.muted": True, "keywords": change["keywords"]}
    assert nest(flatten(change)) == change
    config = {"engine": {"muted": False}, "keywords": [{"text": "小云小云"}], "mqtt": {"password": "***"}}
    assert previous_values(config, ["engine.muted", "keywords"]) == {
        "engine.muted": False,
        "keywords": [{"text": "小云小云"}],
    }
    with pytest.raises(ValueError, match=r"no engine\.nope"):
        previous_values(config, ["engine.nope"])
    with pytest.raises(ValueError, match="secret"):
        previous_values(config, ["mqtt.password"])


def test_poisson_tail_matches_the_closed_forms() -> None:
    assert poisson_tail(0, 3.0) == 1.0
    assert poisson_tail(1, 2.0) == pytest.approx(1 - math.exp(-2.0))
    assert poisson_tail(2, 2.0) == pytest.approx(1 - 3 * math.exp(-2.0))
    assert 0 < poisson_tail(60, 5.0) < 1e-30  # far in the tail, still a number
    assert poisson_tail(3, 0.0) == 0.0


def test_more_detections_fail_only_beyond_chance() -> None:
    # The rest: 100 detections in 100 device-hours (1/h). The canary: 10 device-hours.
    assert not exceeds(12, 10.0, 100, 100.0, ratio=2.0, significance=0.01)  # 1.2/h: fine
    assert not exceeds(25, 10.0, 100, 100.0, ratio=2.0, significance=0.01)  # 2.5/h: could be chance
    assert exceeds(45, 10.0, 100, 100.0, ratio=2.0, significance=0.01)  # 4.5/h: too many
    # A quiet rest does not make one canary detection damning; no exposure, no verdict.
    assert not exceeds(1, 1.0, 0, 50.0, ratio=2.0, significance=0.01)
    assert not exceeds(5, 0.0, 100, 100.0, ratio=2.0, significance=0.01)


def test_judge_names_every_reason() -> None:
    rest = Exposure(hours=100.0, detections=100, errors=0, devices=45)
    calm = Exposure(hours=10.0, detections=11, errors=0, devices=5)
    assert judge(calm, rest, {}).passed
    noisy = Exposure(hours=10.0, detections=60, errors=0, devices=5)
    verdict = judge(noisy, rest, {})
    assert not verdict.passed and "detection rate" in verdict.reasons[0]
    erring = Exposure(hours=10.0, detections=11, errors=30, devices=5)
    assert "error(s)" in judge(erring, rest, {}).reasons[0]
    failed = judge(calm, rest, {"dev-07": "went offline"})
    assert failed.reasons == ["dev-07: went offline"]
    assert failed.to_dict()["canary"]["detections_per_hour"] == 1.1


def test_exposure_skips_restarted_and_silent_devices() -> None:
    marks = {
        "a": (HealthMark("boot1", 10.0, 5), HealthMark("boot1", 3610.0, 9)),
        "b": (HealthMark("boot1", 10.0, 5), HealthMark("boot2", 2.0, 0)),  # restarted
        "c": (HealthMark("boot1", 10.0, 5), HealthMark("boot1", 10.0, 5)),  # no new report
    }
    exposure, unusable = exposure_of(marks, {"a": 2}, ["a", "b", "c", "d"])
    assert (exposure.hours, exposure.detections, exposure.errors, exposure.devices) == (1.0, 4, 2, 1)
    assert unusable == ["b", "c", "d"]


def test_ledger_counts_every_device_once() -> None:
    ledger = Ledger()
    for name in ("a", "b", "c"):
        ledger.set(name, DeviceState.UNCHANGED)
    ledger.set("a", DeviceState.CHANGED)
    ledger.set("b", DeviceState.UNCHANGED, "refused: bad threshold")
    assert ledger.changed() == ["a"]
    assert ledger.counts()["unchanged"] == 2 and sum(ledger.counts().values()) == 3
    assert ledger.lines()[1] == "b                unchanged  (refused: bad threshold)"
    assert not DeviceState.CHANGING.settled and DeviceState.RESTORED.settled
