"""The multipart/form-data parser: what clients send is accepted, everything else named."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.http.multipart import MultipartError, Part, boundary_of, parse_header_value, parse_multipart

CURL_BODY = (
    b"--------------------------d74496d66958873e\r\n"
    b'Content-Disposition: form-data; name="audio_file"; filename="a.wav"\r\n'
    b"Content-Type: audio/x-wav\r\n\r\n"
    b"RIFF\r\n--not-the-boundary\r\n\x00\xff"
    b"\r\n--------------------------d74496d66958873e\r\n"
    b'Content-Disposition: form-data; name="threshold"\r\n\r\n'
    b"0.1"
    b"\r\n--------------------------d74496d66958873e--\r\n"
)
CURL_BOUNDARY = "------------------------d74496d66958873e"


def build(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + data + b"\r\n"
        for name, data in parts
    )
    return body + f"--{boundary}--\r\n".encode()


def test_a_curl_upload() -> None:
    assert boundary_of(f"multipart/form-data; boundary={CURL_BOUNDARY}") == CURL_BOUNDARY
    audio, threshold = parse_multipart(CURL_BODY, CURL_BOUNDARY)
    assert audio == Part(
        name="audio_file",
        data=b"RIFF\r\n--not-the-boundary\r\n\x00\xff",
        filename="a.wav",
        content_type="audio/x-wav",
        headers=audio.headers,
    )
    assert (threshold.name, threshold.data, threshold.filename) == ("threshold", b"0.1", None)


def test_quoted_boundary_preamble_epilogue_padding_and_utf8_names() -> None:
    boundary = "a'b(c)+_,-./:=? z"
    assert boundary_of(f'Multipart/Form-Data; charset=utf-8; boundary="{boundary}";') == boundary
    body = (
        b"preamble to ignore\r\n"
        + f"--{boundary}  \t\r\n".encode()
        + 'Content-Disposition: form-data; name="f"; filename="录音 \\"1\\".wav"\r\n\r\n'.encode()
        + b"data"
        + f"\r\n--{boundary}--\r\nepilogue".encode()
    )
    (part,) = parse_multipart(body, boundary)
    assert part.filename == '录音 "1".wav' and part.data == b"data"


def test_empty_values_and_a_body_that_starts_with_crlf() -> None:
    body = b"\r\n" + build([("a", b""), ("b", b"\r\n")], "xyz")
    a, b = parse_multipart(body, "xyz")
    assert (a.data, b.data) == (b"", b"\r\n")
    assert parse_multipart(b"--xyz--\r\n", "xyz") == []


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("multipart/form-data", "no boundary parameter"),
        ("multipart/mixed; boundary=x", "expected multipart/form-data"),
        ("multipart/form-data; boundary=" + "x" * 71, "invalid boundary"),
        ("multipart/form-data; boundary=a b ", "malformed parameter value"),
        ('multipart/form-data; boundary="ends with space "', "invalid boundary"),
        ('multipart/form-data; boundary="x', "unterminated quoted string"),
        ("multipart/form-data; boundary=x; boundary=y", "given twice"),
        ("multipart/form-data; boundary", "malformed parameter"),
        ("", "empty header value"),
    ],
)
def test_bad_content_types(content_type: str, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        boundary_of(content_type)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no delimiter at all", "does not contain the boundary"),
        (
            b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\nshort',
            "truncated: part 1 is not closed",
        ),
        (
            b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--xyz',
            "without the closing boundary",
        ),
        (b'--xyz\r\nContent-Disposition: form-data; name="a"', "headers do not end with a blank line"),
        (b"--xyzjunk\r\n", "not followed by CRLF"),
        (b"--xyz\r\n\r\nv\r\n--xyz--", "no Content-Disposition"),
        (b'--xyz\r\nContent-Disposition: attachment; name="a"\r\n\r\nv\r\n--xyz--', "expected 'form-data'"),
        (b"--xyz\r\nContent-Disposition: form-data\r\n\r\nv\r\n--xyz--", "has no name"),
        (b'--xyz\r\nContent-Disposition: form-data;\r\n name="a"\r\n\r\nv\r\n--xyz--', "folded header"),
        (b"--xyz\r\nno colon here\r\n\r\nv\r\n--xyz--", "malformed header line"),
        (
            b'--xyz\r\nContent-Disposition: form-data; name="a"\r\ncontent-disposition: form-data\r\n\r\n'
            b"v\r\n--xyz--",
            "given twice",
        ),
        (
            b'--xyz\r\nContent-Disposition: form-data; name="a"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            b"dg==\r\n--xyz--",
            "base64",
        ),
        (b"--xyz\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\nv\r\n--xyz--", "headers longer than 8192 bytes"),
    ],
)
def test_bad_bodies(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse_multipart(body, "xyz")


def test_part_count_is_bounded() -> None:
    body = build([(f"f{i}", b"v") for i in range(17)], "xyz")
    with pytest.raises(MultipartError, match="more than 16"):
        parse_multipart(body, "xyz")
    assert len(parse_multipart(body, "xyz", max_parts=17)) == 17


def test_header_values_with_quoted_semicolons() -> None:
    assert parse_header_value('form-data; name="a;b"; filename="c\\"d"') == (
        "form-data",
        {"name": "a;b", "filename": 'c"d'},
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(codec="utf-8", exclude_characters='"\r\n\\'), min_size=1), st.binary()
        ),
        max_size=6,
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=?", min_size=1, max_size=70),
)
def test_round_trip(parts: list[tuple[str, bytes]], boundary: str) -> None:
    """Whatever a sender frames correctly comes back unchanged (unless the data holds the delimiter)."""
    delimiter = b"\r\n--" + boundary.encode()
    if any(delimiter in b"\r\n" + data + b"\r\n" for _, data in parts):
        return  # a sender must choose a boundary absent from the data
    parsed = parse_multipart(build(parts, boundary), boundary)
    assert [(p.name, p.data) for p in parsed] == parts


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_multipart_error(body: bytes) -> None:
    with contextlib.suppress(MultipartError):
        parse_multipart(body, "xyz")
