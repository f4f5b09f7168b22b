"""Firing policy: which exact matches of a keyword become detections, and when they fire.

Pure rules on plain numbers: no I/O, no posteriors, no decoder state. The search
(``search.py``) scores matches with the recurrence and asks these rules what to do; the rules
are unit-tested on synthetic score sequences (``tests/engine/test_firing_policy.py``).

For one keyword in one stream, frame by frame:

* **Threshold and duration.** A match counts if its confidence reaches the keyword's threshold
  t, each of its n characters reaches ``t ** (n - 1)`` (``recurrence.py``), and its span
  (:func:`keyword_span`) lasts from ``min_duration`` to ``max_duration``.
* **Strength.** The rules below rank matches by their *strength*, the highest threshold at
  which they count: ``min(confidence, q_min ** (1 / (n - 1)))`` with ``q_min`` the weakest
  character's posterior at its peak (one character: the confidence); among equally strong
  matches (sharing their weakest character, say), by confidence. A detection reports its
  confidence, the geometric mean; the strength only orders. The match offered at a frame is
  the highest-ranked one ending there.
* **Pending.** The first match that counts becomes the *pending* detection; a later,
  higher-ranked one replaces it. A pending detection fires at the earliest one frame after its
  last character (the frame that could still bring a better match).
* **Settle.** A later match can at best complete a partial match seen so far with perfect
  characters, so the best partial match (its *rivals*' bound) caps what it could still become.
  The pending detection fires once no rival could be ``settle_ratio`` times as strong: at once
  for a strong match. Only rivals whose every character is above ``settle_ratio`` times the
  pending strength (as a floor: its power n - 1) are read; the others could never be that
  strong. Waiting matters when a weak match borrowed the first characters of a keyword still
  being spoken.
* **Pause.** A rival counts only while it gained a character within the last pause: a keyword
  being spoken goes on within one (:meth:`FiringPolicy.rivals_still_spoken`). The pause only
  ends the wait; a keyword said with longer pauses is still found.
* **Hold.** Whatever the rivals, a pending detection fires ``hold`` after its last character.
* **Suppression.** A detection that fired silences the matches *no stronger than itself* that
  end within the refractory period after it, or that begin before its last character (they
  would reuse its characters): one spoken keyword, one detection. A stronger match is never
  silenced by a weaker one, and a match ranked no higher than the pending one, seen while it
  waited, never fires after it.

Why the rules look at strength, not confidence: a match counts at threshold t exactly when its
strength reaches t, so lowering the threshold only adds matches weaker than every match that
counted before. Confidence does not order them so: the character floor falls with the
threshold, and a match held back by one weak character can be more confident than a detection
made at the higher threshold (it would then replace or silence it). Every decision about a
match (which match a frame offers, whether it is silenced, replaces the pending one or is
replaced, when it settles) compares it only with matches at least as strong as itself, by rules
that do not depend on the threshold: the settle rule reads only rivals that could be
``settle_ratio`` (>= 1) times as strong, all of which count at any threshold the pending match
counts at. So every detection made at a threshold is made, the same, at every lower one; only
detections weaker than the higher threshold are added (a weak match that fired before the
keyword it borrowed from was complete among them: the keyword is reported as well, after it).
Where work is skipped, the bounds used (the filter's scores, ``Firing.silenced_below`` against
a confidence bound) over-estimate confidence, hence strength, so nothing that could rank above
a level is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edge_agent.engine.decoder.keywords import CompiledKeyword


@dataclass(frozen=True)
class Candidate:
    """An exact match of a keyword: the frame of its last character's peak, its confidence and
    its strength (the highest threshold at which it counts; its confidence if not given), with
    each character's peak frame and posterior (carried to the detection)."""

    frame: int
    confidence: float
    peak_frames: tuple[int, ...] = ()
    peak_posteriors: tuple[float, ...] = ()
    strength: float = -1.0

    def __post_init__(self) -> None:
        if self.strength < 0.0:
            object.__setattr__(self, "strength", self.confidence)

    @property
    def rank(self) -> tuple[float, float]:
        """What the firing rules compare: the strength, then the confidence among equally strong
        matches (those sharing their weakest character, say)."""
        return (self.strength, self.confidence)


@dataclass(frozen=True)
class FiringPolicy:
    """One keyword's firing rules, in network frames."""

    threshold: float
    min_duration: float  # seconds, as the span of keyword_span
    max_duration: float
    hold_frames: int
    pause_frames: int
    settle_ratio: float
    refractory_frames: int
    log_threshold: float = field(init=False)
    log_settle_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        # Scores are compared as logs: the recurrence adds log posteriors.
        object.__setattr__(self, "log_threshold", math.log(self.threshold))
        object.__setattr__(self, "log_settle_ratio", math.log(self.settle_ratio))

    @classmethod
    def for_keyword(
        cls,
        keyword: CompiledKeyword,
        frame_seconds: float,
        *,
        refractory_seconds: float,
        hold_seconds: float,
        pause_seconds: float,
        settle_ratio: float,
    ) -> FiringPolicy:
        """The rules for ``keyword`` with times in seconds; a hold or pause is at least one frame."""
        return cls(
            threshold=keyword.threshold,
            min_duration=keyword.min_duration,
            max_duration=keyword.max_duration,
            hold_frames=max(1, int(round(hold_seconds / frame_seconds))),
            pause_frames=max(1, int(round(pause_seconds / frame_seconds))),
            settle_ratio=settle_ratio,
            refractory_frames=int(round(refractory_seconds / frame_seconds)),
        )

    def reaches_threshold(self, log_strength: float) -> bool:
        """Whether a match whose log strength is ``log_strength`` counts (for a log confidence,
        whether a match that confident could count)."""
        return log_strength >= self.log_threshold

    def duration_allowed(self, start: float, end: float) -> bool:
        """Whether a match spanning ``start``..``end`` seconds is as long as the keyword may be."""
        return self.min_duration <= end - start <= self.max_duration

    def settled(self, strength: float, best_rival: float) -> bool:
        """Whether no rival whose log score is at most ``best_rival`` (-inf: none) could be
        ``settle_ratio`` times as strong as a pending match of ``strength``."""
        return math.log(strength) >= best_rival - self.log_settle_ratio

    def rival_level(self, strength: float) -> float:
        """The log strength that a rival's every character must exceed for it to matter to a
        pending match of ``strength``: a match that could be ``settle_ratio`` times as strong has
        no weaker character. The settle rule reads only such rivals, whatever the threshold."""
        return math.log(strength) + self.log_settle_ratio

    def held_long_enough(self, frame: int, pending_frame: int) -> bool:
        """Whether a detection pending since ``pending_frame`` has waited its whole hold at ``frame``."""
        return frame - pending_frame >= self.hold_frames

    def rivals_still_spoken(self, prefix: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The rivals' bound per frame that the settle rule reads, from the best partial match
        at each frame (``prefix``: log scores, -inf for none) and the best one whose last
        character is at that very frame (``ends``): partial matches whose last character is
        more than a pause old count no more. Their gap penalties left out, the latest ``ends``
        within a pause bounds the others from above (as the prefix does, whatever their age);
        the lower of the two counts."""
        padded = np.concatenate([np.full(self.pause_frames - 1, -np.inf), ends])
        # Each frame's last pause of ``ends``: a view of overlapping windows, only read (what
        # sliding_window_view gives, without its checks: a pending match reads it every step).
        step = padded.strides[0]
        windows = np.ndarray((ends.shape[0], self.pause_frames), padded.dtype, padded, 0, (step, step))
        return np.minimum(prefix, windows.max(axis=1))


@dataclass(frozen=True)
class Fired:
    """A detection that fired: the frame of its last character, its strength, and the last
    frame of its refractory period."""

    frame: int
    strength: float
    quiet_until: int

    @property
    def resume(self) -> int:
        """The first frame where a match no stronger than this one may begin."""
        return self.frame + 1


class Firing:
    """The firing state of one keyword in one stream: the pending detection and the recent
    detections that may still silence a match. The caller walks the frames in order and, at
    each one, offers the strongest exact match ending there (if the filter proposes one that
    could be stronger than what :meth:`silenced_below` there), then asks whether the pending
    detection is :meth:`due`."""

    def __init__(self, policy: FiringPolicy) -> None:
        self.policy = policy
        self.pending: Candidate | None = None
        self.fired: list[Fired] = []

    def reset(self) -> None:
        self.pending = None
        self.fired = []

    def silenced_below(self, frame: int) -> float:
        """The strength a match ending at ``frame`` must exceed not to be silenced by a recent
        detection's refractory period (0.0: none)."""
        return max((f.strength for f in self.fired if frame <= f.quiet_until), default=0.0)

    def restrictions(self, first: int) -> list[tuple[int, float]]:
        """``(resume, strength)`` of the recent detections that restrict where a match may
        begin, for matches that may begin at ``first`` or later, by increasing ``resume``: a
        match beginning before ``resume`` counts only if stronger than ``strength``."""
        return sorted((f.resume, f.strength) for f in self.fired if f.resume > first)

    def forget(self, frame: int, window_frames: int) -> None:
        """Drop the detections that can no longer silence a match ending at ``frame`` or later:
        their refractory period is over and a match's window no longer reaches them."""
        self.fired = [f for f in self.fired if f.quiet_until >= frame or f.resume > frame - window_frames]

    def offer(self, candidate: Candidate | None) -> bool:
        """A match that counts (or None): it becomes the pending detection if it is not silenced
        and there is none, or if it ranks above the pending one. Returns whether it did."""
        if candidate is None or candidate.strength <= self.silenced_below(candidate.frame):
            return False
        if self.pending is None or candidate.rank > self.pending.rank:
            self.pending = candidate
            return True
        return False

    def due(self, frame: int, best_rival: float) -> bool:
        """Whether the pending detection fires at ``frame``, the rivals' bound there being
        ``best_rival``: it has settled, or waited its whole hold."""
        pending = self.pending
        if pending is None:
            return False
        return self.policy.settled(pending.strength, best_rival) or self.policy.held_long_enough(
            frame, pending.frame
        )

    def fire(self, frame: int) -> Candidate:
        """Emit the pending detection at ``frame``: its refractory period begins. It lasts
        through ``frame`` at least: the matches seen while it waited ranked no higher."""
        pending = self.pending
        if pending is None:
            raise RuntimeError("nothing pending to fire")
        quiet_until = max(frame, pending.frame + self.policy.refractory_frames)
        self.fired.append(Fired(pending.frame, pending.strength, quiet_until))
        self.pending = None
        return pending


def keyword_span(
    peak_frames: tuple[int, ...], frame_seconds: float, frame_center_seconds: float
) -> tuple[float, float]:
    """Start/end seconds covering the spoken keyword, not just its posterior peaks.

    A CTC peak sits somewhere inside its character; each side is extended by half the mean
    distance between peaks (one character's width), at least one frame; a one-character
    keyword by three frames.
    """
    n = len(peak_frames)
    first, last = peak_frames[0], peak_frames[-1]
    if n > 1:
        half_width = max(frame_seconds, (last - first) * frame_seconds / (n - 1) / 2)
    else:
        half_width = 3 * frame_seconds
    start = max(0.0, first * frame_seconds + frame_center_seconds - half_width)
    end = last * frame_seconds + frame_center_seconds + half_width
    return start, end
