"""The scaling plot: engine RTF and end-to-end p95 delay against the number of streams.

    python -m benchmarks.plot

Reads benchmarks/results/throughput-numpy.json and mqtt_latency.json (written by the other
benchmarks), and mqtt_latency-stagger.json where it exists, and writes
benchmarks/results/scaling.png, linked from the README.
"""

from __future__ import annotations

import json

from benchmarks.common import RESULTS


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on these machines
    import matplotlib.pyplot as plt

    throughput = json.loads((RESULTS / "throughput-numpy.json").read_text(encoding="utf-8"))
    latency = json.loads((RESULTS / "mqtt_latency.json").read_text(encoding="utf-8"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))

    streams = [r["streams"] for r in throughput["results"]]
    left.plot(streams, [r["rtf"] for r in throughput["results"]], "o-", label="batched, 100 ms chunks")
    left.axhline(
        throughput["baseline"]["rtf"],
        color="grey",
        linestyle="--",
        label="plain reference: whole files, 1 stream",
    )
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent streams")
    left.set_ylabel("engine time / audio time, per stream")
    left.set_title("Engine real-time factor (one thread)")
    left.legend()

    rows = latency["results"]
    counts = [r["streams"] for r in rows]
    p95 = [r["delay_ms_p95"] for r in rows]
    # Bars: the lowest and highest p95 of the rounds (older result files have one round).
    spread = [r.get("rounds_delay_ms_p95") or [r["delay_ms_p95"]] for r in rows]
    below = [p - min(s) for p, s in zip(p95, spread, strict=True)]
    above = [max(s) - p for p, s in zip(p95, spread, strict=True)]
    right.errorbar(
        counts,
        p95,
        yerr=[below, above],
        fmt="o-",
        capsize=4,
        label="p95, keyword said at once (bars: rounds)",
    )
    right.plot(counts, [r["delay_ms_p50"] for r in rows], "o-", label="p50, keyword said at once")
    stagger_file = RESULTS / "mqtt_latency-stagger.json"
    if stagger_file.is_file():
        # Streams starting at different recordings: keywords spread over time, and the few weak
        # ones the decoder holds for a better match (see README, Speed) in the tail.
        staggered = json.loads(stagger_file.read_text(encoding="utf-8"))["results"]
        right.plot(
            [r["streams"] for r in staggered],
            [r["delay_ms_p95"] for r in staggered],
            "s:",
            color="tab:red",
            label="p95, streams staggered",
        )
    right.axhline(500, color="grey", linestyle="--", label="500 ms")
    right.set_xlabel("concurrent real-time streams (one agent process)")
    right.set_ylabel("keyword spoken -> detection received (ms)")
    right.set_title("End-to-end delay through mosquitto")
    right.legend()

    cpu = throughput["machine"]["cpu"]
    figure.suptitle(
        f"edge-agent on {cpu}, {throughput['machine']['cores']} cores ({throughput['machine']['date']})"
    )
    figure.tight_layout()
    path = RESULTS / "scaling.png"
    figure.savefig(path, dpi=110)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
