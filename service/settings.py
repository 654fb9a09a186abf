"""Every knob of the broker, read from ``BROKER_*`` environment variables.

Nothing reads the environment at import time: ``Settings()`` is built by the CLI or a test and
passed to ``create_app``. Lists are comma-separated strings in the environment (the contract);
the ``*_list`` helpers split them. Secrets are ``SecretStr`` so that a ``repr`` never shows them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/token-broker.db"

# Microsoft's sign-in and Dynamics hosts, public cloud and the national clouds
# (US Government, China, Germany legacy), so an out-of-the-box broker can talk to any of them.
DEFAULT_ALLOWED_HOSTS = ",".join(
    [
        "login.microsoftonline.com",
        "login.windows.net",
        "login.microsoftonline.us",
        "login.partner.microsoftonline.cn",
        "login.chinacloudapi.cn",
        "login.microsoftonline.de",
        "*.dynamics.com",
        "*.crm.dynamics.com",
        "*.dynamics.us",
        "*.crm.microsoftdynamics.us",
        "*.appsplatform.us",
        "*.dynamics.cn",
        "*.crm.dynamics.cn",
        "*.microsoftdynamics.de",
    ]
)


def split_list(raw: str | None) -> list[str]:
    """Split a comma-separated setting, dropping blanks and surrounding spaces."""
    if not raw:
        return []
    return [part.strip() for part in raw.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    encryption_keys: SecretStr | None = None
    admin_keys: SecretStr | None = None
    client_keys: SecretStr | None = None
    allowed_hosts: str = DEFAULT_ALLOWED_HOSTS
    allow_http: bool = False
    refresh_margin_seconds: int = Field(default=300, ge=0, le=86_400)
    min_token_ttl_seconds: int = Field(default=60, ge=0, le=3_600)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65_535)
    public_url: str | None = None
    # Exact redirect URIs POST /authorize may name besides the hosted callback and loopback.
    allowed_redirect_uris: str = ""

    # Beyond the contract.
    var_dir: Path = Path("./var")
    idp_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    lock_wait_seconds: int = Field(default=20, ge=1, le=600)
    max_wait_seconds: float = Field(default=30.0, gt=0, le=600)
    # A min_ttl the cached token cannot meet refreshes at most this often per account (and
    # replica): Azure answers a token of the same lifetime, so repeating it must not redeem a
    # refresh token on every request.
    forced_refresh_interval_seconds: float = Field(default=30.0, ge=0, le=3_600)
    # Refreshes this replica has claiming or at Azure at once (service/tokens/limiter.py); none holds a
    # database connection while Azure answers, so this is independent of the pool.
    max_concurrent_refreshes: int = Field(default=64, ge=1, le=4_096)
    backoff_base_seconds: float = Field(default=1.0, ge=0)
    backoff_max_seconds: float = Field(default=10.0, ge=0)
    keepalive_interval_seconds: int = Field(default=86_400, ge=60)
    sync_interval_seconds: float = Field(default=5.0, gt=0, le=5.0)
    max_body_bytes: int = Field(default=65_536, ge=1_024)
    # What one client may make `serve` hold (service/serving.py): the request head within this
    # many seconds of connecting (or of its first byte), the body within this many after it.
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3_600)
    keep_alive_seconds: float = Field(default=75.0, ge=1, le=3_600)
    max_connections: int = Field(default=4_096, ge=1)
    shutdown_timeout_seconds: float = Field(default=10.0, gt=0, le=14)
    log_level: str = "INFO"
    access_log_sample_rate: float = Field(default=0.0, ge=0, le=1)
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    # Webhook delivery (service/webhooks.py): how often the lease holder looks for new events,
    # how long one POST may take, and how often a failing delivery is tried before giving up.
    webhook_poll_seconds: float = Field(default=2.0, gt=0, le=60)
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    webhook_max_attempts: int = Field(default=6, ge=1, le=20)
    webhook_backoff_base_seconds: float = Field(default=5.0, ge=0, le=300)
    webhook_backoff_max_seconds: float = Field(default=120.0, ge=0, le=3_600)
    # How long a gap in event ids may be an uncommitted transaction before it is skipped (MySQL).
    webhook_gap_grace_seconds: float = Field(default=10.0, ge=0, le=300)
    create_schema: bool = False
    # How often a replica looks for expiring credentials (notices and broker_credentials_expiring).
    credential_scan_interval_seconds: float = Field(default=900.0, gt=0, le=86_400)
    # Workload identity federation: the projected service-account token that accounts with
    # credential_type "federated" send as their client assertion. Azure Workload Identity's webhook
    # sets AZURE_FEDERATED_TOKEN_FILE; BROKER_FEDERATED_TOKEN_FILE wins when both are set.
    federated_token_file: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "BROKER_FEDERATED_TOKEN_FILE", "AZURE_FEDERATED_TOKEN_FILE", "federated_token_file"
        ),
    )

    # Kubernetes service-account callers (DESIGN.md "Service-account callers"); unset issuer: off.
    k8s_issuer: str | None = None
    k8s_audience: str = Field(default="dynamics-token-broker", min_length=1)
    k8s_jwks_url: str | None = None  # default: the issuer's discovery document's jwks_uri
    k8s_ca_file: Path | None = None  # the CA of an in-cluster JWKS / API server endpoint
    k8s_token_file: Path | None = None  # bearer for the JWKS and TokenReview (re-read each time)
    k8s_token_review: bool = False
    k8s_api_url: str = "https://kubernetes.default.svc"  # where TokenReview is asked

    # The proxy to the Dynamics Web API (service/proxy/): body limit, per-account pacing per
    # replica (16 x 3 replicas stays under Dataverse's 52 concurrent requests), how long a caller
    # may wait for a place, how long upstream may take, and how often pauses set by other
    # replicas are read.
    proxy_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1_024)
    proxy_max_concurrent: int = Field(default=16, ge=1, le=1_000)
    proxy_max_wait_seconds: float = Field(default=10.0, ge=0, le=600)
    proxy_timeout_seconds: float = Field(default=120.0, gt=0, le=600)
    proxy_pause_poll_seconds: float = Field(default=1.0, gt=0, le=5)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # The lock wait must outlast an IdP call, or a replica waiting on another's refresh
        # would give up while that refresh is still legitimately in progress.
        if self.lock_wait_seconds <= self.idp_timeout_seconds:
            raise ValueError(
                "BROKER_LOCK_WAIT_SECONDS must be longer than BROKER_IDP_TIMEOUT_SECONDS "
                f"({self.lock_wait_seconds} <= {self.idp_timeout_seconds})"
            )
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("BROKER_WEBHOOK_URL is set but BROKER_WEBHOOK_SECRET is not")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def allowed_host_list(self) -> list[str]:
        return [h.lower() for h in split_list(self.allowed_hosts)]

    @property
    def allowed_redirect_uri_list(self) -> list[str]:
        return split_list(self.allowed_redirect_uris)

    @property
    def effective_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def secret_list(self, value: SecretStr | None) -> list[str]:
        return split_list(value.get_secret_value() if value else None)
