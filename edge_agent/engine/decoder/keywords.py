"""What the decoder takes and gives: a keyword compiled to network outputs, and a detection.

Plain frozen data, no numpy: the rest of the agent (configuration, MQTT payloads, HTTP) handles
keywords and detections without knowing how they are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompiledKeyword:
    """A keyword ready for decoding: network outputs per character and its policy."""

    text: str
    token_groups: tuple[tuple[int, ...], ...]
    threshold: float
    min_duration: float
    max_duration: float

    def __post_init__(self) -> None:
        if not self.token_groups or any(not group for group in self.token_groups):
            raise ValueError(f"keyword {self.text!r} has no tokens")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"keyword {self.text!r}: threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.min_duration < self.max_duration:
            raise ValueError(
                f"keyword {self.text!r}: need 0 <= min_duration < max_duration, "
                f"got {self.min_duration} and {self.max_duration}"
            )


@dataclass(frozen=True)
class Detection:
    """One keyword found in a stream; times are seconds from the start of the stream."""

    keyword: str
    confidence: float
    start: float
    end: float
    # Network output frame of each character's chosen peak, and its posterior.
    peak_frames: tuple[int, ...] = field(default=(), compare=False)
    peak_posteriors: tuple[float, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "keyword": self.keyword,
            "confidence": round(self.confidence, 4),
            "start": round(self.start, 3),
            "end": round(self.end, 3),
        }
