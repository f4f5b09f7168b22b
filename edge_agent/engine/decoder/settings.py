"""The decoder's settings, shared by every keyword of a stream, and their defaults.

They live with the decoder, which is what reads them (``engine.model`` re-exports them for the
code that imports them from there). What each one does is told where it is applied: the gap
tolerance in ``recurrence.py``, the others in ``firing.py``. The defaults are trade-offs that
``benchmarks.engine`` measures (``hold_trade_off``, ``pause_trade_off``, ``settle_trade_off``);
the figures are in benchmarks/results and the README, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

# After a detection its keyword is not reported again for this long, unless stronger (counting at
# a higher threshold, see firing.py): one spoken keyword, one detection, while a keyword said
# again a moment later is found again.
DEFAULT_REFRACTORY_SECONDS = 1.0
# Share of a frame between two characters that may go to outputs other than blank and those two
# characters at no cost; beyond it the frame costs the match, so that unrelated speech between
# the characters breaks it.
DEFAULT_GAP_TOLERANCE = 0.5
# The longest a weak detection waits for a better match before it fires anyway: the cap on the
# decision delay that the settle ratio may add.
DEFAULT_HOLD_SECONDS = 0.5
# How long a weak detection waits for a partial match that gained no character: a keyword being
# spoken goes on within a pause. Only the wait stops: a keyword said with a longer pause is still
# detected. The default stays above the pauses that the wait for a keyword whose first characters
# a weak match borrowed needs on audio/dev, with a margin (``pause_trade_off``).
DEFAULT_PAUSE_SECONDS = 0.35
# A pending detection fires once no later match could be this many times as strong. What the
# wait is for, a weak match that borrowed the first characters of a keyword still being spoken,
# is far weaker than that keyword. A real 小云小云 whose first 小云 was heard poorly looks like
# one (its own second 小云 could start a match that perfect characters would make
# stronger): a lower ratio makes such detections wait, a higher one lets borrowed matches
# through. The default keeps a margin on both sides (``settle_trade_off``).
DEFAULT_SETTLE_RATIO = 2.5


@dataclass(frozen=True)
class DecoderSettings:
    """How a stream's decoder fires, for all its keywords (``KwsModel.decoder`` applies them)."""

    refractory_seconds: float = DEFAULT_REFRACTORY_SECONDS
    gap_tolerance: float = DEFAULT_GAP_TOLERANCE
    hold_seconds: float = DEFAULT_HOLD_SECONDS
    pause_seconds: float = DEFAULT_PAUSE_SECONDS
    settle_ratio: float = DEFAULT_SETTLE_RATIO
