"""Kubernetes service-account tokens as caller credentials (Vault's Kubernetes auth, without Vault).

A token is accepted when, and only when: its header names RS256 or ES256; a key of the cluster's
JWKS (looked up by ``kid``) verifies its signature; ``iss`` equals ``BROKER_K8S_ISSUER``; ``aud``
contains ``BROKER_K8S_AUDIENCE``; ``exp``/``nbf`` hold within 60 s of leeway; its
``kubernetes.io`` claim's namespace and service-account name name a binding; and, with
``BROKER_K8S_TOKEN_REVIEW``, the API server's TokenReview says it is still authenticated (once per
token: a deleted pod's token stops working). A verified token is remembered by its hash until its
``exp`` (``KeyStore.remember_token``), so later requests are dictionary lookups.

The JWKS is cached; a ``kid`` it lacks makes one fetch (shared by concurrent callers) at most once
per ``REFETCH_SECONDS``, so a rotated cluster key works without a restart and a flood of made-up
``kid`` values cannot turn into a flood of fetches. Verification never says why a token failed
(401 for all); the reason is logged without the token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt

from service.errors import ConfigurationError, IssuerUnavailable
from service.keys.store import KeyStore, Principal, hash_key
from service.settings import Settings

log = logging.getLogger("service.keys.k8s")

ALGORITHMS = ("RS256", "ES256")
LEEWAY_SECONDS = 60
REFETCH_SECONDS = 30.0
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def looks_like_jwt(raw: str) -> bool:
    """A compact JWS (three parts, a JSON header): worth verifying, never worth a key lookup."""
    return raw.startswith("eyJ") and raw.count(".") == 2


def check_url(url: str, *, allow_http: bool, setting: str) -> str:
    """The JWKS and discovery URLs are admin configuration, fetched over https only."""
    parsed = httpx.URL(url)
    if parsed.scheme != "https" and not (allow_http and parsed.scheme == "http"):
        raise ConfigurationError(f"{setting} must be an https:// URL (http only with BROKER_ALLOW_HTTP)")
    if not parsed.host:
        raise ConfigurationError(f"{setting} has no host")
    return url


def subject(claims: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, service-account name) from a projected token's ``kubernetes.io`` claim."""
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        return None
    namespace, account = k8s.get("namespace"), k8s.get("serviceaccount")
    name = account.get("name") if isinstance(account, dict) else None
    if isinstance(namespace, str) and isinstance(name, str) and namespace and name:
        return namespace, name
    return None


class ServiceAccountVerifier:
    """Verifies service-account JWTs against the cluster's JWKS; one per app."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient, keystore: KeyStore) -> None:
        assert settings.k8s_issuer is not None
        self._issuer = settings.k8s_issuer
        self._audience = settings.k8s_audience
        self._allow_http = settings.allow_http
        self._jwks_url = settings.k8s_jwks_url
        if self._jwks_url is not None:
            check_url(self._jwks_url, allow_http=self._allow_http, setting="BROKER_K8S_JWKS_URL")
        else:
            check_url(self._issuer, allow_http=self._allow_http, setting="BROKER_K8S_ISSUER")
        self._token_file = settings.k8s_token_file
        self._review = settings.k8s_token_review
        self._api_url = settings.k8s_api_url.rstrip("/")
        if self._review:
            check_url(self._api_url, allow_http=self._allow_http, setting="BROKER_K8S_API_URL")
        self._owned: httpx.AsyncClient | None = None
        if settings.k8s_ca_file is not None:
            # The in-cluster endpoints present the cluster's own CA: a client of our own trusts it.
            context = ssl.create_default_context(cafile=str(settings.k8s_ca_file))
            http = httpx.AsyncClient(
                verify=context, timeout=http.timeout, follow_redirects=False, trust_env=False
            )
            self._owned = http
        self._http = http
        self._keystore = keystore
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._fetch: asyncio.Future[None] | None = None
        self._reviews: dict[str, asyncio.Future[bool]] = {}
        self.fetches = 0  # JWKS fetches made (public count, for tests and metrics)

    async def aclose(self) -> None:
        if self._owned is not None:
            await self._owned.aclose()

    # -- verification ---------------------------------------------------------------------------

    async def verify(
        self, raw: str, find_binding: Callable[[str, str], Awaitable[Principal | None]]
    ) -> Principal | None:
        """The binding's principal for a valid token, else None (401). ``find_binding`` looks up
        a binding this replica does not know yet. Raises ``IssuerUnavailable`` when the JWKS or
        the TokenReview cannot be had."""
        claims = await self._claims(raw)
        if claims is None:
            return None
        sub = subject(claims)
        binding = None
        if sub is not None:
            binding = self._keystore.binding(*sub) or await find_binding(*sub)
        if sub is None or binding is None:
            _refused("no_binding")
            return None
        if self._review and not await self._reviewed(raw, sub):
            _refused("token_review")
            return None
        self._keystore.remember_token(raw, binding, expires=float(claims["exp"]))
        return self._keystore.lookup(raw) or binding

    async def _claims(self, raw: str) -> dict[str, Any] | None:
        """The claims of a token signed by a cluster key, for this issuer and audience, in time."""
        try:
            header = jwt.get_unverified_header(raw)
        except jwt.PyJWTError:
            return None
        alg = header.get("alg")
        if alg not in ALGORITHMS:  # alg "none", HS256 (a public key used as a secret), ...
            _refused("algorithm")
            return None
        key = await self._key(header.get("kid"))
        if key is None:
            _refused("unknown_key")
            return None
        try:
            claims: dict[str, Any] = jwt.decode(
                raw,
                key=key.key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            _refused(type(exc).__name__)
            return None
        return claims

    # -- the JWKS -------------------------------------------------------------------------------

    async def _key(self, kid: object) -> jwt.PyJWK | None:
        if not isinstance(kid, str):
            return None
        found = self._keys.get(kid)
        if found is None and time.monotonic() - self._fetched_at >= REFETCH_SECONDS:
            await self._refetch()
            found = self._keys.get(kid)
        return found

    async def _refetch(self) -> None:
        if self._fetch is None:  # registered before the first await: one fetch for every caller
            self._fetched_at = time.monotonic()  # failures count too: no retry storm
            self._fetch = asyncio.ensure_future(self._load())
            self._fetch.add_done_callback(lambda _: setattr(self, "_fetch", None))
        await asyncio.shield(self._fetch)

    async def _load(self) -> None:
        self.fetches += 1
        try:
            url = self._jwks_url or await self._discover()
            document = await self._get(url)
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (httpx.HTTPError, ValueError, jwt.PyJWTError, ConfigurationError, OSError) as exc:
            log.warning("service-account keys not fetched", extra={"error_type": type(exc).__name__})
            if not self._keys:
                raise IssuerUnavailable(
                    "The cluster's service-account keys cannot be fetched; try again.", reason="jwks"
                ) from None
            return
        self._keys = {k.key_id: k for k in keys if k.key_id and k.algorithm_name in ALGORITHMS}

    async def _discover(self) -> str:
        document = await self._get(self._issuer.rstrip("/") + "/.well-known/openid-configuration")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError("discovery document without jwks_uri")
        return check_url(jwks_uri, allow_http=self._allow_http, setting="jwks_uri")

    async def _get(self, url: str) -> dict[str, Any]:
        response = await self._http.get(url, headers=self._bearer())
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return document

    def _bearer(self) -> dict[str, str]:
        # Re-read each time: the kubelet rotates the projected token in place.
        if self._token_file is None:
            return {}
        return {"Authorization": "Bearer " + Path(self._token_file).read_text().strip()}

    # -- TokenReview ----------------------------------------------------------------------------

    async def _reviewed(self, raw: str, sub: tuple[str, str]) -> bool:
        digest = hash_key(raw)
        flight = self._reviews.get(digest)
        if flight is None:
            flight = asyncio.ensure_future(self._review_once(raw, sub))
            self._reviews[digest] = flight
            flight.add_done_callback(lambda _: self._reviews.pop(digest, None))
        return await asyncio.shield(flight)

    async def _review_once(self, raw: str, sub: tuple[str, str]) -> bool:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": raw, "audiences": [self._audience]},
        }
        try:
            response = await self._http.post(self._api_url + REVIEW_PATH, json=body, headers=self._bearer())
            response.raise_for_status()
            status = response.json().get("status") or {}
        except (httpx.HTTPError, ValueError, OSError, AttributeError) as exc:
            log.warning("token review failed", extra={"error_type": type(exc).__name__})
            raise IssuerUnavailable(
                "The cluster cannot review the token; try again.", reason="token_review"
            ) from None
        user = status.get("user") or {}
        expected = f"system:serviceaccount:{sub[0]}:{sub[1]}"
        return status.get("authenticated") is True and user.get("username") == expected


def _refused(reason: str) -> None:
    log.info("service-account token refused", extra={"reason": reason})
