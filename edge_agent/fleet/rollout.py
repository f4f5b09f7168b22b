"""Staged rollouts: which devices get a change first, how the canary is judged, who is in what state.

Pure rules on plain data, no I/O (``edge_agent/cli/rollout.py`` does the MQTT); tested with
synthetic numbers. A rollout of ``set_config`` arguments to a group goes:

1. **Snapshot.** ``get_config`` from every online device of the group: its current values of
   the keys being changed, kept to restore them (:func:`previous_values`).
2. **Canary.** ``set_config`` to a fixed fraction of them (:func:`choose_canary`: the same
   change to the same group picks the same devices, so a rollout run again is watched on the
   same canary).
3. **Watch.** For the watch's duration the canary's health, detections and errors are compared
   with the rest's (:class:`Exposure`, :func:`judge`):

   * a canary device that refused the change, went offline, restarted, stopped reporting health
     or whose engine worker died fails the canary at once;
   * the canary's detections fail it when they are more than ``max_rate_ratio`` times what the
     rest's rate predicts over the canary's exposure, beyond chance: a one-sided Poisson test at
     ``significance`` (false alarms are rare events: with a handful of them, a plain ratio of
     rates would be noise); the same rule for errors published on ``{prefix}/+/error``.
4. **Continue or roll back.** A passing canary: the change goes to the rest. A failing one: the
   canary's devices get their previous values back.

Every device is in exactly one :class:`DeviceState`; on Ctrl-C the tool waits for the answers
of commands already sent, restores what it changed, and prints every device's state
(:class:`Ledger`), so no device is left in a state nobody knows.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

HOUR_S = 3600.0
DEFAULT_MAX_RATE_RATIO = 2.0
DEFAULT_SIGNIFICANCE = 0.01


def parse_fraction(text: str) -> float:
    """``10%`` or ``0.1`` as a fraction in (0, 1)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"--canary {text!r}: expected a percentage such as 10%") from None
    if not 0 < value < 1:
        raise ValueError(f"--canary {text!r}: must be more than 0% and less than 100%")
    return value


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m`` or ``2h`` as seconds (positive)."""
    raw = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"--watch {text!r}: expected a duration such as 90s, 15m or 2h") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"--watch {text!r}: must be positive")
    return value


def choose_canary(devices: Iterable[str], fraction: float, seed: str) -> list[str]:
    """At least one device and, when there are two or more, at least one left out: the
    ``ceil(fraction x n)`` devices whose hash with ``seed`` (the change) comes first."""
    names = sorted(set(devices))
    if not names:
        return []
    count = min(max(1, math.ceil(fraction * len(names) - 1e-9)), max(1, len(names) - 1))

    def rank(name: str) -> str:
        return hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()

    return sorted(sorted(names, key=rank)[:count])


def flatten(arguments: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"engine": {"muted": true}}`` as ``{"engine.muted": true}`` (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in arguments.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`: the ``set_config`` arguments for these dotted keys."""
    result: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return result


def previous_values(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The values ``config`` (a ``get_config`` answer's ``config``) has at the dotted ``keys``,
    to put back on a roll back. ValueError when a key is missing or masked (a secret)."""
    values: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"the device's configuration has no {key}")
            node = node[part]
        if node == "***":
            raise ValueError(f"{key} is a secret the device does not show: it cannot be restored")
        values[key] = node
    return values


# --- judging the canary --------------------------------------------------------------------


@dataclass
class Exposure:
    """What a set of devices did during the watch: device-hours of audio time (from the
    health reports' uptime), detections and errors."""

    hours: float = 0.0
    detections: int = 0
    errors: int = 0
    devices: int = 0

    @property
    def rate_per_hour(self) -> float | None:
        return self.detections / self.hours if self.hours > 0 else None


@dataclass(frozen=True)
class HealthMark:
    """One device's counters from one health report."""

    boot_id: str | None
    uptime_s: float | None
    detections: int | None


def exposure_of(
    marks: Mapping[str, tuple[HealthMark, HealthMark]], errors: Mapping[str, int], devices: Iterable[str]
) -> tuple[Exposure, list[str]]:
    """The pooled exposure of ``devices`` from their (watch start, watch end) health marks, and
    the devices whose marks cannot be compared (restarted, or no report during the watch)."""
    total = Exposure()
    unusable: list[str] = []
    for name in devices:
        pair = marks.get(name)
        if pair is None:
            unusable.append(name)
            continue
        first, last = pair
        if (
            first.boot_id != last.boot_id
            or None in (first.uptime_s, last.uptime_s, first.detections, last.detections)
            or last.uptime_s <= first.uptime_s  # type: ignore[operator]
        ):
            unusable.append(name)
            continue
        total.hours += (last.uptime_s - first.uptime_s) / HOUR_S  # type: ignore[operator]
        total.detections += max(0, last.detections - first.detections)  # type: ignore[operator]
        total.errors += errors.get(name, 0)
        total.devices += 1
    return total, unusable


def poisson_tail(count: int, mean: float) -> float:
    """P(X >= count) for X ~ Poisson(mean)."""
    if count <= 0:
        return 1.0
    if mean <= 0:
        return 0.0

    def term(k: int) -> float:
        return math.exp(k * math.log(mean) - mean - math.lgamma(k + 1))

    if count <= mean:  # a large tail: one minus the few terms below it is accurate
        return max(0.0, 1.0 - sum(term(k) for k in range(count)))
    # A small tail: its own terms, which fall faster than geometrically past the mean.
    total, k = 0.0, count
    while True:
        value = term(k)
        total += value
        if value <= total * 1e-12:
            return min(1.0, total)
        k += 1


def exceeds(
    canary_count: int,
    canary_hours: float,
    rest_count: int,
    rest_hours: float,
    ratio: float,
    significance: float,
) -> bool:
    """Whether ``canary_count`` events over ``canary_hours`` are too many for ``ratio`` times the
    rest's rate: P(X >= canary_count) < ``significance`` for X ~ Poisson(ratio x rate x hours).
    The rest's rate counts one event more than it had, so that a quiet rest does not make a
    single canary event damning."""
    if canary_hours <= 0:
        return False
    rest_rate = (rest_count + 1) / rest_hours if rest_hours > 0 else 0.0
    if rest_rate == 0.0:
        return False  # nothing to compare with
    return poisson_tail(canary_count, ratio * rest_rate * canary_hours) < significance


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str]
    canary: Exposure
    rest: Exposure

    def to_dict(self) -> dict[str, Any]:
        def side(e: Exposure) -> dict[str, Any]:
            rate = e.rate_per_hour
            return {
                "devices": e.devices,
                "device_hours": round(e.hours, 4),
                "detections": e.detections,
                "detections_per_hour": None if rate is None else round(rate, 2),
                "errors": e.errors,
            }

        return {
            "passed": self.passed,
            "reasons": self.reasons,
            "canary": side(self.canary),
            "rest": side(self.rest),
        }


def judge(
    canary: Exposure,
    rest: Exposure,
    failures: Mapping[str, str],
    *,
    max_rate_ratio: float = DEFAULT_MAX_RATE_RATIO,
    significance: float = DEFAULT_SIGNIFICANCE,
) -> Verdict:
    """The canary passes when no canary device failed (``failures``: device -> why) and neither
    its detections nor its errors are too many for the rest's rates (:func:`exceeds`)."""
    reasons = [f"{name}: {why}" for name, why in sorted(failures.items())]
    if exceeds(canary.detections, canary.hours, rest.detections, rest.hours, max_rate_ratio, significance):
        reasons.append(
            f"detection rate {_rate(canary)} on the canary against {_rate(rest)} on the rest "
            f"(more than {max_rate_ratio:g}x, beyond chance)"
        )
    if exceeds(canary.errors, canary.hours, rest.errors, rest.hours, max_rate_ratio, significance):
        reasons.append(f"{canary.errors} error(s) on the canary against {rest.errors} on the rest")
    return Verdict(not reasons, reasons, canary, rest)


def _rate(exposure: Exposure) -> str:
    rate = exposure.rate_per_hour
    return (
        "unknown"
        if rate is None
        else f"{rate:.1f}/h ({exposure.detections} in {exposure.hours:.3f} device-h)"
    )


# --- who is in what state ------------------------------------------------------------------


class DeviceState(enum.Enum):
    UNCHANGED = "unchanged"  # never sent the change, or it refused it (set_config checks first)
    CHANGING = "changing"  # the change was sent, no answer yet
    CHANGED = "changed"
    RESTORING = "restoring"  # the previous values were sent, no answer yet
    RESTORED = "restored"  # changed, then given its previous values back: unchanged
    UNKNOWN = "unknown"  # a command went unanswered: the device may or may not have applied it

    @property
    def settled(self) -> bool:
        return self not in (DeviceState.CHANGING, DeviceState.RESTORING)


@dataclass
class Ledger:
    """The state of every device of a rollout, and why."""

    states: dict[str, DeviceState] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def set(self, device: str, state: DeviceState, note: str | None = None) -> None:
        self.states[device] = state
        if note is not None:
            self.notes[device] = note

    def with_state(self, *states: DeviceState) -> list[str]:
        return sorted(name for name, state in self.states.items() if state in states)

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in DeviceState}
        for state in self.states.values():
            counts[state.value] += 1
        return counts

    def changed(self) -> list[str]:
        return self.with_state(DeviceState.CHANGED)

    def lines(self) -> list[str]:
        """One line per device: its final state, and why when there is a reason."""
        lines = []
        for name in sorted(self.states):
            note = self.notes.get(name)
            lines.append(f"{name:<16} {self.states[name].value}" + (f"  ({note})" if note else ""))
        return lines
