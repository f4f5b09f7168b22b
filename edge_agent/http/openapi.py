"""The OpenAPI 3.0 document of the HTTP API, written by hand, and ``/docs`` rendered from it.

The document is the contract: tests validate it (openapi-spec-validator), check that the
server's routes and the document's paths are the same set, validate every response the tests
see against its schema, and let schemathesis fuzz the API with it. ``/docs`` is HTML generated
from the same dictionary on the device, with no CDN, because devices are often offline and the
usual Swagger UI bundle is larger than this whole package: each operation has a form that sends
the request to the server the page came from (as Swagger UI's "Try it out" does) and shows the
answer, and the curl examples name the address the page was opened at.
"""

from __future__ import annotations

import html
import json
from typing import Any

from edge_agent import __version__
from edge_agent.http.detection import MAX_AUDIO_SECONDS

OPENAPI_VERSION = "3.0.3"
# `http.max_upload_mb` counts binary megabytes, like the engine's queue_mb.
BYTES_PER_MB = 1024 * 1024
# Where the examples point when the server's own address is not known (the default config's).
DEFAULT_BASE_URL = "http://127.0.0.1:8080"

_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _json(schema_ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _common_errors(*codes: str) -> dict[str, Any]:
    known = {
        "404": _error("No such path."),
        "405": {
            **_error("Method not allowed on this path; the Allow header lists the allowed ones."),
            "headers": {"Allow": {"schema": {"type": "string"}, "description": "Allowed methods."}},
        },
        "403": _error(
            "The Host header names this server by a name `http.allowed_hosts` does not list "
            "(a DNS-rebinding guard): use its IP address or an allowed name."
        ),
        "500": _error("Unexpected server error (logged on the device; never a stack trace)."),
        "503": {
            **_error("The model is still loading (or failed to load), or every detection slot is busy."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}},
        },
    }
    return {code: known[code] for code in codes}


def _curl(command: str) -> list[dict[str, str]]:
    return [{"lang": "Shell", "label": "curl", "source": command}]


def _health_operation(base: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": "healthz",
            "summary": "Health",
            "description": "Liveness and readiness: 200 when the model is loaded and the engine runs, "
            "503 (same body, with `error`) while the model loads or after it failed. The broker being "
            "away does not make the agent unhealthy: it keeps detecting and queues the detections.",
            "tags": ["health"],
            "responses": {
                "200": _json("Health", "Ready."),
                "503": {
                    **_json("Health", "Loading, starting or failed; `error` says why."),
                    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}},
                },
                **_common_errors("403", "500"),
            },
            "x-codeSamples": _curl(f"curl -fsS {base}/healthz"),
        }
    }


def _root_operation(base: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": "root",
            "summary": "Service status (always 200; `status` and `model_loaded` say whether it is ready)",
            "description": "The root of the REST service around the ModelScope model: `status`, "
            "`service`, `timestamp`, `model_loaded`, with our health fields. Unlike `/healthz` it "
            "answers 200 while the model loads.",
            "tags": ["health"],
            "responses": {"200": _json("Health", "The service's state."), **_common_errors("403", "500")},
            "x-codeSamples": _curl(f"curl -fsS {base}/"),
        }
    }


def _detect_parameters() -> list[dict[str, Any]]:
    return [
        {
            "name": "threshold",
            "in": "query",
            "required": False,
            "description": "Alternative to the form field of the same name (give it in one place only).",
            "schema": {"$ref": "#/components/schemas/Threshold"},
        },
        {
            "name": "keywords",
            "in": "query",
            "required": False,
            "description": "Alternative to the form field of the same name (give it in one place only).",
            "schema": {"$ref": "#/components/schemas/Keywords"},
        },
    ]


def openapi_document(max_upload_bytes: int, base: str = DEFAULT_BASE_URL) -> dict[str, Any]:
    """The API description; ``max_upload_bytes`` is the configured upload limit (documented),
    ``base`` the server's address as the examples show it."""
    upload_mb = max_upload_bytes / BYTES_PER_MB
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "edge-agent HTTP API",
            "version": __version__,
            "description": "On-device Chinese wake-word spotting with ModelScope's "
            "damo/speech_charctc_kws_phone-xiaoyun (小云小云). Off by default and bound to 127.0.0.1 "
            "unless `http.host` says otherwise; there is no authentication, so expose it only on a "
            'trusted network. Errors are JSON objects `{"detail": "...", "error": "..."}` (the same '
            "message twice: `detail` as FastAPI services answer, `error` as before). Pages from the "
            "origins of `http.cors_origins` may call it (CORS, with OPTIONS preflights); requests "
            "must name the server by IP address or by a name of `http.allowed_hosts`.",
            "license": {"name": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "health", "description": "Is it up, is the model loaded."},
            {"name": "detection", "description": "Spot keywords in a WAV file."},
            {"name": "telemetry", "description": "Prometheus metrics."},
            {"name": "pages", "description": "This document, its HTML rendering and the test page."},
        ],
        "paths": {
            "/": _root_operation(base),
            "/healthz": _health_operation(base),
            "/info": {
                "get": {
                    "operationId": "info",
                    "summary": "Model, keywords, input format and version",
                    "tags": ["health"],
                    "responses": {
                        "200": _json("Info", "What this device runs."),
                        **_common_errors("403", "500", "503"),
                    },
                    "x-codeSamples": _curl(f"curl -fsS {base}/info"),
                }
            },
            "/detect": {
                "post": {
                    "operationId": "detect",
                    "summary": "Spot keywords in one WAV file",
                    "description": "The whole file is decoded with a fresh detector, exactly as "
                    "`edge-agent detect FILE` does, so both give the same detections. `confidence` "
                    "is the best score even when nothing is detected; `threshold` 0 reports the best "
                    "match as the detection. WAV files of "
                    "any sample rate and channel count are accepted (PCM 8/16/24/32-bit, float "
                    "32/64-bit, WAVE_FORMAT_EXTENSIBLE); they are averaged to mono and resampled "
                    f"to 16 kHz. Largest upload: {upload_mb:g} MB (`http.max_upload_mb`). "
                    "Send a multipart form with the file in `audio_file` (as the browser page "
                    "does), or the raw WAV as the body with `Content-Type: audio/wav`.",
                    "tags": ["detection"],
                    "parameters": _detect_parameters(),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["audio_file"],
                                    "properties": {
                                        "audio_file": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "The WAV file.",
                                        },
                                        "threshold": {"$ref": "#/components/schemas/Threshold"},
                                        "keywords": {"$ref": "#/components/schemas/Keywords"},
                                    },
                                },
                                "encoding": {
                                    "audio_file": {"contentType": "audio/wav, application/octet-stream"}
                                },
                            },
                            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "responses": {
                        "200": _json("DetectResult", "Detections (possibly none)."),
                        "400": _error(
                            "Bad audio (the reason names what is wrong: not a WAV, empty, truncated, "
                            "unsupported encoding...), a keyword with a character the model does not "
                            "know (named), a bad keyword threshold, or a malformed form."
                        ),
                        "403": _common_errors("403")["403"],
                        "422": _error(
                            "No `audio_file` in the form, or a `threshold` that is not 0 or a number "
                            "in [0.000001, 1] (FastAPI's status for an invalid field)."
                        ),
                        "411": _error("No Content-Length (chunked uploads are not accepted)."),
                        "413": _error(
                            f"The upload is larger than {upload_mb:g} MB, or holds more than "
                            f"{MAX_AUDIO_SECONDS:g} s of audio."
                        ),
                        "415": _error("The body is neither multipart/form-data nor audio/wav."),
                        **_common_errors("500", "503"),
                    },
                    "x-codeSamples": _curl(
                        "curl -fsS -F audio_file=@kws_xiaoyunxiaoyun.wav -F threshold=0.1 "
                        f"{base}/detect\n"
                        "curl -fsS -F audio_file=@recording.wav -F keywords=如家酒店:0.01,八角岭 "
                        f"{base}/detect\n"
                        "curl -fsS --data-binary @recording.wav -H 'Content-Type: audio/wav' "
                        f"'{base}/detect?threshold=0.1'"
                    ),
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text format 0.0.4)",
                    "description": "Detections by keyword, audio seconds and real-time factor per "
                    "stream, dropped chunks, MQTT connection state and reconnects, outbox depth, "
                    "refusals, readiness, HTTP requests, process memory. Answers while the model loads.",
                    "tags": ["telemetry"],
                    "responses": {
                        "200": {
                            "description": "Metrics.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_common_errors("403", "500"),
                    },
                    "x-codeSamples": _curl(f"curl -fsS {base}/metrics"),
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "tags": ["pages"],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.0 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_common_errors("403"),
                    },
                }
            },
            "/docs": {
                "get": {
                    "operationId": "docs",
                    "summary": "This document as a self-contained HTML page",
                    "tags": ["pages"],
                    "responses": {
                        "200": {
                            "description": "HTML.",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        },
                        **_common_errors("403"),
                    },
                }
            },
            "/ui": {
                "get": {
                    "operationId": "ui",
                    "summary": "Browser page: pick a WAV or record from the microphone, see the result",
                    "description": "Recording needs a secure context: open the page as "
                    "http://localhost:PORT (for a remote device, through `ssh -L PORT:localhost:PORT`) "
                    "or behind HTTPS; over plain HTTP to another host only the file picker works.",
                    "tags": ["pages"],
                    "responses": {
                        "200": {
                            "description": "HTML.",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        },
                        **_common_errors("403"),
                    },
                }
            },
        },
        "components": {"schemas": _schemas()},
    }


def _schemas() -> dict[str, Any]:
    nullable_number = {"type": "number", "nullable": True}
    detection = {
        "type": "object",
        "required": ["keyword", "confidence", "start", "end"],
        "properties": {
            "keyword": {"type": "string"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "start": {"type": "number", "description": "Seconds from the start of the file."},
            "end": {"type": "number", "description": "Seconds from the start of the file."},
            "level_dbfs": {
                **nullable_number,
                "description": "RMS level of the keyword's audio, dBFS (null when unknown).",
            },
            "snr_db": {
                **nullable_number,
                "description": "The keyword's level over the background before it (a low percentile), dB.",
            },
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["detail", "error"],
            "properties": {
                "success": {"type": "boolean", "enum": [False]},
                "detail": {"type": "string", "description": "What is wrong, in one line (FastAPI's field)."},
                "error": {"type": "string", "description": "The same message."},
            },
        },
        "Threshold": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "Detection threshold for every keyword of this request, in [0.000001, 1] "
            "(as `keywords[].threshold` in the config), or 0: report the best match, however weak; "
            "default: each keyword's configured threshold.",
        },
        "Keywords": {
            "type": "string",
            "description": "Comma-separated keywords for this request only, each `TEXT` or "
            "`TEXT:THRESHOLD` (e.g. `小云小云,如家酒店:0.01`); default: the configured keywords. "
            "A character the model's lexicon lacks is a 400 naming it.",
        },
        "Health": {
            "type": "object",
            "required": [
                "status",
                "service",
                "timestamp",
                "model_loaded",
                "uptime_s",
                "broker_connected",
                "version",
            ],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "loading", "starting", "failed", "error"]},
                "service": {"type": "string"},
                "timestamp": {"type": "string", "format": "date-time", "description": "Time of the answer."},
                "model_loaded": {"type": "boolean"},
                "uptime_s": {"type": "number", "minimum": 0},
                "broker_connected": {
                    "type": "boolean",
                    "nullable": True,
                    "description": "null when MQTT is disabled (edge-agent serve).",
                },
                "mqtt_enabled": {"type": "boolean"},
                "version": {"type": "string"},
                "device": {"type": "string", "nullable": True},
                "error": {"type": "string", "description": "Why the status is not ok."},
            },
        },
        "Info": {
            "type": "object",
            "required": [
                "model_id",
                "description",
                "input_format",
                "keywords",
                "threshold_range",
                "latency_typical_ms",
                "model",
                "keyword_settings",
                "input",
                "version",
            ],
            "properties": {
                "model_id": {"type": "string"},
                "description": {"type": "string"},
                "input_format": {"type": "string"},
                "keywords": {"type": "array", "items": {"type": "string"}, "description": "The keywords."},
                "threshold_range": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 2,
                    "maxItems": 2,
                    "description": "[0, 1]: the range of `threshold` and `confidence`.",
                },
                "latency_typical_ms": {
                    "type": "number",
                    "nullable": True,
                    "description": "Median processing time of the recent /detect requests; null before "
                    "the first.",
                },
                "model": {
                    "type": "object",
                    "required": ["id", "revision"],
                    "properties": {
                        "id": {"type": "string"},
                        "revision": {"type": "string"},
                        "backend": {"type": "string"},
                        "directory": {
                            "type": "string",
                            "description": "Only with `http.show_paths: true`.",
                        },
                        "latency_s": {"type": "number"},
                    },
                },
                "keyword_settings": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["text", "threshold"],
                        "properties": {
                            "text": {"type": "string"},
                            "threshold": {"type": "number"},
                            "min_duration": nullable_number,
                            "max_duration": nullable_number,
                        },
                    },
                },
                "input": {
                    "type": "object",
                    "properties": {
                        "container": {"type": "string"},
                        "encodings": {"type": "array", "items": {"type": "string"}},
                        "sample_rate_hz": {"type": "integer"},
                        "channels": {"type": "string"},
                        "max_upload_bytes": {"type": "integer"},
                        "field": {"type": "string"},
                    },
                },
                "version": {"type": "string"},
                "device": {"type": "string", "nullable": True},
            },
        },
        "Detection": detection,
        "DetectResult": {
            "type": "object",
            "required": [
                "success",
                "detected",
                "message",
                "keyword",
                "confidence",
                "start",
                "end",
                "timestamp",
                "processing_time_ms",
                "duration_s",
                "detections",
            ],
            "properties": {
                "success": {"type": "boolean", "enum": [True]},
                "detected": {"type": "boolean"},
                "message": {"type": "string", "description": "The outcome in words."},
                "keyword": {
                    "type": "string",
                    "nullable": True,
                    "description": "The most confident detection's keyword; null when none.",
                },
                "confidence": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1,
                    "description": "The detection's confidence, or when nothing was detected the best "
                    "score of the keywords (as `edge-agent eval` scores a file; 0: nothing like them).",
                },
                "start": {
                    "type": "number",
                    "nullable": True,
                    "description": "Seconds from the start of the file to the keyword; null when none.",
                },
                "end": {"type": "number", "nullable": True, "description": "Where the keyword ends (s)."},
                "timestamp": {"type": "string", "format": "date-time", "description": "Time of the answer."},
                "processing_time_ms": {"type": "number", "minimum": 0},
                "duration_s": {"type": "number", "minimum": 0, "description": "Audio length."},
                "detections": {"type": "array", "items": {"$ref": "#/components/schemas/Detection"}},
                "keywords": {
                    "type": "array",
                    "description": "The keywords and thresholds this request used.",
                    "items": {
                        "type": "object",
                        "properties": {"text": {"type": "string"}, "threshold": {"type": "number"}},
                    },
                },
                "best_match": {"type": "boolean", "description": "The request asked for the best match."},
            },
        },
    }


# --- /docs -------------------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1d2330}
h1{margin-bottom:0}code,pre{font:13px ui-monospace,monospace;background:#f3f4f7;border-radius:4px}
pre{padding:.6rem;overflow-x:auto;white-space:pre-wrap}code{padding:0 .2rem}
section.op{border:1px solid #d9dce3;border-radius:6px;padding:.2rem 1rem;margin:1rem 0}
.method{display:inline-block;min-width:3.5rem;text-align:center;color:#fff;border-radius:4px;
padding:0 .4rem;font-weight:600;margin-right:.5rem}.get{background:#2f7ad0}.post{background:#2e9e5b}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e4e6eb;text-align:left;
padding:.3rem;vertical-align:top}details summary{cursor:pointer}nav a{margin-right:1rem}
form.try{background:#f7f8fa;border-radius:6px;padding:.5rem .8rem;margin:.5rem 0}
form.try label{display:block;margin:.3rem 0}form.try button{font:inherit;padding:.2rem .9rem}
.answer-status{font-weight:600;margin-left:.6rem}
"""

# Sends each operation's form to the server the page came from and shows the answer. Relative
# URLs, so that the page also works behind a reverse proxy's path prefix.
_SCRIPT = """
"use strict";
const LIMIT = 20000;
for (const form of document.querySelectorAll("form.try")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const path = form.dataset.path === "/" ? "./" : form.dataset.path.slice(1);
    const answer = form.querySelector("pre.answer");
    const status = form.querySelector(".answer-status");
    const options = { method: form.dataset.method.toUpperCase() };
    if (form.dataset.body === "multipart") {
      const data = new FormData();
      for (const [name, value] of new FormData(form)) {
        if (value instanceof File ? value.name : String(value).trim()) data.append(name, value);
      }
      options.body = data;
    }
    status.textContent = "sending…";
    form.dataset.state = "sending";
    try {
      const response = await fetch(path, options);
      const text = await response.text();
      let shown = text;
      if ((response.headers.get("content-type") || "").startsWith("application/json")) {
        try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (error) { shown = text; }
      }
      status.textContent = `${response.status} ${response.statusText}`;
      answer.textContent = shown.length > LIMIT ? shown.slice(0, LIMIT) + "\\n…" : shown;
      form.dataset.state = "done";
      form.dataset.status = String(response.status);
    } catch (error) {
      status.textContent = "network error";
      answer.textContent = String(error);
      form.dataset.state = "error";
    }
  });
}
"""


def render_docs(document: dict[str, Any]) -> str:
    """A self-contained HTML page describing every operation of ``document``."""
    info = document["info"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(info['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(info['title'])}</h1><p>Version {_e(info['version'])} &middot; OpenAPI "
        f"{_e(document['openapi'])} &middot; <a href='openapi.json'>openapi.json</a> &middot; "
        "<a href='ui'>try it in the browser</a></p>",
        f"<p>{_markdown_code(info.get('description', ''))}</p><nav>",
    ]
    operations = [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    parts += [
        f"<a href='#{_e(op['operationId'])}'>{method.upper()} {_e(path)}</a>"
        for path, method, op in operations
    ]
    parts.append("</nav>")
    for path, method, operation in operations:
        parts.append(_render_operation(document, path, method, operation))
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "".join(parts)


def _render_form(document: dict[str, Any], path: str, method: str, operation: dict[str, Any]) -> str:
    """A "Try it" form: the multipart fields of the request body (a file input for binary ones)."""
    operation_id = _e(operation["operationId"])
    fields = []
    multipart = (operation.get("requestBody") or {}).get("content", {}).get("multipart/form-data")
    if multipart is not None:
        schema = _resolve(document, multipart["schema"])
        required = set(schema.get("required", []))
        for name, field_schema in schema.get("properties", {}).items():
            field_schema = _resolve(document, field_schema)
            kind = "file" if field_schema.get("format") == "binary" else "text"
            need = " required" if name in required else ""
            fields.append(
                f"<label><code>{_e(name)}</code> <input type='{kind}' name='{_e(name)}'{need} "
                f"id='{operation_id}-{_e(name)}'></label>"
            )
    body = " data-body='multipart'" if multipart is not None else ""
    return (
        f"<form class='try' id='try-{operation_id}' data-method='{_e(method)}' data-path='{_e(path)}'{body}>"
        f"{''.join(fields)}<button type='submit'>Send {method.upper()} {_e(path)}</button>"
        "<span class='answer-status' role='status'></span><pre class='answer'></pre></form>"
    )


def _render_operation(document: dict[str, Any], path: str, method: str, operation: dict[str, Any]) -> str:
    out = [
        f"<section class='op' id='{_e(operation['operationId'])}'>",
        f"<h2><span class='method {method}'>{method.upper()}</span><code>{_e(path)}</code></h2>",
        f"<p><strong>{_e(operation.get('summary', ''))}</strong></p>",
    ]
    if operation.get("description"):
        out.append(f"<p>{_markdown_code(operation['description'])}</p>")
    out.append("<h3>Try it</h3>" + _render_form(document, path, method, operation))
    parameters = operation.get("parameters", [])
    body = operation.get("requestBody")
    if parameters or body:
        out.append(
            "<h3>Request</h3><table><tr><th>name</th><th>in</th><th>type</th><th>description</th></tr>"
        )
        for parameter in parameters:
            schema = _resolve(document, parameter["schema"])
            out.append(
                f"<tr><td><code>{_e(parameter['name'])}</code></td><td>{_e(parameter['in'])}</td>"
                f"<td>{_e(_type(schema))}</td><td>{_markdown_code(parameter.get('description', ''))} "
                f"{_markdown_code(schema.get('description', ''))}</td></tr>"
            )
        for media_type, content in (body or {}).get("content", {}).items():
            schema = _resolve(document, content["schema"])
            required = set(schema.get("required", []))
            for name, field_schema in schema.get("properties", {}).items():
                field_schema = _resolve(document, field_schema)
                mark = " (required)" if name in required else ""
                out.append(
                    f"<tr><td><code>{_e(name)}</code>{mark}</td><td>{_e(media_type)}</td>"
                    f"<td>{_e(_type(field_schema))}</td>"
                    f"<td>{_markdown_code(field_schema.get('description', ''))}</td></tr>"
                )
            if "properties" not in schema:
                out.append(
                    f"<tr><td>(body)</td><td>{_e(media_type)}</td><td>{_e(_type(schema))}</td>"
                    "<td>The whole body.</td></tr>"
                )
        out.append("</table>")
    out.append("<h3>Responses</h3><table><tr><th>status</th><th>description</th></tr>")
    for status, response in operation["responses"].items():
        schema_html = ""
        for media_type, content in response.get("content", {}).items():
            expanded = expand_refs(document, content.get("schema", {}))
            schema_html += (
                f"<details><summary>{_e(media_type)}</summary>"
                f"<pre>{_e(json.dumps(expanded, indent=2, ensure_ascii=False))}</pre></details>"
            )
        out.append(
            f"<tr><td><code>{_e(status)}</code></td><td>{_markdown_code(response['description'])}"
            f"{schema_html}</td></tr>"
        )
    out.append("</table>")
    for sample in operation.get("x-codeSamples", []):
        out.append(f"<h3>Example ({_e(sample['label'])})</h3><pre>{_e(sample['source'])}</pre>")
    out.append("</section>")
    return "".join(out)


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        target: Any = document
        for key in schema["$ref"].lstrip("#/").split("/"):
            target = target[key]
        schema = target
    return schema


def expand_refs(document: dict[str, Any], schema: Any, depth: int = 0) -> Any:
    """The schema with references replaced by their targets (the API's schemas are not recursive)."""
    if depth > 20:
        return schema
    if isinstance(schema, dict):
        if "$ref" in schema:
            return expand_refs(document, _resolve(document, schema), depth + 1)
        return {key: expand_refs(document, value, depth + 1) for key, value in schema.items()}
    if isinstance(schema, list):
        return [expand_refs(document, item, depth + 1) for item in schema]
    return schema


def _type(schema: dict[str, Any]) -> str:
    kind = str(schema.get("type", "any"))
    if schema.get("format"):
        kind += f" ({schema['format']})"
    if "minimum" in schema or "maximum" in schema:
        low = "(" if schema.get("exclusiveMinimum") else "["
        kind += f" in {low}{schema.get('minimum', '-inf')}, {schema.get('maximum', 'inf')}]"
    return kind


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _markdown_code(text: str) -> str:
    """Escape, then turn `code` spans into <code> (the only markup the descriptions use)."""
    pieces = _e(text).split("`")
    return "".join(f"<code>{piece}</code>" if i % 2 else piece for i, piece in enumerate(pieces))
