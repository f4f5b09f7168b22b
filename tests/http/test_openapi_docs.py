"""The OpenAPI document is valid, matches the server's routes, and /docs renders all of it offline."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from edge_agent.http.api import Api
from edge_agent.http.openapi import openapi_document, render_docs
from edge_agent.http.standalone import StandaloneBackend
from tests.conftest import REPO_ROOT, require_module


def api() -> Api:
    def never() -> None:
        raise AssertionError("not loaded in this test")

    return Api(StandaloneBackend(never, "m", "r"), 20 * 1024 * 1024)  # type: ignore[arg-type]


def test_the_document_is_valid_openapi_3() -> None:
    validator = require_module("openapi_spec_validator")
    validator.validate(openapi_document(20 * 1024 * 1024))


def test_documented_paths_and_methods_are_the_routes() -> None:
    instance = api()
    documented = {
        (path, method.upper()) for path, item in instance.document["paths"].items() for method in item
    }
    served = {(path, method) for path, methods in instance.routes.items() for method in methods}
    assert documented == served


def test_every_operation_documents_its_errors_and_has_an_id() -> None:
    document = openapi_document(1024 * 1024)
    ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            ids.append(operation["operationId"])
            assert "200" in operation["responses"], (path, method)
            assert "403" in operation["responses"], (path, method)  # the Host allow-list
            if path in ("/healthz", "/info", "/detect"):
                assert "503" in operation["responses"], (path, method)
    assert len(ids) == len(set(ids))
    detect = document["paths"]["/detect"]["post"]["responses"]
    assert {"400", "411", "413", "415", "422", "503", "500"} <= set(detect)
    assert "1 MB" in detect["413"]["description"]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_docs_page_is_self_contained_and_covers_every_operation() -> None:
    document = openapi_document(1024 * 1024, "http://192.0.2.7:8000")
    page = _Collector()
    page.feed(render_docs(document))
    # Nothing fetched from elsewhere: one inline script, no stylesheets, images or frames.
    assert [tag for tag, _ in page.tags].count("script") == 1
    for tag, attrs in page.tags:
        assert tag not in ("link", "img", "iframe"), tag
        assert "src" not in attrs and "action" not in attrs
        href = attrs.get("href") or ""
        assert not re.match(r"^[a-z]+:", href), href  # relative links only
    text = " ".join(page.text)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["summary"] in text
            assert any(
                tag == "section" and attrs.get("id") == operation["operationId"] for tag, attrs in page.tags
            )
            assert f"{method.upper()} {path}" in text
            # A form that sends this operation to the server the page came from.
            assert any(
                tag == "form"
                and attrs.get("id") == f"try-{operation['operationId']}"
                and attrs.get("data-path") == path
                and attrs.get("data-method") == method
                for tag, attrs in page.tags
            )
    assert (
        "input",
        {"type": "file", "name": "audio_file", "required": None, "id": "detect-audio_file"},
    ) in page.tags
    # The examples name the server's address, not a fixed one.
    assert (
        "curl -fsS -F audio_file=@kws_xiaoyunxiaoyun.wav -F threshold=0.1 http://192.0.2.7:8000/detect"
        in text
    )
    assert "8080" not in text


def test_the_ui_page_needs_nothing_from_elsewhere() -> None:
    html = (REPO_ROOT / "edge_agent" / "http" / "static" / "ui.html").read_text(encoding="utf-8")
    page = _Collector()
    page.feed(html)
    for tag, attrs in page.tags:
        assert "src" not in attrs, (tag, attrs)
        assert not re.match(r"^[a-z]+:", attrs.get("href") or ""), attrs
    assert 'fetch("detect"' in html  # relative: works behind a reverse proxy's prefix too
    for element in ("file", "record", "threshold", "keywords", "detect", "status", "detected", "keyword"):
        assert f'id="{element}"' in html


def test_the_markdown_reference_covers_every_operation() -> None:
    text = (REPO_ROOT / "docs" / "http-api.md").read_text(encoding="utf-8")
    for path, item in openapi_document(1024 * 1024)["paths"].items():
        for method in item:
            assert f"`{method.upper()} {path}`" in text, (
                f"docs/http-api.md does not describe {method.upper()} {path}"
            )
    for status in ("400", "403", "404", "405", "411", "413", "415", "422", "500", "503"):
        assert f"| {status} |" in text, status
