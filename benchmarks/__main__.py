"""The whole benchmark suite in one command:

    python -m benchmarks [--quick]

1. ``benchmarks.engine``: single-stream real-time factor on one thread (numpy, torch, torch int8),
   start-up time and peak RSS of ``edge-agent detect`` over audio/dev;
2. ``benchmarks.throughput``: engine throughput with 1, 16, 64 and 256 streams, in real-time
   streams per core, next to the plain per-stream baseline measured in the same run;
3. ``benchmarks.startup``: time from ``edge-agent run`` to ``online`` on the broker;
4. ``benchmarks.mqtt_latency``: end-to-end delay through mosquitto with 1, 16, 64 and 128
   concurrent real-time streams (p50/p95/p99; three rounds each, the median one reported next
   to every round's p95), drops, CPU and peak RSS of the agent; then 25 streams (one per
   recording: the decoder's own delays, at a light load) and 128 again with ``--stagger`` (the
   streams' keywords spread over time instead of said at once);
5. ``benchmarks.qos1_burst``: a burst of 128 detections through the outbox and mosquitto, with the
   broker's defaults and with ``set_tcp_nodelay true``, with and without TCP_QUICKACK, next to a
   plain paho client;
6. ``benchmarks.stages``: one stream's engine time stage by stage (front-end with each FFT
   library installed, network body, output-layer bounds, everything), and one batched network
   step of 128 streams;
7. ``benchmarks.streaming``: one live stream's real-time factor in 20, 100 and 1000 ms chunks, and
   openWakeWord 0.4.0's streaming loop on the same clip in the same run (when a Python with it is
   found: ``--oww-python``, ``$EDGE_AGENT_OWW_PYTHON`` or ``~/.cache/edge-agent/oww-venv``, which
   ``python -m benchmarks.streaming --make-oww-venv`` creates);
8. ``benchmarks.wyoming``: 1, 8, 32 and 128 real-time Home Assistant-style Wyoming clients in
   10 ms chunks: detection delay, ``describe`` under load, CPU and RSS; the same clients against
   wyoming-openwakeword 1.8.2 when ``OPENWAKEWORD_PYTHON`` names the Python of a venv that has it
   (``pip install wyoming-openwakeword==1.8.2 'numpy<2'``);
8. the plot ``benchmarks/results/scaling.png`` (RTF and p95 delay against the number of streams).

Every result file names the machine and its cores. ``--quick`` shortens the runs (for a smoke
test, not for quoting). The soak test is separate: ``python -m benchmarks.soak``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def run(module: str, *arguments: str) -> None:
    print(f"\n=== python -m benchmarks.{module} {' '.join(arguments)}", flush=True)
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *arguments], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the suite")
    args = parser.parse_args()
    quick = args.quick
    run("engine", "--repeat", "1" if quick else "3")
    run("throughput", "--streams", "1,16,64,256", "--seconds", "5" if quick else "30")
    run("startup", "--repeat", "1" if quick else "5")
    run(
        "mqtt_latency",
        *("--streams", "1,16" if quick else "1,16,64,128"),
        *("--seconds", "20" if quick else "40"),
        *("--rounds", "1" if quick else "3"),
    )
    run(
        "mqtt_latency",
        *("--streams", "16" if quick else "25,128"),
        *("--seconds", "20" if quick else "40"),
        *("--rounds", "1" if quick else "3"),
        "--stagger",
    )
    run("qos1_burst", "--repeat", "1" if quick else "7")
    run("stages", "--repeat", "1" if quick else "7")
    run("streaming", "--repeat", "1" if quick else "5")
    run("wyoming", *("--clients", "1,8" if quick else "1,8,32,128"), *("--seconds", "10" if quick else "30"))
    run("plot")


if __name__ == "__main__":
    main()
