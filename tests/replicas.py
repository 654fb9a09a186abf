"""Several ``token-broker serve`` processes sharing one environment, for multi-process tests.

``ReplicaSet(env, count, log_dir)`` starts ``count`` replicas (``python -m service.cli serve``) on
free ports, waits until each answers ``/readyz`` with 200, and stops them with SIGTERM (the exit
status must be 0) or SIGKILL. Each process's stdout and stderr go to a file in ``log_dir``, one
file per start, so a test can read them when something fails or search them for secrets.
Blocking calls only: the processes start and stop while no request is in flight.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0  # the contract: drained and gone within 15 s of SIGTERM


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without any ``BROKER_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def migrate(env: dict[str, str], timeout: float = 120.0) -> None:
    """``token-broker migrate`` with ``env``; raises with its output when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"token-broker migrate exited with {done.returncode}:\n{done.stderr[-4000:]}")


@dataclass
class Replica:
    index: int
    port: int
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)  # one file per start, oldest first

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, chars: int = 3000) -> str:
        if not self.logs or not self.logs[-1].exists():
            return "(no output)"
        return self.logs[-1].read_text(errors="replace")[-chars:]


class ReplicaSet:
    """``count`` replicas of ``token-broker serve``; use as a context manager (stops them all)."""

    def __init__(
        self, env: dict[str, str], count: int, log_dir: Path, *, ready_timeout: float = READY_TIMEOUT
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.ready_timeout = ready_timeout
        self.replicas = [Replica(index=i, port=free_port()) for i in range(count)]
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ReplicaSet:
        try:
            self.start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    # -- starting -------------------------------------------------------------------------------

    def _spawn(self, replica: Replica) -> None:
        replica.starts += 1
        path = self.log_dir / f"replica-{replica.index}.start-{replica.starts}.log"
        replica.logs.append(path)
        env = {**self.env, "BROKER_HOST": "127.0.0.1", "BROKER_PORT": str(replica.port)}
        with path.open("wb") as out:  # the child keeps its own descriptor
            replica.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C on pytest does not reach the replicas directly
            )

    def _wait_ready(self, replica: Replica, deadline: float) -> None:
        with httpx.Client(base_url=replica.url, timeout=2.0, trust_env=False) as client:
            while True:
                assert replica.process is not None
                if replica.process.poll() is not None:
                    raise RuntimeError(
                        f"replica {replica.index} exited with {replica.process.returncode} before it was "
                        f"ready:\n{replica.tail()}"
                    )
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"replica {replica.index} was not ready within {self.ready_timeout} s:\n"
                        + replica.tail()
                    )
                time.sleep(0.1)

    def _start(self, replicas: list[Replica]) -> None:
        for replica in replicas:
            self._spawn(replica)
        deadline = time.monotonic() + self.ready_timeout
        for replica in replicas:
            self._wait_ready(replica, deadline)

    def start_all(self) -> None:
        """Start every replica at once and wait until all are ready (one retry on a taken port)."""
        try:
            self._start(self.replicas)
        except RuntimeError:
            # A port picked as free may have been taken meanwhile: start the dead ones elsewhere.
            dead = [r for r in self.replicas if not r.running]
            for replica in dead:
                replica.port = free_port()
            self._start(dead)

    def start(self, index: int) -> Replica:
        """Start a stopped replica again, on the same port, and wait until it is ready."""
        replica = self.replicas[index]
        if replica.running:
            raise RuntimeError(f"replica {index} is running")
        self._start([replica])
        return replica

    # -- stopping -------------------------------------------------------------------------------

    def stop(self, index: int, *, expect: int | None = 0, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait at most ``timeout`` s; the exit status must be ``expect`` (None: any)."""
        process = self.replicas[index].process
        assert process is not None, f"replica {index} was never started"
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return self._await_exit(index, expect=expect, timeout=timeout)

    def _await_exit(self, index: int, *, expect: int | None, timeout: float) -> int:
        # One SIGTERM only: once the server has stopped, the default disposition is back, and a
        # second SIGTERM during the interpreter's teardown would kill the process (status -15).
        replica = self.replicas[index]
        process = replica.process
        assert process is not None
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"replica {index} did not exit within {timeout} s of SIGTERM:\n{replica.tail()}"
            ) from None
        code = process.returncode
        if expect is not None and code != expect:
            raise AssertionError(f"replica {index} exited with {code} (expected {expect}):\n{replica.tail()}")
        return code

    def kill(self, index: int) -> int:
        """SIGKILL: the process gets no chance to drain or commit."""
        process = self.replicas[index].process
        assert process is not None, f"replica {index} was never started"
        if process.poll() is None:
            process.kill()
        return process.wait()

    def restart(self, index: int, *, hard: bool = False) -> Replica:
        """Stop a replica (SIGTERM and exit status 0, or SIGKILL when ``hard``) and start it again."""
        if hard:
            self.kill(index)
        else:
            self.stop(index)
        return self.start(index)

    def stop_all(self, *, expect: int | None = 0) -> list[int]:
        """SIGTERM every running replica at once, then wait for each; returns the exit statuses."""
        running = [r for r in self.replicas if r.running]
        for replica in running:
            assert replica.process is not None
            replica.process.send_signal(signal.SIGTERM)
        return [self._await_exit(r.index, expect=expect, timeout=STOP_TIMEOUT) for r in running]

    def close(self) -> None:
        """Stop whatever still runs, without judging how (for teardown after a failure)."""
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.process is None:
                continue
            try:
                replica.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()

    # -- output ---------------------------------------------------------------------------------

    def output(self) -> str:
        """Everything every replica printed, every start, in one string."""
        return "\n".join(
            path.read_text(errors="replace") for r in self.replicas for path in r.logs if path.exists()
        )

    def log_files(self) -> list[Path]:
        return [path for r in self.replicas for path in r.logs]
