"""The broker's parts on their own, with a fake clock and rng: the cache, the hold book, the
memory that owns both, and the refresh limiter."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from service.accounts.credentials import AccountSecrets
from service.errors import NeedsAuthorization, UpstreamUnavailable
from service.kit.crypto import Keyring, generate_key
from service.metrics import Metrics
from service.tokens.cache import TokenCache
from service.tokens.claims import ReplicaLiveness
from service.tokens.holds import HoldBook
from service.tokens.limiter import RefreshLimiter
from service.tokens.memory import AccountMemory


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_cache(rng: float = 0.0, metrics: Metrics | None = None) -> TokenCache:
    secrets = AccountSecrets(Keyring.from_strings([generate_key()]))
    return TokenCache(margin=300, rng=lambda: rng, secrets=secrets, metrics=metrics or Metrics())


def test_cache_keeps_the_later_expiry_or_the_newer_version() -> None:
    """A token that expires earlier, of the same VERSION, never replaces the cached one; a later
    expiry or a newer VERSION does."""
    metrics = Metrics()
    cache = make_cache(metrics=metrics)
    late = cache.entry("a", "late", 5000, 1, "https://x", 0)
    cache.store(late)
    cache.store(cache.entry("a", "early", 4000, 1, "https://x", 0))
    assert cache.get("a") is late
    later = cache.entry("a", "later", 6000, 1, "https://x", 0)
    cache.store(later)
    assert cache.get("a") is later
    newer = cache.entry("a", "newer-version", 100, 2, "https://x", 0)
    cache.store(newer)
    assert cache.get("a") is newer
    assert metrics.cache_size._value.get() == 1
    cache.drop("a")
    assert "a" not in cache
    assert metrics.cache_size._value.get() == 0


def test_cache_margin_jitter_takes_at_most_a_fifth() -> None:
    """The refresh point is expiry less the margin, less at most a fifth of it (rng in [0, 1))."""
    assert make_cache(rng=0.0).entry("a", "t", 10_000, 0, "u", 0).refresh_at == 10_000 - 300
    jittered = make_cache(rng=0.999999).entry("a", "t", 10_000, 0, "u", 0).refresh_at
    assert 10_000 - 300 < jittered <= 10_000 - 240 + 1e-3


def test_hold_for_a_backoff_ends_with_it() -> None:
    """A transient failure holds the account for its backoff, and re-raises with what is left."""
    clock = Clock()
    holds = HoldBook(clock=clock, forced_every=60)
    holds.hold("a", 30, 1, UpstreamUnavailable("down", retry_after=30, reason="throttled"))
    hold = holds.held("a")
    assert hold is not None
    clock.now += 10
    with pytest.raises(UpstreamUnavailable) as raised:
        hold.raise_again(clock())
    assert raised.value.reason == "throttled"
    assert math.isclose(raised.value.retry_after, 20)
    clock.now += 20
    assert holds.held("a") is None


def test_refusal_holds_until_the_version_moves() -> None:
    """A refusal holds forever at its VERSION; prune with a new VERSION (or none) lifts it."""
    clock = Clock()
    holds = HoldBook(clock=clock, forced_every=60)
    holds.hold("a", math.inf, 3, NeedsAuthorization("authorize again", idp_code="invalid_grant"))
    holds.hold("b", math.inf, 1, NeedsAuthorization("authorize again"))
    clock.now += 10**9
    holds.prune({"a": 3, "b": 1})
    assert holds.held("a") is not None
    assert holds.held("b") is not None
    holds.prune({"a": 4, "b": 1})
    assert holds.held("a") is None
    assert holds.held("b") is not None
    holds.prune({})
    assert len(holds) == 0


def test_forced_refresh_throttle() -> None:
    """A forced refresh is throttled for ``forced_every`` seconds, then allowed again and pruned."""
    clock = Clock()
    holds = HoldBook(clock=clock, forced_every=60)
    assert not holds.forced_recently("a")
    holds.note_forced("a")
    clock.now += 59
    assert holds.forced_recently("a")
    clock.now += 1
    assert not holds.forced_recently("a")
    holds.note_forced("b")
    holds.prune({})
    assert holds.forced_recently("b")  # a mark still throttling is kept


def test_memory_forgets_token_holds_and_forced_together() -> None:
    """forget drops the cached token, the hold and the forced mark of one account, nothing else."""
    clock = Clock()
    cache = make_cache()
    holds = HoldBook(clock=clock, forced_every=60)
    memory = AccountMemory(cache, holds)
    for account_id in ("a", "b"):
        cache.store(cache.entry(account_id, "t", clock() + 3600, 1, "u", 0))
        holds.hold(account_id, 30, 1, UpstreamUnavailable("down", reason="timeout"))
        holds.note_forced(account_id)
    memory.forget("a")
    assert cache.get("a") is None
    assert holds.held("a") is None
    assert not holds.forced_recently("a")
    assert cache.get("b") is not None
    assert holds.held("b") is not None
    assert holds.forced_recently("b")


def test_memory_apply_versions_forgets_changed_and_deleted_accounts() -> None:
    """An account whose VERSION moved, or that is gone, is forgotten; one unchanged is kept."""
    clock = Clock()
    cache = make_cache()
    holds = HoldBook(clock=clock, forced_every=60)
    memory = AccountMemory(cache, holds)
    for account_id in ("same", "moved", "gone"):
        cache.store(cache.entry(account_id, "t", clock() + 3600, 1, "u", 0))
        holds.hold(account_id, math.inf, 1, NeedsAuthorization("x"))
    memory.apply_versions({"same": 1, "moved": 2})
    assert cache.get("same") is not None
    assert holds.held("same") is not None
    for account_id in ("moved", "gone"):
        assert cache.get(account_id) is None
        assert holds.held(account_id) is None


async def test_limiter_bounds_refreshes_and_reserves_slots_for_callers() -> None:
    """No more than ``slots`` refreshes run at once; background work sees ``background_full``
    once ``background_slots`` run."""
    limiter = RefreshLimiter(3, 2)
    release = asyncio.Event()
    entered = 0

    async def refresh() -> None:
        nonlocal entered
        async with limiter.slot():
            entered += 1
            await release.wait()

    tasks = [asyncio.create_task(refresh()) for _ in range(5)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert (entered, limiter.running) == (3, 3)
    assert limiter.background_full()
    release.set()
    await asyncio.gather(*tasks)
    assert (entered, limiter.running) == (5, 0)
    assert not limiter.background_full()


def test_limiter_for_slots_leaves_callers_an_eighth() -> None:
    """BROKER_MAX_CONCURRENT_REFRESHES=64 lets background refreshes take 56; small limits keep
    at least one slot for callers (one slot: shared)."""
    assert (RefreshLimiter.for_slots(64).slots, RefreshLimiter.for_slots(64).background_slots) == (64, 56)
    assert RefreshLimiter.for_slots(5).background_slots == 4
    assert RefreshLimiter.for_slots(1).background_slots == 1


async def test_liveness_without_named_locks() -> None:
    """On SQLite no lock is taken; this replica's own earlier claim is never live (the
    single-flight runs one refresh per account here), another id's is live until it expires."""
    liveness = ReplicaLiveness(None, replica_id="me")
    await liveness.ready(0.1)  # returns at once
    assert not liveness.named_locks
    session: Any = None  # not used without named locks
    assert await liveness.owner_alive(session, "me") is False
    assert await liveness.owner_alive(session, None) is False
    assert await liveness.owner_alive(session, "an-earlier-process") is True
    await liveness.close()
