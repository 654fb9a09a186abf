"""The long-lived objects of one running app, built and closed by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .accounts import AccountService
from .auth import KeyStore
from .azure_ad import AzureADClient
from .broker import TokenBroker
from .crypto import Keyring
from .keys import KeyService
from .metrics import Metrics
from .outbound import OutboundPolicy
from .settings import Settings


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
