"""CTC keyword decoder: finds keywords in streams of network posteriors. Pure, no I/O.

Network posteriors (or cheap upper bounds of them) come in, detections go out. The package is
split along the decoder's jobs, each module readable alone:

==================  ==========================================================================
``keywords.py``     ``CompiledKeyword`` (what to find) and ``Detection`` (what was found)
``settings.py``     ``DecoderSettings`` and the defaults of the decoder's settings
``recurrence.py``   scoring a keyword over posteriors: per-frame terms, max-plus recurrence
``firing.py``       the firing policy (threshold, duration, settle ratio, pause, hold,
                    refractory period): pure rules, no decoder state
``exact.py``        lazy exact posteriors: the recent frames, exact or bounded, and the exact
                    runs over a candidate's window
``search.py``       one keyword in one stream: filter, exact re-scoring, firing
``batch.py``        ``process_many``: many streams at once, with the results of one at a time
``stream.py``       ``KeywordDecoder``: one stream, its keywords and its recent frames
==================  ==========================================================================

Each module imports only modules above it in this table (``batch.py`` names ``KeywordDecoder``
for type hints alone): the maths and the policy know nothing of streams, the search combines
them for one keyword, and the batching steps many searches together through their public
methods. What other code imports is re-exported here.
"""

from edge_agent.engine.decoder.batch import process_many, process_one
from edge_agent.engine.decoder.exact import Resolver
from edge_agent.engine.decoder.keywords import CompiledKeyword, Detection
from edge_agent.engine.decoder.settings import (
    DEFAULT_GAP_TOLERANCE,
    DEFAULT_HOLD_SECONDS,
    DEFAULT_PAUSE_SECONDS,
    DEFAULT_REFRACTORY_SECONDS,
    DEFAULT_SETTLE_RATIO,
    DecoderSettings,
)
from edge_agent.engine.decoder.stream import KeywordDecoder

__all__ = [
    "DEFAULT_GAP_TOLERANCE",
    "DEFAULT_HOLD_SECONDS",
    "DEFAULT_PAUSE_SECONDS",
    "DEFAULT_REFRACTORY_SECONDS",
    "DEFAULT_SETTLE_RATIO",
    "CompiledKeyword",
    "DecoderSettings",
    "Detection",
    "KeywordDecoder",
    "Resolver",
    "process_many",
    "process_one",
]
