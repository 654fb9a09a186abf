"""Forwarding to the Dynamics Web API with the account's token, paced for all of its callers.

Invariants:
* Only ``{api_url}/{path}`` of the account is ever called (``paths.py``), with the account's bearer
  token and none of the caller's credentials (``headers.py``); redirects are not followed.
* A request is sent only while holding a place of the account's limit and when the account is
  not paused (``pacing.py``); the place is held until the upstream response is closed, so the
  limit counts what upstream is really serving.
* An upstream 429 or 503 with Retry-After pauses the account here at once and on the other
  replicas through the database (``pauses.py``); the response itself goes back as it is.
* An upstream 401 costs one forced refresh per rejected token (``refresh.py``) and one resend
  when the body is replayable (empty, or buffered because it was at most ``REPLAY_BYTES``).
* Network errors are 502, never retried, except a replayable GET once after a connection error.
* Response bodies are streamed back raw (a body announced at most 64 KiB is read whole first).
* Request bodies larger than ``BROKER_PROXY_MAX_BODY_BYTES`` are refused (413), by Content-Length
  before anything is read, or while streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import AccountNotFound, BadGateway, BrokerError, PayloadTooLarge, Throttled
from service.keys.store import Principal
from service.kit.outbound import OutboundPolicy
from service.metrics import Metrics
from service.proxy import headers as hdrs
from service.proxy import paths
from service.proxy.pacing import Pacer, Slot, retry_after_seconds
from service.proxy.pauses import PauseBook, PauseSync
from service.proxy.refresh import TokenRenewer
from service.settings import Settings
from service.tokens.broker import TokenBroker
from service.tokens.response import CachedToken

log = logging.getLogger("service.proxy")

REPLAY_BYTES = 1024 * 1024  # bodies up to this are buffered, so a 401 can be answered by a resend
THROTTLE_STATUSES = (429, 503)
SMALL_BYTES = 64 * 1024


@dataclass
class Incoming:
    """What the endpoint hands over of the caller's request."""

    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: AsyncIterator[bytes]


@dataclass
class Body:
    """The request body: ``content`` when buffered (replayable), else a stream sent once."""

    content: bytes | None
    stream: AsyncIterator[bytes] | None = None
    length: bytes | None = None  # the caller's Content-Length, kept when the body is streamed

    @property
    def replayable(self) -> bool:
        return self.content is not None


class Relay(StreamingResponse):
    """The upstream response streamed back raw; ``on_close`` runs however the stream ends."""

    def __init__(self, upstream: httpx.Response, on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(upstream.aiter_raw(), status_code=upstream.status_code)
        self.raw_headers = hdrs.response_headers(upstream.headers.raw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def take_body(stream: AsyncIterator[bytes], limit: int, declared: bytes | None) -> Body:
    """Buffer up to ``REPLAY_BYTES``; a longer body is streamed on, counted against ``limit``."""
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"Send at most {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Send at most {limit} bytes.")
        chunks.append(chunk)
        if size > REPLAY_BYTES:
            return Body(None, _counted(chunks, stream, size, limit), declared)
    return Body(b"".join(chunks))


async def _counted(
    head: list[bytes], stream: AsyncIterator[bytes], size: int, limit: int
) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Send at most {limit} bytes.")
        yield chunk


def _small(upstream: httpx.Response) -> bool:
    """A body announced at most ``SMALL_BYTES`` long is read whole and sent in one message: the
    streaming machinery costs more than the copy, and the account's place is freed sooner."""
    length = upstream.headers.get("content-length", "")
    return length.isdigit() and int(length) <= SMALL_BYTES


def outcome_of(status: int, *, resent: bool, throttled: bool) -> str:
    if throttled or status == 429:
        return "throttled_upstream"
    if status >= 500:
        return "upstream_5xx"
    if status >= 400:
        return "upstream_4xx"
    return "refreshed_retry" if resent else "ok"


class ProxyService:
    def __init__(
        self,
        *,
        broker: TokenBroker,
        policy: OutboundPolicy,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        metrics: Metrics,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._broker = broker
        self._policy = policy
        self._settings = settings
        self._metrics = metrics
        self.pauses = PauseBook(clock)
        self.sync = PauseSync(self.pauses, sessions, interval=settings.proxy_pause_poll_seconds)
        self.pacer = Pacer(
            capacity=settings.proxy_max_concurrent,
            max_wait=settings.proxy_max_wait_seconds,
            pauses=self.pauses,
            sleep=sleep,
        )
        self.renewer = TokenRenewer(broker)
        self.http = http or httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(
                settings.proxy_timeout_seconds, connect=10.0, pool=settings.proxy_max_wait_seconds
            ),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._background: set[asyncio.Task[CachedToken]] = set()
        metrics.proxy_paused.set_function(self.pauses.active_count)

    # -- the request ----------------------------------------------------------------------------

    def check_path(self, incoming: Incoming) -> str:
        """The raw path below ``/accounts/{id}/api/``, refused (400) if it could leave the API URL."""
        self.sync.touch()
        return paths.check_remainder(paths.raw_remainder(incoming.raw_path))

    async def forward(self, account_id: str, rest: str, incoming: Incoming) -> Response:
        """Send the request for an account already resolved and in the caller's scope."""
        declared = next((v for k, v in incoming.headers if k.lower() == b"content-length"), None)
        body = await take_body(incoming.body, self._settings.proxy_max_body_bytes, declared)
        token = await self._broker.get_token(account_id)
        url = paths.target(token.api_url, rest, incoming.query, self._policy)
        await self.sync.fresh()
        try:
            slot = await self.pacer.acquire(account_id)
        except Throttled:
            self._count("throttled_local")
            raise
        self._metrics.proxy_queue_wait.observe(slot.waited)
        try:
            upstream, resent = await self._exchange(account_id, incoming, url, body, token, slot)
        except BaseException:
            slot.release()
            raise
        throttled = upstream.status_code in THROTTLE_STATUSES and "retry-after" in upstream.headers
        self._count(outcome_of(upstream.status_code, resent=resent, throttled=throttled))

        async def close() -> None:
            try:
                await upstream.aclose()
            finally:
                slot.release()

        if _small(upstream):
            try:
                content = b"".join([chunk async for chunk in upstream.aiter_raw()])
            except httpx.HTTPError:
                raise BadGateway("The Dynamics Web API broke off its answer.") from None
            finally:
                await close()
            small = Response(content, status_code=upstream.status_code)
            small.raw_headers = hdrs.response_headers(upstream.headers.raw)
            return small
        return Relay(upstream, close)

    async def resolve(self, caller: Principal, account_id: str) -> str:
        """The token endpoint's rule: outside the key's scope answers exactly as a missing account."""
        broker = self._broker
        if account_id == "default":
            try:
                account_id = await broker.resolve(account_id)
            except AccountNotFound:
                await broker.exists(account_id)
                raise
        if not caller.may_use(account_id):
            await broker.exists(account_id)
            raise AccountNotFound(account_id)
        return account_id

    async def _exchange(
        self, account_id: str, incoming: Incoming, url: httpx.URL, body: Body, token: CachedToken, slot: Slot
    ) -> tuple[httpx.Response, bool]:
        upstream = await self._send(account_id, incoming, url, body, token)
        if upstream.status_code != 401:
            return upstream, False
        if not body.replayable:
            self._renew_in_background(account_id, token)
            return upstream, False
        fresh = await self.renewer.renew(account_id, token)
        if fresh.access_token == token.access_token or self.pauses.remaining(account_id) > 0:
            return upstream, False  # nothing better to send with, or paused meanwhile: the 401 goes back
        await upstream.aclose()
        return await self._send(account_id, incoming, url, body, fresh), True

    async def _send(
        self, account_id: str, incoming: Incoming, url: httpx.URL, body: Body, token: CachedToken
    ) -> httpx.Response:
        outgoing = hdrs.request_headers(incoming.headers, token.access_token)
        if body.length is not None:
            outgoing.append((b"content-length", body.length))
        content = body.content if body.content is not None else body.stream
        request = self.http.build_request(incoming.method, url, headers=outgoing, content=content)
        started = time.perf_counter()
        try:
            try:
                response = await self.http.send(request, stream=True)
            except httpx.ConnectError:
                if incoming.method != "GET" or not body.replayable:
                    raise
                response = await self.http.send(request, stream=True)  # once: nothing reached upstream
        except PayloadTooLarge:
            raise
        except httpx.TimeoutException:
            self._count("upstream_5xx")
            raise BadGateway("The Dynamics Web API did not answer in time.") from None
        except httpx.HTTPError as exc:
            self._count("upstream_5xx")
            raise BadGateway(f"The Dynamics Web API could not be reached ({type(exc).__name__}).") from None
        finally:
            self._metrics.proxy_latency.observe(time.perf_counter() - started)
        self._note_throttling(account_id, response)
        return response

    def _note_throttling(self, account_id: str, response: httpx.Response) -> None:
        if response.status_code not in THROTTLE_STATUSES:
            return
        now = self.pauses.clock()
        seconds = retry_after_seconds(response.headers.get("retry-after"), now)
        if seconds is not None and seconds > 0:
            self.sync.pause(account_id, now + seconds)

    def _renew_in_background(self, account_id: str, token: CachedToken) -> None:
        """The 401 goes back (the body cannot be sent again), but the next request gets a new token."""
        task = asyncio.get_running_loop().create_task(self.renewer.renew(account_id, token))
        self._background.add(task)

        def _done(t: asyncio.Task[CachedToken]) -> None:
            self._background.discard(t)
            if not t.cancelled() and isinstance(t.exception(), BrokerError):
                log.info("token refresh after a 401 failed", extra={"account_id": account_id})

        task.add_done_callback(_done)

    def _count(self, outcome: str) -> None:
        self._metrics.proxy_requests.labels(outcome).inc()

    # -- lifetime -------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.sync.run())

    async def close(self) -> None:
        await self.sync.close()
        for task in list(self._background):
            task.cancel()
        await self.http.aclose()
