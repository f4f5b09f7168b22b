"""A keyword's score in a whole recording, whatever its threshold.

The decoder answers yes or no for a threshold; the score of a keyword in a recording is the
highest threshold at which it would still be detected. ``edge-agent eval`` scores files with it
(for the score range and a suggested threshold), and HTTP ``POST /detect`` reports it as
``confidence`` when nothing was detected and uses it for ``threshold`` 0 (the best match).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np

from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings
from edge_agent.engine.features import FeatureStream
from edge_agent.engine.model import KwsModel

# The lowest score measured: below it a keyword counts as not said at all (score 0).
SCORE_FLOOR = 1e-4


def best_threshold(decode: Callable[[float], bool], low: float = SCORE_FLOOR, steps: int = 16) -> float:
    """Highest threshold (on a log scale, to ~1%) at which ``decode(threshold)`` still detects.

    Detection is monotone in the threshold: a candidate above a threshold is above every lower
    one, and the first pending candidate always fires. 0.0 when nothing is found even at ``low``.
    """
    if not decode(low):
        return 0.0
    lo, hi = math.log(low), 0.0
    if decode(1.0):
        return 1.0
    for _ in range(steps):
        middle = (lo + hi) / 2
        if decode(math.exp(middle)):
            lo = middle
        else:
            hi = middle
    return math.exp(lo)


def keyword_scores(
    model: KwsModel, keywords: Sequence[CompiledKeyword], settings: DecoderSettings, posteriors: np.ndarray
) -> dict[str, float]:
    """Each keyword's score in a recording: the highest threshold at which it would still be
    detected (0.0 below :data:`SCORE_FLOOR`). ``posteriors`` are the recording's, every output
    (``model.posteriors(samples)``)."""
    scores = {}
    for keyword in keywords:

        def detects(threshold: float, keyword: CompiledKeyword = keyword) -> bool:
            decoder = model.decoder([replace(keyword, threshold=threshold)], settings)
            return bool(decoder.process(posteriors) or decoder.finish())

        scores[keyword.text] = best_threshold(detects)
    return scores


def recording_scores(
    model: KwsModel,
    keywords: Sequence[CompiledKeyword],
    settings: DecoderSettings,
    blocks: Iterable[np.ndarray],
) -> dict[str, float]:
    """:func:`keyword_scores` of a recording read a block at a time (``Recording.blocks()``):
    only the outputs the keywords read are kept, so memory stays small whatever the length."""
    decoders = {k.text: model.decoder([k], settings) for k in keywords}
    columns = np.unique(np.concatenate([d.columns for d in decoders.values()]))
    features, state = FeatureStream(model.cmvn), model.network.new_state()
    parts = [model.network.forward(state, features.accept(block), columns=columns) for block in blocks]
    parts.append(model.network.forward(state, features.finish(), final=True, columns=columns))
    gathered = np.concatenate(parts)
    scores = {}
    for keyword in keywords:
        own = gathered[:, np.searchsorted(columns, decoders[keyword.text].columns)]

        def detects(threshold: float, keyword: CompiledKeyword = keyword, own: np.ndarray = own) -> bool:
            decoder = model.decoder([replace(keyword, threshold=threshold)], settings)
            return bool(decoder.process(own) or decoder.finish())

        scores[keyword.text] = best_threshold(detects)
    return scores
