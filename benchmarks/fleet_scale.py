"""A thousand devices on one mosquitto: the fleet view and staged rollouts, their memory and CPU.

    python -m benchmarks.fleet_scale [--devices 1000] [--quick]

One mosquitto (started here on a free port) and one simulated fleet (``benchmarks.fleet_sim``:
1,000 lightweight clients publishing the agent's real availability, info, health and detection
messages and answering get_config/set_config; rooms of 100 devices, every 97th device detecting
ten times as often as its room; every device starts as if it had run for an hour, so that its
detections per hour are settled). Then, as subprocesses, each measured by the kernel (``wait4``:
CPU time and peak RSS):

1. ``edge-agent fleet --json``: one snapshot of the whole fleet (every device listed, the loud
   devices flagged ``det-rate-high``);
2. ``edge-agent fleet --watch --json`` for a fixed time: the monitor's steady CPU and memory while
   1,000 devices report health;
3. ``edge-agent fleet rollout`` over all 1,000 devices with a 10% canary: one change that raises
   the detection rate (rolled back) and one that does not (completed).

The simulator's and mosquitto's CPU and memory over the whole run are reported too. The result
goes to ``benchmarks/results/fleet_scale.json``; README's Speed quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import REPO, machine, write_result
from edge_agent.config.schema import DEFAULT_THRESHOLD
from tests.broker import Broker

GROUP = "fleet"
ROOM_SIZE = 100
OUTLIER_EVERY = 97
RATE_PER_HOUR = 60.0
SNAPSHOT_WAIT_S = 5.0


def measured(argv: list[str], timeout: float, interrupt_after: float | None = None) -> dict[str, Any]:
    """Run ``argv``; its wall time, CPU seconds and peak RSS (from wait4), exit code and stdout."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err)
        if interrupt_after is not None:
            try:
                process.wait(interrupt_after)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "exit_code": process.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_percent": round(100 * cpu / wall, 1) if wall else None,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "stdout": stdout,
        "stderr": stderr[-2000:],
    }


def process_usage(process: psutil.Process, since: psutil._common.pcputimes, seconds: float) -> dict[str, Any]:
    now = process.cpu_times()
    cpu = (now.user - since.user) + (now.system - since.system)
    return {
        "cpu_s": round(cpu, 2),
        "cpu_percent": round(100 * cpu / seconds, 1),
        "rss_mb": round(process.memory_info().rss / 1e6, 1),
    }


def rollout(port: int, threshold: float, watch: str) -> dict[str, Any]:
    keywords = json.dumps([{"text": "小云小云", "threshold": threshold}], ensure_ascii=False)
    argv = [sys.executable, "-m", "edge_agent", "fleet", "rollout", "--group", GROUP]
    argv += ["--set", f"keywords={keywords}", "--canary", "10%", "--watch", watch, "--json"]
    argv += ["--broker", f"127.0.0.1:{port}", "--wait", "3", "--timeout", "30"]
    run = measured(argv, timeout=600)
    report = json.loads(run.pop("stdout"))
    run.pop("stderr")
    return {
        **run,
        "threshold": threshold,
        "watch": watch,
        "outcome": report["outcome"],
        "canary": len(report["canary"]),
        "counts": {k: v for k, v in report["counts"].items() if v},
        "verdict": report["verdict"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--health-interval", type=float, default=5.0, help="the devices' health interval (s)")
    parser.add_argument("--watch-seconds", type=float, default=30.0, help="how long the --watch monitor runs")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test (not for quoting)")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.watch_seconds = min(args.devices, 100), 12.0
    rollout_watch = f"{max(3 * args.health_interval, 15.0 if not args.quick else 6.0):g}s"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.devices + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.devices * 2 + 100), hard))
    workdir = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    broker = Broker(workdir).start()
    sim = None
    try:
        started = time.monotonic()
        simulation = ["--devices", str(args.devices), "--group", GROUP, "--group-size", str(ROOM_SIZE)]
        simulation += ["--rate", str(RATE_PER_HOUR), "--outlier-every", str(OUTLIER_EVERY)]
        simulation += ["--health-interval", str(args.health_interval), "--detection-events", "--aged"]
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.fleet_sim",
                "--broker",
                f"127.0.0.1:{broker.port}",
                *simulation,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sim.stdout is not None
        ready = sim.stdout.readline().strip()
        if ready != f"ready {args.devices}":
            raise SystemExit(f"the simulator did not start: {ready!r}")
        connect_s = time.monotonic() - started
        print(f"{args.devices} simulated devices connected in {connect_s:.1f} s", flush=True)
        sim_process, broker_process = psutil.Process(sim.pid), psutil.Process(broker.process.pid)  # type: ignore[union-attr]
        sim_cpu, broker_cpu, since = sim_process.cpu_times(), broker_process.cpu_times(), time.monotonic()

        fleet = [sys.executable, "-m", "edge_agent", "fleet", "--broker", f"127.0.0.1:{broker.port}"]
        # --wait long enough for 3 retained messages per device to arrive on a busy machine.
        snapshot = measured([*fleet, "--json", "--wait", str(SNAPSHOT_WAIT_S)], timeout=120)
        document = json.loads(snapshot.pop("stdout"))
        snapshot.pop("stderr")
        flagged = {d["device"] for d in document["devices"] if "det-rate-high" in d["flags"]}
        outliers = {f"sim-{index:04d}" for index in range(0, args.devices, OUTLIER_EVERY)}
        snapshot.update(
            wait_s=SNAPSHOT_WAIT_S,
            devices=len(document["devices"]),
            online=document["summary"]["online"],
            with_info=sum(d["version"] is not None for d in document["devices"]),
            with_health=sum(d["health_time"] is not None for d in document["devices"]),
            outliers_simulated=len(outliers),
            outliers_flagged=len(flagged & outliers),
            others_flagged=len(flagged - outliers),
        )
        print(f"fleet --json: {json.dumps(snapshot)}", flush=True)

        watch = measured(
            [*fleet, "--watch", "--json", "--wait", "3"], timeout=120, interrupt_after=args.watch_seconds
        )
        refreshes = len(watch.pop("stdout").splitlines())
        watch.pop("stderr")
        watch.update(seconds=args.watch_seconds, refreshes=refreshes)
        print(f"fleet --watch: {json.dumps(watch)}", flush=True)

        rolled_back = rollout(broker.port, DEFAULT_THRESHOLD / 2, rollout_watch)
        print(f"rollout (raises the rate): {json.dumps(rolled_back)}", flush=True)
        completed = rollout(broker.port, DEFAULT_THRESHOLD * 1.2, rollout_watch)
        print(f"rollout (does not): {json.dumps(completed)}", flush=True)

        seconds = time.monotonic() - since
        result = {
            "benchmark": "fleet_scale",
            "machine": machine(),
            "note": "a shared machine: other work ran at the same time; compare figures of one run",
            "devices": args.devices,
            "room_size": ROOM_SIZE,
            "health_interval_s": args.health_interval,
            "detections_per_hour_per_device": RATE_PER_HOUR,
            "simulator_connect_s": round(connect_s, 1),
            "fleet_snapshot": snapshot,
            "fleet_watch": watch,
            "rollout_rolled_back": rolled_back,
            "rollout_completed": completed,
            "over_the_run": {
                "seconds": round(seconds, 1),
                "simulator": process_usage(sim_process, sim_cpu, seconds),
                "mosquitto": process_usage(broker_process, broker_cpu, seconds),
            },
        }
        path = write_result("fleet_scale" if not args.quick else "fleet_scale-quick", result)
        print(f"wrote {path}")
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGTERM)
            sim.communicate(timeout=60)
        broker.stop()


if __name__ == "__main__":
    main()
