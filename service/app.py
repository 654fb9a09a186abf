"""``create_app(settings)``: wiring only. The lifespan builds the long-lived objects and closes them.

Start-up refuses to serve (``ConfigurationError``) when the schema is behind, a key is missing or
wrong, or the settings disagree, with a message that says what to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import bootstrap
from service.accounts import endpoints as accounts
from service.accounts.credentials import AccountSecrets
from service.accounts.federated import FederatedTokenFile
from service.accounts.service import AccountService
from service.api import problems
from service.api.middleware import AccessLog, BodyLimit, RequireKey
from service.authorization import endpoints as oauth
from service.background import Background
from service.context import Context
from service.health import endpoints as health
from service.idp.azure_ad import AzureADClient
from service.keys import endpoints as keys
from service.keys.k8s import ServiceAccountVerifier
from service.keys.service import KeyService
from service.keys.service_accounts import ServiceAccountService
from service.keys.store import TAG_LABEL, KeyStore
from service.kit.db import create_engine, create_sessionmaker
from service.kit.outbound import OutboundPolicy
from service.kit.problems import problem_response
from service.metrics import Metrics
from service.proxy import endpoints as proxy
from service.proxy.asgi import ProxyBypass
from service.proxy.service import ProxyService
from service.settings import Settings
from service.tokens import endpoints as tokens
from service.tokens.broker import TokenBroker
from service.tokens.fastpath import TokenFastPath
from service.webhooks import service as webhooks
from service.webhooks.delivery import check_url

log = logging.getLogger("service.app")

DESCRIPTION = """Keeps OAuth integration accounts for Microsoft Dynamics 365 and hands internal
services a valid access token on `GET /accounts/{id}/token`.

Press **Authorize** and paste an admin API key (on the embedded default it is in `./var/admin.key`).
"""


async def build_context(settings: Settings) -> Context:
    keyring = bootstrap.load_keyring(settings)
    keystore = KeyStore(
        admin_keys=bootstrap.load_admin_keys(settings),
        client_keys=settings.secret_list(settings.client_keys),
        tag_keys=keyring.derive(TAG_LABEL),
    )
    engine = create_engine(settings)
    try:
        await bootstrap.check_schema(engine)
        sessions = create_sessionmaker(engine)
        await bootstrap.check_keys(sessions, keyring)
    except BaseException:
        await engine.dispose()
        raise
    policy = OutboundPolicy(settings.allowed_host_list, settings.allow_http)
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.idp_timeout_seconds),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        trust_env=False,
    )
    metrics = Metrics()
    azure = AzureADClient(http, policy, timeout=settings.idp_timeout_seconds)
    secrets = AccountSecrets(keyring, FederatedTokenFile(settings.federated_token_file))
    verifier = ServiceAccountVerifier(settings, http, keystore) if settings.k8s_issuer else None
    broker = TokenBroker(
        sessions=sessions, azure=azure, keyring=keyring, secrets=secrets, settings=settings, metrics=metrics
    )
    proxied = ProxyService(
        broker=broker, policy=policy, sessions=sessions, settings=settings, metrics=metrics
    )
    return Context(
        proxy=proxied,
        settings=settings,
        engine=engine,
        sessions=sessions,
        keyring=keyring,
        keystore=keystore,
        policy=policy,
        http=http,
        azure=azure,
        metrics=metrics,
        broker=broker,
        accounts=AccountService(sessions=sessions, keyring=keyring, policy=policy, listener=broker),
        keys=KeyService(sessions=sessions, keystore=keystore, verifier=verifier),
        service_accounts=ServiceAccountService(sessions=sessions, keystore=keystore),
        verifier=verifier,
        secrets=secrets,
        background=Background(
            settings=settings,
            sessions=sessions,
            keystore=keystore,
            broker=broker,
            metrics=metrics,
            federated=secrets.federated,
        ),
    )


async def close_context(ctx: Context, tasks: list[asyncio.Task[None]]) -> None:
    """Stop the background work, then let what may wait on the database or Azure finish side by
    side: each step is bounded (the webhook lease 2 s, key usage 3 s, refreshes in flight half
    the shutdown timeout), so after uvicorn's own wait the whole stays within the pod's grace."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    closing = [ctx.background.flush_key_usage(), ctx.broker.close()]
    if ctx.proxy is not None:
        closing.append(ctx.proxy.close())
    if ctx.notifier is not None:
        closing.append(ctx.notifier.aclose())
    await asyncio.gather(*closing, return_exceptions=True)
    if ctx.verifier is not None:
        await ctx.verifier.aclose()
    await ctx.http.aclose()
    await ctx.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        webhook_url = check_url(settings)  # a bad URL refuses start-up before anything opens
        ctx = await build_context(settings)
        await ctx.background.sync_once()
        await ctx.broker.preload()
        app.state.ctx = ctx
        tasks = ctx.background.start()
        if ctx.proxy is not None:
            tasks.append(ctx.proxy.start())
        if webhook_url:
            ctx.notifier = await webhooks.start(
                webhook_url, sessions=ctx.sessions, http=ctx.http, settings=settings, metrics=ctx.metrics
            )
        try:
            yield
        finally:
            ctx.draining = True
            await close_context(ctx, tasks)
            app.state.ctx = None

    app = FastAPIOffline(
        title="Dynamics Token Broker",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url="/docs/static",
        redoc_url=None,
        swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        # No trailing-slash redirect: Starlette builds its Location from the Host header, which the
        # client controls. ``/accounts/{id}/`` is a 404 like any other unknown path.
        redirect_slashes=False,
    )
    app.state.ctx = None
    problems.install(app)
    problems.install_openapi(app)
    routers = (accounts.router, tokens.router, keys.router, keys.sa_router, oauth.router, health.router)
    for router in (*routers, proxy.router):
        app.include_router(router)
    return app


def wrap(app: FastAPI, settings: Settings) -> TokenFastPath:
    """The layers in front of FastAPI: token fast path, access log, key check, body limit (except
    on proxy paths: see service/proxy/asgi.py)."""

    def context() -> Context | None:
        ctx: Context | None = app.state.ctx
        return ctx

    def proxy_service() -> ProxyService | None:
        ctx = context()
        return ctx.proxy if ctx is not None else None

    # Proxy paths: answered below FastAPI, under their own body limit (service/proxy/asgi.py).
    limited = ProxyBypass(BodyLimit(app, settings.max_body_bytes), app, proxy_service, problem_response)
    inner = AccessLog(RequireKey(limited, context))
    return TokenFastPath(inner, context)


def create_asgi(settings: Settings | None = None) -> TokenFastPath:
    """The served application: ``create_app`` behind the layers of ``wrap``."""
    settings = settings or Settings()
    return wrap(create_app(settings), settings)


__all__ = ["FastAPI", "create_app", "create_asgi"]
