"""Two ``token-broker serve`` replicas on MariaDB in front of the fake Dataverse (its own process).

The fake checks tokens, caps concurrency, enforces a request window with 429 + Retry-After and
extends the penalty when called during it, and counts what it saw; the tests assert on its counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.kit.crypto import generate_key
from tests.conftest import ADMIN_KEY, CLIENT_KEY, admin, client
from tests.proxy.fake_dataverse import FakeDataverse, running_fake_dataverse
from tests.replicas import ReplicaSet, broker_env, migrate

pytestmark = [pytest.mark.multiprocess, pytest.mark.mysql]

PER_REPLICA = 4  # BROKER_PROXY_MAX_CONCURRENT: two replicas, at most 8 upstream
CAP = 2 * PER_REPLICA
# A pause reaches the other replica within about a second (its poll); requests it sends meanwhile
# are expected, later ones are not. Plus scheduling slack on a shared 2-core machine.
GRACE_SECONDS = 1.5


@contextlib.contextmanager
def cluster(mysql_url: str, tmp_path: Path, **fake: Any) -> Iterator[tuple[ReplicaSet, FakeDataverse, str]]:
    """Two replicas, the fake, and one client_credentials account on it."""
    settings = {
        "BROKER_DATABASE_URL": mysql_url,
        "BROKER_ENCRYPTION_KEYS": generate_key(),
        "BROKER_ADMIN_KEYS": ADMIN_KEY,
        "BROKER_CLIENT_KEYS": CLIENT_KEY,
        "BROKER_ALLOWED_HOSTS": "127.0.0.1:*",
        "BROKER_ALLOW_HTTP": "true",
        "BROKER_VAR_DIR": str(tmp_path / "var"),
        "BROKER_PROXY_MAX_CONCURRENT": str(PER_REPLICA),
        "BROKER_PROXY_MAX_WAIT_SECONDS": "10",
        "BROKER_LOG_LEVEL": "INFO",
    }
    env = broker_env(settings)
    migrate(env)
    with (
        running_fake_dataverse(watch=[ADMIN_KEY, CLIENT_KEY], **fake) as dv,
        ReplicaSet(env, 2, tmp_path / "logs") as replicas,
    ):
        made = httpx.post(f"{replicas[0].url}/accounts", json=dv.account_body(), headers=admin(), timeout=10)
        assert made.status_code == 201, made.text
        yield replicas, dv, made.json()["id"]
        output = replicas.output()
        assert ADMIN_KEY not in output
        assert CLIENT_KEY not in output


async def call_until_done(
    http: httpx.AsyncClient, url: str, outcomes: Counter[str], attempts: int = 30
) -> int:
    """One caller: GET until 200, waiting out each 429's Retry-After (what a well-behaved engine does)."""
    for _ in range(attempts):
        r = await http.get(url, headers=client())
        if r.status_code != 429:
            outcomes[str(r.status_code)] += 1
            return r.status_code
        local = r.headers.get("content-type") == "application/problem+json"
        outcomes["429 broker" if local else "429 upstream"] += 1
        await asyncio.sleep(float(r.headers["retry-after"]))
    return 429


async def test_a_hundred_callers_through_two_replicas_stay_under_the_cap_and_respect_pauses(
    mysql_url: str, tmp_path: Path
) -> None:
    """100 concurrent callers: never more than the cap upstream, nothing sent during a pause beyond
    the propagation grace, every caller finishes with 200, and no caller key reaches upstream."""
    with cluster(
        mysql_url, tmp_path, cap=CAP, window_limit=60, window_seconds=2.0, extend_seconds=0.25, delay=0.03
    ) as (replicas, dv, account):
        outcomes: Counter[str] = Counter()
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as http:
            urls = [f"{replicas[i % 2].url}/accounts/{account}/api/contacts?$top=1" for i in range(100)]
            started = time.monotonic()
            results = await asyncio.gather(*(call_until_done(http, url, outcomes) for url in urls))
            elapsed = time.monotonic() - started
        stats = dv.stats()
        assert results == [200] * 100, (outcomes, stats)
        assert stats["max_in_flight"] <= CAP, stats
        assert stats["over_cap"] == 0, stats
        assert stats["penalties"] >= 1, stats  # the window was hit: the pause logic was exercised
        late = [offset for offset in stats["during_penalty"] if offset > GRACE_SECONDS]
        assert not late, (late, stats["during_penalty"])
        assert stats["watch_hits"] == 0
        assert stats["token_calls"] <= 2  # one per replica at most (the second finds it stored)
        assert elapsed < 60


async def test_a_pause_seen_by_one_replica_stops_the_other_within_a_second(
    mysql_url: str, tmp_path: Path
) -> None:
    """Replica 0 gets 429 Retry-After 30; a second later replica 1 answers 429 itself and sends nothing."""
    with cluster(mysql_url, tmp_path, window_limit=1, window_seconds=30.0) as (replicas, dv, account):
        path = f"/accounts/{account}/api/contacts"
        with httpx.Client(timeout=20, trust_env=False) as http:
            assert http.get(replicas[0].url + path, headers=client()).status_code == 200
            upstream = http.get(replicas[0].url + path, headers=client())
            assert upstream.status_code == 429
            assert upstream.headers["content-type"] == "application/json"  # Dataverse's own answer
            sent = dv.stats()["requests"]
            await asyncio.sleep(GRACE_SECONDS)  # the contract: about a second to reach the other replica
            other = http.get(replicas[1].url + path, headers=client())
            assert other.status_code == 429, other.text
            assert other.headers["content-type"] == "application/problem+json"
            assert other.json()["reason"] == "upstream_pause"
            assert 20 <= int(other.headers["retry-after"]) <= 30
            assert dv.stats()["requests"] == sent
            metrics = http.get(replicas[1].url + "/metrics").text
            assert "broker_proxy_paused_accounts 1.0" in metrics


async def test_a_revoked_token_costs_one_refresh_and_no_failed_request(
    mysql_url: str, tmp_path: Path
) -> None:
    """Both replicas hold a token upstream then revokes: 40 concurrent callers all get 200, one refresh."""
    with cluster(mysql_url, tmp_path, delay=0.02) as (replicas, dv, account):
        path = f"/accounts/{account}/api/contacts"
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            for replica in replicas.replicas:
                assert (await http.get(replica.url + path, headers=client())).status_code == 200
            before = dv.stats()["token_calls"]
            dv.control("revoke")
            results = await asyncio.gather(
                *(http.get(replicas[i % 2].url + path, headers=client()) for i in range(40))
            )
        assert [r.status_code for r in results] == [200] * 40, [
            r.text for r in results if r.status_code != 200
        ]
        stats = dv.stats()
        assert stats["token_calls"] - before == 1, stats
        assert stats["unauthorized"] >= 2  # both replicas saw their token rejected
        assert stats["watch_hits"] == 0


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_50_mb_response_is_streamed_within_a_memory_bound(mysql_url: str, tmp_path: Path) -> None:
    """50 MB from upstream reach the caller whole while the broker's RSS grows by less than 16 MB."""
    size = 50_000_000
    with cluster(mysql_url, tmp_path) as (replicas, _dv, account):
        process = replicas[0].process
        assert process is not None
        url = f"{replicas[0].url}/accounts/{account}/api/big?bytes={size}"
        with httpx.Client(timeout=60, trust_env=False) as http:
            assert (
                http.get(f"{replicas[0].url}/accounts/{account}/api/contacts", headers=client()).status_code
                == 200
            )
            baseline = _rss_bytes(process.pid)
            peak = baseline
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, _rss_bytes(process.pid))
                    done.wait(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            received = 0
            try:
                with http.stream("GET", url, headers=client()) as r:
                    assert r.status_code == 200
                    for chunk in r.iter_raw():
                        received += len(chunk)
            finally:
                done.set()
                sampler.join()
        assert received == size
        assert peak - baseline < 16 * 1024 * 1024, f"RSS grew by {(peak - baseline) / 1e6:.1f} MB"
