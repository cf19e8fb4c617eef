"""Reading requests, against a real ``python -m deblur.service`` process: multipart forms through
python-multipart, corrupt vs unsupported images, and slow clients (header and body timeouts)."""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from deblur.core.config import ServingConfig
from deblur.service.admission import MemoryBudget
from deblur.service.decoding import read_body
from deblur.service.errors import add_error_handlers
from serving_support import PARAMS, encode, free_port, make_artifact, running_server, smooth_rgb

HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 4.0
SETTINGS = {"max_body_mb": 1, "max_pixels": 1_000_000, "max_side": 2000, "min_side": 8,
            "header_timeout_seconds": HEADER_TIMEOUT, "body_timeout_seconds": BODY_TIMEOUT}
BOUNDARY = "deblur-test-boundary"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(make_artifact(tmp_path_factory.mktemp("requests"), serving=SETTINGS)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def photo_png(width: int = 64, height: int = 48) -> bytes:
    return encode(Image.fromarray(smooth_rgb(height, width)), "PNG")


def assert_error(response: httpx.Response, status: int, code: str, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and mentions in body["detail"], body


def form(*parts: tuple[bytes, bytes], boundary: str = BOUNDARY, end: bool = True) -> bytes:
    """A multipart/form-data body from (part headers, part data) pairs."""
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"
                    for headers, data in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if end else b"")


def file_part(name: str, data: bytes, filename: str = "photo.png") -> tuple[bytes, bytes]:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/png").encode(), data


def post_form(client: httpx.Client, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}"):
    return client.post("/api/deblur", content=body, headers={"Content-Type": content_type})


# --- multipart forms -------------------------------------------------------------------------------

def test_a_form_with_the_image_and_other_fields_is_deblurred(client):
    body = form((b'Content-Disposition: form-data; name="note"', b"holiday \xe2\x98\x80"),
                file_part("image", photo_png(), filename='sea "view".png'),
                (b'Content-Disposition: form-data; name="format"', b"jpeg"))
    response = post_form(client, body)
    assert response.status_code == 200 and response.headers["X-Image-Size"] == "64x48", response.text
    through_httpx = client.post("/api/deblur", files={"image": ("a.png", photo_png(), "image/png")},
                                data={"comment": "x"})
    assert through_httpx.status_code == 200 and through_httpx.content == response.content


def test_two_image_fields_are_refused_naming_the_field(client):
    one, other = photo_png(64, 48), photo_png(80, 40)
    response = client.post("/api/deblur", files=[("image", ("a.png", one, "image/png")),
                                                  ("image", ("b.png", other, "image/png"))])
    assert_error(response, 400, "duplicate_field", "'image'")


@pytest.mark.parametrize("content_type, body, mentions", [
    ("multipart/form-data", form(file_part("image", b"x")), "boundary"),
    (f"multipart/form-data; boundary={BOUNDARY}", b"this is not a multipart form at all", "form"),
    (f"multipart/form-data; boundary={BOUNDARY}", form(file_part("image", b"\x89PNG" * 40), end=False)[:-40],
     "closing boundary"),
    (f"multipart/form-data; boundary={BOUNDARY}", form((b"Content-Type: image/png", b"abc")), "Content-Disposition"),
    (f"multipart/form-data; boundary={BOUNDARY}",
     form(*[(f'Content-Disposition: form-data; name="f{i}"'.encode(), b"v") for i in range(20)]), "parts"),
    (f"multipart/form-data; boundary={BOUNDARY}",
     form((b'Content-Disposition: form-data; name="image"\r\nX-Padding: ' + b"a" * 9000, b"abc")), "header"),
    (f"multipart/form-data; boundary={'b' * 80}", form(file_part("image", b"x"), boundary="b" * 80), "boundary"),
], ids=["no-boundary", "garbage", "truncated", "no-disposition", "too-many-parts", "huge-part-header",
        "boundary-too-long"])
def test_malformed_forms_get_invalid_multipart(client, server, content_type, body, mentions):
    assert_error(post_form(client, body, content_type), 400, "invalid_multipart", mentions)
    assert server.process.poll() is None


def test_a_form_without_the_field_or_with_an_empty_file(client):
    assert_error(post_form(client, form(file_part("file", photo_png()))), 400, "missing_field", "'image'")
    assert_error(post_form(client, form(file_part("image", b""))), 400, "empty_body", "'image'")


# --- corrupt vs unsupported images -----------------------------------------------------------------

def _encoded(fmt: str) -> bytes:
    return encode(Image.fromarray(smooth_rgb(48, 64)), fmt)


@pytest.mark.parametrize("body, fmt", [
    (b"II*\x00" + bytes(range(256)) * 2, "TIFF"),
    (b"MM\x00*" + b"\xff" * 64, "TIFF"),
    (_encoded("TIFF")[:16], "TIFF"),
    (_encoded("JPEG")[:4], "JPEG"),
    (_encoded("PNG")[:12], "PNG"),
    (_encoded("PNG")[:8] + b"\0" * 40, "PNG"),
    (_encoded("GIF")[:12], "GIF"),
    (_encoded("BMP")[:12], "BMP"),
    (_encoded("WEBP")[:12], "WEBP"),
], ids=["tiff-garbage", "tiff-big-endian-garbage", "tiff-truncated", "jpeg-truncated", "png-truncated",
        "png-corrupt-header", "gif-truncated", "bmp-truncated", "webp-truncated"])
def test_a_corrupt_header_of_an_accepted_format_is_invalid_image_not_unsupported(client, body, fmt):
    assert_error(client.post("/api/deblur", content=body), 400, "invalid_image", fmt)


@pytest.mark.parametrize("body", [
    b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00",
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    encode(Image.new("RGB", (64, 48)), "PPM"),
], ids=["wav", "pdf", "ppm"])
def test_unknown_formats_stay_unsupported_media_type(client, body):
    assert_error(client.post("/api/deblur", content=body), 415, "unsupported_media_type", "GIF")


# --- slow clients ----------------------------------------------------------------------------------

def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, float | None]:
    """What the server sends until it closes the connection, and when it closed (None: still open at deadline)."""
    reply = b""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return reply, time.monotonic()
        if not chunk:
            return reply, time.monotonic()
        reply += chunk
    return reply, None


def trickle(sock: socket.socket, piece: bytes, every: float, until: float) -> None:
    """Send ``piece`` every ``every`` seconds until the server answers or ``until``."""
    while time.monotonic() < until:
        if select.select([sock], [], [], every)[0]:
            return
        try:
            sock.sendall(piece)
        except OSError:
            return


def send_slowly(sock: socket.socket, data: bytes, every: float) -> None:
    """One byte of ``data`` every ``every`` seconds (stops when the server has closed)."""
    for i in range(len(data)):
        try:
            sock.send(data[i:i + 1])
        except OSError:
            return
        time.sleep(every)


def read_reply(sock: socket.socket, ends_with: bytes) -> bytes:
    reply = b""
    while not reply.rstrip().endswith(ends_with) and (chunk := sock.recv(65536)):
        reply += chunk
    return reply


def json_reply(reply: bytes) -> tuple[str, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.decode("latin-1"), json.loads(body)


def test_half_sent_requests_are_closed_after_the_header_timeout_while_others_are_served(server, client):
    openings = [b"", b"GET /api/hea", b"POST /api/deblur?code=s3cret HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: image/png\r\n"]
    started = time.monotonic()
    held = []
    for i in range(30):
        sock = connect(server)
        sock.sendall(openings[i % len(openings)])
        held.append(sock)
    assert client.get("/api/health").json()["ready"]
    assert client.post("/api/deblur", content=photo_png()).status_code == 200
    closed_at = [read_until_closed(sock, started + HEADER_TIMEOUT + 2)[1] for sock in held]
    for sock in held:
        sock.close()
    assert all(t is not None for t in closed_at), f"{sum(t is None for t in closed_at)} of 30 still open"
    assert min(closed_at) - started >= HEADER_TIMEOUT - 0.1
    assert client.get("/api/health").status_code == 200
    log = server.log()
    assert f"request headers not complete within {HEADER_TIMEOUT:g} s" in log and "s3cret" not in log


def test_headers_trickled_byte_by_byte_or_after_a_keep_alive_response_are_timed_out(server):
    with connect(server) as trickled, connect(server) as reused:
        started = time.monotonic()
        request = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        threading.Thread(target=send_slowly, args=(trickled, request[:20], 0.2), daemon=True).start()
        reused.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_reply(reused, b"}").startswith(b"HTTP/1.1 200")
        reused.sendall(b"GET /api/health HTTP/1.1\r\nHo")
        second_started = time.monotonic()
        _, trickled_closed = read_until_closed(trickled, started + HEADER_TIMEOUT + 2)
        _, reused_closed = read_until_closed(reused, second_started + HEADER_TIMEOUT + 2)
    assert trickled_closed is not None and reused_closed is not None, (trickled_closed, reused_closed)


def test_a_body_trickled_slower_than_the_body_timeout_gets_408_and_the_connection_closes(server):
    with connect(server) as sock:
        sock.sendall(b"POST /api/deblur?code=s3cret HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        started = time.monotonic()
        trickle(sock, b"\0" * 100, every=0.4, until=started + BODY_TIMEOUT + 3)
        reply, closed = read_until_closed(sock, started + BODY_TIMEOUT + 3)
    head, body = json_reply(reply)
    assert head.startswith("HTTP/1.1 408"), reply
    assert body["error"] == "request_timeout" and "serving.body_timeout_seconds" in body["detail"], body
    assert closed is not None and BODY_TIMEOUT - 0.5 <= closed - started <= BODY_TIMEOUT + 2, closed - started
    log = server.log()
    assert '"POST /api/deblur?code=*** HTTP/1.1" 408' in log and "s3cret" not in log


def test_a_body_that_stops_arriving_gets_408_after_the_idle_limit(server):
    with connect(server) as sock:
        sock.sendall(b"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\0" * 5000)
        started = time.monotonic()
        reply, closed = read_until_closed(sock, started + BODY_TIMEOUT + 2)
    head, body = json_reply(reply)
    assert head.startswith("HTTP/1.1 408") and body["error"] == "request_timeout", reply
    assert "no part of the body" in body["detail"]
    assert closed is not None and closed - started < BODY_TIMEOUT - 1, closed - started


def test_a_slow_upload_within_the_body_timeout_is_served(server):
    data = photo_png(120, 90)
    pieces = [data[i * len(data) // 4:(i + 1) * len(data) // 4] for i in range(4)]
    with connect(server) as sock:
        sock.sendall(b"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n")
        for piece in pieces:  # 1.8 s in all: longer than the header timeout, within the body timeout
            time.sleep(0.6)
            sock.sendall(piece)
        reply, _ = read_until_closed(sock, time.monotonic() + 30)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b"x-image-size: 120x90" in reply.lower()


def test_a_body_nobody_reads_is_cut_at_the_body_timeout(server):
    with connect(server) as sock:
        sock.sendall(b"POST /api/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        assert read_reply(sock, b"}").startswith(b"HTTP/1.1 404")
        trickle(sock, b"\0" * 10, every=0.3, until=started + BODY_TIMEOUT + 4)
        _, closed = read_until_closed(sock, started + BODY_TIMEOUT + 4)
    assert closed is not None and closed - started <= BODY_TIMEOUT + 3


def test_a_client_leaving_mid_body_leaves_no_traceback(server, client):
    with connect(server) as sock:
        sock.sendall(b"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
        time.sleep(0.2)
    time.sleep(0.5)
    assert client.get("/api/health").status_code == 200
    assert "Traceback" not in server.log() and "unhandled error" not in server.log()


@pytest.mark.parametrize("request_bytes, why", [
    (b"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", "bad Content-Length"),
    (b"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     "conflicting Content-Length headers"),
    (b"GET /api/health?code=s3cret HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header s3cret\r\n\r\n", "illegal header line"),
    (b"GET /api/health?code=s3cret HTTP/1.1 and more\r\nHost: 127.0.0.1\r\n\r\n", "illegal request line"),
    (b"GET /api/health HTTP/1.1\r\n\r\n", "Missing mandatory Host: header"),
], ids=["content-length-abc", "two-content-lengths", "header-line", "request-line", "no-host"])
def test_requests_that_are_not_http_get_the_json_error_and_the_connection_closes(server, client, request_bytes,
                                                                                  why):
    with connect(server) as sock:   # before: uvicorn's "Invalid HTTP request received." as text/plain
        sock.sendall(request_bytes)
        reply, closed = read_until_closed(sock, time.monotonic() + 30)
    head, body = json_reply(reply)
    assert head.startswith("HTTP/1.1 400"), reply
    assert "content-type: application/json" in head.lower() and "connection: close" in head.lower(), head
    assert body["error"] == "bad_request" and why in body["detail"] and "not valid HTTP/1.1" in body["detail"], body
    assert closed is not None and b"s3cret" not in reply   # nothing of the request is echoed
    assert client.get("/api/health").status_code == 200
    assert "s3cret" not in server.log()


# --- the buffered-bytes budget while reading -------------------------------------------------------

@pytest.fixture(scope="module")
def budget_server():
    """A real uvicorn server on loopback with one route that reads its body against a 200 kB budget."""
    import uvicorn

    serving = ServingConfig.model_validate({**PARAMS.serving.model_dump(), "max_body_mb": 1})
    budget = MemoryBudget(200_000)
    app = FastAPI()
    add_error_handlers(app)

    @app.post("/read")
    async def read(request: Request) -> dict:
        with budget.reservation() as reservation:
            body = await read_body(request, serving, reservation)
            return {"bytes": len(body), "held": reservation.held}

    @app.get("/used")
    def used() -> dict:
        return {"used": budget.used}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", port, budget
    server.should_exit = True
    thread.join(10)


def test_read_body_holds_the_bytes_it_reads_in_the_reservation(budget_server):
    url, port, budget = budget_server
    ok = httpx.post(f"{url}/read", content=b"\1" * 60_000)
    assert ok.status_code == 200 and ok.json() == {"bytes": 60_000, "held": 60_000}
    assert budget.try_take(100_000)   # another request holds half the budget
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /read HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(2):  # 128 kB of a longer body: over the room left before the body is complete
                sock.sendall(b"10000\r\n" + b"\2" * 0x10000 + b"\r\n")
            reply = read_reply(sock, b"}")
    finally:
        budget.give_back(100_000)
    head, body = json_reply(reply)
    assert head.startswith("HTTP/1.1 503") and body["error"] == "busy", reply
    assert "serving.max_buffered_mb" in body["detail"]
    assert httpx.get(f"{url}/used").json() == {"used": 0}


def test_read_body_keeps_the_413_before_the_budget(budget_server):
    url, _, _ = budget_server
    assert_error(httpx.post(f"{url}/read", content=np.zeros(2 * 2**20, np.uint8).tobytes()), 413,
                 "payload_too_large", "serving.max_body_mb")
