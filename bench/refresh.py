"""A cold refresh wave over MariaDB: ``python -m bench.refresh [--quick]`` (``make bench-refresh``).

N accounts with a refresh token and no access token; the fake Azure AD (``tests/fake_idp.py``)
answers each token call in 300 ms; 200 concurrent callers each ask ``GET /accounts/<id>/token``
for a different account, spread over 1 or 3 ``token-broker serve`` replicas. Printed per run:
accounts/s, p50/p99 wait, 503s (and other errors), IdP calls (must equal N) and the replicas'
CPU seconds. The same waves run against the old design (commit ``--old``, a row lock held across
the Azure call) checked out into a temporary git worktree, in the same run. Also printed: the
memory one cached token takes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvloop

from bench.loadgen import Connection

ROOT = Path(__file__).resolve().parent.parent
MYSQL_SERVER = os.environ.get("BROKER_BENCH_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306")
OLD_DESIGN = "2a82c95"
ADMIN_KEY = "bench-admin-" + secrets.token_urlsafe(16)
CLIENT_KEY = "bench-client-" + secrets.token_urlsafe(16)
IDP_DELAY = 0.3


def _sql(statement: str) -> None:
    subprocess.run(["mysql", "-uroot", "-h127.0.0.1", "-e", statement], check=True, capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(root: Path, database: str, tmp: Path) -> dict[str, str]:
    from service.kit.crypto import generate_key

    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        PYTHONPATH=str(root),
        PYTHONUNBUFFERED="1",
        BROKER_DATABASE_URL=f"{MYSQL_SERVER}/{database}",
        BROKER_ENCRYPTION_KEYS=generate_key(),
        BROKER_ADMIN_KEYS=ADMIN_KEY,
        BROKER_CLIENT_KEYS=CLIENT_KEY,
        BROKER_ALLOW_HTTP="true",
        BROKER_ALLOWED_HOSTS="127.0.0.1:*",
        BROKER_VAR_DIR=str(tmp / "var"),
        BROKER_LOG_LEVEL="WARNING",
    )
    return env


@contextmanager
def replicas(root: Path, env: dict[str, str], count: int, logs: Path) -> Iterator[list[tuple[str, int]]]:
    """``count`` replicas of the code at ``root``: (url, pid) each."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(count):
            port = _free_port()
            with (logs / f"replica-{count}-{i}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "service.cli", "serve"],
                        cwd=root,
                        env={**env, "BROKER_HOST": "127.0.0.1", "BROKER_PORT": str(port)},
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url, proc in zip(urls, procs, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"replica exited: {(logs / f'replica-{count}-0.log').read_text()[-2000:]}"
                    )
                try:
                    if httpx.get(url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("replica not ready")
                time.sleep(0.1)
        yield [(u, p.pid) for u, p in zip(urls, procs, strict=True)]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def seed(url: str, fake: Any, count: int) -> list[str]:
    from tests.fake_idp import account_body

    client_id = fake.control("clients", {"client_id": "bench-app", "client_secret": "bench-secret"})[
        "registered"
    ]
    tokens = [fake.control("refresh_tokens", {"client_id": client_id})["refresh_token"] for _ in range(count)]
    ids: list[str] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    ) as admin:
        gate = asyncio.Semaphore(16)

        async def one(i: int, refresh_token: str) -> None:
            body = account_body(
                fake.url,
                tenant="bench-tenant",
                client_id=client_id,
                client_secret="bench-secret",
                refresh_token=refresh_token,
                name=f"bench-{i}",
            )
            async with gate:
                r = await admin.post("/accounts", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])

        await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
    return ids


async def wave(urls: list[str], ids: list[str], callers: int) -> dict[str, Any]:
    """``callers`` loops, each taking the next account (round-robin over the replicas), each on
    its own keep-alive connection to every replica (bench/loadgen.py)."""
    queue = list(enumerate(ids))
    waits: list[float] = []
    statuses: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}

    async def caller() -> None:
        connections = [Connection(u, headers) for u in urls]
        try:
            while queue:
                i, account_id = queue.pop()
                started = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(
                        connections[i % len(urls)].get(f"/accounts/{account_id}/token"), 90
                    )
                    statuses[str(status)] += 1
                except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    statuses[type(exc).__name__] += 1
                waits.append(time.perf_counter() - started)
        finally:
            for connection in connections:
                await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - started
    waits.sort()
    return {
        "elapsed_s": round(elapsed, 2),
        "accounts_per_s": round(len(ids) / elapsed, 1),
        "p50_wait_s": round(statistics.median(waits), 2),
        "p99_wait_s": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 2),
        "503s": statuses.get("503", 0),
        "statuses": dict(statuses),
    }


def clear_tokens(database: str) -> None:
    # The database name is made here (bench_refresh_<design>_<hex>), never taken from input.
    _sql(f"UPDATE {database}.broker_account_state SET access_token=NULL, token_expires_at=NULL")  # noqa: S608


def run_design(
    name: str,
    root: Path,
    accounts: int,
    callers: int,
    counts: list[int],
    tmp: Path,
    extra_env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    from tests.fake_idp import running_fake_idp

    database = f"bench_refresh_{name.replace('/', '_')}_{secrets.token_hex(3)}"
    _sql(f"CREATE DATABASE {database} CHARACTER SET utf8mb4")
    env = {**_env(root, database, tmp), **(extra_env or {})}
    logs = tmp / name
    logs.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"], cwd=root, env=env, check=True, capture_output=True
    )
    results = []
    try:
        with running_fake_idp(refresh_token_mode="azure") as fake:
            with replicas(root, env, 1, logs) as seeding:
                ids = asyncio.run(seed(seeding[0][0], fake, accounts))
            fake.control("mode", {"mode": "slow", "delay": IDP_DELAY})
            for count in counts:
                clear_tokens(database)
                with replicas(root, env, count, logs) as running:
                    fake.control("reset")
                    before = sum(cpu_seconds(pid) for _, pid in running)
                    figures = uvloop.run(wave([u for u, _ in running], ids, callers))
                    figures["broker_cpu_s"] = round(sum(cpu_seconds(pid) for _, pid in running) - before, 1)
                    figures["idp_calls"] = fake.stats()["token_calls"]
                figures.update(design=name, replicas=count, accounts=accounts)
                print(line(figures), flush=True)
                results.append(figures)
    finally:
        _sql(f"DROP DATABASE IF EXISTS {database}")
    return results


def line(f: dict[str, Any]) -> str:
    return (
        f"{f['design']:>10} x{f['replicas']}: {f['accounts']} accounts in {f['elapsed_s']} s = "
        f"{f['accounts_per_s']}/s, wait p50 {f['p50_wait_s']} s p99 {f['p99_wait_s']} s, "
        f"503s {f['503s']}, IdP calls {f['idp_calls']} (N={f['accounts']}), "
        f"broker CPU {f['broker_cpu_s']} s, "
        f"statuses {f['statuses']}"
    )


def memory_per_token(count: int = 10_000, token_length: int = 1_500) -> float:
    """Bytes one cached token costs: a TokenCache of ``count`` entries with realistic tokens."""
    from service.accounts.credentials import AccountSecrets
    from service.kit.crypto import Keyring, generate_key
    from service.metrics import Metrics
    from service.tokens.cache import TokenCache

    cache = TokenCache(
        margin=300,
        rng=lambda: 0.5,
        secrets=AccountSecrets(Keyring.from_strings([generate_key()])),
        metrics=Metrics(),
    )
    tokens = ["eyJ" + secrets.token_urlsafe(token_length)[: token_length - 3] for _ in range(count)]
    ids = [f"{i:08d}-0000-4000-8000-{i:012d}" for i in range(count)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    now = time.time()
    for i in range(count):
        entry = cache.entry(ids[i], tokens[i], now + 3600, 1, "https://org.crm.dynamics.com", now)
        entry.response(now)  # the encoded body a hit builds once per second
        cache.store(entry)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / count


@contextmanager
def old_tree(ref: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="broker-old-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 accounts, 1 and 3 replicas")
    parser.add_argument("--accounts", type=int, default=None)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--old", default=OLD_DESIGN, help="the commit of the old design ('' to skip)")
    parser.add_argument("--replicas", default="1,3")
    parser.add_argument(
        "--slots", type=int, default=256, help="also run with this many refresh slots per replica (0: skip)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "refresh.json"))
    parser.add_argument("--logs", default="", help="keep the replicas' logs in this directory")
    opts = parser.parse_args(argv)
    accounts = opts.accounts or (300 if opts.quick else 2000)
    counts = [int(c) for c in opts.replicas.split(",")]
    print(
        f"cold wave: {accounts} accounts, {opts.callers} callers, IdP answers in {IDP_DELAY * 1000:.0f} ms, "
        f"replicas {counts}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    per_token = memory_per_token()
    print(f"memory per cached token (1,500-character access token): {per_token:.0f} bytes", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-refresh-") as tmp:
        logs = Path(opts.logs) if opts.logs else Path(tmp)
        results += run_design("claims", ROOT, accounts, opts.callers, counts, logs)
        if opts.slots:
            # The same design with more refresh slots: when the figures do not move, the slot
            # count is not what limits them (the CPU is).
            slots = {"BROKER_MAX_CONCURRENT_REFRESHES": str(opts.slots)}
            results += run_design(f"claims/{opts.slots}", ROOT, accounts, opts.callers, counts, logs, slots)
        if opts.old:
            with old_tree(opts.old) as old:
                # The old design's host patterns carry no port ("127.0.0.1" matched any port).
                hosts = {"BROKER_ALLOWED_HOSTS": "127.0.0.1"}
                results += run_design("rowlock", old, accounts, opts.callers, counts, logs, hosts)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"memory_per_token_bytes": round(per_token), "waves": results}, indent=2) + "\n"
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
