"""A small HTTP client for the tests (http.client: no dependency), checking every JSON answer
against the OpenAPI document's schema for that path, method and status."""

from __future__ import annotations

import http.client
import json
import uuid
from dataclasses import dataclass
from typing import Any

from edge_agent.http.openapi import expand_refs


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body.decode("utf-8"))

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body as browsers build it, and its Content-Type."""
    boundary = f"----edgeagenttest{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode()
        )
    for name, (filename, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        )
        chunks.append(head.encode() + data)
    body = b"\r\n".join(chunks) + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, port: int, document: dict[str, Any] | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.document = document

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        connection: http.client.HTTPConnection | None = None,
    ) -> Reply:
        own = connection is None
        conn = connection or http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            if own:
                conn.close()
        self.check(method, path, reply)
        return reply

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def detect(
        self, wav: bytes, fields: dict[str, str] | None = None, query: str = "", filename: str = "audio.wav"
    ) -> Reply:
        body, content_type = multipart(fields or {}, {"audio_file": (filename, wav)})
        return self.request("POST", f"/detect{query}", body, {"Content-Type": content_type})

    def check(self, method: str, path: str, reply: Reply) -> None:
        """Every error is JSON {"detail": ..., "error": ...}; documented answers match their schema."""
        if reply.status >= 400 and method != "HEAD":
            data = reply.json()
            assert isinstance(data.get("error"), str) and data["error"], data
            assert data.get("detail") == data["error"] or "status" in data, data  # health bodies
            assert "Traceback" not in data["error"]
        if self.document is None or method == "HEAD":
            return
        operation = self.document["paths"].get(path.split("?")[0], {}).get(method.lower())
        if operation is None:
            return
        response = operation["responses"].get(str(reply.status))
        assert response is not None, f"{method} {path}: status {reply.status} is not documented"
        content = response.get("content", {})
        media_type = reply.headers.get("content-type", "").split(";")[0]
        assert media_type in content, f"{method} {path}: {media_type} not documented for {reply.status}"
        if media_type == "application/json":
            from openapi_schema_validator import OAS30Validator, validate

            validate(
                reply.json(), expand_refs(self.document, content[media_type]["schema"]), cls=OAS30Validator
            )
