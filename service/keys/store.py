"""Caller keys in memory: who a bearer key is, what role it has, which accounts it may use.

One principal model: a service-account binding (``service_accounts.py``) is a ``Principal`` of its
role and scope like a key, kept in the same managed map (under ``"sa:<id>"``, never a key hash), so
the same reload, scope changes and revocation apply to both. A verified service-account token is
remembered by its hash until its ``exp``, pointing at its binding: a hit is two dictionary lookups,
and a deleted binding stops its remembered tokens at once.

Keys are known only by their SHA-256 hash. A lookup hashes the presented key in full and finds
the entry by that hash, then compares the hashes with ``hmac.compare_digest``: the work does not
depend on how much of a key is right. Keys from the environment are unscoped and permanent;
keys from the database are reloaded by ``KeyStore.replace_managed`` (every replica, every few
seconds) and changed at once on the replica that changed them.

A key made on another replica since the last reload is found in the database by its hash
(``KeyService.resolve``) before the caller gets a 401. Only keys that can exist go there: a managed
key carries a tag, an HMAC of its random part under a subkey of the encryption keyring every
replica shares, so a flood of made-up keys fails the tag check and costs no query at all; a tagged
key the database does not hold (a revoked one) is remembered in a bounded negative cache (size
``ABSENT_CACHE_SIZE``, lifetime ``ABSENT_TTL_SECONDS``), so repeating it costs no query either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

DIGEST_MEMO_SIZE = 4096
# Tagged keys the database did not hold: at most this many, each for this long. A key is random
# (256 bits) and shown only after its row is committed, so "absent" can only turn into "present"
# for a key nobody has seen yet; the lifetime only bounds the memory of stale entries.
ABSENT_CACHE_SIZE = 10_000
ABSENT_TTL_SECONDS = 60.0
KEY_PREFIX = "tbk_"
_RANDOM_BYTES = 32
_TAG_BYTES = 8
TAG_LABEL = "token-broker caller key tag v1"
TOKEN_MEMO_SIZE = 10_000  # verified service-account tokens remembered at once
ADMIN = "admin"
CLIENT = "client"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(raw: str) -> str:
    """A short, non-secret name for a key, safe for logs and events."""
    return "k_" + hash_key(raw)[:10]


def new_key() -> str:
    # 32 random bytes (256 bits); the prefix makes a leaked key recognisable in a scan.
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def _tag(tag_key: bytes, random_part: bytes) -> bytes:
    return hmac.new(tag_key, random_part, hashlib.sha256).digest()[:_TAG_BYTES]


def new_tagged_key(tag_key: bytes) -> str:
    """``tbk_`` + base64url(32 random bytes + an 8-byte tag of them under ``tag_key``)."""
    random_part = secrets.token_bytes(_RANDOM_BYTES)
    raw = random_part + _tag(tag_key, random_part)
    return KEY_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def has_valid_tag(raw: str, tag_keys: Sequence[bytes]) -> bool:
    """Whether ``raw`` is a key some replica sharing ``tag_keys`` made (constant-time tag check)."""
    body = raw[len(KEY_PREFIX) :]
    if not raw.startswith(KEY_PREFIX) or len(body) != 54:  # 40 bytes in base64url, unpadded
        return False
    try:
        decoded = base64.urlsafe_b64decode(body + "==")
    except (binascii.Error, ValueError):
        return False
    if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode("ascii") != body:
        return False  # one key, one spelling: no stray bits in the last character
    random_part, tag = decoded[:_RANDOM_BYTES], decoded[_RANDOM_BYTES:]
    ok = False
    for tag_key in tag_keys:  # every key of the ring: a rotation must not orphan the keys made before
        ok |= hmac.compare_digest(_tag(tag_key, random_part), tag)
    return ok


@dataclass(frozen=True)
class Principal:
    key_id: str | None  # None for keys from the environment
    role: str
    accounts: frozenset[str] | None  # None: every account
    fingerprint: str
    key_hash: str = field(repr=False)  # a service account's is "sa:<id>", no hash of anything
    subject: tuple[str, str] | None = None  # (namespace, name) of a service-account binding

    @property
    def is_service_account(self) -> bool:
        return self.subject is not None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may_use(self, account_id: str) -> bool:
        return self.accounts is None or account_id in self.accounts


@dataclass(frozen=True)
class KeyUsage:
    """What one key did since its usage was last written: when it was last used, how often."""

    key_id: str | None  # None for keys from the environment
    fingerprint: str
    last_used: float  # epoch seconds
    count: int
    key_hash: str = field(repr=False)
    service_account: bool = False


# A local change, replayed over a snapshot of the database that may predate it.
_Change = tuple[str, str, Principal | None]


class KeyStore:
    """The keys this replica accepts. Mutated only by replacing whole entries (no awaits).

    A local change (``put``/``remove``/``drop_account``) applies at once. The periodic reload
    (``replace_managed(..., since=mark())``) replays the local changes made after its ``mark``
    over what it read, so a reload that read the database before a change cannot undo it (a
    revoked key must not come back, not even for one sync interval).

    Usage is counted per key on the hot path (two dictionary writes, no I/O); ``take_usage``
    hands a key's usage out at most once per ``every`` seconds, so that ``last_used_at`` and the
    sampled ``tokens_fetched`` events are written at most once a minute per key.
    """

    def __init__(
        self,
        *,
        admin_keys: Iterable[str] = (),
        client_keys: Iterable[str] = (),
        tag_keys: Sequence[bytes] = (),
    ) -> None:
        self._tag_keys = tuple(tag_keys)
        self._absent: dict[str, float] = {}  # key hash -> monotonic time it stops being known absent
        self._static: dict[str, Principal] = {}
        for role, keys in ((CLIENT, client_keys), (ADMIN, admin_keys)):
            for raw in keys:
                digest = hash_key(raw)
                self._static[digest] = Principal(None, role, None, fingerprint(raw), digest)
        self._managed: dict[str, Principal] = {}
        self._by_hash: dict[str, Principal] = dict(self._static)
        self._seq = 0
        self._changes: list[tuple[int, _Change]] = []
        self._last_used: dict[str, float] = {}  # key hash -> epoch seconds of the last use
        self._count: dict[str, int] = {}  # key hash -> uses since last handed out
        self._handed_out: dict[str, float] = {}  # key hash -> monotonic time of the last hand-out
        # Hashes of keys that were valid when presented, so a busy caller is not hashed on every
        # request. Only found keys enter it, so a wrong key is always hashed in full: rejection
        # time still does not depend on how much of a key is right.
        self._digests: dict[str, str] = {}
        self._subjects: dict[tuple[str, str], Principal] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # token hash -> (binding's key_hash, exp)
        self._absent_subjects: set[tuple[str, str]] = set()  # not bound at the last look

    def lookup(self, raw: str) -> Principal | None:
        digest = self._digests.get(raw) or hash_key(raw)
        found = self._by_hash.get(digest)
        if found is None:
            found = self._remembered(digest)
            if found is None:
                return None
        elif not hmac.compare_digest(found.key_hash, digest):
            return None
        if raw not in self._digests:
            if len(self._digests) >= DIGEST_MEMO_SIZE:
                self._digests.clear()
            self._digests[raw] = digest
        self._last_used[found.key_hash] = time.time()
        self._count[found.key_hash] = self._count.get(found.key_hash, 0) + 1
        return found

    def _remembered(self, digest: str) -> Principal | None:
        entry = self._tokens.get(digest)
        if entry is None:
            return None
        binding = self._by_hash.get(entry[0])
        if binding is None or time.time() >= entry[1]:
            del self._tokens[digest]  # expired, or its binding is gone
            return None
        return binding

    # -- service accounts -----------------------------------------------------------------------

    def binding(self, namespace: str, name: str) -> Principal | None:
        """The service-account binding for (namespace, name), or None."""
        return self._subjects.get((namespace, name))

    def binding_worth_looking_up(self, namespace: str, name: str) -> bool:
        """Whether an unknown (namespace, name) is worth a query: not found since the last reload
        (which clears this memory, so a binding made elsewhere works within the sync anyway)."""
        return (namespace, name) not in self._absent_subjects

    def binding_absent(self, namespace: str, name: str) -> None:
        if len(self._absent_subjects) >= ABSENT_CACHE_SIZE:
            self._absent_subjects.clear()
        self._absent_subjects.add((namespace, name))

    def remember_token(self, raw: str, principal: Principal, *, expires: float) -> None:
        """A verified service-account token: found by ``lookup`` until ``expires`` (epoch seconds)."""
        if len(self._tokens) >= TOKEN_MEMO_SIZE:
            now = time.time()
            self._tokens = {d: e for d, e in self._tokens.items() if e[1] > now}
            while len(self._tokens) >= TOKEN_MEMO_SIZE:
                del self._tokens[next(iter(self._tokens))]
        self._tokens[hash_key(raw)] = (principal.key_hash, expires)

    @property
    def remembered_tokens(self) -> int:
        return len(self._tokens)

    # -- keys made elsewhere since the last reload ------------------------------------------------

    def mint(self) -> str:
        """A new managed key: tagged when the store has tag keys (so other replicas may look it up)."""
        return new_tagged_key(self._tag_keys[0]) if self._tag_keys else new_key()

    def worth_looking_up(self, raw: str) -> str | None:
        """The hash to look up in the database for a key not in memory, or None: not a key any
        replica made (no valid tag), or known to be absent."""
        if not has_valid_tag(raw, self._tag_keys):
            return None
        digest = hash_key(raw)
        until = self._absent.get(digest)
        if until is not None:
            if time.monotonic() < until:
                return None
            del self._absent[digest]
        return digest

    def absent(self, digest: str) -> None:
        """The database does not hold this key: refuse it without a query for a while."""
        if len(self._absent) >= ABSENT_CACHE_SIZE:
            now = time.monotonic()
            self._absent = {d: t for d, t in self._absent.items() if t > now}
            while len(self._absent) >= ABSENT_CACHE_SIZE:  # still full: drop the oldest entries
                del self._absent[next(iter(self._absent))]
        self._absent[digest] = time.monotonic() + ABSENT_TTL_SECONDS

    def learn(self, principal: Principal, *, since: int) -> bool:
        """Install a key read from the database after ``mark() == since``, unless a local change
        came in between (a revocation here must win over a read that predates it).

        Not recorded as a local change: the next reload either holds it too or (when its read
        predates the key) drops it, and the next request looks it up again.
        """
        if self._seq != since:
            return False
        managed = {h: p for h, p in self._managed.items() if p.key_id != principal.key_id}
        managed[principal.key_hash] = principal
        self._install(managed)
        return True

    @property
    def absent_count(self) -> int:
        return len(self._absent)

    # -- the managed keys -----------------------------------------------------------------------

    def mark(self) -> int:
        """Take before reading the keys from the database; pass to ``replace_managed``."""
        return self._seq

    def replace_managed(self, principals: Iterable[Principal], *, since: int | None = None) -> None:
        """Replace the managed keys with ``principals`` (read from the database).

        With ``since`` (a ``mark()`` taken before the read), local changes made after the mark
        are applied again on top. Without it, ``principals`` are the whole truth.
        """
        managed = {p.key_hash: p for p in principals}
        self._absent_subjects = set()
        if since is None:
            self._changes = []
        else:
            self._changes = [(seq, change) for seq, change in self._changes if seq > since]
            for _, change in self._changes:
                managed = _apply(managed, change)
        self._install(managed)

    def _install(self, managed: dict[str, Principal]) -> None:
        merged = dict(managed)
        merged.update(self._static)  # environment keys win a (practically impossible) collision
        self._managed = managed
        self._by_hash = merged
        self._subjects = {p.subject: p for p in managed.values() if p.subject is not None}

    def _change(self, change: _Change) -> None:
        self._seq += 1
        self._changes.append((self._seq, change))
        self._install(_apply(self._managed, change))

    def put(self, principal: Principal) -> None:
        assert principal.key_id is not None
        if principal.subject is not None:
            self._absent_subjects.discard(principal.subject)
        self._change(("put", principal.key_id, principal))

    def remove(self, key_id: str) -> None:
        self._change(("remove", key_id, None))

    def drop_account(self, account_id: str) -> None:
        self._change(("drop_account", account_id, None))

    # -- usage ----------------------------------------------------------------------------------

    def take_usage(self, *, every: float = 60.0) -> list[KeyUsage]:
        """The keys used since their usage was last taken, for those last taken ``every``
        seconds ago or more (or never); the others stay pending. The caller persists them."""
        now = time.monotonic()
        taken: list[KeyUsage] = []
        for digest in list(self._last_used):
            if now - self._handed_out.get(digest, -math.inf) < every:
                continue
            last_used = self._last_used.pop(digest)
            count = self._count.pop(digest, 0)
            principal = self._by_hash.get(digest)
            if principal is None:  # revoked meanwhile
                continue
            self._handed_out[digest] = now
            taken.append(
                KeyUsage(
                    principal.key_id,
                    principal.fingerprint,
                    last_used,
                    count,
                    digest,
                    principal.is_service_account,
                )
            )
        for digest, when in list(self._handed_out.items()):
            if now - when >= every:
                del self._handed_out[digest]  # as good as never: keeps the map small
        return taken

    def give_back(self, usage: Iterable[KeyUsage]) -> None:
        """Usage that could not be written: pending again, due at the next ``take_usage``."""
        for item in usage:
            digest = item.key_hash
            self._handed_out.pop(digest, None)
            self._last_used[digest] = max(self._last_used.get(digest, 0.0), item.last_used)
            self._count[digest] = self._count.get(digest, 0) + item.count

    @property
    def has_static_admin(self) -> bool:
        return any(p.role == ADMIN for p in self._static.values())


def _apply(managed: dict[str, Principal], change: _Change) -> dict[str, Principal]:
    kind, target, principal = change
    if kind == "put":
        assert principal is not None
        out = {h: p for h, p in managed.items() if p.key_id != target}
        out[principal.key_hash] = principal
        return out
    if kind == "remove":
        return {h: p for h, p in managed.items() if p.key_id != target}
    return {  # drop_account
        h: p if p.accounts is None or target not in p.accounts else replace(p, accounts=p.accounts - {target})
        for h, p in managed.items()
    }
