"""Who may call the API from a browser: CORS with preflights, and the Host allow-list against
DNS rebinding. Pure policy first, then over a real socket."""

from __future__ import annotations

import http.client

import pytest

from edge_agent.config import HttpConfig
from edge_agent.http.access import AccessPolicy, host_name
from edge_agent.http.standalone import LoadedEngine
from tests.http.client import Client
from tests.http.conftest import StartServer, ready_backend

DEFAULTS = AccessPolicy(HttpConfig().allowed_hosts, HttpConfig().cors_origins)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (None, True),  # HTTP/1.0 clients send none; browsers always do
        ("localhost:8000", True),
        ("LOCALHOST.:8000", True),
        ("app.localhost", True),
        ("127.0.0.1:8080", True),
        ("[::1]:8080", True),
        ("192.168.1.20", True),  # an address cannot be rebound
        ("evil.example:8000", False),
        ("localhost.evil.example", False),
        ("kitchen.lan", False),
    ],
)
def test_host_allow_list_defaults(host: str | None, allowed: bool) -> None:
    assert DEFAULTS.host_allowed(host) is allowed


def test_host_allow_list_settings() -> None:
    lan = AccessPolicy((".lan", "kitchen"), ())
    assert lan.host_allowed("kitchen.lan:80") and lan.host_allowed("lan") and lan.host_allowed("kitchen")
    assert not lan.host_allowed("localhost") and not lan.host_allowed("kitchen.lan.evil")
    assert AccessPolicy(("*",), ()).host_allowed("anything.example")
    assert host_name("[fe80::1]:80") == "fe80::1" and host_name("Example.COM.:443") == "example.com"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://localhost", True),
        ("http://127.0.0.1:5500", True),
        ("http://[::1]:8000", True),
        ("https://localhost:3000", False),
        ("http://evil.example", False),
        ("http://localhost.evil.example", False),
        ("null", False),  # a page opened from a file, or a sandboxed frame anywhere
        ("garbage", False),
    ],
)
def test_cors_origin_defaults(origin: str, allowed: bool) -> None:
    assert DEFAULTS.origin_allowed(origin) is allowed


def test_cors_origin_settings_and_headers() -> None:
    exact = AccessPolicy((), ("https://app.example", "http://box:8000", "null"))
    assert exact.origin_allowed("https://app.example") and exact.origin_allowed("https://app.example:443")
    assert not exact.origin_allowed("https://app.example:8443") and exact.origin_allowed("null")
    assert exact.cors_headers("http://box:8000")["Access-Control-Allow-Origin"] == "http://box:8000"
    assert exact.cors_headers("http://other")["Vary"] == "Origin"
    assert "Access-Control-Allow-Origin" not in exact.cors_headers("http://other")
    anyone = AccessPolicy((), ("*",))
    assert anyone.cors_headers("null")["Access-Control-Allow-Origin"] == "*"


def raw(client: Client, method: str, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(client.host, client.port, timeout=30)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_preflight_and_answers_carry_cors_for_allowed_origins(client: Client) -> None:
    preflight = {
        "Host": f"localhost:{client.port}",
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-requested-with",
    }
    answer = raw(client, "OPTIONS", "/detect", preflight)
    assert answer.status == 204
    assert answer.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
    assert "POST" in (answer.getheader("Access-Control-Allow-Methods") or "")
    assert answer.getheader("Access-Control-Allow-Headers") == "content-type, x-requested-with"
    assert int(answer.getheader("Access-Control-Max-Age") or 0) > 0

    refused = raw(client, "OPTIONS", "/detect", {**preflight, "Origin": "http://evil.example"})
    assert refused.status == 403 and refused.getheader("Access-Control-Allow-Origin") is None
    plain = raw(client, "OPTIONS", "/info", {"Host": "localhost"})
    assert plain.status == 204 and "GET" in (plain.getheader("Allow") or "")
    assert raw(client, "OPTIONS", "/nope", {"Host": "localhost"}).status == 404

    read = raw(client, "GET", "/info", {"Host": "localhost", "Origin": "http://127.0.0.1:5173"})
    assert read.status == 200 and read.getheader("Access-Control-Allow-Origin") == "http://127.0.0.1:5173"
    # Errors are readable too, or the page could not show `detail`.
    missing = raw(client, "GET", "/nope", {"Host": "localhost", "Origin": "http://localhost:3000"})
    assert (
        missing.status == 404 and missing.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
    )
    other = raw(client, "GET", "/info", {"Host": "localhost", "Origin": "http://evil.example"})
    assert other.status == 200 and other.getheader("Access-Control-Allow-Origin") is None


def test_a_rebound_host_name_is_refused_before_anything_is_read(client: Client) -> None:
    """DNS rebinding: the page's own name arrives in Host; /info must not answer it."""
    for path in ("/info", "/healthz", "/docs", "/metrics"):
        reply = client.request("GET", path, headers={"Host": f"evil.example:{client.port}"})
        assert reply.status == 403 and "http.allowed_hosts" in reply.json()["detail"]
    upload = client.request(
        "POST", "/detect", b"x" * 1000, {"Host": "evil.example", "Content-Type": "audio/wav"}
    )
    assert upload.status == 403
    assert client.request("GET", "/info", headers={"Host": f"localhost:{client.port}"}).status == 200


def test_allowed_hosts_from_the_config(engine: LoadedEngine, start_server: StartServer) -> None:
    _, client = start_server(ready_backend(engine), allowed_hosts=(".lan",), cors_origins=("*",))
    assert client.request("GET", "/info", headers={"Host": "kitchen.lan"}).status == 200
    assert client.request("GET", "/info", headers={"Host": "localhost"}).status == 403
    answer = raw(client, "GET", "/healthz", {"Host": "kitchen.lan", "Origin": "null"})
    assert answer.getheader("Access-Control-Allow-Origin") == "*"


def test_docs_examples_name_the_address_the_client_used(client: Client) -> None:
    docs = client.request("GET", "/docs", headers={"Host": f"127.0.0.1:{client.port}"}).text
    assert f"-F threshold=0.1 http://127.0.0.1:{client.port}/detect" in docs and ":8080" not in docs
    document = client.request("GET", "/openapi.json", headers={"Host": f"localhost:{client.port}"}).json()
    samples = document["paths"]["/healthz"]["get"]["x-codeSamples"]
    assert samples[0]["source"] == f"curl -fsS http://localhost:{client.port}/healthz"
    # A Host header unfit for an example falls back to the server's own address.
    odd = client.request("GET", "/docs", headers={"Host": "localhost:80<b>"})
    assert f"http://127.0.0.1:{client.port}/detect" in odd.text and "<b>" not in odd.text
