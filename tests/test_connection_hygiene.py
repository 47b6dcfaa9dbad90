"""Connection hygiene against a real `facegate serve` process: slow clients are cut off,
probes answer HEAD, CORS refusals are JSON envelopes, and the API docs work offline."""

from __future__ import annotations

import re
import select
import socket
import time

import httpx
import pytest
from server_support import default_bundle, free_port, start_server

ALLOWED_ORIGIN = "http://allowed.example"
TIMEOUT_S = 1.0
EXTERNAL_URL = re.compile(r"https?://", re.IGNORECASE)  # a CDN asset, fonts, ...


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """One server with 1 s header and body deadlines and CORS for one origin."""
    folder = tmp_path_factory.mktemp("hygiene")
    port = free_port()
    env = {
        "FACEGATE_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "FACEGATE_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "FACEGATE_CORS_ORIGINS": ALLOWED_ORIGIN,
    }
    proc = start_server(default_bundle(), folder / "gallery.sqlite", port, env=env)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):  # socket.timeout (a test failure) if never closed
            data += chunk
    except ConnectionResetError:  # closed while our last bytes were in flight
        pass
    return data, time.monotonic() - start


def read_response(sock: socket.socket) -> httpx.Response:
    """One response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        parse_raw_response(data).headers["content-length"]
    ):
        chunk = sock.recv(65536)
        assert chunk, "the server closed a connection it should have kept"
        data += chunk
    return parse_raw_response(data)


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def assert_envelope(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code


def parse_raw_response(data: bytes) -> httpx.Response:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in header_lines]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


def test_half_sent_headers_are_cut_off_with_408(url):
    with raw_connection(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        data, took = read_until_closed(sock, limit_s=TIMEOUT_S + 4)
    assert TIMEOUT_S - 0.2 <= took < TIMEOUT_S + 3
    response = parse_raw_response(data)
    assert_envelope(response, 408, "request_timeout")
    assert response.headers["connection"] == "close"


def test_headers_trickled_byte_by_byte_are_cut_off(url):
    """Each byte arrives well inside the deadline; the whole head does not."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
    with raw_connection(url) as sock:
        start = time.monotonic()
        for byte in request:  # stop sending once the server has answered
            if select.select([sock], [], [], 0.1)[0]:
                break
            sock.sendall(bytes([byte]))
        data, _ = read_until_closed(sock, limit_s=TIMEOUT_S + 3)
        took = time.monotonic() - start
    assert took < TIMEOUT_S + 3
    assert data.startswith(b"HTTP/1.1 408 ")


def test_idle_connection_is_closed_silently(url):
    with raw_connection(url) as sock:
        data, took = read_until_closed(sock, limit_s=TIMEOUT_S + 4)
    assert data == b""
    assert took < TIMEOUT_S + 3


def test_stalled_body_gets_408_envelope_and_close(url):
    with raw_connection(url) as sock:
        sock.sendall(
            b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"image1_b'
        )
        data, took = read_until_closed(sock, limit_s=TIMEOUT_S + 4)
    assert TIMEOUT_S - 0.2 <= took < TIMEOUT_S + 3
    response = parse_raw_response(data)
    assert_envelope(response, 408, "request_timeout")
    assert response.headers["connection"] == "close"


def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline(url):
    """Requests answered in time keep the connection; a later half-sent one is cut off."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with raw_connection(url) as sock:
        for _ in range(3):
            time.sleep(TIMEOUT_S * 0.6)  # idle time before each request counts, but resets
            sock.sendall(request)
            assert read_response(sock).status_code == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        data, took = read_until_closed(sock, limit_s=TIMEOUT_S + 4)
    assert took < TIMEOUT_S + 3
    assert data.startswith(b"HTTP/1.1 408 ")


def test_malformed_request_is_a_json_400(url):
    with raw_connection(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        data, _ = read_until_closed(sock, limit_s=5)
    assert_envelope(parse_raw_response(data), 400, "bad_request")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_answer_head_and_other_methods_get_405_envelopes(url, path):
    head = httpx.head(url + path)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == httpx.get(url + path).headers["content-type"]
    wrong = httpx.put(url + path)
    assert_envelope(wrong, 405, "method_not_allowed")
    assert "GET" in wrong.headers["allow"]
    assert_envelope(httpx.get(url + "/no-such-thing"), 404, "not_found")


@pytest.mark.parametrize(
    ("origin", "method", "headers"),
    [
        ("http://evil.example", "GET", None),
        (ALLOWED_ORIGIN, "PUT", None),
        (ALLOWED_ORIGIN, "POST", "X-Evil"),
    ],
)
def test_refused_cors_preflight_is_an_envelope(url, origin, method, headers):
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        request_headers["Access-Control-Request-Headers"] = headers
    response = httpx.options(url + "/v1/verify", headers=request_headers)
    assert_envelope(response, 400, "cors_rejected")
    assert "Disallowed CORS" in response.json()["error"]["message"]
    allowed = httpx.options(
        url + "/v1/verify",
        headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "X-API-Key, Content-Type"},
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_the_server(url, page):
    html = httpx.get(url + page)
    assert html.status_code == 200
    assert not EXTERNAL_URL.search(html.text), "the page references an external URL"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        assert httpx.get(url + asset).status_code == 200, asset
    spec = re.search(r"(?:url: '|spec-url=\")([^'\"]+)", html.text)
    assert spec and httpx.get(url + spec.group(1)).status_code == 200
