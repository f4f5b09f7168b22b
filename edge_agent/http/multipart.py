"""A strict ``multipart/form-data`` parser (RFC 7578 over RFC 2046) for one in-memory body.

The stdlib has none since ``cgi`` was deprecated, and ``email.parser`` is neither strict nor
binary-safe for this. The body is small (bounded by ``http.max_upload_mb`` before it is read),
so it is parsed whole. What browsers, curl and HTTP client libraries send is accepted:

* a boundary of 1-70 characters, quoted or not; a preamble before the first delimiter and an
  epilogue after the closing one (both ignored); transport padding after a delimiter;
* per part: ``Content-Disposition: form-data; name="..."`` (``filename`` optional), any other
  headers (``Content-Type`` is kept); header values in UTF-8 (browsers send file names raw).

Everything else is a :class:`MultipartError` saying what is wrong: no boundary parameter, a
body that does not start with the delimiter, a part not closed before the body ends (truncated
upload), a missing closing delimiter, folded or malformed header lines, a part without a name,
``Content-Transfer-Encoding`` other than the identity ones, too many parts or header bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_BOUNDARY_CHARS = 70
DEFAULT_MAX_PARTS = 16
DEFAULT_MAX_HEADER_BYTES = 8192  # all header lines of one part together

# RFC 2046 bchars (space allowed except last).
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
# RFC 9110 token characters, for header names and parameter names.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_IDENTITY_ENCODINGS = ("7bit", "8bit", "binary")


class MultipartError(ValueError):
    """The body or its Content-Type header is not valid multipart/form-data."""


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


def parse_header_value(value: str) -> tuple[str, dict[str, str]]:
    """``type; a=1; b="x;y"`` -> (``type`` lower-cased, parameters with lower-case names)."""
    items = _split_params(value)
    if not items or not items[0].strip():
        raise MultipartError(f"empty header value {value!r}")
    main = items[0].strip().lower()
    params: dict[str, str] = {}
    for item in items[1:]:
        item = item.strip()
        if not item:
            continue  # a trailing ';' is common and harmless
        name, equals, raw = item.partition("=")
        name = name.strip().lower()
        if not equals or not _TOKEN.match(name):
            raise MultipartError(f"malformed parameter {item!r} in {value!r}")
        if name in params:
            raise MultipartError(f"parameter {name!r} given twice in {value!r}")
        params[name] = _unquote(raw.strip(), value)
    return main, params


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/form-data`` Content-Type header value."""
    media_type, params = parse_header_value(content_type)
    if media_type != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {media_type}")
    boundary = params.get("boundary")
    if boundary is None:
        raise MultipartError("the Content-Type header has no boundary parameter")
    if not _BOUNDARY.match(boundary):
        raise MultipartError(
            f"invalid boundary {boundary!r}: 1-{MAX_BOUNDARY_CHARS} characters of letters, digits "
            "and '()+_,-./:=? (not ending with a space)"
        )
    return boundary


def parse_multipart(
    body: bytes,
    boundary: str,
    max_parts: int = DEFAULT_MAX_PARTS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> list[Part]:
    """Every part of ``body``, in order; duplicates are kept (the caller decides about them)."""
    delimiter = b"--" + boundary.encode("ascii")
    next_delimiter = b"\r\n" + delimiter
    if body.startswith(delimiter):
        position = 0
    else:
        found = body.find(next_delimiter)
        if found < 0:
            raise MultipartError("the body does not contain the boundary given in the Content-Type header")
        position = found + 2  # skip the preamble and its CRLF
    parts: list[Part] = []
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):
            return parts  # the closing delimiter; what follows is the epilogue
        while position < len(body) and body[position] in b" \t":
            position += 1  # transport padding
        if not body.startswith(b"\r\n", position):
            if position >= len(body):
                raise MultipartError("truncated: the body ends without the closing boundary")
            raise MultipartError("malformed boundary line: the delimiter is not followed by CRLF")
        position += 2
        if len(parts) == max_parts:
            raise MultipartError(f"too many parts: more than {max_parts}")
        headers, content_start = _read_headers(body, position, max_header_bytes, len(parts) + 1)
        end = body.find(next_delimiter, content_start)
        if end < 0:
            raise MultipartError(
                f"truncated: part {len(parts) + 1} is not closed by the boundary before the body ends"
            )
        parts.append(_make_part(headers, body[content_start:end], len(parts) + 1))
        position = end + 2


def _read_headers(body: bytes, position: int, max_bytes: int, number: int) -> tuple[dict[str, str], int]:
    if body.startswith(b"\r\n", position):
        return {}, position + 2  # a part with no headers (refused later for having no name)
    end = body.find(b"\r\n\r\n", position, position + max_bytes + 4)
    if end < 0:
        if len(body) - position > max_bytes:
            raise MultipartError(f"part {number}: headers longer than {max_bytes} bytes")
        raise MultipartError(f"truncated: part {number}'s headers do not end with a blank line")
    raw = body[position:end]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # old clients; only ASCII names matter to us
    headers: dict[str, str] = {}
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t"):
            raise MultipartError(f"part {number}: folded header lines are not allowed")
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not _TOKEN.match(name):
            raise MultipartError(f"part {number}: malformed header line {line[:80]!r}")
        if name in headers:
            raise MultipartError(f"part {number}: header {name!r} given twice")
        headers[name] = value.strip()
    return headers, end + 4


def _make_part(headers: dict[str, str], data: bytes, number: int) -> Part:
    disposition = headers.get("content-disposition")
    if disposition is None:
        raise MultipartError(f"part {number} has no Content-Disposition header")
    kind, params = parse_header_value(disposition)
    if kind != "form-data":
        raise MultipartError(f"part {number}: Content-Disposition is {kind!r}, expected 'form-data'")
    name = params.get("name")
    if not name:
        raise MultipartError(f"part {number}: Content-Disposition has no name")
    encoding = headers.get("content-transfer-encoding", "binary").strip().lower()
    if encoding not in _IDENTITY_ENCODINGS:
        raise MultipartError(f"part {name!r}: Content-Transfer-Encoding {encoding!r} is not supported")
    content_type = headers.get("content-type")
    return Part(
        name=name,
        data=data,
        filename=params.get("filename"),
        content_type=content_type.strip() if content_type else None,
        headers=headers,
    )


def _split_params(value: str) -> list[str]:
    """Split on ';' outside double quotes."""
    items, current, quoted, escaped = [], [], False, False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise MultipartError(f"unterminated quoted string in {value!r}")
    items.append("".join(current))
    return items


def _unquote(raw: str, whole: str) -> str:
    if not raw.startswith('"'):
        if not _TOKEN.match(raw):  # unquoted values are tokens (RFC 9110): no spaces, no quotes
            raise MultipartError(f"malformed parameter value {raw!r} in {whole!r}")
        return raw
    if len(raw) < 2 or not raw.endswith('"'):
        raise MultipartError(f"malformed quoted value {raw!r} in {whole!r}")
    inner = raw[1:-1]
    # Browsers percent-encode '"' in names (HTML spec); others backslash-escape it (RFC 9110).
    return re.sub(r"\\(.)", r"\1", inner)
