"""`edge-agent detect` / `eval` / `model` as a user runs them: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WAKE = "小云小云"


def edge_agent(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture()
def model_env(model_dir: Path) -> dict[str, str]:
    return {"EDGE_AGENT_MODEL_DIR": str(model_dir)}


def test_detect_prints_one_json_line_per_file_and_fails_only_for_the_bad_one(
    model_env: dict[str, str], dev_audio: Path, tmp_path: Path
) -> None:
    positive = sorted(dev_audio.glob("pos/*.wav"))[0]
    negative = sorted(dev_audio.glob("neg/*.wav"))[0]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(positive.read_bytes()[:30])
    result = edge_agent("detect", str(positive), str(broken), str(negative), env=model_env)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(positive), str(broken), str(negative)]
    assert lines[0]["detected"] is True
    (detection,) = lines[0]["detections"]
    assert detection["keyword"] == WAKE
    assert set(detection) == {"keyword", "confidence", "start", "end", "level_dbfs", "snr_db"}
    assert -60.0 < detection["level_dbfs"] < 0.0 and detection["snr_db"] > 0.0
    assert 0.05 <= detection["confidence"] <= 1 and detection["start"] < detection["end"]
    assert "error" in lines[1] and "broken.wav" in lines[1]["error"]
    assert lines[2] == {"file": str(negative), "detected": False, "detections": []}


def test_detect_all_good_files_exit_zero_and_chunked_mode_agrees(
    model_env: dict[str, str], example_wav: Path
) -> None:
    whole = edge_agent("detect", str(example_wav), env=model_env)
    streamed = edge_agent("detect", "--chunk-ms", "100", str(example_wav), env=model_env)
    assert whole.returncode == streamed.returncode == 0
    assert json.loads(whole.stdout) == json.loads(streamed.stdout)


def test_detect_exact_prints_every_digit_and_the_peak_frames(
    model_env: dict[str, str], example_wav: Path, tmp_path: Path
) -> None:
    """What the ARM comparison reads: the usual output's detection unrounded, with the frames
    of the characters' peaks; a bad file still gets its own line and the exit code 1."""
    broken = tmp_path / "broken.wav"
    broken.write_bytes(example_wav.read_bytes()[:30])
    usual = edge_agent("detect", str(example_wav), env=model_env)
    exact = edge_agent("detect", "--exact", str(example_wav), str(broken), env=model_env)
    assert exact.returncode == 1, exact.stderr
    good, bad = (json.loads(line) for line in exact.stdout.splitlines())
    (rounded,) = json.loads(usual.stdout)["detections"]
    (detection,) = good["detections"]
    assert good["error"] is None and detection["keyword"] == WAKE
    assert round(detection["confidence"], 4) == rounded["confidence"]
    assert detection["confidence"] != rounded["confidence"]  # more digits than the rounded one
    assert (round(detection["start"], 3), round(detection["end"], 3)) == (rounded["start"], rounded["end"])
    peaks = detection["peak_frames"]
    assert len(peaks) == len(WAKE) and peaks == sorted(peaks)
    assert bad["detections"] == [] and "broken.wav" in bad["error"]


def test_detect_custom_keywords_and_thresholds(
    model_env: dict[str, str], dev_audio: Path, transcripts
) -> None:  # type: ignore[no-untyped-def]
    with_keyword = sorted(
        name for name, text in transcripts.items() if "八角岭" in text or "如家酒店" in text
    )
    without = sorted(name for name in transcripts if name not in with_keyword and name.startswith("neg/"))[:3]
    files = [str(dev_audio / name) for name in with_keyword + without]
    result = edge_agent(
        "detect", "--keywords", "八角岭,如家酒店", "--threshold", "0.002", *files, env=model_env
    )
    assert result.returncode == 0, result.stderr
    detected = [json.loads(line)["detected"] for line in result.stdout.splitlines()]
    assert detected == [True] * len(with_keyword) + [False] * len(without)


def test_unknown_character_in_keyword_is_a_usage_error(model_env: dict[str, str], example_wav: Path) -> None:
    result = edge_agent("detect", "--keywords", "小☃", str(example_wav), env=model_env)
    assert result.returncode == 2
    assert "character '☃'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_value_names_the_key(tmp_path: Path, example_wav: Path, model_env: dict[str, str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("engine:\n  backend: tensorflow\n", encoding="utf-8")
    result = edge_agent("detect", "-c", str(config), str(example_wav), env=model_env)
    assert result.returncode == 2
    assert "engine.backend: must be one of 'numpy', 'torch', got 'tensorflow'" in result.stderr


def test_missing_model_explains_what_was_tried(tmp_path: Path, example_wav: Path) -> None:
    env = {
        "EDGE_AGENT_MODEL_DIR": "",
        "MODELSCOPE_CACHE": str(tmp_path / "cache"),
        "EDGE_AGENT_MODEL__DOWNLOAD": "false",
    }
    result = edge_agent("detect", str(example_wav), env=env)
    assert result.returncode == 2
    assert "cannot find the keyword-spotting model" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_json_has_the_documented_keys(model_env: dict[str, str], dev_audio: Path) -> None:
    result = edge_agent(
        "eval",
        "--keywords",
        WAKE,
        "--positives",
        str(dev_audio / "pos"),
        "--negatives",
        str(dev_audio / "neg"),
        "--json",
        env=model_env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"recall", "false_alarms", "positives", "negatives", "audio_hours", "fa_per_hour", "rtf"} <= set(
        report
    )
    assert report["recall"] == 1.0 and report["false_alarms"] == 0
    assert (report["positives"], report["negatives"]) == (25, 33)
    assert 0.1 < report["audio_hours"] < 0.15
    assert report["rtf"] > 0
    (keyword,) = report["keywords"]
    assert keyword["positive_score_min"] > keyword["suggested_threshold"] > keyword["negative_score_max"]


def test_eval_with_transcripts_labels_custom_keywords(model_env: dict[str, str], dev_audio: Path) -> None:
    result = edge_agent(
        "eval",
        "--keywords",
        "如家酒店,瑞宝分理处:0.002",
        "--data",
        str(dev_audio),
        "--labels",
        str(dev_audio / "trans.txt"),
        "--json",
        env=model_env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["positives"] == 5 and report["detected_positives"] == 5 and report["false_alarms"] == 0


def test_eval_human_output(model_env: dict[str, str], dev_audio: Path) -> None:
    result = edge_agent(
        "eval",
        "--keywords",
        WAKE,
        "--positives",
        str(dev_audio / "pos"),
        "--negatives",
        str(dev_audio / "neg"),
        env=model_env,
    )
    assert result.returncode == 0
    assert "recall:            25/25 (100.0%)" in result.stdout
    assert "false alarms:      0" in result.stdout


def test_model_info_and_path(model_env: dict[str, str], model_dir: Path) -> None:
    path = edge_agent("model", "path", env=model_env)
    assert path.returncode == 0 and path.stdout.strip() == str(model_dir)
    info = json.loads(edge_agent("model", "info", env=model_env).stdout)
    assert info["outputs"] == 2599 and info["lookahead_frames"] == 8


def test_eval_without_keywords_uses_the_configs_as_its_help_says(
    model_env: dict[str, str], dev_audio: Path, tmp_path: Path
) -> None:
    assert "default: the config's" in edge_agent("eval", "--help").stdout
    for kind in ("pos", "neg"):
        (tmp_path / kind).mkdir()
        source = sorted(dev_audio.glob(f"{kind}/*.wav"))[0]
        (tmp_path / kind / source.name).write_bytes(source.read_bytes())
    result = edge_agent(
        "eval",
        "--positives",
        str(tmp_path / "pos"),
        "--negatives",
        str(tmp_path / "neg"),
        "--json",
        env=model_env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [k["text"] for k in report["keywords"]] == [WAKE] and report["recall"] == 1.0


def test_no_model_anywhere_fails_at_once_with_the_whole_message(tmp_path: Path) -> None:
    """The default path (download allowed, no hub reachable from here): one line per place tried,
    the hub's reason in full, and no empty snapshot folder left in the cache."""
    cache = tmp_path / "cache"
    env = {"EDGE_AGENT_MODEL_DIR": "", "MODELSCOPE_CACHE": str(cache), "MODELSCOPE_DOMAIN": ""}
    result = edge_agent("model", "path", env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot find the keyword-spotting model" in result.stderr
    assert "is unreachable: " in result.stderr or "modelscope package is not installed" in result.stderr
    assert "Fix one of:" in result.stderr and "Traceback" not in result.stderr
    assert not cache.exists()
