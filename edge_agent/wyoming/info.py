"""What the service says of itself in answer to ``describe``: one wake program, one model a keyword.

Home Assistant reads the first wake program only: its ``name`` names the wake-word entity, and
each model becomes a wake word whose id is the model's ``name`` (the keyword's text, the name
it then asks for in ``detect`` and expects in ``detection``), shown by its ``description`` and
de-duplicated across satellites by its ``phrase``. Every field that ``wyoming`` 1.5.3 (what Home
Assistant 2024.3 pins) requires is given, so the answer parses with old and new releases alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from wyoming.info import Attribution, Info, WakeModel, WakeProgram

from edge_agent import __version__
from edge_agent.engine.decoder import CompiledKeyword

# The model's language: it knows Mandarin characters only.
LANGUAGES = ("zh",)
MODEL_URL = "https://modelscope.cn/models/{model_id}"
MODEL_AUTHOR = "Alibaba DAMO Academy (ModelScope)"
PROGRAM_DESCRIPTION = (
    "Chinese wake words (小云小云 and any keyword of the model's lexicon) with ModelScope's "
    "keyword-spotting model, run by edge-agent"
)


def model_attribution(model_id: str) -> Attribution:
    return Attribution(name=MODEL_AUTHOR, url=MODEL_URL.format(model_id=model_id))


def wake_info(program_name: str, model_id: str, keywords: Sequence[CompiledKeyword]) -> Info:
    """The ``info`` answer: the program and the keywords configured now."""
    attribution = model_attribution(model_id)
    models = [
        WakeModel(
            name=keyword.text,
            attribution=attribution,
            installed=True,
            description=f"{keyword.text} (threshold {keyword.threshold:g})",
            version=None,
            languages=list(LANGUAGES),
            phrase=keyword.text,
        )
        for keyword in keywords
    ]
    program = WakeProgram(
        name=program_name,
        attribution=attribution,
        installed=True,
        description=PROGRAM_DESCRIPTION,
        version=__version__,
        models=models,
    )
    return Info(wake=[program])
