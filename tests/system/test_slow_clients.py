"""``token-broker serve`` bounds what a slow or greedy client can hold, over real sockets.

One served process (SQLite) with short bounds; each test opens raw TCP connections and measures
when the server gives up on them. The trickling clients pause between bytes by design: the
behaviour under test is a time bound.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.replicas import migrate
from tests.system.test_lifecycle import Served, serving, sqlite_env

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
GIVE_UP = 6.0  # far beyond the bounds: a server without them keeps the connection past this
ADMIN = "slow-clients-admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp: Path = tmp_path_factory.mktemp("slow")
    env = sqlite_env(
        tmp,
        BROKER_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        BROKER_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        BROKER_MAX_CONNECTIONS="8",
        BROKER_ADMIN_KEYS=ADMIN,
    )
    migrate(env)
    with serving(env, tmp / "serve.log") as running:
        yield running


def _connect(served: Served) -> socket.socket:
    host, port = served.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=GIVE_UP)


def _trickle_until_closed(sock: socket.socket, data: bytes, pause: float = 0.25) -> tuple[bytes, float]:
    """Send ``data`` a byte at a time; what the server answered and when it closed (seconds)."""
    started = time.monotonic()
    sock.setblocking(False)
    answer = b""
    for byte in data:
        if time.monotonic() - started > GIVE_UP:
            break
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            except OSError:
                return answer, time.monotonic() - started
            if not chunk:
                return answer, time.monotonic() - started
            answer += chunk
    sock.settimeout(max(0.1, GIVE_UP - (time.monotonic() - started)))
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except OSError:
        pass
    return answer, time.monotonic() - started


def test_a_silent_connection_is_closed_with_408(served: Served) -> None:
    """A connection that sends nothing is answered 408 and closed after the header timeout."""
    with _connect(served) as sock:
        started = time.monotonic()
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except TimeoutError:
            pytest.fail(f"still open after {GIVE_UP} s")
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT * 0.8 <= took < HEADER_TIMEOUT + 2


def test_a_trickled_request_head_is_cut_off(served: Served) -> None:
    """Headers sent a byte every 0.25 s never complete: 408 and closed within the header timeout."""
    head = b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Padding: " + b"a" * 64 + b"\r\n\r\n"
    with _connect(served) as sock:
        answer, took = _trickle_until_closed(sock, head)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert took < HEADER_TIMEOUT + 2


def test_a_trickled_body_is_cut_off(served: Served) -> None:
    """A body sent a byte every 0.25 s is cut off after the body timeout, head or no head timer."""
    body = b'{"name": "' + b"a" * 60 + b'"}'
    head = (
        b"POST /keys HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + ADMIN.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with _connect(served) as sock:
        sock.sendall(head)
        answer, took = _trickle_until_closed(sock, body)
    assert took < BODY_TIMEOUT + 2, answer
    assert answer == b"" or answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 422 ")), answer[:200]


def test_an_oversized_head_is_431(served: Served) -> None:
    """A request head beyond 32 KiB is refused with 431 and the connection closed."""
    head = b"GET /healthz HTTP/1.1\r\nHost: broker\r\n" + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    with _connect(served) as sock:
        with contextlib.suppress(OSError):  # the server may close before it has read everything
            sock.sendall(head)
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_connections_beyond_the_limit_get_503(served: Served) -> None:
    """With BROKER_MAX_CONNECTIONS=8, a request on a ninth open connection is answered 503."""
    held = [_connect(served) for _ in range(8)]
    try:
        with _connect(served) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
    finally:
        for sock in held:
            sock.close()
    # Once they are closed (the server notices on a later loop turn), requests are served again.
    deadline = time.monotonic() + GIVE_UP
    while True:
        with _connect(served) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")
            if sock.recv(4096).startswith(b"HTTP/1.1 200 "):
                break
        assert time.monotonic() < deadline, "still refusing after the connections closed"
