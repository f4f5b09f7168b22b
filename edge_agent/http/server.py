"""The socket side of the HTTP API: the stdlib ``ThreadingHTTPServer``, no dependencies.

Why the stdlib and not FastAPI + uvicorn: the API is eight routes, and on a Raspberry Pi every
megabyte and every 100 ms of start-up counts; this server adds about 1 MB of RSS and no import
time worth measuring, and has nothing to install. It is HTTP/1.1 with keep-alive, one thread
per connection (daemon threads), and a socket timeout so that idle or slow clients cannot pin
threads forever.

Limits are enforced before a body is read: a Host header the allow-list does not name is a 403
(DNS rebinding, ``access.py``), a POST without Content-Length is a 411, one larger than the
upload limit a 413 (answered before ``100 Continue`` when the client asks, so curl never sends
the file). A refused body that is not read leaves the connection closed; a small one is drained
first so the client sees the refusal rather than a reset.

Each response leaves in one ``send()`` (status line, headers and body buffered together, flushed
once by the stdlib after the handler) on a socket with TCP_NODELAY. Written in two pieces with
Nagle's algorithm on, the body of every keep-alive request after the first would wait for the
client's delayed ACK of the headers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edge_agent import __version__
from edge_agent.config import HttpConfig
from edge_agent.http.access import AccessPolicy
from edge_agent.http.api import Api, Request, Response, error_response
from edge_agent.http.backend import ApiBackend
from edge_agent.http.openapi import BYTES_PER_MB

log = logging.getLogger(__name__)

# Seconds a connection may sit idle (or trickle a body) before it is closed.
SOCKET_TIMEOUT_SECONDS = 30.0
# A refused body up to this size is read and thrown away so the client gets the status line.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
# Query strings with more fields than this are refused (parse_qs would build them all).
MAX_QUERY_FIELDS = 32
_DRAIN_CHUNK_BYTES = 64 * 1024
# Write buffer of a connection (allocated per connection): every answer of this API fits (/docs is
# the largest); a larger one would leave in two sends, which TCP_NODELAY sends at once all the same.
RESPONSE_BUFFER_BYTES = 64 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: Api

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client dropping the connection is normal.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edge-agent/{__version__}"
    timeout = SOCKET_TIMEOUT_SECONDS
    # One send per response: writes are buffered until the stdlib flushes after each request,
    # and TCP_NODELAY sends what is flushed at once (see the module docstring).
    wbufsize = RESPONSE_BUFFER_BYTES
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        return self.server_version  # without the Python version the stdlib appends

    # Every method goes through the router: unknown paths are 404, known ones 405 with Allow,
    # including methods the stdlib has never heard of (QUERY...), which it would answer with 501.
    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_GET

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    # --- limits before the body --------------------------------------------------------------
    def handle_expect_100(self) -> bool:
        """Refuse an oversized upload (or a foreign Host) before the client sends the body."""
        refusal = self._body_refusal()
        if refusal is not None:
            self.server.api.count(urlsplit(self.path).path, refusal.status)
            self._send(refusal, close=True)
            self.wfile.flush()
            return False
        accepted = super().handle_expect_100()
        self.wfile.flush()  # the client waits for the 100 before it sends the body
        return accepted

    def _content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        raw = raw.strip()
        if not raw.isdigit():
            raise ValueError(raw)
        return int(raw)

    def _wants_body(self, path: str) -> bool:
        """Whether this request's body is read at all (only by the routes that take one)."""
        allowed = self.server.api.allowed_methods(path)
        return allowed is not None and self.command in allowed and self.command not in ("GET", "HEAD")

    def _body_refusal(self) -> Response | None:
        """A response refusing the request before reading its body (403/411/413/400), or None."""
        api = self.server.api
        host_refusal = api.host_refusal(self.headers.get("Host"))
        if host_refusal is not None:
            return host_refusal
        if not self._wants_body(urlsplit(self.path).path):
            return None  # answered by the router; the body is not wanted either way
        if self.headers.get("Transfer-Encoding"):
            return error_response(
                411, "send the upload with a Content-Length (chunked bodies are not accepted)"
            )
        try:
            length = self._content_length()
        except ValueError:
            return error_response(400, "Content-Length is not a number")
        if length is None:
            return error_response(411, "a Content-Length header is required")
        if length > api.max_body_bytes:
            limit_mb = api.max_upload_bytes / BYTES_PER_MB
            return error_response(
                413,
                f"the upload is {length} bytes, larger than the {limit_mb:.3g} MB limit (http.max_upload_mb)",
            )
        return None

    # --- one request -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        api = self.server.api
        split = urlsplit(self.path)
        path = split.path
        body = b""
        refusal = self._body_refusal()
        if refusal is not None:
            self._refuse_body(refusal, path)
            return
        if self._wants_body(path):
            length = self._content_length() or 0
            body = self.rfile.read(length)
            if len(body) < length:
                log.info("client %s closed the connection during its upload", self.client_address[0])
                self.close_connection = True
                return
        elif self._has_unread_body():
            # A body nobody reads (GET with a body, 404, 405): close rather than misread it.
            self.close_connection = True
        try:
            query = parse_qs(split.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            response = error_response(400, f"too many query fields (at most {MAX_QUERY_FIELDS})")
            api.count(path, response.status)
            self._send(response)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = Request(self.command, path, query, headers, body)
        self._send(api.handle(request))

    def _has_unread_body(self) -> bool:
        try:
            length = self._content_length()
        except ValueError:
            return True
        return bool(length) or bool(self.headers.get("Transfer-Encoding"))

    def _refuse_body(self, response: Response, path: str) -> None:
        self.server.api.count(path, response.status)
        try:
            length = self._content_length()
        except ValueError:
            length = None
        if length is not None and length <= DRAIN_LIMIT_BYTES:
            remaining = length
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _DRAIN_CHUNK_BYTES))
                if not chunk:
                    break
                remaining -= len(chunk)
        self._send(response, close=True)

    def _send(self, response: Response, close: bool = False) -> None:
        if close:
            self.close_connection = True
        self.send_response(response.status)
        if response.status != 204:
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        # A request line the stdlib could not parse has no headers yet.
        origin = self.headers.get("Origin") if getattr(self, "headers", None) is not None else None
        headers = {**self.server.api.access.cors_headers(origin), **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and response.status != 204:
            self.wfile.write(response.body)

    # --- what BaseHTTPRequestHandler itself refuses (bad request line, huge headers) --------
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        response = error_response(code, message or self.responses.get(code, ("error",))[0])
        self.server.api.count("other", code)
        with contextlib.suppress(OSError):  # the client may be gone already
            self._send(response, close=True)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


@dataclass
class HttpServerHandle:
    """A running server: where it listens, and how to stop it."""

    host: str
    port: int
    api: Api
    _server: _Server
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = "[::1]" if host == "::" else f"[{host}]"
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the socket; requests in flight finish on their daemon threads."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)


def start_http_server(config: HttpConfig, backend: ApiBackend) -> HttpServerHandle:
    """Serve the API on ``config.host:config.port`` (port 0: any free port) in a background thread.

    Raises ``OSError`` when the address cannot be bound (in use, not an address of this host).
    ``config.enabled`` is not consulted: the caller decides whether to serve.
    """
    access = AccessPolicy(config.allowed_hosts, config.cors_origins)
    api = Api(backend, int(config.max_upload_mb * BYTES_PER_MB), access, config.show_paths)
    server_class = _Server6 if ":" in config.host else _Server
    server = server_class((config.host, config.port), _Handler)
    server.api = api
    port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http-server")
    thread.daemon = True
    thread.start()
    handle = HttpServerHandle(config.host, port, api, server, thread)
    api.base_url = handle.url
    log.info("HTTP API on http://%s:%d (docs at /docs, test page at /ui)", config.host, port)
    return handle
