"""Shared pieces of the benchmarks: the machine they ran on, where the data is, result files."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edge_agent.audio.wav import read_wav, to_mono_16k
from edge_agent.engine.features import default_fft
from tests.support import start_agent_process

REPO = Path(__file__).resolve().parent.parent
# mosquitto.conf line that turns Nagle's algorithm off on the broker's sockets (docs/mqtt.md).
BROKER_NODELAY = "set_tcp_nodelay true"
# Where results go: the committed benchmarks/results, or elsewhere (the suite's smoke test).
RESULTS = Path(os.environ.get("EDGE_AGENT_BENCH_RESULTS", REPO / "benchmarks" / "results"))
SHARED = REPO.parent / "shared"
# Silence between the recordings of the wake word when they are played back to back.
GAP_SECONDS = 0.5
# In :func:`conversation`, a recording of the wake word after this many recordings of other speech.
SPEECH_PER_KEYWORD = 3


def model_dir() -> Path:
    env = os.environ.get("EDGE_AGENT_MODEL_DIR")
    path = Path(env) if env else SHARED / "models" / "speech_charctc_kws_phone-xiaoyun"
    if not (path / "kwsr.net").is_file():
        raise SystemExit(f"model not found at {path}: set EDGE_AGENT_MODEL_DIR")
    return path


def dev_audio() -> Path:
    env = os.environ.get("EDGE_AGENT_DEV_AUDIO")
    path = Path(env) if env else SHARED / "audio" / "dev"
    if not (path / "trans.txt").is_file():
        raise SystemExit(f"recordings not found at {path}: set EDGE_AGENT_DEV_AUDIO")
    return path


def cpu_identity(cpuinfo: str | None = None) -> dict[str, Any]:
    """Name, vendor, family and model of the first CPU in ``/proc/cpuinfo`` (or ``cpuinfo``):
    one name covers several designs (an "AMD EPYC" VM was Zen 4 one day and Zen 5 the next)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())

    def number(key: str) -> int | None:
        return int(fields[key]) if fields.get(key, "").isdigit() else None

    return {
        "name": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id"),
        "family": number("cpu family"),
        "model": number("model"),
    }


# Where OpenBLAS says which kernels it runs: numpy's own build (64-bit integers, prefixed), then others.
_OPENBLAS_CORENAME = (
    "scipy_openblas_get_corename64_",
    "scipy_openblas_get_corename",
    "openblas_get_corename",
)


def openblas_kernels() -> str | None:
    """The kernels of the OpenBLAS numpy loaded (``Haswell``, ``SkylakeX``, ...): chosen by
    OpenBLAS for the CPU, unless ``OPENBLAS_CORETYPE`` says otherwise; the agents the
    benchmarks start inherit the same environment. None without OpenBLAS (or not on Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _OPENBLAS_CORENAME:
            function = getattr(library, symbol, None)
            if function is not None:
                function.restype = ctypes.c_char_p
                name = function()
                return name.decode("ascii", "replace") if name else None
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on: they mean nothing without it."""
    identity = cpu_identity()
    cpu = identity["name"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu,
        "cpu_vendor_family_model": [identity["vendor"], identity["family"], identity["model"]],
        "cores": os.cpu_count(),
        # The BLAS kernels behind the network's matrix products, and the setting that chose them.
        "openblas_kernels": openblas_kernels(),
        "openblas_coretype_setting": os.environ.get("OPENBLAS_CORETYPE"),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        # The front-end's FFT library (scipy with the `fast` extra): it changes the engine's speed.
        "fft": default_fft(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        # Other work on the machine when the results were written: a shared VM's speed drifts
        # with it (1-minute average of runnable processes; compare it with the cores).
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def start_agent(
    port: int, device: str, outbox: Path, *options: str, checkout: Path = REPO, **settings: str
) -> subprocess.Popen[Any]:
    """``edge-agent run`` as its own process (logging warnings only), against 127.0.0.1:``port``.

    ``settings`` are config overrides given the way a deployment would, as environment variables
    (``health__interval="2"`` becomes ``EDGE_AGENT_HEALTH__INTERVAL=2``). ``checkout``: the
    repository whose agent runs (its own ``edge_agent`` package: ``python -m`` puts the working
    directory first on the path, and engine worker processes take their package's).
    """
    env = {f"EDGE_AGENT_{key.upper()}": value for key, value in settings.items()}
    options = ("--log-level", "warning", *options)
    return start_agent_process(
        model_dir(), port, device, outbox, *options, env=env, stdout=None, stderr=None, cwd=checkout
    )


def positives_back_to_back() -> tuple[np.ndarray, list[float]]:
    """The 25 recordings of the wake word one after another with GAP_SECONDS of silence between
    them, as 16-bit values (float32, what a device would send as s16le), and where each one
    starts (s): what the MQTT benchmark's devices play, and the engine benchmark's continuous
    streams."""
    return _back_to_back(sorted(dev_audio().glob("pos/*.wav")))


def conversation() -> tuple[np.ndarray, list[float]]:
    """Other Mandarin speech (the 33 negatives of audio/dev, navigation and smart-device
    commands) with a recording of the wake word after every SPEECH_PER_KEYWORD of them, as
    :func:`positives_back_to_back` gives its recordings: what a satellite in a room where people
    talk hears, the keyword said now and then, rather than the keyword alone over and over."""
    speech = sorted(dev_audio().glob("neg/*.wav"))
    keywords = sorted(dev_audio().glob("pos/*.wav"))
    order = []
    for k, path in enumerate(speech):
        order.append(path)
        if (k + 1) % SPEECH_PER_KEYWORD == 0:
            order.append(keywords[(k // SPEECH_PER_KEYWORD) % len(keywords)])
    return _back_to_back(order)


def _back_to_back(paths: list[Path]) -> tuple[np.ndarray, list[float]]:
    """The recordings at ``paths`` one after another with GAP_SECONDS of silence between them,
    and where each one starts (s)."""
    pieces, starts, offset = [], [], 0.0
    gap = np.zeros(int(GAP_SECONDS * 16000), dtype=np.float32)
    for path in paths:
        samples = to_mono_16k(read_wav(path))
        starts.append(offset)
        pieces += [samples, gap]
        offset += (samples.shape[0] + gap.shape[0]) / 16000
    audio = np.clip(np.round(np.concatenate(pieces)), -32768, 32767).astype(np.float32)
    return audio, starts


def played_stream(audio: np.ndarray, offset: int, samples: int) -> np.ndarray:
    """The first ``samples`` one stream plays: ``audio`` from ``offset``, wrapping round."""
    return np.roll(audio, -offset)[:samples]


def stream_offsets(streams: int, starts: list[float], stagger: bool) -> list[int]:
    """Where each stream starts in the audio (samples): all at 0, or stream k at recording k."""
    if not stagger:
        return [0] * streams
    return [int(round(starts[k % len(starts)] * 16000)) for k in range(streams)]


class AgentUsage:
    """CPU and memory of the agent as a whole: its own process and every process it started
    (the engine's worker processes), sampled with :meth:`sample`.

    RSS counts pages shared between the processes (the interpreter, numpy, the model) once per
    process; PSS splits them among the processes that share them, so its sum is what the agent
    takes from the machine. Both are reported."""

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self._seen: dict[int, tuple[psutil.Process, float]] = {}  # pid -> (process, CPU s at first sight)
        self._started = time.monotonic()
        self.peak_rss_mb = 0.0
        self.peak_pss_mb = 0.0
        self.processes = 0
        self.sample()

    def _processes(self) -> list[psutil.Process]:
        found = []
        for process in [self._root, *self._root.children(recursive=True)]:
            if process.pid not in self._seen:
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                self._seen[process.pid] = (process, times.user + times.system)
            found.append(self._seen[process.pid][0])
        return found

    def sample(self) -> None:
        rss = pss = 0.0
        processes = self._processes()
        for process in processes:
            try:
                memory = process.memory_full_info()
            except psutil.Error:
                continue
            rss += memory.rss / 1e6
            pss += getattr(memory, "pss", memory.rss) / 1e6
        self.processes = max(self.processes, len(processes))
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        self.peak_pss_mb = max(self.peak_pss_mb, pss)

    def cpu_percent(self) -> dict[str, float]:
        """CPU used since this object was made, per process (pid) and in all (100 = one core)."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        used: dict[str, float] = {}
        for pid, (process, first) in self._seen.items():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            used[str(pid)] = round((times.user + times.system - first) / elapsed * 100, 1)
        used["total"] = round(sum(used.values()), 1)
        return used
