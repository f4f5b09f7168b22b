"""Output tokens (``kwsr.phn``) and the character lexicon (``kwsr.lex``): keywords as token ids.

The network predicts 2599 character classes; ``kwsr.lex`` maps 5,984 characters onto them
(rare homophones share the class of a frequent character: 瑞, 睿 and 锐 are one output). A
keyword is any sequence of characters the lexicon knows, so new keywords need no retraining.
Garbage entries (``SIL``, ``GBG_...``) are not characters and cannot be part of a keyword.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BLANK_TOKEN = "sil"


class LexiconError(ValueError):
    """A model token or lexicon file is malformed, or a keyword cannot be spelled with it."""


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one per loaded model
class Lexicon:
    """Token names in network output order, and characters to output ids."""

    token_names: tuple[str, ...]
    char_to_tokens: dict[str, tuple[int, ...]]
    blank_id: int

    @classmethod
    def load(cls, phone_table: Path, lexicon: Path | None) -> Lexicon:
        """``lexicon`` None: the token table alone (no characters: :meth:`spell` refuses), for a
        process that gets its keywords compiled."""
        token_names = _read_token_table(phone_table)
        index = {name: i for i, name in enumerate(token_names)}
        if BLANK_TOKEN not in index:
            raise LexiconError(f"{phone_table}: no {BLANK_TOKEN!r} (CTC blank) token")
        if lexicon is None:
            return cls(token_names=token_names, char_to_tokens={}, blank_id=index[BLANK_TOKEN])
        char_to_tokens: dict[str, list[int]] = {}
        try:
            lines = lexicon.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise LexiconError(f"{lexicon}: not UTF-8 text ({error})") from None
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise LexiconError(f"{lexicon}:{number}: expected 'WORD TOKEN...', found {line!r}")
            word, tokens = fields[0], fields[1:]
            if word == "SIL" or word.startswith("GBG_"):
                continue  # silence and garbage models, not characters
            ids = []
            for token in tokens:
                if token not in index:
                    raise LexiconError(f"{lexicon}:{number}: token {token!r} is not in {phone_table.name}")
                ids.append(index[token])
            if len(ids) != 1:
                # This model maps every character to exactly one output; a multi-token entry
                # would need a different keyword compiler.
                raise LexiconError(f"{lexicon}:{number}: {word!r} maps to {len(ids)} tokens, expected 1")
            alternatives = char_to_tokens.setdefault(word, [])
            if ids[0] not in alternatives:
                alternatives.append(ids[0])
        if not char_to_tokens:
            raise LexiconError(f"{lexicon}: no entries")
        return cls(
            token_names=token_names,
            char_to_tokens={c: tuple(ids) for c, ids in char_to_tokens.items()},
            blank_id=index[BLANK_TOKEN],
        )

    def spell(
        self,
        keyword: str,
        homophones: Callable[[str], Sequence[tuple[int, ...]]] | None = None,
    ) -> tuple[tuple[int, ...], ...]:
        """Token groups of ``keyword``, one group per character; whitespace is ignored.

        ``homophones``, when given, maps the keyword text to extra outputs per character
        (outputs of other characters pronounced the same in that word).
        """
        if not self.char_to_tokens:
            raise LexiconError(
                "the model was loaded without its lexicon (keywords reach this process compiled); "
                "load it with the lexicon to spell keywords"
            )
        text = normalize_keyword(keyword)
        if not text:
            raise LexiconError("empty keyword")
        extra = homophones(text) if homophones is not None else [() for _ in text]
        groups = []
        for char, similar in zip(text, extra, strict=True):
            ids = self.char_to_tokens.get(char) or self.char_to_tokens.get(char.lower())
            if ids is None:
                raise LexiconError(
                    f"keyword {keyword!r}: character {char!r} (U+{ord(char):04X}) is not in the "
                    "model's lexicon, so the model cannot spot it; choose another character"
                )
            groups.append(tuple(dict.fromkeys(ids + tuple(similar))))
        return tuple(groups)


def normalize_keyword(keyword: str) -> str:
    """NFKC (full-width letters and digits become ASCII) without whitespace."""
    return "".join(unicodedata.normalize("NFKC", keyword).split())


def _read_token_table(path: Path) -> tuple[str, ...]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise LexiconError(f"{path}: not UTF-8 text ({error})") from None
    while names and not names[-1]:
        names.pop()
    if not names:
        raise LexiconError(f"{path}: empty token table")
    for number, name in enumerate(names, start=1):
        if not name or len(name.split()) != 1:
            raise LexiconError(f"{path}:{number}: expected one token name, found {name!r}")
    if len(set(names)) != len(names):
        raise LexiconError(f"{path}: duplicate token names")
    return tuple(names)
