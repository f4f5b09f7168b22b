from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.engine.lexicon import LexiconError
from edge_agent.engine.model import REQUIRED_FILES, KeywordSpec, KwsModel, ModelError


def copy_model(model_dir: Path, target: Path) -> Path:
    target.mkdir()
    for name in (*REQUIRED_FILES, "keywords.json"):
        shutil.copy(model_dir / name, target / name)
    return target


def test_loads_the_real_model(numpy_model) -> None:  # type: ignore[no-untyped-def]
    assert numpy_model.backend == "numpy"
    assert numpy_model.network.output_dim == 2599
    assert (numpy_model.default_min_duration, numpy_model.default_max_duration) == (0.25, 2.5)
    assert numpy_model.network.lookahead_frames == 8
    assert 0.2 < numpy_model.latency_seconds < 0.35


def test_missing_files_are_listed(tmp_path: Path, model_dir: Path) -> None:
    folder = copy_model(model_dir, tmp_path / "m")
    (folder / "kwsr.lex").unlink()
    with pytest.raises(ModelError, match=r"lacks kwsr.lex"):
        KwsModel.load(folder)


def test_corrupt_network_file_names_file_and_offset(tmp_path: Path, model_dir: Path) -> None:
    folder = copy_model(model_dir, tmp_path / "m")
    data = (folder / "kwsr.net").read_bytes()
    (folder / "kwsr.net").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match=r"kwsr.net: byte \d+: unexpected end of file"):
        KwsModel.load(folder)


def test_token_table_must_match_network_outputs(tmp_path: Path, model_dir: Path) -> None:
    folder = copy_model(model_dir, tmp_path / "m")
    lines = (folder / "kwsr.phn").read_text(encoding="utf-8").splitlines()
    (folder / "kwsr.phn").write_text("\n".join([*lines, "extra"]) + "\n", encoding="utf-8")
    with pytest.raises(ModelError, match=r"2599 outputs but kwsr.phn lists 2600 tokens"):
        KwsModel.load(folder)


def test_unknown_backend_is_refused(model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"backend must be one of numpy, torch"):
        KwsModel.load(model_dir, backend="onnx")


def test_numpy_backend_never_imports_torch(model_dir: Path, tmp_path: Path) -> None:
    """Run in a fresh interpreter: the test process may have torch loaded already."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from edge_agent.engine.model import KwsModel, KeywordSpec\n"
        f"model = KwsModel.load({str(model_dir)!r})\n"
        "detector = model.detector([KeywordSpec('小云小云')])\n"
        "detector.feed(np.zeros(16000, np.int16)); detector.finish()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compile_uses_model_durations_and_rejects_unknown_characters(numpy_model) -> None:  # type: ignore[no-untyped-def]
    compiled = numpy_model.compile(KeywordSpec("小云小云", threshold=0.2))
    assert compiled.token_groups == ((1462,), (976,), (1462,), (976,))
    assert (compiled.min_duration, compiled.max_duration, compiled.threshold) == (0.25, 2.5, 0.2)
    with pytest.raises(LexiconError, match=r"'😀'"):
        numpy_model.compile(KeywordSpec("小😀"))


def test_detector_reset_and_keyword_swap(numpy_model, example_wav: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.audio.wav import read_wav, to_mono_16k

    samples = to_mono_16k(read_wav(example_wav))
    detector = numpy_model.detector([KeywordSpec("如家酒店")])
    assert detector.feed(samples) + detector.finish() == []
    detector.feed(samples[:16000])
    detector.set_keywords([numpy_model.compile(KeywordSpec("小云小云"))])
    found = detector.feed(samples[16000:]) + detector.finish()
    assert [d.keyword for d in found] == ["小云小云"]
    # Times still count from the start of the stream, not from the swap.
    alone = numpy_model.detector([KeywordSpec("小云小云")])
    (reference,) = alone.feed(samples) + alone.finish()
    assert found[0].start == pytest.approx(reference.start) and found[0].end == pytest.approx(reference.end)
    assert detector.audio_seconds == 0.0  # finish() reset the stream


def test_posteriors_sum_to_one(numpy_model) -> None:  # type: ignore[no-untyped-def]
    posteriors = numpy_model.posteriors(
        np.random.default_rng(0).integers(-3000, 3000, 16000).astype(np.int16)
    )
    assert posteriors.shape == (33, 2599)  # 98 filterbank frames, every third kept
    np.testing.assert_allclose(posteriors.sum(axis=1), 1.0, atol=1e-4)


def test_int8_torch_backend_runs_and_numpy_refuses_it(model_dir: Path, example_wav: Path) -> None:
    from edge_agent.audio.wav import read_wav, to_mono_16k
    from tests.conftest import require_module

    require_module("torch")
    model = KwsModel.load(model_dir, backend="torch", quantize=True)
    assert model.backend == "torch-int8"
    detector = model.detector([KeywordSpec("小云小云")])
    (found,) = detector.feed(to_mono_16k(read_wav(example_wav))) + detector.finish()
    assert found.confidence > 0.5
    with pytest.raises(ModelError, match="int8 quantization needs the torch backend"):
        KwsModel.load(model_dir, backend="numpy", quantize=True)


def test_a_model_without_its_network_spells_describes_and_reads_it_only_when_asked(  # type: ignore[no-untyped-def]
    numpy_model, example_wav: Path
) -> None:
    """The agent's process, when engine processes score its streams, keeps the model without
    the network's weights: it still compiles keywords and says what the model is; a recording
    scored there after all (the HTTP API's scores) reads the network then, with the same
    results."""
    from edge_agent.audio.wav import read_wav, to_mono_16k
    from edge_agent.engine.model import NetworkOnDemand

    light = numpy_model.without_network()
    assert isinstance(light.network, NetworkOnDemand) and not light.network.held
    assert light.lexicon is numpy_model.lexicon and light.backend == numpy_model.backend
    assert light.latency_seconds == numpy_model.latency_seconds
    assert light.network.output_dim == 2599 and not light.network.held
    keyword = KeywordSpec("小云小云")
    assert light.compile(keyword) == numpy_model.compile(keyword)
    assert light.without_network() is light
    samples = to_mono_16k(read_wav(example_wav))
    np.testing.assert_array_equal(light.posteriors(samples), numpy_model.posteriors(samples))
    assert light.network.held


def test_a_model_loaded_without_spelling_takes_compiled_keywords(  # type: ignore[no-untyped-def]
    numpy_model, model_dir: Path, example_wav: Path
) -> None:
    """An engine process gets its keywords compiled: it reads the token table, not the
    characters; spelling there is refused, clearly."""
    from edge_agent.audio.wav import read_wav, to_mono_16k

    engine = KwsModel.load(model_dir, spelling=False)
    assert engine.lexicon.blank_id == numpy_model.lexicon.blank_id
    assert engine.lexicon.token_names == numpy_model.lexicon.token_names
    with pytest.raises(LexiconError, match="without its lexicon"):
        engine.compile(KeywordSpec("小云小云"))
    compiled = numpy_model.compile(KeywordSpec("小云小云"))
    samples = to_mono_16k(read_wav(example_wav))
    found = []
    for model in (engine, numpy_model):
        detector = model.detector([compiled])
        found.append(detector.feed(samples) + detector.finish())
    assert found[0] == found[1] and len(found[0]) == 1
