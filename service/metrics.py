"""Prometheus metrics, in a registry owned by the app (no global default registry).

Labels never carry a secret or an account id (their number is not bounded); outcomes and
grant types are small fixed sets.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

TOKEN_OUTCOMES = (
    "hit",
    "stale_served",
    "loaded",
    "refreshed",
    "not_found",
    "needs_authorization",
    "invalid_credentials",
    "upstream_unavailable",
    "storage_unavailable",
)

PROXY_OUTCOMES = (
    "ok",
    "upstream_4xx",
    "upstream_5xx",
    "throttled_upstream",
    "throttled_local",
    "refreshed_retry",
)


class TokenOutcomes(Collector):
    """``broker_token_requests_total{outcome}`` kept in a plain dict.

    A cache hit adds one to an int (no lock, no label lookup): the event loop is the only writer,
    and the scrape reads the numbers when it happens.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(TOKEN_OUTCOMES, 0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "broker_token_requests",
            "Token requests by outcome (hit, stale_served, error codes: one per request); loaded and "
            "refreshed count how a missing token was obtained (one per refresh, whatever its waiters)",
            labels=["outcome"],
        )
        for outcome, count in self.counts.items():
            family.add_metric([outcome], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.token_outcomes = TokenOutcomes()
        self.tokens = self.token_outcomes.counts  # tokens["hit"] += 1 on the hot path
        r.register(self.token_outcomes)
        self.idp_requests = Counter(
            "broker_idp_requests", "Calls to Azure AD by grant and outcome", ["grant", "outcome"], registry=r
        )
        self.idp_latency = Histogram(
            "broker_idp_request_seconds",
            "Latency of Azure AD token calls",
            ["grant"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.refresh_waiters = Gauge(
            "broker_refresh_waiters", "Callers waiting on an in-flight refresh", registry=r
        )
        self.refreshes_in_flight = Gauge(
            "broker_refreshes_in_flight", "Refreshes running in this process", registry=r
        )
        self.cache_size = Gauge("broker_token_cache_size", "Access tokens cached in memory", registry=r)
        self.accounts_by_status = Gauge("broker_accounts", "Accounts by status", ["status"], registry=r)
        self.lock_wait = Histogram(
            "broker_lock_wait_seconds",
            "Time spent waiting for an account's token row lock",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
            registry=r,
        )
        self.refresh_token_unsaved = Counter(
            "broker_refresh_token_unsaved",
            "Rotated refresh tokens that could not be stored (the old one must still work)",
            registry=r,
        )
        self.credentials_expiring = Gauge(
            "broker_credentials_expiring",
            "Accounts whose secret or certificate expires within 30 or 7 days (not yet expired), or "
            "has expired",
            ["within"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "broker_webhook_deliveries", "Webhook deliveries by outcome", ["outcome"], registry=r
        )

        # The proxy (service/proxy/): one outcome per proxied request, by the answer it got.
        self.proxy_requests = Counter(
            "broker_proxy_requests",
            "Proxied requests by outcome (ok, upstream_4xx, upstream_5xx, throttled_upstream, "
            "throttled_local, refreshed_retry: a 2xx/3xx after one refresh and resend)",
            ["outcome"],
            registry=r,
        )
        for outcome in PROXY_OUTCOMES:
            self.proxy_requests.labels(outcome)
        self.proxy_latency = Histogram(
            "broker_proxy_upstream_seconds",
            "Time from sending a proxied request to the upstream's response headers",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 120),
            registry=r,
        )
        self.proxy_queue_wait = Histogram(
            "broker_proxy_queue_wait_seconds",
            "Time a proxied request waited for its account's place (queue and upstream pause)",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.proxy_paused = Gauge(
            "broker_proxy_paused_accounts",
            "Accounts the proxy is holding back on upstream's request",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
