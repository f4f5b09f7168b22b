"""A long, reproducible background without the keyword, for false alarms per hour.

    python -m benchmarks.background [--hours 6] [--seed 0] [--out DIR]

Seven minutes of negatives cannot show a false alarm a day. This builds hours of real Mandarin
speech out of ../shared/audio/dev/neg (speech that never holds 小云小云): each recording played
again and again, each time at a random speed (0.88-1.12, pitch with it, as a tape), a random
gain (0.4-1.6), in white noise at a random signal-to-noise ratio (5-30 dB), with a short gap
of that noise (0.1-1.5 s) before the next one. A fixed seed makes the same audio on every
machine. Files of ten minutes go to DIR (default: ~/.cache/edge-agent/background-<hours>h-seed<seed>,
never the repository), with a manifest; a complete set is not built again. Then:

    edge-agent eval --keywords 小云小云 --positives ../shared/audio/dev/pos \\
        --negatives ../shared/audio/dev/neg --background DIR --curve
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import dev_audio
from edge_agent.audio.wav import encode_wav, read_wav, to_mono_16k

RATE = 16000
FILE_SECONDS = 600
SPEED = (0.88, 1.12)
GAIN = (0.4, 1.6)
SNR_DB = (5.0, 30.0)
GAP_SECONDS = (0.1, 1.5)


def default_folder(hours: float, seed: int) -> Path:
    return Path.home() / ".cache" / "edge-agent" / f"background-{hours:g}h-seed{seed}"


def recipe(hours: float, seed: int) -> dict[str, object]:
    """What the files are made of: written to the manifest, and compared with it."""
    return {
        "hours": hours,
        "seed": seed,
        "file_seconds": FILE_SECONDS,
        "speed": SPEED,
        "gain": GAIN,
        "snr_db": SNR_DB,
        "gap_seconds": GAP_SECONDS,
        "source": "audio/dev/neg",
        "version": 2,
    }


def played(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One playing of a recording: speed, gain, a gap before it, white noise over both."""
    speed = float(rng.uniform(*SPEED))
    # Played faster: fewer samples, read between the original ones (linear interpolation, a
    # tape's change of speed; a band-limited resampler for these odd ratios takes far longer).
    positions = np.arange(0.0, speech.shape[0] - 1, speed)
    stretched = np.interp(positions, np.arange(speech.shape[0]), speech).astype(np.float32)
    voiced = stretched * float(rng.uniform(*GAIN))
    gap = np.zeros(int(rng.uniform(*GAP_SECONDS) * RATE), dtype=np.float32)
    signal = np.concatenate([gap, voiced])
    power = float(np.mean(voiced.astype(np.float64) ** 2)) or 1.0
    snr_db = float(rng.uniform(*SNR_DB))
    noise = rng.standard_normal(signal.shape[0]) * np.sqrt(power / 10 ** (snr_db / 10))
    return (signal + noise).astype(np.float32)


def build(folder: Path, hours: float, seed: int) -> list[Path]:
    """The background's files in ``folder``, built unless a complete set with the same recipe
    is there."""
    wanted = recipe(hours, seed)
    manifest = folder / "manifest.json"
    count = int(np.ceil(hours * 3600 / FILE_SECONDS))
    paths = [folder / f"background-{i:03d}.wav" for i in range(count)]
    same = manifest.exists() and json.loads(manifest.read_text()) == json.loads(json.dumps(wanted))
    if same and all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    sources = [to_mono_16k(read_wav(p)) for p in sorted((dev_audio() / "neg").glob("*.wav"))]
    rng = np.random.default_rng(seed)
    for index, path in enumerate(paths):
        pieces: list[np.ndarray] = []
        length = 0
        while length < FILE_SECONDS * RATE:
            piece = played(sources[int(rng.integers(len(sources)))], rng)
            pieces.append(piece)
            length += piece.shape[0]
        audio = np.concatenate(pieces)[: FILE_SECONDS * RATE]
        path.write_bytes(encode_wav(np.clip(audio, -32768, 32767)))
        print(f"{path} ({index + 1}/{count})", file=sys.stderr, flush=True)
    manifest.write_text(json.dumps(wanted, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for the files (default: under ~/.cache/edge-agent)")
    args = parser.parse_args(argv)
    folder = args.out or default_folder(args.hours, args.seed)
    paths = build(folder, args.hours, args.seed)
    print(folder)
    return 0 if paths else 1


if __name__ == "__main__":
    raise SystemExit(main())
