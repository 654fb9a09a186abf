"""The long-lived objects of one running app, built and closed by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.accounts.service import AccountService
from service.idp.azure_ad import AzureADClient
from service.keys.service import KeyService
from service.keys.store import KeyStore
from service.kit.crypto import Keyring
from service.kit.outbound import OutboundPolicy
from service.metrics import Metrics
from service.settings import Settings
from service.tokens.broker import TokenBroker


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
    extras: dict[str, object] = field(default_factory=dict)
