"""Fakes in their own process (the fake IdP, Dataverse, service-account issuer), started and served
one way.

Invariants:
* A fake run by ``running`` is given to the caller only once it listens: it prints
  ``READY <url>`` on stdout after uvicorn started (``serve``), and ``running`` waits for that line
  (bounded), reporting a fake that exited or printed something else.
* The process never outlives the block: terminated, then killed if it does not stop in 10 s.
* The fakes answer without Nagle's delay: the listening socket has ``TCP_NODELAY``, which the
  accepted connections inherit (else a response's header and body writes meet delayed ACKs:
  40 ms a request, which would dwarf what a benchmark measures).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

REPO_ROOT = Path(__file__).resolve().parent.parent


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), so the real port is known before serving."""
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


class ReadyServer(uvicorn.Server):
    """uvicorn that prints ``READY <url>`` once it listens."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"READY {self.url}", flush=True)


async def serve(app: ASGIApp, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until signalled, printing READY first."""
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1
    )
    await ReadyServer(config, url_of(sock)).serve([sock])


def wait_ready(proc: subprocess.Popen[bytes], timeout: float, name: str = "the fake") -> str:
    """The URL the process printed as ``READY <url>``, within ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline, buffer = time.monotonic() + timeout, b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            raise TimeoutError(f"{name} did not print READY within {timeout} s")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"{name} exited with {proc.wait()} before READY")
        buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    if not line.startswith("READY "):
        raise RuntimeError(f"{name} printed {line!r} instead of READY")
    return line.split(" ", 1)[1].strip()


@contextlib.contextmanager
def running(
    command: Sequence[str], *, name: str, ready_timeout: float = 20.0, cwd: Path = REPO_ROOT
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``command`` (which prints READY), yield (its URL, the process), then stop it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.getenv("PYTHONPATH")])),
    }
    with subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE) as proc:
        try:
            yield wait_ready(proc, ready_timeout, name), proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module --host 127.0.0.1 --port 0 [args]``."""
    return [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *args]
