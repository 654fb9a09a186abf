"""Helpers for the fault and load scenarios (``tests/system/test_faults.py``, ``bench/reliability.py``).

* ``SCALE`` (``BROKER_FAULTS_SCALE``, default 1: the short CI version) stretches every phase;
* ``Tally`` records what callers got: outcomes by kind, latencies, ``Retry-After`` values, a
  timeline; ``call_loop`` drives concurrent callers over a changing set of replica clients;
* ``Broker`` is one deployment: fake Azure AD + migrated database + ``ReplicaSet`` + accounts;
* ``PrivateMariaDB`` is a MariaDB server of the test's own (own datadir, port and socket), which
  the test may stop and start without touching the shared server;
* ``report`` prints a scenario's figures and, when ``BROKER_FAULTS_REPORT`` names a file, appends
  them to it as one JSON line (``bench/reliability.py`` turns those into the Reliability table).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.accounts import repository as accounts_repo

from .fake_idp import FakeIdpHandle, account_body, running_fake_idp
from .replicas import ReplicaSet, broker_env, free_port, migrate

SCALE = max(0.5, float(os.environ.get("BROKER_FAULTS_SCALE", "1")))
REPORT_FILE = os.environ.get("BROKER_FAULTS_REPORT")

# Broker timing used by every fault scenario (seconds). LOCK_WAIT > IDP_TIMEOUT (the settings
# insist); MAX_WAIT < IDP_TIMEOUT so that a hanging IdP shows the caller's bound, not the IdP's.
IDP_TIMEOUT = 4.0
LOCK_WAIT = 6
MAX_WAIT = 3.0
BACKOFF_BASE = 0.5
BACKOFF_MAX = 2.0
SYNC_INTERVAL = 1.0
LATENCY_SLACK = 1.5  # scheduling on a busy 2-core machine, on top of the bound


def scaled(seconds: float) -> float:
    return seconds * SCALE


# -- what callers saw ---------------------------------------------------------------------------


def kind_of(response: httpx.Response) -> str:
    """``ok`` for 200, else ``<status> <code>[/<reason>]`` from the problem document."""
    if response.status_code == 200:
        return "ok"
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} (not JSON)"
    code = body.get("code", "?") if isinstance(body, dict) else "?"
    reason = body.get("reason") if isinstance(body, dict) else None
    return f"{response.status_code} {code}" + (f"/{reason}" if reason else "")


@dataclass
class Sample:
    at: float  # monotonic, when the request started
    latency: float
    account: str
    kind: str
    retry_after: int | None = None
    expires_in: int | None = None


@dataclass
class Tally:
    """Every request's outcome; ``phase`` labels what follows (``tally.phase = "down"``)."""

    phase: str = "start"
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    transport_errors: list[str] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples.setdefault(self.phase, []).append(sample)

    def all(self, *phases: str) -> list[Sample]:
        return [s for p, ss in self.samples.items() if not phases or p in phases for s in ss]

    def kinds(self, *phases: str) -> Counter[str]:
        return Counter(s.kind for s in self.all(*phases))

    def errors(self, *phases: str) -> Counter[str]:
        return Counter({k: n for k, n in self.kinds(*phases).items() if k != "ok"})

    def max_latency(self, *phases: str) -> float:
        return max((s.latency for s in self.all(*phases)), default=0.0)

    def percentile(self, q: float, *phases: str) -> float:
        values = sorted(s.latency for s in self.all(*phases))
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(q * len(values)))]

    def requests(self, *phases: str) -> int:
        return len(self.all(*phases))


async def fetch(
    client: httpx.AsyncClient, account: str, tally: Tally, *, params: dict[str, Any] | None = None
) -> Sample:
    started = time.monotonic()
    try:
        response = await client.get(f"/accounts/{account}/token", params=params)
    except httpx.HTTPError as exc:
        sample = Sample(started, time.monotonic() - started, account, f"transport {type(exc).__name__}")
        tally.transport_errors.append(f"{client.base_url} {account}: {type(exc).__name__}: {exc}")
        tally.add(sample)
        return sample
    latency = time.monotonic() - started
    kind = kind_of(response)
    retry = response.headers.get("retry-after")
    expires_in = response.json().get("expires_in") if kind == "ok" else None
    sample = Sample(started, latency, account, kind, int(retry) if retry else None, expires_in)
    tally.add(sample)
    return sample


async def call_loop(
    clients: Callable[[], list[httpx.AsyncClient]],
    accounts: list[str],
    tally: Tally,
    stop: asyncio.Event,
    *,
    callers: int,
    pause: float = 0.02,
) -> None:
    """``callers`` loops asking each account in turn from the replicas ``clients()`` returns now."""

    async def caller(number: int) -> None:
        k = number
        while not stop.is_set():
            live = clients()
            if not live:
                await asyncio.sleep(0.05)
                continue
            account = accounts[k % len(accounts)]
            client = live[(k // len(accounts)) % len(live)]
            k += 1
            await fetch(client, account, tally)
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(caller(n) for n in range(callers)))


@contextlib.asynccontextmanager
async def callers_running(
    clients: Callable[[], list[httpx.AsyncClient]],
    accounts: list[str],
    tally: Tally,
    *,
    callers: int,
    pause: float = 0.02,
) -> Any:
    stop = asyncio.Event()
    task = asyncio.create_task(call_loop(clients, accounts, tally, stop, callers=callers, pause=pause))
    try:
        yield stop
    finally:
        stop.set()
        await task


def async_clients(urls: list[str], key: str, *, connections: int = 50, timeout: float = 30.0) -> list[Any]:
    # uvicorn closes a connection idle for 5 s: a shorter client keepalive avoids reusing one
    # that the server is closing at that very moment (see tests/system/test_multiprocess.py).
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=2
    )
    return [
        httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            limits=limits,
            trust_env=False,
        )
        for url in urls
    ]


async def wait_for(
    predicate: Callable[[], Any], *, within: float, interval: float = 0.1, what: str = "condition"
) -> float:
    """Poll ``predicate`` (sync or async) until truthy; returns the seconds it took."""
    started = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"{what} did not hold within {within:.1f} s")
        await asyncio.sleep(interval)


# -- one deployment -----------------------------------------------------------------------------


@dataclass
class Broker:
    env: dict[str, str]
    fake: FakeIdpHandle
    replicas: ReplicaSet
    admin_key: str
    client_key: str
    encryption_key: str
    accounts: list[str] = field(default_factory=list)
    client_of: dict[str, str] = field(default_factory=dict)  # account id -> OAuth client_id

    def admin(self, index: int = 0) -> httpx.Client:
        return httpx.Client(
            base_url=self.replicas[index].url,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=30.0,
            trust_env=False,
        )

    def create_accounts(self, count: int, *, index: int = 0) -> list[str]:
        """Register a client and a first refresh token per account in the fake, then the accounts."""
        created: list[str] = []
        with self.admin(index) as admin:
            for n in range(count):
                tenant, client_id = str(uuid.uuid4()), str(uuid.uuid4())
                secret = f"fault-secret~{secrets.token_urlsafe(16)}"
                self.fake.control(
                    "clients", {"client_id": client_id, "client_secret": secret, "tenant": tenant}
                )
                refresh = self.fake.control("refresh_tokens", {"client_id": client_id})["refresh_token"]
                body = account_body(
                    self.fake.url,
                    tenant=tenant,
                    client_id=client_id,
                    client_secret=secret,
                    refresh_token=refresh,
                    v2=bool(n % 2),
                    name=f"fault-{uuid.uuid4().hex[:10]}",
                )
                response = admin.post("/accounts", json=body)
                assert response.status_code == 201, response.text
                account = response.json()["id"]
                created.append(account)
                self.client_of[account] = client_id
        self.accounts += created
        return created

    def refreshes(self, stats: dict[str, Any], accounts: list[str] | None = None) -> int:
        by_client = stats["refresh_by_client"]
        return sum(by_client.get(self.client_of[a], 0) for a in (accounts or self.accounts))


def fault_env(database_url: str, tmp_path: Path, **overrides: str) -> tuple[dict[str, str], dict[str, str]]:
    """The replicas' environment with the fault-suite timings, and the keys it carries."""
    keys = {
        "admin": f"fault-admin-{secrets.token_urlsafe(12)}",
        "client": f"fault-client-{secrets.token_urlsafe(12)}",
        "encryption": overrides.pop("encryption_key", None) or _generate_key(),
    }
    settings = {
        "BROKER_DATABASE_URL": database_url,
        "BROKER_ENCRYPTION_KEYS": keys["encryption"],
        "BROKER_ADMIN_KEYS": keys["admin"],
        "BROKER_CLIENT_KEYS": keys["client"],
        "BROKER_ALLOW_HTTP": "true",
        "BROKER_ALLOWED_HOSTS": "127.0.0.1:*",
        "BROKER_VAR_DIR": str(tmp_path / "var"),
        "BROKER_LOG_LEVEL": "WARNING",
        "BROKER_IDP_TIMEOUT_SECONDS": str(IDP_TIMEOUT),
        "BROKER_LOCK_WAIT_SECONDS": str(LOCK_WAIT),
        "BROKER_MAX_WAIT_SECONDS": str(MAX_WAIT),
        # The scenarios force refreshes with ?min_ttl=3600 again and again, on purpose.
        "BROKER_FORCED_REFRESH_INTERVAL_SECONDS": "0",
        "BROKER_BACKOFF_BASE_SECONDS": str(BACKOFF_BASE),
        "BROKER_BACKOFF_MAX_SECONDS": str(BACKOFF_MAX),
        "BROKER_SYNC_INTERVAL_SECONDS": str(SYNC_INTERVAL),
        **overrides,
    }
    return broker_env(settings), keys


def _generate_key() -> str:
    from service.kit.crypto import generate_key

    return generate_key()


@contextlib.contextmanager
def deployment(
    database_url: str,
    tmp_path: Path,
    *,
    replicas: int,
    accounts: int,
    fake_mode: dict[str, Any] | None = None,
    **overrides: str,
) -> Iterator[Broker]:
    env, keys = fault_env(database_url, tmp_path, **overrides)
    migrate(env)
    with (
        running_fake_idp(**(fake_mode or {})) as fake,
        ReplicaSet(env, replicas, tmp_path / "logs") as replica_set,
    ):
        broker = Broker(env, fake, replica_set, keys["admin"], keys["client"], keys["encryption"])
        if accounts:
            broker.create_accounts(accounts)
        yield broker


# -- a MariaDB server of the test's own ---------------------------------------------------------


def mariadb_binaries() -> tuple[str, str] | None:
    server = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not install or not Path(server).exists():
        return None
    return server, install


class PrivateMariaDB:
    """A throw-away MariaDB: own datadir, port and socket; ``stop()``/``start()`` at will."""

    def __init__(self, base: Path) -> None:
        found = mariadb_binaries()
        assert found is not None, "mariadbd / mariadb-install-db not found"
        self.server, self.install = found
        self.base = base
        self.datadir = base / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        base.mkdir(parents=True, exist_ok=True)
        user = ["--user=root"] if os.geteuid() == 0 else []
        done = subprocess.run(
            [self.install, "--no-defaults", f"--datadir={self.datadir}",
             "--auth-root-authentication-method=normal", "--skip-test-db", *user],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    @property
    def url(self) -> str:
        return f"mysql+aiomysql://root@127.0.0.1:{self.port}/broker"

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        log = (self.base / f"server.start-{self.starts}.log").open("wb")
        user = ["--user=root"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [self.server, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.base / 'mysqld.sock'}",
             f"--pid-file={self.base / 'mysqld.pid'}", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
             "--skip-name-resolve", *user],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.process.returncode}: {self.log_tail()}")
            if self._sql("CREATE DATABASE IF NOT EXISTS broker CHARACTER SET utf8mb4"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"mariadbd did not answer within {timeout} s: {self.log_tail()}")

    def _sql(self, statement: str) -> bool:
        client = shutil.which("mariadb") or shutil.which("mysql")
        assert client, "the mariadb command-line client is missing"
        done = subprocess.run(
            [client, "--no-defaults", "-uroot", "-h127.0.0.1", f"-P{self.port}", "-e", statement],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        return done.returncode == 0

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        logs = sorted(self.base.glob("server.start-*.log"))
        return logs[-1].read_text(errors="replace")[-2000:] if logs else ""

    def __enter__(self) -> PrivateMariaDB:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the report ---------------------------------------------------------------------------------


def report(
    scenario: str, tried: str, held: str, tally: Tally | None = None, **figures: Any
) -> dict[str, Any]:
    """Print one scenario's figures; append them to ``BROKER_FAULTS_REPORT`` when set."""
    row: dict[str, Any] = {"scenario": scenario, "tried": tried, "held": held, "scale": SCALE}
    if tally is not None:
        row |= {
            "requests": tally.requests(),
            "ok": tally.kinds()["ok"],
            "errors": dict(tally.errors()),
            "max_latency_s": round(tally.max_latency(), 3),
        }
    row |= figures
    lines = [f"\n== {scenario} (scale {SCALE:g}) ==", f"  tried: {tried}", f"  held:  {held}"]
    lines += [f"  {key}: {value}" for key, value in row.items() if key not in ("scenario", "tried", "held")]
    print("\n".join(lines))
    if REPORT_FILE:
        with open(REPORT_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(row, default=str) + "\n")
    return row


def latency_figures(tally: Tally, *phases: str) -> dict[str, float]:
    values = [s.latency for s in tally.all(*phases)]
    if not values:
        return {}
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(tally.percentile(0.99, *phases) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


# -- a lean HTTP/1.1 client for the load test ----------------------------------------------------


class RawConnection:
    """One caller's own keep-alive connection to one replica: GET only, Content-Length bodies.

    httpx spends far more CPU per request than the broker does: on a 2-core machine it, not the
    replicas, would set the figures. This reads the response with two stream calls instead.
    A GET on a reused connection that the server closed before answering is sent once more on a
    new connection (as any HTTP client does); ``reconnects`` counts those.
    """

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {key}\r\nHost: {host}:{port}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                await self._open()
            assert self.reader is not None
            assert self.writer is not None
            try:
                self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.auth + b"\r\n")
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if fresh or attempt:
                    raise
                self.reconnects += 1
                continue
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
            if b"connection: close" in head.lower():
                await self.close()
            return status, body
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


# -- refresh tokens lost ------------------------------------------------------------------------


async def lost_refresh_tokens(
    database_url: str, encryption_keys: str, broker: Broker, stats: dict[str, Any]
) -> list[str]:
    """Accounts whose stored refresh token (decrypted) is not one the fake IdP still accepts.

    ``stats`` must be the fake's stats taken after the last refresh (no call in flight).
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    from service.kit import sealing
    from service.kit.crypto import Keyring
    from service.kit.db import create_sessionmaker

    keyring = Keyring.from_strings([k for k in encryption_keys.split(",") if k])
    engine = create_async_engine(database_url)
    lost: list[str] = []
    try:
        async with create_sessionmaker(engine)() as session:
            for account in broker.accounts:
                row = await accounts_repo.get_account(session, account)
                assert row is not None, account
                stored = sealing.unseal(keyring, sealing.REFRESH_TOKEN, account, row[0].refresh_token)
                valid = stats["valid_refresh_tokens"].get(broker.client_of[account], [])
                if stored not in valid:
                    lost.append(account)
    finally:
        await engine.dispose()
    return lost
