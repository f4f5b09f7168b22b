"""Prometheus text exposition (format 0.0.4), written by hand: no client library on the device.

Only counters and gauges are used. A counter is written as ``name_total`` in its ``# HELP`` and
``# TYPE`` lines and samples alike, as the 0.0.4 format wants (metadata names must equal sample
names; only OpenMetrics strips ``_total``) and as prometheus_client itself writes it; its
parser then reports the family as ``name``. Families with the same name from several sources
(the HTTP layer and a backend) are merged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from edge_agent.http.backend import MetricFamily, Sample

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(families: Iterable[MetricFamily]) -> str:
    merged: dict[str, MetricFamily] = {}
    for family in families:
        known = merged.get(family.name)
        if known is None:
            merged[family.name] = family
        elif known.kind != family.kind:
            raise ValueError(f"metric {family.name} is both a {known.kind} and a {family.kind}")
        else:
            merged[family.name] = MetricFamily(
                known.name, known.kind, known.help, known.samples + family.samples
            )
    lines: list[str] = []
    for family in merged.values():
        sample_name = f"{family.name}_total" if family.kind == "counter" else family.name
        lines.append(f"# HELP {sample_name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {sample_name} {family.kind}")
        lines.extend(f"{sample_name}{_labels(sample)} {_value(sample.value)}" for sample in family.samples)
    return "\n".join(lines) + "\n"


def _labels(sample: Sample) -> str:
    if not sample.labels:
        return ""
    inner = ",".join(f'{key}="{_escape_label(str(value))}"' for key, value in sorted(sample.labels.items()))
    return "{" + inner + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))
