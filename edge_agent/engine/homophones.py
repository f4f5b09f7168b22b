"""Optional homophone merging for custom keywords (``keywords[].homophones: true``).

The network has one output per frequent character; characters that sound exactly alike keep
separate outputs when both are frequent (理, 里 and 李 are all li3), and the model often picks
the one its training text preferred. Summing the posteriors of every output pronounced like
the keyword's character (same syllable, same tone) makes custom keywords more robust, at the
cost of a few more false alarms; ``edge-agent eval`` shows both sides on your recordings.

Readings come from pypinyin (``pip install 'edge-agent[pinyin]'``), imported only here and only
when a keyword asks for it: it costs about 0.2 s and 40 MB, too much to pay by default on a
small board.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from edge_agent.engine.lexicon import Lexicon


def _import_pypinyin() -> Any:
    try:
        import pypinyin
    except ImportError as error:
        raise ImportError(
            "keywords with homophones: true need pypinyin: pip install 'edge-agent[pinyin]'"
        ) from error
    return pypinyin


def _is_han(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


@lru_cache(maxsize=4)
def _reading_index(lexicon: Lexicon) -> dict[str, tuple[int, ...]]:
    """Tonal reading (``li3``) -> outputs of every lexicon character read that way."""
    pypinyin = _import_pypinyin()
    chars = [c for c in lexicon.char_to_tokens if len(c) == 1 and _is_han(c)]
    readings = pypinyin.lazy_pinyin(chars, style=pypinyin.Style.TONE3, neutral_tone_with_five=True)
    index: dict[str, dict[int, None]] = {}
    for char, reading in zip(chars, readings, strict=True):
        for token in lexicon.char_to_tokens[char]:
            index.setdefault(reading, {})[token] = None
    return {reading: tuple(tokens) for reading, tokens in index.items()}


def homophone_expander(lexicon: Lexicon) -> Callable[[str], Sequence[tuple[int, ...]]]:
    """A function: keyword text -> extra outputs per character, read in the word's context."""
    pypinyin = _import_pypinyin()
    index = _reading_index(lexicon)

    def expand(text: str) -> Sequence[tuple[int, ...]]:
        # Reading the whole word picks the right reading of characters with several (角 in 八角).
        readings = pypinyin.lazy_pinyin(text, style=pypinyin.Style.TONE3, neutral_tone_with_five=True)
        if len(readings) != len(text):
            readings = [pypinyin.lazy_pinyin(c, style=pypinyin.Style.TONE3)[0] for c in text]
        return [index.get(r, ()) if _is_han(c) else () for c, r in zip(text, readings, strict=True)]

    return expand
