"""``edge-agent eval --curve``: miss rate against false alarms per hour, per keyword, over a sweep
of thresholds (a DET curve), with the threshold that meets a false-alarm target.

Each recording's posteriors are computed once (the columns the keywords read) and decoded at
every threshold of the sweep. The decoder's detections only grow as the threshold falls
(``engine/decoder/firing.py``), so a recording with no detection at a threshold has none at any
higher one: those decodes are skipped, which keeps hours of background audio cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_agent.audio.wav import WavError
from edge_agent.cli.common import fail
from edge_agent.engine.decoder import CompiledKeyword, DecoderSettings
from edge_agent.engine.features import SAMPLE_RATE_HZ
from edge_agent.engine.model import KwsModel
from edge_agent.recording import Recording

# Fonts with Chinese characters, for the legend (the first one installed is used).
_CJK_FONTS = ["WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "DejaVu Sans"]

DEFAULT_TARGET_FA_PER_HOUR = 0.1

# The sweep: thresholds on a log scale, this many a decade, from the lowest up to 1.
STEPS_PER_DECADE = 12
LOWEST_THRESHOLD = 1e-4


def sweep_thresholds(configured: float, lowest: float = LOWEST_THRESHOLD) -> list[float]:
    """The thresholds tried for a keyword: a log grid from ``lowest`` to 1, and its own."""
    decades = -math.log10(lowest)
    count = int(round(decades * STEPS_PER_DECADE))
    grid = {float(f"{lowest * 10 ** (i / STEPS_PER_DECADE):.4g}") for i in range(count + 1)}
    return sorted(grid | {configured})


@dataclass
class KeywordCurve:
    """One keyword's counts per threshold: positives found, false alarms."""

    keyword: CompiledKeyword
    thresholds: list[float]
    positives: int = 0
    found: np.ndarray = field(init=False)
    false_alarms: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.found = np.zeros(len(self.thresholds), dtype=np.int64)
        self.false_alarms = np.zeros(len(self.thresholds), dtype=np.int64)

    def points(self, negative_hours: float) -> list[dict[str, float | int | None]]:
        return [
            {
                "threshold": threshold,
                "miss_rate": round(1 - int(found) / self.positives, 4) if self.positives else None,
                "false_alarms": int(alarms),
                "fa_per_hour": round(int(alarms) / negative_hours, 4) if negative_hours > 0 else None,
            }
            for threshold, found, alarms in zip(self.thresholds, self.found, self.false_alarms, strict=True)
        ]


def suggest(points: Sequence[dict[str, float | int | None]], target_fa_per_hour: float) -> float | None:
    """The threshold meeting ``target_fa_per_hour`` with the lowest miss rate: of the thresholds
    that do, those with the lowest miss rate form a range; its geometric middle leaves a margin
    both ways. None if no threshold meets the target or there are no positives."""
    meeting = [p for p in points if p["fa_per_hour"] is not None and p["fa_per_hour"] <= target_fa_per_hour]
    meeting = [p for p in meeting if p["miss_rate"] is not None]
    if not meeting:
        return None
    lowest = min(p["miss_rate"] for p in meeting)  # type: ignore[type-var]
    best = [float(p["threshold"]) for p in meeting if p["miss_rate"] == lowest]  # type: ignore[arg-type]
    return float(f"{math.sqrt(min(best) * max(best)):.3g}")


def _posteriors(model: KwsModel, path: Path, columns: np.ndarray) -> tuple[np.ndarray, float] | str:
    """The recording's posteriors of ``columns`` and its length, or the error text."""
    try:
        samples = Recording(path, max_seconds=None).samples()
    except WavError as error:
        return str(error)
    return model.posteriors(samples, columns), samples.shape[0] / SAMPLE_RATE_HZ


def _count(
    model: KwsModel,
    settings: DecoderSettings,
    keyword: CompiledKeyword,
    gathered: np.ndarray,
    thresholds: Sequence[float],
) -> list[int]:
    """Detections of ``keyword`` at each threshold (increasing), stopping at the first with none."""
    counts = [0] * len(thresholds)
    for i, threshold in enumerate(thresholds):
        decoder = model.decoder([replace(keyword, threshold=threshold)], settings)
        found = decoder.process(gathered) + decoder.finish()
        if not found:
            break  # none at any higher threshold either
        counts[i] = len(found)
    return counts


def run_curve(
    model: KwsModel,
    keywords: Sequence[CompiledKeyword],
    settings: DecoderSettings,
    expected: dict[Path, set[str] | None],
    background: Sequence[Path],
    target_fa_per_hour: float,
    output: Path,
    as_json: bool,
) -> int:
    """Sweep every keyword over the labelled recordings (``expected``: the keywords each one
    holds, None for "a keyword") and the ``background`` recordings (none); write ``output``.json
    and, with matplotlib, ``output``.png; print a summary."""
    columns = np.array(sorted({0, *(t for k in keywords for g in k.token_groups for t in g)}), dtype=np.int64)
    curves = {k.text: KeywordCurve(k, sweep_thresholds(k.threshold)) for k in keywords}
    # Each keyword's decoder reads its own columns, in its own order, out of the gathered ones.
    index = {int(c): i for i, c in enumerate(columns)}
    own = {k.text: np.array([index[int(c)] for c in model.decoder([k], settings).columns]) for k in keywords}
    hours = {"positives": 0.0, "negatives": 0.0, "background": 0.0}
    errors: list[dict[str, str]] = []
    items = [(path, wanted, "labelled") for path, wanted in expected.items()]
    items += [(path, set(), "background") for path in background]
    for path, wanted, kind in items:
        loaded = _posteriors(model, path, columns)
        if isinstance(loaded, str):
            errors.append({"file": str(path), "error": loaded})
            continue
        gathered, seconds = loaded
        holds_any = wanted is None or bool(wanted)
        share = "background" if kind == "background" else ("positives" if holds_any else "negatives")
        hours[share] += seconds / 3600
        for keyword in keywords:
            curve = curves[keyword.text]
            counts = _count(model, settings, keyword, gathered[:, own[keyword.text]], curve.thresholds)
            positive = wanted is None or keyword.text in wanted
            if positive:
                curve.positives += 1
                curve.found += np.array(counts) > 0
            elif wanted is not None:
                curve.false_alarms += np.array(counts)
    negative_hours = hours["negatives"] + hours["background"]
    report: dict[str, object] = {
        "target_fa_per_hour": target_fa_per_hour,
        "hours": {name: round(value, 4) for name, value in hours.items()},
        "negative_hours": round(negative_hours, 4),
        "backend": model.backend,
        "keywords": [],
        "errors": errors,
    }
    for curve in curves.values():
        points = curve.points(negative_hours)
        configured = next(p for p in points if p["threshold"] == curve.keyword.threshold)
        report["keywords"].append(  # type: ignore[attr-defined]
            {
                "text": curve.keyword.text,
                "positives": curve.positives,
                "configured": configured,
                "suggested_threshold": suggest(points, target_fa_per_hour),
                "points": points,
            }
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    json_path = output.with_suffix(".json")
    json_path.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    plot_path = plot_curves(report, output.with_suffix(".png"))
    if as_json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print_summary(report, json_path, plot_path)
    return 1 if errors else 0


def plot_curves(report: dict[str, object], path: Path) -> Path | None:
    """A DET plot (miss rate against false alarms per hour, both on log scales) with each
    keyword's configured and suggested thresholds marked; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # fonts not installed
    negative_hours = float(report["negative_hours"])  # type: ignore[arg-type]
    # No false alarm at all plots at the resolution of the audio: one per all of it, halved.
    floor_fa = 0.5 / negative_hours if negative_hours > 0 else 1e-3
    floor_miss = 0.5 / max(1, max(int(k["positives"]) for k in report["keywords"]))  # type: ignore[attr-defined]
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for keyword in report["keywords"]:  # type: ignore[attr-defined]
        points = [p for p in keyword["points"] if p["miss_rate"] is not None and p["fa_per_hour"] is not None]
        if not points:
            continue
        xs = [max(p["fa_per_hour"], floor_fa) for p in points]
        ys = [max(p["miss_rate"], floor_miss) for p in points]
        (line,) = axes.plot(xs, ys, drawstyle="steps-post", label=keyword["text"])
        configured = keyword["configured"]
        if configured["miss_rate"] is not None:
            axes.plot(
                max(configured["fa_per_hour"], floor_fa),
                max(configured["miss_rate"], floor_miss),
                "o",
                color=line.get_color(),
                markerfacecolor="none",
                markersize=9,
            )
        suggested = keyword["suggested_threshold"]
        if suggested is not None:
            nearest = min(points, key=lambda p: abs(math.log(p["threshold"] / suggested)))
            axes.plot(
                max(nearest["fa_per_hour"], floor_fa),
                max(nearest["miss_rate"], floor_miss),
                "*",
                color=line.get_color(),
                markersize=11,
            )
    axes.axvline(float(report["target_fa_per_hour"]), color="grey", linestyle=":", linewidth=1)  # type: ignore[arg-type]
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(f"false alarms per hour ({negative_hours:.2f} h without the keyword)")
    axes.set_ylabel("miss rate")
    axes.set_title("DET: o configured threshold, * suggested, : target", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(prop={"family": _CJK_FONTS})
    with warnings.catch_warnings():
        # Keywords in Chinese: a machine without a CJK font draws boxes, which is no error.
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        figure.tight_layout()
        figure.savefig(path)
    plt.close(figure)
    return path


def _print_summary(report: dict[str, object], json_path: Path, plot_path: Path | None) -> None:
    hours: dict[str, float] = report["hours"]  # type: ignore[assignment]
    target = report["target_fa_per_hour"]
    lines = [
        f"audio: {hours['positives']:.3f} h with keywords, {hours['negatives']:.3f} h without, "
        f"{hours['background']:.3f} h of background; target {target} false alarms per hour"
    ]
    for keyword in report["keywords"]:  # type: ignore[attr-defined]
        configured = keyword["configured"]
        lines.append(
            f"keyword {keyword['text']}: at {configured['threshold']} miss rate {configured['miss_rate']}, "
            f"{configured['false_alarms']} false alarms ({configured['fa_per_hour']} per hour); "
            f"suggested threshold {keyword['suggested_threshold'] or 'none meets the target'}"
        )
    plotted = f", plot: {plot_path}" if plot_path else " (no plot: pip install matplotlib)"
    lines.append(f"curve: {json_path}{plotted}")
    lines += [f"error: {e['file']}: {e['error']}" for e in report["errors"]]  # type: ignore[attr-defined]
    sys.stdout.write("\n".join(lines) + "\n")


def wav_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".wav")


def add_curve_options(parser: argparse.ArgumentParser) -> None:
    """``eval``'s options for the curve."""
    parser.add_argument(
        "--curve",
        nargs="?",
        const="eval-curve",
        type=Path,
        metavar="PREFIX",
        help="sweep thresholds: miss rate against false alarms per hour per keyword, written to "
        "PREFIX.json and (with matplotlib) PREFIX.png (default PREFIX: eval-curve)",
    )
    parser.add_argument(
        "--background",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR_OR_WAV",
        help="long recordings without any keyword (TV, kitchen, street): their false alarms count per "
        "hour in the curve (implies --curve)",
    )
    parser.add_argument(
        "--target-fa-per-hour",
        type=float,
        default=DEFAULT_TARGET_FA_PER_HOUR,
        metavar="RATE",
        help="the curve's suggested threshold meets this rate of false alarms with the lowest miss rate "
        f"(default {DEFAULT_TARGET_FA_PER_HOUR}: one per ten hours)",
    )


def run_curve_from_args(
    args: argparse.Namespace,
    model: KwsModel,
    keywords: Sequence[CompiledKeyword],
    settings: DecoderSettings,
    expected: dict[Path, set[str] | None],
) -> int:
    if not args.target_fa_per_hour >= 0:
        fail("--target-fa-per-hour must be a number >= 0")
    background: list[Path] = []
    for item in args.background:
        if item.is_dir():
            background += wav_files(item)
        elif item.is_file():
            background.append(item)
        else:
            fail(f"--background: {item} is neither a folder nor a file")
    output = args.curve if args.curve is not None else Path("eval-curve")
    target = args.target_fa_per_hour
    return run_curve(model, keywords, settings, expected, background, target, output, args.json)
