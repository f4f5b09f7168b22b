"""Optional local HTTP API: health, /info, POST /detect, Prometheus /metrics, OpenAPI docs, /ui.

Stdlib only (``http.server``). The HTTP layer talks to an :class:`ApiBackend`:
:class:`AgentBackend` for ``edge-agent run`` (``http.enabled: true``) and
:class:`StandaloneBackend` for ``edge-agent serve``. Start it with :func:`start_http_server`.

Names are imported on first use, so that importing one module of this package (the CLI does)
does not pull in the agent, paho-mqtt and SQLite.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AgentBackend": "edge_agent.http.agent_backend",
    "ApiBackend": "edge_agent.http.backend",
    "BadRequest": "edge_agent.http.backend",
    "DetectResult": "edge_agent.http.backend",
    "KeywordRequest": "edge_agent.http.backend",
    "MetricFamily": "edge_agent.http.backend",
    "NotReady": "edge_agent.http.backend",
    "HttpServerHandle": "edge_agent.http.server",
    "start_http_server": "edge_agent.http.server",
    "LoadedEngine": "edge_agent.http.standalone",
    "StandaloneBackend": "edge_agent.http.standalone",
    "config_loader": "edge_agent.http.standalone",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_agent.http' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
