"""``edge-agent detect`` (keywords in WAV files) and ``edge-agent eval`` (recall / false alarms)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.audio.levels import KeywordLevel
from edge_agent.audio.wav import WavError
from edge_agent.cli.common import (
    add_keyword_options,
    add_model_options,
    compile_keywords,
    fail,
    load_settings,
    open_model,
)
from edge_agent.cli.curve import add_curve_options, run_curve_from_args
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings, Detection
from edge_agent.engine.features import SAMPLE_RATE_HZ
from edge_agent.engine.lexicon import normalize_keyword
from edge_agent.engine.model import KwsModel
from edge_agent.keywords import decoder_settings_from
from edge_agent.recording import Recording, detect_recording, detection_dict, zip_levels
from edge_agent.scoring import SCORE_FLOOR, best_threshold
from edge_agent.system import tune_allocator


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    detect = subparsers.add_parser(
        "detect",
        help="spot keywords in WAV files, one JSON line per file",
        description="Spot keywords in WAV files. Prints one JSON line per file; exits 1 if any file "
        "could not be read (the others are still processed).",
    )
    add_model_options(detect)
    add_keyword_options(detect)
    detect.add_argument(
        "--chunk-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="feed the audio in chunks of this many ms, as a stream would (default: whole file)",
    )
    detect.add_argument(
        "--exact",
        action="store_true",
        help="print confidence, start and end unrounded (every digit) with the network frames of the "
        "characters' peaks: to compare machines or backends bit for bit",
    )
    detect.add_argument(
        "files", nargs="+", metavar="FILE", help="WAV files (any rate, mono or multi-channel)"
    )
    detect.set_defaults(handler=run_detect)

    evaluate = subparsers.add_parser(
        "eval",
        help="measure recall and false alarms on folders of recordings",
        description="Run every WAV under --positives (should hold a keyword) and --negatives (should "
        "not); print recall, false alarms, false alarms per hour, audio hours and real-time factor, "
        "plus the score range and a suggested threshold.",
    )
    add_model_options(evaluate)
    add_keyword_options(evaluate)
    evaluate.add_argument("--positives", type=Path, metavar="DIR", help="recordings that hold the keyword")
    evaluate.add_argument("--negatives", type=Path, metavar="DIR", help="recordings that do not")
    evaluate.add_argument("--data", type=Path, metavar="DIR", help="with --labels: a folder of recordings")
    evaluate.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="transcripts, 'relative/path.wav<TAB>text' per line: a file is a positive for each keyword "
        "its transcript contains (like audio/dev/trans.txt)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    add_curve_options(evaluate)
    evaluate.set_defaults(handler=run_eval)


@dataclass(frozen=True)
class FileResult:
    path: Path
    detections: tuple[Detection, ...] = ()
    error: str | None = None
    audio_seconds: float = 0.0
    engine_seconds: float = 0.0
    levels: tuple[KeywordLevel | None, ...] = ()  # of each detection's keyword, in order

    def to_dict(self) -> dict[str, object]:
        if self.error is not None:
            return {"file": str(self.path), "error": self.error}
        return {
            "file": str(self.path),
            "detected": bool(self.detections),
            "detections": [detection_dict(d, level) for d, level in zip_levels(self.detections, self.levels)],
        }


def detect_file(
    model: KwsModel,
    keywords: Sequence[CompiledKeyword],
    path: Path,
    settings: DecoderSettings,
    chunk_samples: int = 0,
) -> FileResult:
    """One WAV through the whole-file pipeline; errors become a result, not an exception."""
    try:
        recording = Recording(path, max_seconds=None)
        audio = recording.samples() if chunk_samples > 0 else recording
        result = detect_recording(model, keywords, settings, audio, chunk_samples)
    except WavError as error:
        return FileResult(path, error=str(error))
    return FileResult(
        path, result.detections, None, result.audio_seconds, result.processing_seconds, result.levels
    )


def run_detect(args: argparse.Namespace) -> int:
    tune_allocator()
    config = load_settings(args)
    model = open_model(config)
    keywords = compile_keywords(model, config)
    settings = decoder_settings_from(config)
    chunk_samples = int(round(args.chunk_ms * SAMPLE_RATE_HZ / 1000)) if args.chunk_ms > 0 else 0
    failed = False
    for name in args.files:
        result = detect_file(model, keywords, Path(name), settings, chunk_samples)
        failed |= result.error is not None
        row = exact_dict(result) if args.exact else result.to_dict()
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def exact_dict(result: FileResult) -> dict[str, object]:
    """A file's detections with nothing rounded: Python floats print every digit, so a difference
    in the last bit shows (the usual output rounds the confidence to 4 decimals)."""
    return {
        "file": str(result.path),
        "error": result.error,
        "detections": [
            {
                "keyword": d.keyword,
                "confidence": d.confidence,
                "start": d.start,
                "end": d.end,
                "peak_frames": list(d.peak_frames),
            }
            for d in result.detections
        ],
    }


def wav_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        fail(f"{folder} is not a directory")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".wav")


def read_labels(path: Path, root: Path) -> dict[Path, str]:
    """``relative/path.wav<TAB>transcript`` lines -> absolute path: transcript without spaces."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        fail(f"--labels: cannot read {path}: {error}")
    labels = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name, tab, text = line.partition("\t")
        if not tab:
            fail(f"--labels {path}:{number}: expected 'path<TAB>transcript'")
        labels[(root / name).resolve()] = "".join(text.split())
    return labels


def suggest_threshold(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float | None:
    """Geometric midpoint between the weakest positive and the strongest negative, if they separate."""
    if not positive_scores or min(positive_scores) <= 0:
        return None
    weakest = min(positive_scores)
    strongest = max([s for s in negative_scores if s > 0], default=SCORE_FLOOR)
    if strongest >= weakest:
        return None
    return float(math.sqrt(weakest * strongest))


@dataclass
class _KeywordTally:
    keyword: CompiledKeyword
    positives: int = 0
    detected: int = 0
    false_alarms: int = 0
    positive_scores: list[float] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        return {
            "text": self.keyword.text,
            "threshold": self.keyword.threshold,
            "positives": self.positives,
            "detected": self.detected,
            "false_alarms": self.false_alarms,
            "positive_score_min": _round(min(self.positive_scores, default=None)),
            "positive_score_median": _round(
                float(np.median(self.positive_scores)) if self.positive_scores else None
            ),
            "negative_score_max": _round(max(self.negative_scores, default=None)),
            "suggested_threshold": _round(suggest_threshold(self.positive_scores, self.negative_scores)),
        }


def run_eval(args: argparse.Namespace) -> int:
    tune_allocator()
    config = load_settings(args)
    model = open_model(config)
    keywords = compile_keywords(model, config)
    settings = decoder_settings_from(config)

    # Which keywords each file should hold: from --labels transcripts, or from the folders.
    expected: dict[Path, set[str] | None] = {}  # None: "a keyword" (positives folder, several keywords)
    if args.labels is not None:
        if args.data is None:
            fail("--labels needs --data (the folder its paths are relative to)")
        labels = read_labels(args.labels, args.data)
        for path in wav_files(args.data):
            transcript = labels.get(path.resolve(), "")
            expected[path] = {k.text for k in keywords if normalize_keyword(k.text) in transcript}
    else:
        if args.positives is None or args.negatives is None:
            fail("give --positives and --negatives, or --data and --labels")
        for path in wav_files(args.positives):
            expected[path] = {keywords[0].text} if len(keywords) == 1 else None
        for path in wav_files(args.negatives):
            expected[path] = set()
    if not expected:
        fail("no WAV files found")
    if args.curve is not None or args.background:
        return run_curve_from_args(args, model, keywords, settings, expected)

    tallies = {k.text: _KeywordTally(k) for k in keywords}
    positives = detected_files = false_alarms = 0
    audio_seconds = {"positives": 0.0, "negatives": 0.0}
    engine_seconds = 0.0
    errors: list[dict[str, object]] = []
    misses: list[str] = []
    alarms: list[dict[str, object]] = []

    for path, wanted in expected.items():
        try:
            samples = Recording(path, max_seconds=None).samples()
        except WavError as error:
            errors.append({"file": str(path), "error": str(error)})
            continue
        is_positive = wanted is None or bool(wanted)
        audio_seconds["positives" if is_positive else "negatives"] += samples.shape[0] / SAMPLE_RATE_HZ
        started = time.perf_counter()
        # All outputs: each keyword's probe decoder below gathers its own columns.
        posteriors = model.posteriors(samples)
        decoder = model.decoder(keywords, settings)
        found = decoder.process(posteriors) + decoder.finish()
        engine_seconds += time.perf_counter() - started

        found_texts = {d.keyword for d in found}
        if is_positive:
            positives += 1
            hit = bool(found_texts) if wanted is None else wanted <= found_texts
            detected_files += hit
            if not hit:
                misses.append(str(path))
        for detection in found:
            if wanted is not None and detection.keyword not in wanted:
                false_alarms += 1
                tallies[detection.keyword].false_alarms += 1
                alarms.append({"file": str(path), **detection.to_dict()})
        for keyword in keywords:
            tally = tallies[keyword.text]

            def detects(
                threshold: float, keyword: CompiledKeyword = keyword, posteriors: np.ndarray = posteriors
            ) -> bool:
                probe = replace(keyword, threshold=threshold)
                single = model.decoder([probe], settings)
                return bool(single.process(posteriors) or single.finish())

            score = best_threshold(detects)
            if wanted is None or keyword.text in wanted:
                tally.positives += 1
                tally.detected += keyword.text in found_texts
                tally.positive_scores.append(score)
            else:
                tally.negative_scores.append(score)

    total_seconds = sum(audio_seconds.values())
    negative_hours = audio_seconds["negatives"] / 3600
    per_keyword = [t.report() for t in tallies.values()]
    report: dict[str, object] = {
        "keywords": per_keyword,
        "backend": model.backend,
        "fft": model.fft,
        "recall": round(detected_files / positives, 4) if positives else None,
        "false_alarms": false_alarms,
        "positives": positives,
        "negatives": len(expected) - positives - len(errors),
        "detected_positives": detected_files,
        "audio_hours": round(total_seconds / 3600, 6),
        "fa_per_hour": round(false_alarms / negative_hours, 3) if negative_hours > 0 else None,
        "rtf": round(engine_seconds / total_seconds, 6) if total_seconds > 0 else None,
        "missed": misses,
        "false_alarm_detections": alarms,
        "errors": errors,
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print_report(report)
    return 1 if errors else 0


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def _print_report(report: dict[str, Any]) -> None:
    recall = report["recall"]
    lines = [
        f"backend:           {report['backend']} (FFT: {report['fft']})",
        f"recall:            {report['detected_positives']}/{report['positives']}"
        + (f" ({recall:.1%})" if recall is not None else ""),
        f"false alarms:      {report['false_alarms']} ({report['fa_per_hour']} per hour of negatives)",
        f"audio:             {report['audio_hours']:.4f} h",
        f"real-time factor:  {report['rtf']}",
    ]
    for k in report["keywords"]:
        lines.append(
            f"keyword {k['text']}: threshold {k['threshold']}, detected {k['detected']}/{k['positives']}, "
            f"false alarms {k['false_alarms']}; scores: positives min {k['positive_score_min']} "
            f"median {k['positive_score_median']}, negatives max {k['negative_score_max']}; "
            f"suggested threshold {k['suggested_threshold'] or 'none (scores overlap)'}"
        )
    lines += [f"missed: {path}" for path in report["missed"]]
    lines += [f"false alarm: {json.dumps(a, ensure_ascii=False)}" for a in report["false_alarm_detections"]]
    lines += [f"error: {e['file']}: {e['error']}" for e in report["errors"]]
    sys.stdout.write("\n".join(lines) + "\n")
