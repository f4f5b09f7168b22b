"""Who may talk to the API from a browser: the Host allow-list and CORS, as pure functions.

Two different threats, two settings:

* **DNS rebinding** (``http.allowed_hosts``). A page on another site can make its own host name
  resolve to 127.0.0.1 and then read this API as if it were same-origin; the only trace is the
  ``Host`` header, which carries the attacker's name. So a request must name this server by an
  IP address (an address cannot be rebound) or by an allowed name (loopback names by default).
* **Cross-origin pages** (``http.cors_origins``). Pages from the listed origins may read the
  answers (``Access-Control-Allow-Origin``) and get their preflights answered; others are not
  refused by the server (a browser enforces CORS) but get no CORS headers, so their script
  cannot read anything.

Neither is authentication: any program that can reach the port can use the API.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ANY = "*"
# How long a browser may cache a preflight's answer (seconds).
PREFLIGHT_MAX_AGE_SECONDS = 600
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def host_name(host_header: str) -> str:
    """The name (or address) in a Host header, without its port: ``[::1]:80`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, _ = host.partition(":")
    return name.rstrip(".")


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Origin:
    """``scheme://host[:port]`` split, with the default port made explicit."""

    scheme: str
    host: str
    port: str

    @classmethod
    def parse(cls, text: str) -> Origin | None:
        scheme, sep, rest = text.strip().lower().partition("://")
        if not sep or not rest or "/" in rest:
            return None
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                return None
            host, tail = rest[: end + 1], rest[end + 1 :]
        else:
            host, _, port_part = rest.partition(":")
            tail = f":{port_part}" if port_part else ""
        port = tail[1:] if tail.startswith(":") else _DEFAULT_PORTS.get(scheme, "")
        return cls(scheme, host, port)


class AccessPolicy:
    """The Host allow-list and the CORS origins of one server."""

    def __init__(self, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> None:
        self.allowed_hosts = tuple(h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip())
        self.cors_origins = tuple(o.strip() for o in cors_origins if o.strip())
        self._any_origin = ANY in self.cors_origins
        parsed = (Origin.parse(entry) for entry in self.cors_origins if entry not in (ANY, "null"))
        self._origins = [origin for origin in parsed if origin is not None]
        self._null_origin = "null" in self.cors_origins

    # --- Host --------------------------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        """True for no Host header (HTTP/1.0 clients; browsers always send one), an IP address,
        or a name the list allows (exactly, or under a ``.suffix`` entry)."""
        if host_header is None or not host_header.strip():
            return True
        name = host_name(host_header)
        if is_ip_address(name) or ANY in self.allowed_hosts:
            return True
        for allowed in self.allowed_hosts:
            if allowed.startswith("."):
                if name == allowed[1:] or name.endswith(allowed):
                    return True
            elif name == allowed:
                return True
        return False

    # --- CORS --------------------------------------------------------------------------------
    def origin_allowed(self, origin: str) -> bool:
        if self._any_origin:
            return True
        if origin == "null":
            return self._null_origin
        parsed = Origin.parse(origin)
        if parsed is None:
            return False
        return any(
            (allowed.scheme, allowed.host) == (parsed.scheme, parsed.host)
            and allowed.port in ("*", parsed.port)
            for allowed in self._origins
        )

    def cors_headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an answer to a request from ``origin`` (none when it may not read it)."""
        headers = {"Vary": "Origin"} if not self._any_origin else {}
        if origin is None or not self.origin_allowed(origin):
            return headers
        headers["Access-Control-Allow-Origin"] = ANY if self._any_origin else origin
        headers["Access-Control-Expose-Headers"] = "Retry-After"
        return headers

    def preflight_headers(
        self, origin: str, methods: Iterable[str], request_headers: str | None
    ) -> dict[str, str]:
        """Headers of a 204 answer to an allowed origin's preflight."""
        headers = self.cors_headers(origin)
        headers["Access-Control-Allow-Methods"] = ", ".join(methods)
        if request_headers:
            # Echoed: every header a browser may send is harmless here (there are no credentials).
            headers["Access-Control-Allow-Headers"] = request_headers
        headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_SECONDS)
        return headers


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers
