"""``token-broker serve | migrate | rotate-keys | generate-key``.

``serve`` exits with status 0 after a graceful stop on SIGTERM or SIGINT: uvicorn's own signal
handling re-raises the signal after shutting down (a non-zero exit to Kubernetes), so the
server's signal capture is replaced by handlers that only ask it to exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence

import uvicorn
from pydantic import SecretStr, ValidationError

from service import logconfig
from service.errors import ConfigurationError
from service.kit.crypto import generate_key
from service.settings import Settings

log = logging.getLogger("service.cli")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
                # Already stopping: a second signal must not kill the process mid-teardown
                # (the default handler would, and the exit status would not be 0).
                signal.signal(sig, signal.SIG_IGN)

    def _stop(self) -> None:
        log.info("shutting down")
        self.should_exit = True


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: v for k, v in (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None))) if v
    }
    return Settings(**overrides)


async def _preflight(settings: Settings) -> Settings:
    """Every start-up refusal, before uvicorn runs: a ``ConfigurationError`` becomes one plain line
    and exit status 2 in ``main`` (inside the lifespan uvicorn would print a traceback, exit 3).

    Returns the settings to serve with, holding the admin key read (or generated) here, so the
    app does not load the key file a second time and the log names it once."""
    from service import bootstrap
    from service.kit.db import create_engine, create_sessionmaker
    from service.webhooks.delivery import check_url

    check_url(settings)
    keyring = bootstrap.load_keyring(settings)
    admin_keys = bootstrap.load_admin_keys(settings)
    engine = create_engine(settings)
    try:
        await bootstrap.check_schema(engine)
        await bootstrap.check_keys(create_sessionmaker(engine), keyring)
    finally:
        await engine.dispose()
    return settings.model_copy(update={"admin_keys": SecretStr(",".join(admin_keys))})


def serve(args: argparse.Namespace) -> int:
    from service.app import create_asgi
    from service.serving import MAX_HEADER_BYTES, GuardedHttpToolsProtocol

    settings = _settings(args)
    logconfig.configure(settings.log_level)
    settings = asyncio.run(_preflight(settings))
    config = uvicorn.Config(
        create_asgi(settings),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
        # Longer than clients' and load balancers' idle timeouts (httpx: 5 s), so the server never
        # closes a connection a client is about to reuse.
        timeout_keep_alive=int(settings.keep_alive_seconds),
        # Slow or endless request heads and bodies are cut off (serving.py); beyond
        # BROKER_MAX_CONNECTIONS connections (or requests in progress) uvicorn answers 503.
        http=GuardedHttpToolsProtocol.configured(
            header_timeout=settings.header_timeout_seconds, body_timeout=settings.body_timeout_seconds
        ),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=settings.max_connections,
    )
    server = _Server(config)
    server.run()  # uvicorn's loop factory: uvloop when installed
    if not server.started:
        log.error("refusing to serve: start-up failed (see the error above)")
        return 1
    return 0


def migrate(args: argparse.Namespace) -> int:
    from service import migrate as migrations

    settings = Settings()
    logconfig.configure(settings.log_level)
    from service.kit.db import sqlite_path

    path = sqlite_path(settings.database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(migrations.upgrade(settings.database_url, args.revision))
    log.info("database migrated", extra={"revision": args.revision})
    return 0


def rotate_keys(_args: argparse.Namespace) -> int:
    from service.bootstrap import check_schema, load_keyring
    from service.kit.db import create_engine, create_sessionmaker
    from service.rotation.service import rotate_all

    settings = Settings()
    logconfig.configure(settings.log_level)

    async def run() -> int:
        keyring = load_keyring(settings)
        engine = create_engine(settings)
        try:
            await check_schema(engine)
            report = await rotate_all(create_sessionmaker(engine), keyring)
        finally:
            await engine.dispose()
        print(
            f"re-encrypted {report.values} values in {report.accounts} accounts and {report.pending} pending "
            f"authorizations with key id {keyring.primary_key_id}"
        )
        return 0

    return asyncio.run(run())


def generate(_args: argparse.Namespace) -> int:
    print("# a new encryption key; put it first in BROKER_ENCRYPTION_KEYS, keep the old ones after it")
    print(generate_key())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="token-broker", description="Dynamics Token Broker")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve the API (settings from BROKER_* variables)")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.set_defaults(func=serve)
    p_migrate = sub.add_parser("migrate", help="upgrade the database schema")
    p_migrate.add_argument("--revision", default="head")
    p_migrate.set_defaults(func=migrate)
    sub.add_parser("rotate-keys", help="re-encrypt every stored secret with the first key").set_defaults(
        func=rotate_keys
    )
    sub.add_parser("generate-key", help="print a new encryption key").set_defaults(func=generate)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ValidationError as exc:
        # A field's error names its variable; a cross-field check's message names them itself.
        problems = "; ".join(
            f"BROKER_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        print(f"token-broker: invalid settings: {problems}", file=sys.stderr)
        return 2
    except ConfigurationError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
