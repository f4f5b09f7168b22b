from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.engine.lexicon import Lexicon, LexiconError, normalize_keyword


def write_model_tables(folder: Path, lexicon_lines: list[str], tokens: list[str] | None = None) -> Lexicon:
    tokens = tokens or ["sil", "c2c", "c3c", "c4c"]
    (folder / "kwsr.phn").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (folder / "kwsr.lex").write_text("\n".join(lexicon_lines) + "\n", encoding="utf-8")
    return Lexicon.load(folder / "kwsr.phn", folder / "kwsr.lex")


def test_spells_characters_as_output_ids(tmp_path: Path) -> None:
    lexicon = write_model_tables(tmp_path, ["SIL sil", "GBG_C2C c2c", "小 c3c", "云 c4c", "晓 c3c"])
    assert lexicon.blank_id == 0
    assert lexicon.spell("小云 小云") == ((2,), (3,), (2,), (3,))
    assert "GBG_C2C" not in lexicon.char_to_tokens


def test_unknown_character_is_named(tmp_path: Path) -> None:
    lexicon = write_model_tables(tmp_path, ["小 c3c", "云 c4c"])
    with pytest.raises(LexiconError, match=r"character '龘' \(U\+9F98\) is not in the model's lexicon"):
        lexicon.spell("小龘")


def test_empty_keyword_is_refused(tmp_path: Path) -> None:
    lexicon = write_model_tables(tmp_path, ["小 c3c"])
    with pytest.raises(LexiconError, match=r"empty keyword"):
        lexicon.spell("  ")


def test_full_width_text_is_normalised() -> None:
    assert normalize_keyword("ＡＢ 小云") == "AB小云"


def test_lexicon_token_missing_from_table(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match=r"kwsr.lex:2: token 'c99c' is not in kwsr.phn"):
        write_model_tables(tmp_path, ["小 c3c", "云 c99c"])


def test_token_table_without_blank(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match=r"no 'sil'"):
        write_model_tables(tmp_path, ["小 c3c"], tokens=["c2c", "c3c"])


def test_homophone_extras_are_merged_without_duplicates(tmp_path: Path) -> None:
    lexicon = write_model_tables(tmp_path, ["小 c3c", "云 c4c"])
    groups = lexicon.spell("小云", homophones=lambda text: [(2, 1), ()])
    assert groups == ((2, 1), (3,))


def test_real_lexicon(model_dir: Path) -> None:
    lexicon = Lexicon.load(model_dir / "kwsr.phn", model_dir / "kwsr.lex")
    assert len(lexicon.token_names) == 2599
    assert lexicon.spell("小云") == ((1462,), (976,))
    assert len(lexicon.char_to_tokens) == 5984  # 8583 lines minus SIL and 2598 garbage entries
