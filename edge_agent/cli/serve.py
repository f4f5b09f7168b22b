"""``edge-agent serve`` (the HTTP API alone, no MQTT) and ``edge-agent healthcheck``.

``serve`` listens at once and loads the model in the background: ``/healthz`` answers 503
``loading`` until the model is ready, so a container's health check or a load balancer sees the
truth while a first start downloads the model. If loading fails the command exits 1, so that
systemd's or Docker's restart policy tries again (a download may succeed later).

``healthcheck`` asks ``/healthz`` of the server the config describes and exits 0 only on 200:
the Docker HEALTHCHECK, and a quick check for operators.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import urllib.error
import urllib.request
from types import FrameType
from typing import Any

from edge_agent.cli.common import (
    add_config_option,
    add_keyword_options,
    add_model_options,
    fail,
    load_settings,
)
from edge_agent.config import AgentConfig, ConfigError, merge_update
from edge_agent.logs import configure_logging
from edge_agent.system import tune_allocator

log = logging.getLogger("edge_agent")

EXIT_UNHEALTHY = 1
DEFAULT_HEALTHCHECK_TIMEOUT_SECONDS = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = subparsers.add_parser(
        "serve",
        help="serve the HTTP API only (health, /detect, /metrics, /docs, /ui), no MQTT",
        description="Serve the HTTP API without MQTT or audio sources: GET /healthz, GET /info, "
        "POST /detect, GET /metrics, GET /docs, GET /ui. The model loads in the background; "
        "/healthz answers 503 until it is ready. Host, port and upload limit come from the "
        "config's http section (http.enabled is not needed), then these options. The API has "
        "no authentication: keep the default 127.0.0.1 unless the network is trusted.",
    )
    add_model_options(serve)
    add_keyword_options(serve)
    serve.add_argument(
        "--host", metavar="ADDRESS", help="address to bind (overrides http.host; default 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="TCP port (overrides http.port; default 8080; --port 8000 for clients of the FastAPI "
        "REST service, which hard-code it)",
    )
    serve.add_argument(
        "--cors-origins",
        metavar="LIST",
        help="comma-separated origins whose pages may call the API, or '*' for any (a page opened "
        "from a file); overrides http.cors_origins (default: pages from localhost, any port)",
    )
    serve.add_argument(
        "--allowed-hosts",
        metavar="LIST",
        help="comma-separated host names requests may use besides IP addresses, '*' for any "
        "(overrides http.allowed_hosts; default: localhost)",
    )
    serve.add_argument(
        "--max-upload-mb",
        type=float,
        metavar="MB",
        help="largest WAV accepted (overrides http.max_upload_mb)",
    )
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level")
    serve.set_defaults(handler=run_serve)

    check = subparsers.add_parser(
        "healthcheck",
        help="exit 0 if the HTTP API's /healthz answers 200 (for Docker HEALTHCHECK)",
        description="GET /healthz of the local HTTP API (address from the config's http section, or "
        "--url) and print its JSON; exit 0 on 200, 1 otherwise (loading, failed, unreachable).",
    )
    add_config_option(check)
    check.add_argument(
        "--url",
        metavar="URL",
        help="the server's address instead of the config's (http://127.0.0.1:8080, or its /healthz)",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_HEALTHCHECK_TIMEOUT_SECONDS,
        metavar="S",
        help=f"seconds to wait for the answer (default {DEFAULT_HEALTHCHECK_TIMEOUT_SECONDS:g})",
    )
    check.set_defaults(handler=run_healthcheck)


def _http_overrides(args: argparse.Namespace) -> dict[str, Any]:
    update: dict[str, Any] = {}
    http: dict[str, Any] = {}
    if args.host is not None:
        http["host"] = args.host
    if args.port is not None:
        http["port"] = args.port
    if args.max_upload_mb is not None:
        http["max_upload_mb"] = args.max_upload_mb
    if args.cors_origins is not None:
        http["cors_origins"] = args.cors_origins
    if args.allowed_hosts is not None:
        http["allowed_hosts"] = args.allowed_hosts
    if http:
        update["http"] = http
    if args.log_level or args.log_json:
        update["logging"] = {}
        if args.log_level:
            update["logging"]["level"] = args.log_level
        if args.log_json:
            update["logging"]["format"] = "json"
    return update


def run_serve(args: argparse.Namespace) -> int:
    # Imported here: the other commands should not pay for the HTTP server and psutil.
    from edge_agent.http.server import start_http_server
    from edge_agent.http.standalone import StandaloneBackend

    tune_allocator()
    config = load_settings(args)
    try:
        config = merge_update(config, _http_overrides(args))
    except ConfigError as error:
        fail(str(error))
    configure_logging(config.logging.level, config.logging.format == "json")
    backend = StandaloneBackend.from_config(config)
    try:
        server = start_http_server(config.http, backend)
    except OSError as error:
        fail(f"cannot listen on {config.http.host}:{config.http.port}: {error.strerror or error}")
    backend.start()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        while not stop.wait(0.2):
            if backend.failed:
                log.error("exiting: the model could not be loaded (%s)", backend.error)
                code = 1
                break
    finally:
        server.stop()
    return code


def healthcheck_url(config: AgentConfig) -> str:
    """Where the config's HTTP API answers, seen from this host (wildcards become loopback)."""
    host = config.http.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.http.port}"


def health_url(base: str) -> str:
    """``base``'s /healthz: a server's address, or already the health URL itself."""
    base = base.rstrip("/")
    return base if base.endswith("/healthz") else base + "/healthz"


def run_healthcheck(args: argparse.Namespace) -> int:
    url = health_url(args.url or healthcheck_url(load_settings(args)))
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read().decode("utf-8", "replace")
            status = response.status
    except urllib.error.HTTPError as error:
        body, status = error.read().decode("utf-8", "replace"), error.code
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        print(json.dumps({"url": url, "status": "unreachable", "error": str(reason)}))
        return EXIT_UNHEALTHY
    print(body.strip() or json.dumps({"url": url, "http_status": status}))
    return 0 if status == 200 else EXIT_UNHEALTHY
