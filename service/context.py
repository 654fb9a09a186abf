"""The long-lived objects of one running app, built and closed by its lifespan.

Only the wiring (``app.py``) and the edges that serve requests read it; every service is built from
the few typed objects it uses, never from the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.accounts.credentials import AccountSecrets
from service.accounts.service import AccountService
from service.background import Background
from service.health.readiness import Readiness
from service.idp.azure_ad import AzureADClient
from service.keys.k8s import ServiceAccountVerifier
from service.keys.service import KeyService
from service.keys.service_accounts import ServiceAccountService
from service.keys.store import KeyStore
from service.kit.crypto import Keyring
from service.kit.outbound import OutboundPolicy
from service.metrics import Metrics
from service.proxy.service import ProxyService
from service.settings import Settings
from service.tokens.broker import TokenBroker
from service.webhooks.service import Notifier


@dataclass
class Context:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    keyring: Keyring
    keystore: KeyStore
    policy: OutboundPolicy
    http: httpx.AsyncClient
    azure: AzureADClient
    metrics: Metrics
    broker: TokenBroker
    accounts: AccountService
    keys: KeyService
    secrets: AccountSecrets
    background: Background
    service_accounts: ServiceAccountService
    verifier: ServiceAccountVerifier | None = None  # None: service-account callers are off
    notifier: Notifier | None = None
    proxy: ProxyService | None = None
    readiness: Readiness | None = None  # built by the first probe: /readyz answers from it
    draining: bool = False  # set when shutdown begins: readiness fails so traffic moves away
