"""The hand-written Prometheus exposition against prometheus_client's own parser."""

from __future__ import annotations

import math

import pytest

from edge_agent.http.backend import MetricFamily, Sample
from edge_agent.http.metrics import render
from tests.conftest import require_module


def parse(text: str) -> dict[str, object]:
    parser = require_module("prometheus_client.parser")
    return {family.name: family for family in parser.text_string_to_metric_families(text)}


def test_counters_gauges_labels_and_escaping_round_trip() -> None:
    tricky = 'quote " backslash \\ newline \n 小云'
    text = render(
        [
            MetricFamily("a_events", "counter", "Events.\nSecond line \\ here.", (Sample(3, {"k": tricky}),)),
            MetricFamily("b_level", "gauge", "A level.", (Sample(-1.5), Sample(math.inf, {"x": "1"}))),
            MetricFamily("c_empty", "gauge", "No samples yet."),
        ]
    )
    families = parse(text)
    events = families["a_events"]
    assert events.type == "counter" and events.documentation == "Events.\nSecond line \\ here."
    (sample,) = events.samples
    assert (sample.name, sample.labels, sample.value) == ("a_events_total", {"k": tricky}, 3)
    level = families["b_level"]
    assert [s.value for s in level.samples] == [-1.5, math.inf]
    assert families["c_empty"].samples == []


def test_families_of_one_name_are_merged_and_kinds_must_agree() -> None:
    text = render(
        [
            MetricFamily("d", "counter", "Detections.", (Sample(1, {"source": "http"}),)),
            MetricFamily("d", "counter", "Detections.", (Sample(2, {"source": "stream"}),)),
        ]
    )
    assert text.count("# TYPE d_total counter") == 1
    assert {s.labels["source"]: s.value for s in parse(text)["d"].samples} == {"http": 1, "stream": 2}
    with pytest.raises(ValueError, match="both a counter and a gauge"):
        render([MetricFamily("d", "counter", "x"), MetricFamily("d", "gauge", "x")])


def test_unknown_values_leave_the_family_empty() -> None:
    assert MetricFamily.single("x", "gauge", "x", None).samples == ()
    assert MetricFamily.single("x", "gauge", "x", math.nan).samples == ()
    assert render([MetricFamily.single("x", "gauge", "x", 2.0)]).endswith("x 2\n")
