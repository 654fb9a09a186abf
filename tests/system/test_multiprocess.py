"""Three ``token-broker serve`` processes on one MariaDB database, against the fake Azure AD in
its own process with strict single-use refresh tokens and short-lived access tokens.

Timing: the fake issues tokens for ``TOKEN_TTL`` s; a replica must not hand out a token with less
than ``MIN_TTL`` s left, so every token becomes unusable ``TOKEN_TTL - MIN_TTL`` = 5 s after it was
issued, and the stale-while-revalidate window (``MARGIN``, jittered by up to a fifth) may start a
background refresh from 3 s on. Under constant load each account is therefore refreshed every
3-5 s, by whichever replica gets there first, and both the waiting and the background paths run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from service.accounts import repository as accounts_repo
from service.kit import sealing
from service.kit.crypto import Keyring, generate_key
from service.kit.db import create_sessionmaker
from tests.fake_idp import account_body, running_fake_idp
from tests.replicas import ReplicaSet, broker_env, migrate

pytestmark = [pytest.mark.multiprocess, pytest.mark.mysql]

TOKEN_TTL = 75
MIN_TTL = 70
MARGIN = 72
EARLIEST = TOKEN_TTL - MARGIN  # a refresh may start this long after the previous token was issued
LATEST = TOKEN_TTL - MIN_TTL  # ... and must have started by then (callers wait from here on)
SLACK = 3.0  # whole-second iat on the fake's side, plus scheduling on a busy 2-core machine
ACCOUNTS = 5
REPLICAS = 3
CALLERS = 50
HAMMER_SECONDS = 24.0
MAX_REQUESTS = 400_000

REFRESH_TOKEN_SHAPE = re.compile(r"0\.A[A-Za-z0-9_-]{40,}")  # the fake's refresh tokens
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}")  # any access token


@dataclass
class Seen:
    """What callers got for one account: each distinct access token, when first seen."""

    tokens: dict[str, float] = field(default_factory=dict)
    served: Counter[str] = field(default_factory=Counter)  # by replica URL

    def add(self, token: str, replica: str) -> None:
        self.tokens.setdefault(token, time.monotonic())
        self.served[replica] += 1


@dataclass
class Load:
    seen: dict[str, Seen]
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def fail(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(text)


def claims(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def check_token(load: Load, account_id: str, replica: str, response: httpx.Response) -> None:
    if response.status_code != 200:
        load.fail(f"{replica} {account_id}: {response.status_code} {response.text[:300]}")
        return
    body = response.json()
    token, left = body.get("access_token"), body.get("expires_in")
    if body.get("account_id") != account_id or not isinstance(token, str) or not isinstance(left, int):
        load.fail(f"{replica} {account_id}: unexpected body keys {sorted(body)}")
        return
    # Never a token with less than MIN_TTL left (one second for the int() of expires_in).
    if not MIN_TTL - 1 <= left <= TOKEN_TTL:
        load.fail(f"{replica} {account_id}: expires_in {left} outside [{MIN_TTL - 1}, {TOKEN_TTL}]")
    load.seen[account_id].add(token, replica)


async def hammer(
    clients: list[httpx.AsyncClient], account_ids: list[str], load: Load, *, seconds: float, callers: int
) -> float:
    """``callers`` concurrent loops over every (account, replica) pair; returns the elapsed time."""
    started = time.monotonic()
    deadline = started + seconds

    async def caller(number: int) -> None:
        k = 0
        while time.monotonic() < deadline and load.requests < MAX_REQUESTS:
            account_id = account_ids[(number + k) % len(account_ids)]
            client = clients[(number + k // len(account_ids)) % len(clients)]
            k += 1
            load.requests += 1
            try:
                response = await client.get(f"/accounts/{account_id}/token")
            except httpx.HTTPError as exc:
                load.fail(f"{client.base_url} {account_id}: {type(exc).__name__}: {exc}")
                continue
            check_token(load, account_id, str(client.base_url), response)

    await asyncio.gather(*(caller(n) for n in range(callers)))
    return time.monotonic() - started


async def harvest_refresh_tokens(fake_url: str, into: set[str], stop: asyncio.Event) -> None:
    """Every refresh token the fake issues lives >= 3 s: polling its stats twice a second sees each."""
    async with httpx.AsyncClient(base_url=fake_url, timeout=10.0, trust_env=False) as client:
        while not stop.is_set():
            stats = (await client.get("/_control/stats")).json()
            for tokens in stats["valid_refresh_tokens"].values():
                into.update(tokens)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def fake_stats(fake_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=fake_url, timeout=10.0, trust_env=False) as client:
        stats: dict[str, Any] = (await client.get("/_control/stats")).json()
        return stats


async def settle(fake_url: str) -> dict[str, Any]:
    """Wait until no refresh can still be on its way: 1 s of quiet, then nothing in flight at the fake."""
    await asyncio.sleep(1.0)
    for _ in range(100):
        stats = await fake_stats(fake_url)
        if stats["in_flight"] == 0:
            return stats
        await asyncio.sleep(0.1)
    raise AssertionError("the fake IdP still has token calls in flight after 10 s")


async def sweep_until_quiet(
    clients: list[httpx.AsyncClient], account_ids: list[str], load: Load, fake_url: str
) -> dict[str, Any]:
    """Fetch every account from every replica until a round starts no refresh.

    A background refresh that finished after the last request of the load handed its token to
    nobody yet; the replica that made it has it cached, so one more round on every replica sees it.
    """
    stats = await settle(fake_url)
    for _ in range(10):
        before = stats["token_calls"]
        for client in clients:
            for account_id in account_ids:
                load.requests += 1
                check_token(
                    load, account_id, str(client.base_url), await client.get(f"/accounts/{account_id}/token")
                )
        stats = await settle(fake_url)
        if stats["token_calls"] == before:
            return stats
    raise AssertionError("replicas kept refreshing with no load")


async def replica_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The replica's Prometheus samples, keyed by name and labels as printed."""
    text = (await client.get("/metrics")).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def outcome(samples: dict[str, float], name: str) -> int:
    return int(samples.get(f'broker_token_requests_total{{outcome="{name}"}}', 0))


async def stored_refresh_tokens(
    database_url: str, keyring: Keyring, account_ids: list[str]
) -> dict[str, str]:
    """Each account's refresh token as the broker stored it (decrypted), straight from the database."""
    engine = create_async_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            found: dict[str, str] = {}
            for account_id in account_ids:
                row = await accounts_repo.get_account(session, account_id)
                assert row is not None
                token = sealing.unseal(keyring, sealing.REFRESH_TOKEN, account_id, row[0].refresh_token)
                found[account_id] = token or ""
            return found
    finally:
        await engine.dispose()


def create_accounts(admin: httpx.Client, fake: Any, count: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Register a client and a first refresh token per account in the fake, then the accounts (v1 and v2)."""
    accounts: list[dict[str, Any]] = []
    secrets_seen: list[str] = []
    for n in range(count):
        tenant, client_id = str(uuid.uuid4()), str(uuid.uuid4())
        client_secret = f"mp-secret~{secrets.token_urlsafe(24)}"
        fake.control("clients", {"client_id": client_id, "client_secret": client_secret, "tenant": tenant})
        refresh = fake.control("refresh_tokens", {"client_id": client_id})["refresh_token"]
        body = account_body(  # mix Azure's v1 (string expires_in) and v2 endpoints
            fake.url,
            tenant=tenant,
            client_id=client_id,
            client_secret=client_secret,
            refresh_token=refresh,
            v2=bool(n % 2),
            name=f"replica-test-{n}",
        )
        response = admin.post("/accounts", json=body)
        assert response.status_code == 201, response.text
        accounts.append({**response.json(), "client_id": client_id})
        secrets_seen += [client_secret, refresh]
    return accounts, secrets_seen


def check_chain(account_id: str, tokens: list[str], until: float) -> list[int]:
    """One account's access tokens, in issue order, follow each other by EARLIEST..LATEST s, up to ``until``.

    A gap under EARLIEST would be two IdP calls for one expiry; over LATEST, a refresh that came
    late; the last token must still have been usable when the load stopped (``until``, epoch s).
    """
    issued = sorted(claims(t)["iat"] for t in tokens)
    gaps = [b - a for a, b in itertools.pairwise(issued)]
    for gap in gaps:
        assert EARLIEST - 1 <= gap <= LATEST + SLACK, (
            f"{account_id}: refresh gaps {gaps} (issued at {issued})"
        )
    late = until - issued[-1]
    assert late <= LATEST + SLACK, f"{account_id}: no refresh in the last {late:.0f} s of the load"
    return gaps


async def test_replicas_refresh_each_token_once_restart_without_idp_and_log_no_secret(
    mysql_url: str, tmp_path: Path
) -> None:
    """Replicas under load: one IdP call per expiry, no reuse, restart without IdP call, no secret logged."""
    wall = time.monotonic()
    admin_key, client_key, encryption_key = (
        f"mp-admin-{secrets.token_urlsafe(16)}",
        f"mp-client-{secrets.token_urlsafe(16)}",
        generate_key(),
    )
    env = broker_env(
        {
            "BROKER_DATABASE_URL": mysql_url,
            "BROKER_ENCRYPTION_KEYS": encryption_key,
            "BROKER_ADMIN_KEYS": admin_key,
            "BROKER_CLIENT_KEYS": client_key,
            "BROKER_ALLOW_HTTP": "true",
            "BROKER_ALLOWED_HOSTS": "127.0.0.1:*",
            "BROKER_VAR_DIR": str(tmp_path / "var"),
            "BROKER_REFRESH_MARGIN_SECONDS": str(MARGIN),
            "BROKER_MIN_TOKEN_TTL_SECONDS": str(MIN_TTL),
            # INFO rather than WARNING: more output (access log of every non-cached request,
            # refresh events) makes the secret search below mean more.
            "BROKER_LOG_LEVEL": "INFO",
        }
    )
    migrate(env)
    secret_values = [admin_key, client_key, encryption_key]
    refresh_tokens: set[str] = set()

    with (
        running_fake_idp(token_ttl=TOKEN_TTL) as fake,
        ReplicaSet(env, REPLICAS, tmp_path / "logs") as replicas,
    ):
        with httpx.Client(
            base_url=replicas[0].url, headers={"Authorization": f"Bearer {admin_key}"}, trust_env=False
        ) as admin:
            accounts, created_secrets = create_accounts(admin, fake, ACCOUNTS)
        secret_values += created_secrets
        account_ids = [a["id"] for a in accounts]
        client_of = {a["id"]: a["client_id"] for a in accounts}
        load = Load(seen={a: Seen() for a in account_ids})

        # The callers are the engines; an engine that reused a connection the replica was closing
        # would count an error that is not the broker's. The replicas keep connections 75 s
        # (service/cli.py); the callers give theirs up well before.
        limits = httpx.Limits(max_connections=CALLERS, max_keepalive_connections=CALLERS, keepalive_expiry=2)
        clients = [
            httpx.AsyncClient(
                base_url=url,
                headers={"Authorization": f"Bearer {client_key}"},
                timeout=40.0,
                limits=limits,
                trust_env=False,
            )
            for url in replicas.urls
        ]
        try:
            stop = asyncio.Event()
            harvester = asyncio.create_task(harvest_refresh_tokens(fake.url, refresh_tokens, stop))
            elapsed = await hammer(clients, account_ids, load, seconds=HAMMER_SECONDS, callers=CALLERS)
            load_ended = time.time()
            stats = await sweep_until_quiet(clients, account_ids, load, fake.url)
            window = elapsed + time.time() - load_ended  # the sweep may still refresh
            stop.set()
            await harvester
            metrics = [await replica_metrics(client) for client in clients]
        finally:
            for client in clients:
                await client.aclose()

        # -- the load: no error, one IdP call per token, none concurrent, none reused ----------------
        per_account = {
            a: (stats["refresh_by_client"].get(client_of[a], 0), len(load.seen[a].tokens))
            for a in account_ids
        }
        print(
            f"\n{load.requests} requests in {elapsed:.1f} s ({load.requests / elapsed:.0f}/s) over "
            f"{REPLICAS} replicas, {CALLERS} callers; {load.error_count} errors; IdP token calls "
            f"{stats['token_calls']} {stats['by_grant']}, reuse {stats['reuse']}, "
            f"IdP errors {stats['errors']}"
        )
        for url, samples in zip(replicas.urls, metrics, strict=True):
            print(
                f"  replica {url}: hit {outcome(samples, 'hit')}, "
                f"stale_served {outcome(samples, 'stale_served')}, "
                f"loaded {outcome(samples, 'loaded')}, refreshed {outcome(samples, 'refreshed')}, "
                f"lock waits {int(samples['broker_lock_wait_seconds_count'])} "
                f"(total {samples['broker_lock_wait_seconds_sum']:.2f} s)"
            )
        gaps: dict[str, list[int]] = {}
        for account_id in account_ids:
            calls, distinct = per_account[account_id]
            tokens = list(load.seen[account_id].tokens)
            served = dict(load.seen[account_id].served)
            gaps[account_id] = check_chain(account_id, tokens, load_ended) if load.error_count == 0 else []
            print(
                f"  account {account_id[:8]}: {calls} IdP refreshes, {distinct} distinct tokens, "
                f"gaps {gaps[account_id]} s, served per replica {sorted(served.values())}"
            )
        failures = [line for line in replicas.output().splitlines() if "token refresh failed" in line]
        assert load.error_count == 0, (
            f"{load.error_count} failed requests, first: {load.errors}; the replicas logged: {failures}"
        )
        assert not failures, failures
        assert stats["reuse"] == 0, "a refresh token was redeemed twice"
        assert stats["errors"] == {}, stats["errors"]
        assert set(stats["by_grant"]) == {"refresh_token"}, stats["by_grant"]
        refreshed = sum(outcome(samples, "refreshed") for samples in metrics)
        assert refreshed == stats["by_grant"]["refresh_token"], "the replicas' metrics disagree with the IdP"
        for account_id, (calls, distinct) in per_account.items():
            assert calls == distinct, f"{account_id}: {calls} IdP refreshes for {distinct} tokens handed out"
            # The first token, then one per expiry: a refresh was due every EARLIEST..LATEST s.
            assert (elapsed - SLACK) / (LATEST + SLACK) <= calls <= window / (EARLIEST - 1) + 1, (
                f"{account_id}: {calls} refreshes in {elapsed:.0f} s"
            )
            assert stats["max_in_flight_by_client"][client_of[account_id]] == 1, stats[
                "max_in_flight_by_client"
            ]
            assert len(load.seen[account_id].served) == REPLICAS
        # No refresh token lost: what each account stored is the one the fake still accepts.
        stored = await stored_refresh_tokens(mysql_url, Keyring.from_strings([encryption_key]), account_ids)
        for account_id in account_ids:
            valid = stats["valid_refresh_tokens"].get(client_of[account_id], [])
            assert valid == [stored[account_id]], f"{account_id}: stored refresh token is not the valid one"
        refresh_tokens.update(stored.values())

        # -- a restarted replica serves the stored token: no IdP call --------------------------------
        fake.control("mode", {"token_ttl": 3599})
        long_lived: dict[str, str] = {}
        with httpx.Client(
            base_url=replicas[0].url, headers={"Authorization": f"Bearer {client_key}"}, trust_env=False
        ) as c0:
            for account_id in account_ids:  # min_ttl forces one refresh each, to a token that lasts
                response = c0.get(f"/accounts/{account_id}/token", params={"min_ttl": 600})
                assert response.status_code == 200, response.text
                long_lived[account_id] = response.json()["access_token"]
        before = fake.stats()
        assert before["in_flight"] == 0
        replicas.restart(REPLICAS - 1)  # SIGTERM, exit status 0, start again
        with httpx.Client(
            base_url=replicas[REPLICAS - 1].url,
            headers={"Authorization": f"Bearer {client_key}"},
            trust_env=False,
        ) as restarted:
            for account_id in account_ids:
                response = restarted.get(f"/accounts/{account_id}/token")
                assert response.status_code == 200, response.text
                assert response.json()["access_token"] == long_lived[account_id]
        after = fake.stats()
        print(f"  restart: IdP token calls {before['token_calls']} -> {after['token_calls']}")
        assert after["token_calls"] == before["token_calls"], "the restarted replica called the IdP"
        refresh_tokens.update(t for tokens in after["valid_refresh_tokens"].values() for t in tokens)

        replicas.stop_all()  # every one exits 0 on SIGTERM
        output = replicas.output()

    # -- no secret in anything a replica printed ---------------------------------------------------
    access_tokens = [t for seen in load.seen.values() for t in seen.tokens] + list(long_lived.values())
    everything = [*secret_values, *refresh_tokens, *access_tokens]
    leaked = [f"{value[:12]}..." for value in everything if value in output]
    shapes = REFRESH_TOKEN_SHAPE.findall(output) + JWT_SHAPE.findall(output)
    print(
        f"  searched {len(output.splitlines())} log lines ({len(output)} chars) from "
        f"{len(replicas.log_files())} process starts for {len(everything)} secrets; "
        f"wall {time.monotonic() - wall:.0f} s"
    )
    assert output.strip(), "the replicas printed nothing: the secret search would prove nothing"
    assert not leaked, f"secrets in the replicas' output: {leaked}"
    assert not shapes, f"token-shaped strings in the replicas' output: {[s[:12] for s in shapes]}"
