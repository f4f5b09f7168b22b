"""The detection event as the outbox keeps it and as it goes out."""

from __future__ import annotations

import json

import pytest

from edge_agent.mqtt.messages import DetectionEvent, PayloadError, iso_utc


def _event(**changes: object) -> DetectionEvent:
    fields = {
        "device": "kitchen",
        "stream": "s1",
        "keyword": "小云小云",
        "confidence": 0.9,
        "start": 1.0,
        "end": 2.0,
        "time": iso_utc(1_700_000_000.0),
        "seq": 0,
        "boot_id": "b1",
        "level_dbfs": -20.0,
    }
    return DetectionEvent(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_stored_event_goes_out_with_its_number_delay_and_replay_flag() -> None:
    body = _event().stored_body()
    assert not DetectionEvent.DELIVERY_FIELDS & set(body)
    live = DetectionEvent.from_stored(body, 7, 1_700_000_000.25, replayed=False)
    assert (live.seq, live.delay_ms, live.replayed) == (7, 250.0, False)
    replay = DetectionEvent.from_stored(body, 7, 1_700_000_600.0, replayed=True)
    assert (replay.delay_ms, replay.replayed) == (600_000.0, True)
    payload = json.loads(live.to_payload())
    assert payload["keyword"] == "小云小云" and payload["level_dbfs"] == -20.0 and payload["seq"] == 7


def test_a_stored_event_read_back_without_delivery_has_no_delay() -> None:
    event = DetectionEvent.from_stored({**_event().stored_body(), "older_key": 1}, 3)
    assert (event.seq, event.delay_ms, event.replayed) == (3, None, False)


def test_the_delay_is_never_negative_for_a_clock_behind_the_keyword() -> None:
    assert DetectionEvent.from_stored(_event().stored_body(), 1, 1_699_999_999.0).delay_ms == 0.0


def test_a_stored_body_that_breaks_the_rules_is_refused_when_read_back() -> None:
    with pytest.raises(PayloadError):
        DetectionEvent.from_stored({**_event().stored_body(), "confidence": 2.0}, 1, 1_700_000_001.0)
