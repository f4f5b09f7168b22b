"""The HTTP API as plain functions of a request: routing, validation, JSON, no sockets.

``server.py`` owns the socket side (reading bodies within limits, keep-alive, Expect: 100,
the Host check and CORS headers); this module turns a complete :class:`Request` into a
:class:`Response` and never raises: a backend's :class:`ApiError` becomes its status with
``{"detail": message, "error": message}``, anything else is logged with its traceback and
answered with a generic 500.

The answers carry the fields of the REST service around the ModelScope model that users come
from (FastAPI's ``detail`` on errors and 422 for a malformed form; ``success``, ``message``,
``timestamp``; ``/`` and ``/info`` with its fields) beside our own, so its clients work unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psutil

from edge_agent import __version__
from edge_agent.audio.wav import TARGET_SAMPLE_RATE_HZ
from edge_agent.http import metrics as prometheus
from edge_agent.http.access import AccessPolicy, is_preflight
from edge_agent.http.backend import (
    ApiBackend,
    ApiError,
    BadRequest,
    KeywordRequest,
    MetricFamily,
    PayloadTooLarge,
    Sample,
    iso_timestamp,
)
from edge_agent.http.detection import AUDIO_FIELD, BEST_MATCH_THRESHOLD
from edge_agent.http.multipart import MultipartError, boundary_of, parse_header_value, parse_multipart
from edge_agent.http.openapi import DEFAULT_BASE_URL, openapi_document, render_docs

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
# Room for the multipart framing and the small form fields around the WAV itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Thresholds below this are refused, as for keywords[].threshold in the config: lower ones
# underflow the per-character floor (threshold ** (n - 1)) and accept any sound. 0 itself is
# accepted: it asks for the best match (BEST_MATCH_THRESHOLD).
MIN_THRESHOLD = 1e-6
# The service name in `/` (the REST service's `service` field).
SERVICE_NAME = "edge-agent keyword spotting (damo/speech_charctc_kws_phone-xiaoyun)"
MODEL_DESCRIPTION = (
    "Chinese keyword spotting: ModelScope's cFSMN CTC model (小云小云, or any keyword of its lexicon), "
    "run natively in numpy"
)
INPUT_FORMAT = "WAV (PCM 8/16/24/32-bit or float), any sample rate and channels; converted to 16 kHz mono"
THRESHOLD_RANGE = (0.0, 1.0)
# A Host header fit to appear in the examples: a name or an address, and a port.
_HOST_HEADER = re.compile(r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$")
# An absolute path in a message, up to a space, quote, bracket or colon.
_ABSOLUTE_PATH = re.compile(r"(?<![\w/:.])/[^\s'\"()\[\],;:]+")
# Renderings of /docs kept, one per address clients used (bounded: IP addresses are not).
MAX_CACHED_PAGES = 8
# Raw-body uploads: what `curl --data-binary -H 'Content-Type: audio/wav'` and friends send.
WAV_MEDIA_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "application/octet-stream")
# Pages are served with a policy that forbids loading anything from elsewhere (they need nothing).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; media-src blob:; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class UnsupportedMediaType(ApiError):
    status = 415


class InvalidField(ApiError):
    """A form field missing or of the wrong type or range: 422, as FastAPI's validation answers."""

    status = 422


class Forbidden(ApiError):
    status = 403


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, Sequence[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: Mapping[str, str] = field(default_factory=dict)


def json_response(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return Response(status, body, JSON_TYPE, dict(headers or {}))


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """``detail`` for FastAPI's clients, ``error`` for ours: the same one-line message."""
    return json_response(status, {"success": False, "detail": message, "error": message}, headers)


Handler = Callable[[Request], Response]


class Api:
    """Routes and handlers over one :class:`ApiBackend`."""

    def __init__(
        self,
        backend: ApiBackend,
        max_upload_bytes: int,
        access: AccessPolicy | None = None,
        show_paths: bool = False,
    ) -> None:
        self.backend = backend
        self.max_upload_bytes = max_upload_bytes
        self.access = access or AccessPolicy(("*",), ())
        self.show_paths = show_paths
        self._started = time.monotonic()
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._responses: dict[tuple[str, str], int] = {}
        # The server's address as the examples show it when a request names none (set once bound).
        self.base_url = DEFAULT_BASE_URL
        self._document = openapi_document(max_upload_bytes)
        self._pages: dict[str, tuple[bytes, bytes]] = {}  # base URL -> (openapi.json, /docs)
        self._ui_html = resources.files("edge_agent.http").joinpath("static/ui.html").read_bytes()
        self.routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self._root},
            "/healthz": {"GET": self._health},
            "/info": {"GET": self._info},
            "/detect": {"POST": self._detect},
            "/metrics": {"GET": self._metrics},
            "/openapi.json": {"GET": self._openapi},
            "/docs": {"GET": self._docs},
            "/ui": {"GET": self._ui},
        }

    @property
    def document(self) -> dict[str, Any]:
        return self._document

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read at all; ``/detect`` checks the WAV itself afterwards."""
        return self.max_upload_bytes + MULTIPART_OVERHEAD_BYTES

    def allowed_methods(self, path: str) -> list[str] | None:
        """Methods of ``path`` (HEAD wherever GET is), or None for an unknown path."""
        methods = self.routes.get(path)
        if methods is None:
            return None
        allowed = list(methods)
        if "GET" in allowed:
            allowed.append("HEAD")
        return allowed

    def host_refusal(self, host: str | None) -> Response | None:
        """A 403 for a Host header the allow-list does not name (DNS rebinding), else None."""
        if self.access.host_allowed(host):
            return None
        return error_response(
            403,
            f"host {host!r} is not allowed: address this server by IP address or by a name in "
            "http.allowed_hosts",
        )

    def handle(self, request: Request) -> Response:
        """The response to ``request``; never raises."""
        methods = self.routes.get(request.path)
        if methods is None:
            response = error_response(404, f"no such path: {request.path}")
        elif request.method == "OPTIONS":
            response = self._options(request)
        else:
            method = "GET" if request.method == "HEAD" else request.method
            handler = methods.get(method)
            if handler is None:
                allowed = ", ".join(self.allowed_methods(request.path) or [])
                response = error_response(
                    405,
                    f"{request.method} is not allowed on {request.path}; use {allowed}",
                    {"Allow": allowed},
                )
            else:
                response = self._call(handler, request)
        self.count(request.path, response.status)
        return response

    def _call(self, handler: Handler, request: Request) -> Response:
        try:
            return handler(request)
        except ApiError as error:
            if error.status >= 500:
                log.warning("%s %s: %d %s", request.method, request.path, error.status, error.message)
            else:
                log.info("%s %s refused (%d): %s", request.method, request.path, error.status, error.message)
            return error_response(error.status, error.message, error.headers)
        except Exception:
            # The traceback goes to the log, never to the client.
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, "internal error; the device's log has the details")

    def count(self, path: str, status: int) -> None:
        """Count a response (also those the server sends before routing, e.g. 413)."""
        label = path if path in self.routes else "other"  # unknown paths must not grow the label set
        with self._lock:
            self._responses[(label, str(status))] = self._responses.get((label, str(status)), 0) + 1

    # --- handlers ----------------------------------------------------------------------------
    def _options(self, request: Request) -> Response:
        """A CORS preflight (answered for the allowed origins), or a plain OPTIONS (Allow)."""
        allowed = ", ".join([*(self.allowed_methods(request.path) or []), "OPTIONS"])
        if not is_preflight(request.method, request.headers):
            return Response(204, b"", headers={"Allow": allowed})
        origin = request.headers["origin"]
        if not self.access.origin_allowed(origin):
            return error_response(403, f"origin {origin} may not call this API (add it to http.cors_origins)")
        headers = self.access.preflight_headers(
            origin, allowed.split(", "), request.headers.get("access-control-request-headers")
        )
        return Response(204, b"", headers=headers)

    def _status(self) -> dict[str, Any]:
        status = dict(self.backend.status())
        if not self.show_paths and isinstance(status.get("error"), str):
            status["error"] = hide_paths(status["error"])
        status["service"] = SERVICE_NAME
        status["timestamp"] = iso_timestamp()
        return status

    def _root(self, request: Request) -> Response:
        """Always 200 (the REST service's root), whatever the state: ``status`` says it."""
        return json_response(200, self._status())

    def _health(self, request: Request) -> Response:
        status = self._status()
        if status.get("status") == "ok":
            return json_response(200, status)
        status.setdefault("error", f"not ready: {status.get('status')}")
        return json_response(503, status, {"Retry-After": "1"})

    def _info(self, request: Request) -> Response:
        ours = dict(self.backend.info())
        model = dict(ours.get("model") or {})
        if not self.show_paths:
            model.pop("directory", None)
        settings = list(ours.pop("keywords", []))
        service = self._detection_service()
        info: dict[str, Any] = {
            # The REST service's fields first.
            "model_id": model.get("id"),
            "description": MODEL_DESCRIPTION,
            "input_format": INPUT_FORMAT,
            "keywords": [str(k["text"]) for k in settings],
            "threshold_range": list(THRESHOLD_RANGE),
            "latency_typical_ms": service.typical_latency_ms() if service is not None else None,
            **ours,
            "model": model,
            "keyword_settings": settings,
        }
        info["input"] = {
            "container": "WAV (RIFF)",
            "encodings": ["PCM 8/16/24/32-bit", "IEEE float 32/64-bit", "WAVE_FORMAT_EXTENSIBLE"],
            "sample_rate_hz": TARGET_SAMPLE_RATE_HZ,
            "channels": "any: averaged to mono; other sample rates are resampled to 16 kHz",
            "max_upload_bytes": self.max_upload_bytes,
            "field": AUDIO_FIELD,
        }
        return json_response(200, info)

    def _detection_service(self) -> Any:
        """The backend's detection service, for its typical latency (None before it exists)."""
        return getattr(self.backend, "service", None)

    def _detect(self, request: Request) -> Response:
        wav, fields = self._detect_inputs(request)
        threshold = _threshold(fields.get("threshold"))
        keywords = _keywords(fields.get("keywords"))
        result = self.backend.detect(wav, threshold, keywords)
        return json_response(200, result.to_dict())

    def _detect_inputs(self, request: Request) -> tuple[bytes, dict[str, str]]:
        """The WAV bytes and the text fields (threshold, keywords) from form and query."""
        content_type = request.headers.get("content-type", "")
        try:
            media_type, _ = parse_header_value(content_type) if content_type else ("", {})
        except MultipartError as error:
            raise BadRequest(f"Content-Type: {error}") from None
        fields: dict[str, str] = {}
        if media_type == "multipart/form-data":
            try:
                parts = parse_multipart(request.body, boundary_of(content_type))
            except MultipartError as error:
                raise BadRequest(f"malformed multipart body: {error}") from None
            audio = [p for p in parts if p.name == AUDIO_FIELD]
            if not audio:
                names = ", ".join(sorted({p.name for p in parts})) or "none"
                raise InvalidField(f"the form has no {AUDIO_FIELD} file field (fields: {names})")
            if len(audio) > 1:
                raise BadRequest(f"{AUDIO_FIELD} is given {len(audio)} times; send one file per request")
            wav = audio[0].data
            for part in parts:
                if part.name in ("threshold", "keywords"):
                    if part.name in fields:
                        raise BadRequest(f"{part.name} is given twice")
                    fields[part.name] = _text(part.data, part.name)
        elif media_type in WAV_MEDIA_TYPES:
            wav = request.body
        else:
            shown = media_type or "none"
            raise UnsupportedMediaType(
                f"Content-Type {shown} is not accepted: send multipart/form-data with the file in "
                f"{AUDIO_FIELD} (curl -F {AUDIO_FIELD}=@file.wav) or the raw file as audio/wav"
            )
        if len(wav) > self.max_upload_bytes:
            raise PayloadTooLarge(
                f"{AUDIO_FIELD} is {len(wav)} bytes, larger than the {self.max_upload_bytes}-byte limit "
                "(http.max_upload_mb)"
            )
        for name in ("threshold", "keywords"):
            values = request.query.get(name, [])
            if len(values) > 1:
                raise BadRequest(f"{name} is given {len(values)} times in the query")
            if values:
                if name in fields:
                    raise BadRequest(f"{name} is given both in the form and in the query; give it once")
                fields[name] = values[0]
        return wav, fields

    def _metrics(self, request: Request) -> Response:
        families = [*self.backend.metrics(), *self._own_metrics()]
        body = prometheus.render(families).encode("utf-8")
        return Response(200, body, prometheus.CONTENT_TYPE)

    def _own_metrics(self) -> list[MetricFamily]:
        with self._lock:
            responses = dict(self._responses)
        try:
            rss: float | None = float(self._process.memory_info().rss)
            times = self._process.cpu_times()
            cpu: float | None = times.user + times.system
        except psutil.Error:
            rss = cpu = None
        return [
            MetricFamily(
                "edge_agent_http_responses",
                "counter",
                "HTTP responses by route and status code (unknown paths count as 'other').",
                tuple(Sample(v, {"path": p, "code": c}) for (p, c), v in sorted(responses.items())),
            ),
            MetricFamily.single(
                "edge_agent_http_uptime_seconds",
                "gauge",
                "Seconds since the HTTP server started.",
                time.monotonic() - self._started,
            ),
            MetricFamily.single(
                "edge_agent_ready", "gauge", "1 when POST /detect can run.", float(self.backend.ready())
            ),
            MetricFamily.single(
                "process_resident_memory_bytes", "gauge", "Resident memory of the process (bytes).", rss
            ),
            MetricFamily.single("process_cpu_seconds", "counter", "CPU time of the process (seconds).", cpu),
            MetricFamily(
                "edge_agent_build_info",
                "gauge",
                "Version of the agent (always 1).",
                (Sample(1.0, {"version": __version__}),),
            ),
        ]

    def _openapi(self, request: Request) -> Response:
        return Response(200, self._pages_for(request)[0], JSON_TYPE)

    def _docs(self, request: Request) -> Response:
        return Response(200, self._pages_for(request)[1], HTML_TYPE, _PAGE_HEADERS)

    def _pages_for(self, request: Request) -> tuple[bytes, bytes]:
        """The document and /docs with examples at the address the client used."""
        host = request.headers.get("host", "")
        base = f"http://{host}" if _HOST_HEADER.match(host) else self.base_url
        with self._lock:
            pages = self._pages.get(base)
        if pages is None:
            document = openapi_document(self.max_upload_bytes, base)
            pages = (
                json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8"),
                render_docs(document).encode("utf-8"),
            )
            with self._lock:
                if len(self._pages) >= MAX_CACHED_PAGES:
                    self._pages.clear()
                self._pages[base] = pages
        return pages

    def _ui(self, request: Request) -> Response:
        return Response(200, self._ui_html, HTML_TYPE, _PAGE_HEADERS)


# --- field parsing -------------------------------------------------------------------------------


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8 text") from None


def hide_paths(message: str) -> str:
    """``message`` with its absolute file paths replaced (an unauthenticated answer should not
    tell where the model or the configuration lives; the log keeps the whole message)."""
    return _ABSOLUTE_PATH.sub("<path>", message)


def _threshold(text: str | None) -> float | None:
    """A threshold in [1e-6, 1], or 0 for the best match; an empty field (a browser form left
    blank) means 'not given'."""
    if text is None or not text.strip():
        return None
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if value == BEST_MATCH_THRESHOLD:
        return BEST_MATCH_THRESHOLD
    return _parse_threshold(text, "threshold", InvalidField, " (0: report the best match)")


def _parse_threshold(text: str, what: str, error: type[ApiError] = BadRequest, zero: str = "") -> float:
    wanted = f"{what} must be a number in [{MIN_THRESHOLD:g}, 1]{zero}"
    try:
        value = float(text.strip())
    except ValueError:
        raise error(f"{wanted}, got {text.strip()[:40]!r}") from None
    if not (math.isfinite(value) and MIN_THRESHOLD <= value <= 1.0):
        raise error(f"{wanted}, got {value:g}")
    return value


def _keywords(text: str | None) -> list[KeywordRequest] | None:
    """``A,B:0.1`` -> keyword requests; full-width ，and ： work too (NFKC), blanks are skipped."""
    if text is None:
        return None
    entries = [entry.strip() for entry in unicodedata.normalize("NFKC", text).split(",")]
    entries = [entry for entry in entries if entry]
    if not entries:
        return None
    requests = []
    for entry in entries:
        keyword, colon, threshold = entry.partition(":")
        keyword = keyword.strip()
        if not keyword:
            raise BadRequest(f"keywords: {entry!r} has no keyword before ':'")
        value = _parse_threshold(threshold, f"keywords: {keyword!r}: the threshold") if colon else None
        requests.append(KeywordRequest(keyword, value))
    return requests
