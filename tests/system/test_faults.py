"""Faults and load against real processes: ``token-broker serve`` replicas on MariaDB and the fake
Azure AD (``tests/fake_idp.py``) in its own process, while concurrent callers keep asking.

``BROKER_FAULTS_SCALE`` (default 1, the CI version: each scenario well under 30 s) stretches every
phase; ``python -m bench.reliability`` runs them longer and writes the Reliability table. Each
scenario prints what held: requests, errors by kind, IdP calls, refresh tokens lost. Timings the
scenarios rely on are in ``tests/faults.py`` (IdP timeout 4 s, lock wait 6 s, caller bound 3 s,
backoff 0.5..2 s).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from service.kit.crypto import Keyring, generate_key
from service.models import Account, AccountState, Event
from tests.conftest import require
from tests.fake_idp import account_body, running_fake_idp
from tests.faults import (
    BACKOFF_MAX,
    IDP_TIMEOUT,
    LATENCY_SLACK,
    LOCK_WAIT,
    MAX_WAIT,
    SCALE,
    Broker,
    PrivateMariaDB,
    RawConnection,
    Tally,
    async_clients,
    callers_running,
    deployment,
    fault_env,
    fetch,
    latency_figures,
    lost_refresh_tokens,
    mariadb_binaries,
    report,
    scaled,
    wait_for,
)
from tests.replicas import REPO_ROOT, ReplicaSet, migrate

pytestmark = [pytest.mark.multiprocess, pytest.mark.mysql]

BOUND = MAX_WAIT + LATENCY_SLACK  # no caller waits longer than this


def _statuses(tally: Tally, *phases: str) -> str:
    return ", ".join(f"{k}: {n}" for k, n in tally.kinds(*phases).most_common())


# -- 1. the IdP down longer than a token's life --------------------------------------------------


async def test_idp_down_longer_than_token_life(mysql_url: str, tmp_path: Path) -> None:
    """IdP down: valid tokens until they expire, then 503 + Retry-After; bounded waits; quick recovery."""
    ttl, min_ttl, margin = 12, 4, 6  # a token is usable for ttl - min_ttl = 8 s after it was issued
    usable = ttl - min_ttl
    with deployment(
        mysql_url, tmp_path, replicas=3, accounts=3,
        fake_mode={"token_ttl": ttl, "refresh_token_mode": "azure"},
        BROKER_MIN_TOKEN_TTL_SECONDS=str(min_ttl), BROKER_REFRESH_MARGIN_SECONDS=str(margin),
    ) as broker:  # fmt: skip
        clients = async_clients(broker.replicas.urls, broker.client_key)
        tally = Tally()
        try:
            # Fresh tokens for every account (min_ttl forces a refresh), loaded on every replica.
            for account in broker.accounts:
                sample = await fetch(clients[0], account, tally, params={"min_ttl": ttl - 1})
                assert sample.kind == "ok", sample
            issued = time.monotonic()
            for client in clients:
                for account in broker.accounts:
                    assert (await fetch(client, account, tally)).kind == "ok"
            async with callers_running(lambda: clients, broker.accounts, tally, callers=20):
                tally.phase = "down"
                broker.fake.control("mode", {"mode": "down"})
                down_at = time.monotonic()
                await asyncio.sleep(max(usable + 3, scaled(11)) - (down_at - issued))
                # A hanging IdP (slower than the broker's IdP timeout): callers still give up in time.
                tally.phase = "hanging"
                broker.fake.control("mode", {"mode": "slow", "delay": 30})
                await asyncio.sleep(max(MAX_WAIT + 1, scaled(4)))
                tally.phase = "down again"  # the hung calls time out: none is in flight any more
                broker.fake.control("mode", {"mode": "down"})
                await asyncio.sleep(IDP_TIMEOUT + 0.5)
                tally.phase = "back"
                back_at = time.monotonic()
                broker.fake.control("mode", {"mode": "normal"})
                await asyncio.sleep(max(BACKOFF_MAX + 3, scaled(5)))
            stats = broker.fake.stats()
        finally:
            for client in clients:
                await client.aclose()

    lost = await lost_refresh_tokens(mysql_url, broker.env["BROKER_ENCRYPTION_KEYS"], broker, stats)
    down = tally.all("down")
    early = [s for s in down if s.at + s.latency < issued + usable - 2]
    late = [s for s in tally.all("down", "hanging", "down again") if s.at > issued + usable + 1]
    unavailable = [s for s in tally.all() if s.kind.startswith("503")]
    recovered: dict[str, float] = {}
    for s in sorted(tally.all("back"), key=lambda s: s.at):
        if s.kind == "ok" and s.at > back_at:
            recovered.setdefault(s.account, s.at + s.latency - back_at)
    report(
        "IdP down longer than a token's life",
        f"IdP answering 503 for {max(usable + 3, scaled(11)):.0f} s, then hanging (30 s per call) for "
        f"{max(MAX_WAIT + 1, scaled(4)):.0f} s, then back; tokens usable {usable} s; "
        "20 callers over 3 replicas",
        "cached tokens served until they ran out, then 503 with Retry-After; waits bounded; recovery",
        tally,
        by_phase={p: dict(tally.kinds(p)) for p in tally.samples},
        served_while_down=sum(s.kind == "ok" for s in down),
        max_wait_s={p: round(tally.max_latency(p), 2) for p in tally.samples},
        bound_s=BOUND,
        recovery_s={a[:8]: round(t, 2) for a, t in recovered.items()},
        idp_calls=stats["token_calls"],
        idp_faults=stats["faults"],
        refresh_tokens_lost=len(lost),
    )
    assert tally.transport_errors == [], tally.transport_errors[:5]
    assert lost == [], f"refresh tokens lost: {lost}"
    assert early
    assert all(s.kind == "ok" for s in early), Counter(s.kind for s in early)
    assert late
    assert all(s.kind.startswith("503 upstream_unavailable") for s in late), _statuses(tally)
    assert all(s.retry_after is not None and s.retry_after >= 1 for s in unavailable)
    assert all(
        s.expires_in is not None and s.expires_in >= min_ttl - 1 for s in tally.all() if s.kind == "ok"
    )
    assert any(s.kind.endswith("/timeout") for s in tally.all("hanging")), _statuses(tally, "hanging")
    assert tally.max_latency() <= BOUND, {p: tally.max_latency(p) for p in tally.samples}
    assert set(recovered) == set(broker.accounts), f"not recovered: {set(broker.accounts) - set(recovered)}"
    assert max(recovered.values()) <= BACKOFF_MAX + 3, recovered


# -- 2. throttling -------------------------------------------------------------------------------


async def test_throttling_is_honoured_without_retry_storm(mysql_url: str, tmp_path: Path) -> None:
    """IdP throttling (429 + Retry-After N): at most one call per account per N s across replicas."""
    retry_after = 3
    window = max(12.0, scaled(12))
    with deployment(mysql_url, tmp_path, replicas=3, accounts=3, fake_mode={"token_ttl": 3599}) as broker:
        clients = async_clients(broker.replicas.urls, broker.client_key)
        tally = Tally(phase="throttled")
        try:
            broker.fake.control("mode", {"mode": "throttle", "retry_after": retry_after})
            broker.fake.control("reset")
            async with callers_running(lambda: clients, broker.accounts, tally, callers=30):
                started = time.monotonic()
                await asyncio.sleep(window)
                throttled = broker.fake.stats()
                elapsed = time.monotonic() - started
                tally.phase = "back"
                back_at = time.monotonic()
                broker.fake.control("mode", {"mode": "normal"})
                await asyncio.sleep(retry_after + 3)
            final = broker.fake.stats()
        finally:
            for client in clients:
                await client.aclose()

    lost = await lost_refresh_tokens(mysql_url, broker.env["BROKER_ENCRYPTION_KEYS"], broker, final)
    per_account = {a: throttled["by_client"].get(broker.client_of[a], 0) for a in broker.accounts}
    allowed = int(elapsed / retry_after) + 2  # the first call, one per N s, one for the edges
    during = tally.all("throttled")
    retry_values = Counter(s.retry_after for s in during if s.kind.startswith("503"))
    recovered = {s.account for s in tally.all("back") if s.kind == "ok" and s.at > back_at}
    report(
        "IdP throttling",
        f"IdP answering 429 Retry-After {retry_after} s for {elapsed:.0f} s; 30 callers over 3 replicas, "
        "3 accounts with no token yet",
        f"at most one IdP call per account per {retry_after} s across replicas; callers told Retry-After",
        tally,
        idp_calls_per_account=sorted(per_account.values()),
        allowed_per_account=allowed,
        retry_after_seen=dict(sorted(retry_values.items(), key=lambda kv: kv[0] or 0)),
        latency=latency_figures(tally, "throttled"),
        refresh_tokens_lost=len(lost),
    )
    assert tally.transport_errors == []
    assert lost == [], f"refresh tokens lost: {lost}"
    assert all(1 <= n <= allowed for n in per_account.values()), per_account
    assert all(s.kind == "503 upstream_unavailable/throttled" or s.kind.startswith("503 upstream_unavailable")
               for s in during), _statuses(tally, "throttled")  # fmt: skip
    assert all(s.retry_after is not None and 1 <= s.retry_after <= retry_after + 1 for s in during)
    assert max(retry_values) >= retry_after, retry_values  # the IdP's own figure is passed on
    assert tally.max_latency() <= BOUND
    assert recovered == set(broker.accounts), "not every account recovered after the throttling"


# -- 3. SIGKILL in the middle of a refresh -------------------------------------------------------


async def _kill_mid_refresh(
    broker: Broker, victim: int, account: str, *, release: str, live: list[int]
) -> None:
    """Start a forced refresh of ``account`` on replica ``victim``, hold it at the IdP, SIGKILL it.

    ``release`` is the mode the fake's held call continues in: ``normal`` (the IdP then answers,
    rotating the refresh token, to a dead replica) or ``down`` (the IdP refuses, nothing rotated).
    """
    broker.fake.control("mode", {"mode": "hold"})
    async with httpx.AsyncClient(
        base_url=broker.replicas[victim].url,
        headers={"Authorization": f"Bearer {broker.client_key}"},
        timeout=30.0,
        trust_env=False,
    ) as doomed:
        request = asyncio.create_task(doomed.get(f"/accounts/{account}/token", params={"min_ttl": 3600}))
        await wait_for(
            lambda: broker.fake.stats()["held"] == 1, within=10, what="the refresh reaching the IdP"
        )
        live.remove(victim)
        await asyncio.sleep(0.3)  # callers' requests already sent to the victim are answered
        broker.replicas.kill(victim)
        with pytest.raises(httpx.TransportError):
            await request
    broker.fake.control("mode", {"mode": release})  # releases the held call
    await wait_for(lambda: broker.fake.stats()["in_flight"] == 0, within=10, what="the held call ending")
    if release != "normal":
        broker.fake.control("mode", {"mode": "normal"})


# What "before" and "after the IdP answered" mean here. The fake redeems (and, strict, consumes) a
# refresh token when it answers, not when the request arrives; a held call is answered on release.
# So: hold -> the replica's refresh is at the IdP with its row lock taken -> SIGKILL the replica ->
# release with mode "normal": the IdP answers, rotating the token, to a dead replica: from the
# token store's point of view this is exactly "the IdP answered but the replica died before the
# commit" (the new refresh token exists only in a response nobody read). Release with mode "down":
# the IdP refuses, nothing is redeemed: "died before the IdP answered". The narrower window between
# the replica reading the response and its COMMIT cannot be hit deterministically from outside; it
# leaves the database in the same state as the first case (nothing committed, old token redeemed).
async def test_sigkill_mid_refresh(mysql_url: str, tmp_path: Path) -> None:
    """SIGKILL mid-refresh: no account lost or locked with Azure semantics; strict loss is a single 409."""
    rounds = max(3, round(3 * SCALE))
    with deployment(mysql_url, tmp_path, replicas=3, accounts=5, fake_mode={"token_ttl": 3599}) as broker:
        target, before, after, *others = broker.accounts
        clients = async_clients(broker.replicas.urls, broker.client_key)
        live = [0, 1, 2]
        tally = Tally(phase="others")
        checks = Tally(phase="after kill")
        refresh_waits: list[float] = []
        try:
            for client in clients:  # every replica has every token cached
                for account in broker.accounts:
                    assert (await fetch(client, account, tally)).kind == "ok"
            async with callers_running(lambda: [clients[i] for i in live], others, tally, callers=10):
                # a) Azure semantics: the old refresh token stays valid after a rotation.
                broker.fake.control("mode", {"refresh_token_mode": "azure"})
                for r in range(rounds):
                    victim, survivor = r % 3, (r + 1) % 3
                    release = "normal" if r % 2 == 0 else "down"  # after / before the IdP answered
                    await _kill_mid_refresh(broker, victim, target, release=release, live=live)
                    sample = await fetch(clients[survivor], target, checks, params={"min_ttl": 3600})
                    refresh_waits.append(sample.latency)
                    assert sample.kind == "ok", sample
                    await asyncio.to_thread(broker.replicas.start, victim)
                    live.append(victim)
                # b) strict single-use tokens, killed before the IdP answered (it then refuses).
                broker.fake.control("mode", {"refresh_token_mode": "strict"})
                await _kill_mid_refresh(broker, 0, before, release="down", live=live)
                sample = await fetch(clients[1], before, checks, params={"min_ttl": 3600})
                refresh_waits.append(sample.latency)
                assert sample.kind == "ok", sample
                await asyncio.to_thread(broker.replicas.start, 0)
                live.append(0)
                # c) strict, killed after the IdP answered: the rotated token died with the replica.
                await _kill_mid_refresh(broker, 1, after, release="normal", live=live)
                calls_before = broker.refreshes(broker.fake.stats(), [after])
                checks.phase = "lost token"
                async with callers_running(
                    lambda: [clients[i] for i in live], [after], checks, callers=5, pause=0.05
                ):
                    await asyncio.sleep(max(3.0, scaled(3)))
                # forced refreshes too: each must be refused without asking the IdP again
                for i in live:
                    for _ in range(5):
                        await fetch(clients[i], after, checks, params={"min_ttl": 3600})
                calls_after = broker.refreshes(broker.fake.stats(), [after])
                await asyncio.to_thread(broker.replicas.start, 1)
                live.append(1)
                restarted = [await fetch(clients[1], a, checks) for a in (target, before)]
            stats = broker.fake.stats()
        finally:
            for client in clients:
                await client.aclose()

    outcomes = checks.kinds("lost token")
    lost = await lost_refresh_tokens(mysql_url, broker.env["BROKER_ENCRYPTION_KEYS"], broker, stats)
    report(
        "SIGKILL mid-refresh",
        f"{rounds} times a replica SIGKILLed while its refresh was held at the IdP (Azure semantics, "
        "alternately before and after the IdP answered), then strict single-use tokens once before and "
        "once after; 10 callers on other accounts",
        "no account lost or left locked with Azure semantics; strict loss reported as 409 "
        "needs_authorization after a single IdP call",
        tally,
        refresh_after_kill_s=[round(w, 2) for w in refresh_waits],
        lock_wait_bound_s=LOCK_WAIT,
        lost_token_outcomes=dict(outcomes),
        idp_calls_for_lost_account=calls_after - calls_before,
        refresh_tokens_lost_azure=len([a for a in lost if a != after]),
        refresh_tokens_lost=len(lost),
        idp_calls=stats["token_calls"],
        reuse_refused=stats["reuse"],
    )
    assert tally.errors() == Counter(), tally.errors()
    assert all(w <= LOCK_WAIT + 2 for w in refresh_waits), refresh_waits
    # Only the account killed after the IdP answered with strict single-use tokens lost its token.
    assert lost == [after], f"refresh tokens lost: {lost} (expected only {after})"
    assert set(outcomes) <= {"ok", "409 needs_authorization"}, outcomes
    assert all(s.kind == "409 needs_authorization" for s in checks.all("lost token") if s.expires_in is None)
    assert calls_after - calls_before == 1, f"{calls_after - calls_before} IdP calls for the lost account"
    assert all(s.kind == "ok" for s in restarted), restarted


# -- 4. the database restarts -------------------------------------------------------------------


async def test_database_restart(tmp_path: Path) -> None:
    """Database down: cached tokens served, others 503, no IdP call, writes 503; recovers without restart."""
    require(mariadb_binaries() is not None, "mariadbd / mariadb-install-db not installed")
    outage = max(8.0, scaled(8))
    with PrivateMariaDB(tmp_path / "mariadb") as db, deployment(
        db.url, tmp_path, replicas=2, accounts=4, fake_mode={"token_ttl": 3599}
    ) as broker:  # fmt: skip
        warm, cold = broker.accounts[:2], broker.accounts[2:]
        clients = async_clients(broker.replicas.urls, broker.client_key)
        tally, probes = Tally(phase="up"), Tally(phase="db down")
        writes: list[int] = []
        valid_body = _account_body(broker)

        def write(index: int) -> int:
            with broker.admin(index) as admin:
                body = {**valid_body, "name": f"during-{time.monotonic_ns()}"}
                return admin.post("/accounts", json=body).status_code

        try:
            for client in clients:
                for account in warm:
                    assert (await fetch(client, account, tally)).kind == "ok"
            async with callers_running(lambda: clients, warm, tally, callers=10):
                await asyncio.sleep(1)
                await asyncio.to_thread(db.stop)
                tally.phase = "db down"
                before = broker.fake.stats()["token_calls"]
                until = time.monotonic() + outage
                while time.monotonic() < until:
                    for client in clients:
                        for account in cold:
                            await fetch(client, account, probes)
                        await fetch(client, warm[0], probes, params={"min_ttl": 3600})  # must refresh
                    writes += [await asyncio.to_thread(write, i) for i in range(len(clients))]
                    await asyncio.sleep(0.5)
                during = broker.fake.stats()["token_calls"] - before
                await asyncio.to_thread(db.start)
                tally.phase = probes.phase = "db back"
                restarted = time.monotonic()

                async def all_back() -> bool:
                    results = [await fetch(c, a, probes) for c in clients for a in cold]
                    return all(s.kind == "ok" for s in results)

                recovery = await wait_for(
                    all_back, within=30, interval=0.5, what="recovery after the restart"
                )
                with broker.admin(0) as admin:
                    created = admin.post("/accounts", json={**valid_body, "name": "after-restart"})
                await asyncio.sleep(1)
            stats = broker.fake.stats()
            lost = await lost_refresh_tokens(db.url, broker.env["BROKER_ENCRYPTION_KEYS"], broker, stats)
        finally:
            for client in clients:
                await client.aclose()

    report(
        "Database restart",
        f"a private MariaDB stopped (SIGTERM) for {outage:.0f} s under 10 callers over 2 replicas, "
        "then started again",
        "cached tokens served; cold accounts and forced refreshes 503 storage_unavailable; writes 503; "
        "no IdP call while down; recovered without restarting the replicas",
        tally,
        probes_while_down=dict(probes.kinds("db down")),
        writes_while_down=dict(Counter(writes)),
        idp_calls_while_down=during,
        recovery_s=round(recovery, 2),
        recovered_after_s=round(time.monotonic() - restarted, 1),
        max_probe_wait_s=round(probes.max_latency(), 2),
        refresh_tokens_lost=len(lost),
    )
    assert lost == [], f"refresh tokens lost: {lost}"
    assert tally.errors() == Counter(), tally.errors()
    assert tally.kinds("db down")["ok"] > 0
    down = probes.all("db down")
    assert down
    assert all(s.kind.startswith("503 storage_unavailable") for s in down), probes.kinds("db down")
    assert all(s.retry_after is not None for s in down)
    assert set(writes) == {503}, Counter(writes)
    assert during == 0, f"{during} IdP calls while the database was down"
    assert probes.max_latency() <= BOUND, probes.max_latency()
    assert created.status_code == 201, created.text


def _account_body(broker: Broker) -> dict[str, Any]:
    tenant, client_id = "3f6e2a4b-0d1c-4e8f-9a7b-5c6d7e8f9a0b", "7d6c5b4a-3e2f-4a1b-8c9d-0e1f2a3b4c5d"
    broker.fake.control("clients", {"client_id": client_id, "client_secret": "s~1", "tenant": tenant})
    refresh = broker.fake.control("refresh_tokens", {"client_id": client_id})["refresh_token"]
    return account_body(
        broker.fake.url, tenant=tenant, client_id=client_id, client_secret="s~1", refresh_token=refresh
    )


# -- 5. encryption key rotation under load ------------------------------------------------------


async def test_key_rotation_under_load(mysql_url: str, tmp_path: Path) -> None:
    """rotate-keys while callers hammer replicas running "new,old": no failed request, all under new."""
    old, new = generate_key(), generate_key()
    ttl, min_ttl, margin = 12, 4, 6  # refreshes (writes under the new key) keep happening
    env, keys = fault_env(
        mysql_url, tmp_path, encryption_key=old,
        BROKER_MIN_TOKEN_TTL_SECONDS=str(min_ttl), BROKER_REFRESH_MARGIN_SECONDS=str(margin),
    )  # fmt: skip
    migrate(env)
    with running_fake_idp(token_ttl=ttl) as fake:
        with ReplicaSet(env, 1, tmp_path / "logs-old") as first:
            broker = Broker(env, fake, first, keys["admin"], keys["client"], old)
            broker.create_accounts(6)
            clients = async_clients(first.urls, broker.client_key)
            for account in broker.accounts:  # access tokens stored under the old key too
                assert (await fetch(clients[0], account, Tally())).kind == "ok"
            await clients[0].aclose()
        env = {**env, "BROKER_ENCRYPTION_KEYS": f"{new},{old}"}
        with ReplicaSet(env, 3, tmp_path / "logs-new") as replicas:
            clients = async_clients(replicas.urls, broker.client_key)
            tally = Tally(phase="before")
            try:
                async with callers_running(lambda: clients, broker.accounts, tally, callers=30):
                    await asyncio.sleep(max(3.0, scaled(3)))
                    tally.phase = "rotating"
                    started = time.monotonic()
                    process = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "service.cli", "rotate-keys", cwd=REPO_ROOT, env=env,
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                    )  # fmt: skip
                    output, _ = await process.communicate()
                    took = time.monotonic() - started
                    tally.phase = "after"
                    await asyncio.sleep(max(3.0, scaled(3)))
                stats = fake.stats()
            finally:
                for client in clients:
                    await client.aclose()
            replicas.stop_all()  # a refresh still in flight commits before its replica exits
        stats = fake.stats()

    assert process.returncode == 0, output.decode(errors="replace")[-2000:]
    lost = await lost_refresh_tokens(mysql_url, f"{new},{old}", broker, stats)
    new_id = Keyring.from_strings([new]).primary_key_id
    engine = create_async_engine(mysql_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(Account.client_secret, Account.refresh_token, AccountState.access_token).outerjoin(
                        AccountState, AccountState.account_id == Account.id
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    values = [v for row in rows for v in row if v]
    key_ids = Counter(Keyring.key_id_of(v) for v in values)
    report(
        "Encryption key rotation under load",
        'token-broker rotate-keys while 30 callers hammer 3 replicas holding "new,old" (tokens refreshed '
        "every few seconds)",
        "no failed request; afterwards every stored secret is under the new key",
        tally,
        rotate_keys_s=round(took, 2),
        rotate_keys_output=output.decode(errors="replace").strip()[-200:],
        stored_values=len(values),
        under_new_key=key_ids.get(new_id, 0),
        idp_calls=stats["token_calls"],
        latency=latency_figures(tally, "rotating"),
        refresh_tokens_lost=len(lost),
    )
    assert lost == [], f"refresh tokens lost: {lost}"
    assert tally.errors() == Counter(), tally.errors()
    assert tally.kinds("rotating")["ok"] > 0
    assert len(rows) == len(broker.accounts)
    assert key_ids == Counter({new_id: len(values)}), key_ids
    assert stats["reuse"] == 0


# -- 6. load -------------------------------------------------------------------------------------

LOAD_TTL, LOAD_MIN_TTL, LOAD_MARGIN = 75, 70, 72  # see tests/system/test_multiprocess.py: refresh every 3-5 s
LOAD_EARLIEST = LOAD_TTL - LOAD_MARGIN
LOAD_CALLERS = int(os.environ.get("BROKER_LOAD_CALLERS", "300"))
LOAD_SECONDS = float(os.environ.get("BROKER_LOAD_SECONDS", str(10 * SCALE)))
LOAD_ACCOUNTS = 10


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{claims['exp']}:{claims['jti']}"


async def _refresh_history(database_url: str, account: str, seen: dict[str, float]) -> str:
    """For a failure message: the account's refresh events next to the tokens callers saw."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(Event.created_at, Event.kind, Event.detail)
                    .where(Event.account_id == account)
                    .order_by(Event.id)
                )
            ).all()
    finally:
        await engine.dispose()
    events = [f"{r[0]:%H:%M:%S.%f} {r[1]} {r[2]}" for r in rows]
    tokens = [
        f"exp {time.strftime('%H:%M:%S', time.gmtime(int(k.split(':')[0])))} first seen "
        f"{time.strftime('%H:%M:%S', time.gmtime(t))}.{int(t % 1 * 1000):03d}"
        for k, t in sorted(seen.items())
    ]
    return "\nevents:\n  " + "\n  ".join(events) + "\ntokens seen:\n  " + "\n  ".join(tokens)


async def test_load_many_callers_three_replicas(mysql_url: str, tmp_path: Path) -> None:
    """Load: many concurrent callers over 3 replicas, tokens expiring every few s: no error, one call each."""
    with deployment(
        mysql_url, tmp_path, replicas=3, accounts=LOAD_ACCOUNTS, fake_mode={"token_ttl": LOAD_TTL},
        BROKER_MIN_TOKEN_TTL_SECONDS=str(LOAD_MIN_TTL), BROKER_REFRESH_MARGIN_SECONDS=str(LOAD_MARGIN),
        BROKER_MAX_WAIT_SECONDS="30", BROKER_IDP_TIMEOUT_SECONDS="10", BROKER_LOCK_WAIT_SECONDS="20",
    ) as broker:  # fmt: skip
        ports = [r.port for r in broker.replicas.replicas]
        # Each caller has its own keep-alive connection to one replica, and asks every account in turn.
        connections = [
            RawConnection("127.0.0.1", ports[n % 3], broker.client_key) for n in range(LOAD_CALLERS)
        ]
        seen: dict[str, dict[str, float]] = defaultdict(dict)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        first_errors: list[str] = []
        accounts = broker.accounts

        async def one(conn: RawConnection, account: str) -> None:
            started = time.perf_counter()
            try:
                status, body = await conn.get(f"/accounts/{account}/token")
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors[f"transport {type(exc).__name__}"] += 1
                if len(first_errors) < 5:
                    first_errors.append(f"{conn.port}: {exc!r}")
                return
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors[str(status)] += 1
                if len(first_errors) < 5:
                    first_errors.append(body[:300].decode(errors="replace"))
                return
            token = json.loads(body)
            if token["expires_in"] < LOAD_MIN_TTL - 1:
                errors["token too short"] += 1
            seen[account].setdefault(_jti(token["access_token"]), time.time())

        try:
            for conn in connections:  # connect first: the timed part is requests, not handshakes
                await conn.get("/healthz")
            started = time.monotonic()
            deadline = started + LOAD_SECONDS

            async def caller(n: int) -> None:
                k = n
                while time.monotonic() < deadline:
                    await one(connections[n], accounts[k % len(accounts)])
                    k += 1

            await asyncio.gather(*(caller(n) for n in range(LOAD_CALLERS)))
            elapsed = time.monotonic() - started
            requests = len(latencies) + sum(v for k, v in errors.items() if k.startswith("transport"))
            ordered = sorted(latencies)
            # A background refresh that ended after the last request handed its token to nobody yet.
            # Once no call is in flight, the IdP is taken down (no new token can appear) and every
            # replica is asked once: what each has cached is served, so every issued token is seen.
            await asyncio.sleep(1.0)
            await wait_for(lambda: broker.fake.stats()["in_flight"] == 0, within=20)
            broker.fake.control("mode", {"mode": "down"})
            stats = broker.fake.stats()
            late, late_first = Counter(errors), list(first_errors)
            for conn in connections[:3]:  # callers n = 0, 1, 2 are on replicas 0, 1, 2
                for account in accounts:
                    await one(conn, account)
            # A 503 in this sweep is a token that expired after the load: not an error of the load.
            errors, first_errors = late, late_first
            window = time.monotonic() - started
        finally:
            for conn in connections:
                await conn.close()

    lost = await lost_refresh_tokens(mysql_url, broker.env["BROKER_ENCRYPTION_KEYS"], broker, stats)
    calls = {a: stats["refresh_by_client"].get(broker.client_of[a], 0) for a in accounts}
    distinct = {a: len(seen[a]) for a in accounts}
    report(
        "Load",
        f"{LOAD_CALLERS} concurrent callers (each its own keep-alive connection) over 3 replicas for "
        f"{elapsed:.0f} s, {len(accounts)} accounts, tokens unusable {LOAD_TTL - LOAD_MIN_TTL} s after issue",
        "zero errors; one IdP call per account per expiry (calls = distinct tokens served, one at a time)",
        requests=requests,
        rate_per_s=round(requests / elapsed),
        errors=dict(errors),
        first_errors=first_errors,
        reconnects=sum(c.reconnects for c in connections),
        p50_ms=round(ordered[len(ordered) // 2] * 1000, 1),
        p99_ms=round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
        max_ms=round(ordered[-1] * 1000, 1),
        idp_calls=sum(calls.values()),
        idp_calls_per_account=sorted(calls.values()),
        distinct_tokens_per_account=sorted(distinct.values()),
        max_in_flight_per_client=max(stats["max_in_flight_by_client"].values()),
        reuse=stats["reuse"],
        refresh_tokens_lost=len(lost),
    )
    assert errors == Counter(), (errors, first_errors)
    assert lost == [], f"refresh tokens lost: {lost}"
    assert stats["reuse"] == 0, stats["reuse"]
    assert stats["errors"] == {}, stats["errors"]
    for account in accounts:
        if calls[account] != distinct[account]:
            history = await _refresh_history(mysql_url, account, seen[account])
            raise AssertionError(
                f"{account}: {calls[account]} IdP calls, {distinct[account]} tokens{history}"
            )
        assert calls[account] <= window / (LOAD_EARLIEST - 1) + 1, (account, calls[account], window)
        expiries = sorted(int(k.split(":")[0]) for k in seen[account])
        gaps = [b - a for a, b in itertools.pairwise(expiries)]
        assert all(gap >= LOAD_EARLIEST - 1 for gap in gaps), (
            f"{account}: two refreshes for one expiry {gaps}"
        )
    assert max(stats["max_in_flight_by_client"].values()) == 1
