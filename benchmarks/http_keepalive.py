"""Keep-alive throughput of the HTTP API: ``/healthz`` and ``POST /detect`` with N clients.

    python -m benchmarks.http_keepalive [--clients 4] [--seconds 10] [--before COMMIT]

Each client holds one keep-alive connection (``http.client``, as ``requests.Session`` or a
browser would) and sends requests back to back for ``--seconds``; ``/detect`` uploads the
model's example recording as a multipart form. A separate run times 20 requests, one after
another, on a single connection (what one curl invocation with several URLs does): with Nagle's
algorithm on and a response written in two pieces, every request after the first waits for the
client's delayed ACK.

``edge-agent serve`` runs as its own process, from this checkout and, with ``--before COMMIT``,
from that commit too (extracted with ``git archive`` into a temporary folder), so that the
figures before and after a change come from the same run on the same machine. Results go to
``benchmarks/results/http_keepalive.json``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine, model_dir, percentile, write_result

SERVE_START_SECONDS = 60.0
SEQUENTIAL_REQUESTS = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def checkout(commit: str, into: Path) -> Path:
    """The tree of ``commit`` in ``into`` (its edge_agent package is what the server imports)."""
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def start_serve(source: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_MODEL_DIR"] = str(model_dir())
    env["PYTHONPATH"] = str(source)
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=source,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + SERVE_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"edge-agent serve from {source} exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return process
            connection.close()
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"edge-agent serve from {source} did not become ready")


def detect_request() -> tuple[bytes, dict[str, str]]:
    wav = (model_dir() / "example" / "kws_xiaoyunxiaoyun.wav").read_bytes()
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio_file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + wav
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def one_request(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> float:
    started = time.perf_counter()
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"{method} {path}: {response.status}")
    return time.perf_counter() - started


def load(
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    """``clients`` keep-alive connections sending back to back for ``seconds`` (each at least
    one request) from the moment every one of them is connected and warmed up."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    began: list[float] = []

    def open_the_run() -> None:  # run by the last client to arrive, before any is released
        began.append(time.perf_counter())

    start = threading.Barrier(clients, action=open_the_run)

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        one_request(connection, method, path, body, headers)  # connect and warm up
        start.wait()
        while True:
            latencies[index].append(one_request(connection, method, path, body, headers))
            if time.perf_counter() >= began[0] + seconds:
                break
        connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began[0]
    every = [value * 1000 for values in latencies for value in values]
    return {
        "clients": clients,
        "requests": len(every),
        "requests_per_second": round(len(every) / elapsed, 1),
        "latency_ms_p50": round(percentile(every, 50) or 0.0, 2),
        "latency_ms_p95": round(percentile(every, 95) or 0.0, 2),
        "latency_ms_max": round(max(every, default=0.0), 2),
    }


def sequential(
    port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> dict[str, Any]:
    """One connection, requests one after another: the first and the rest."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = [one_request(connection, method, path, body, headers) * 1000 for _ in range(SEQUENTIAL_REQUESTS)]
    connection.close()
    rest = times[1:]
    return {
        "requests": len(times),
        "first_ms": round(times[0], 2),
        "later_ms_median": round(percentile(rest, 50) or 0.0, 2),
        "later_ms_max": round(max(rest), 2),
    }


def measure(label: str, source: Path, commit: str, clients: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    process = start_serve(source, port)
    detect_body, detect_headers = detect_request()
    try:
        result = {
            "server": label,
            "commit": commit,
            "healthz": load(port, "GET", "/healthz", None, {}, clients, seconds),
            "detect": load(port, "POST", "/detect", detect_body, detect_headers, clients, seconds),
            "one_connection_healthz": sequential(port, "GET", "/healthz", None, {}),
            "one_connection_detect": sequential(port, "POST", "/detect", detect_body, detect_headers),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(
        f"{label:>7} ({commit}): /healthz {result['healthz']['requests_per_second']} req/s, "
        f"/detect {result['detect']['requests_per_second']} req/s with {clients} clients; one connection: "
        f"/healthz first {result['one_connection_healthz']['first_ms']} ms, then "
        f"{result['one_connection_healthz']['later_ms_median']} ms",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4, help="keep-alive connections at once (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load run (default 10)")
    parser.add_argument("--before", metavar="COMMIT", help="also measure the server of this commit")
    args = parser.parse_args()
    head = machine()["commit"]
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-agent-before-") as folder:
        if args.before:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", args.before],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            results.append(
                measure("before", checkout(commit, Path(folder)), commit, args.clients, args.seconds)
            )
        results.append(measure("after", REPO, head, args.clients, args.seconds))
    path = write_result(
        "http_keepalive",
        {
            "benchmark": "http_keepalive",
            "machine": machine(),
            "note": "client and server share the machine's cores; a shared VM's speed drifts",
            "seconds_per_run": args.seconds,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
