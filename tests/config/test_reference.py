"""docs/configuration.md and config.yaml are what the schema generates, and they agree."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from edge_agent.cli.config_cmd import REFERENCE_HEADER
from edge_agent.config import (
    FileSource,
    MicrophoneSource,
    config_reference,
    example_yaml,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent.parent


def test_config_yaml_is_the_generated_example_and_valid() -> None:
    assert (REPO / "config.yaml").read_text(encoding="utf-8") == example_yaml()
    config = load_config(REPO / "config.yaml", env={})
    assert config == load_config(None, env={})  # every key at its default


def test_reference_doc_is_generated_from_the_code() -> None:
    assert (REPO / "docs" / "configuration.md").read_text(
        encoding="utf-8"
    ) == REFERENCE_HEADER + config_reference()


def test_every_key_of_the_reference_is_in_config_yaml() -> None:
    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    for key in re.findall(r"^\| `([^`]+)` \|", config_reference(), flags=re.MULTILINE):
        leaf = key.split(".")[-1].replace("[]", "")
        assert re.search(rf"^\s*#?\s*-?\s*{re.escape(leaf)}:", text, flags=re.MULTILINE), key


def test_commented_source_examples_are_valid() -> None:
    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    block = re.search(r"  # sources:\n((?:  #   .*\n)+)", text)
    assert block is not None
    uncommented = "sources:\n" + "".join(
        line.replace("  #   ", "  ", 1) + "\n" for line in block.group(1).splitlines()
    )
    sources = parse_config({"audio": yaml.safe_load(uncommented)}).audio.sources
    assert [type(s) for s in sources] == [MicrophoneSource, FileSource]
