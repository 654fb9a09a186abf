"""The broker's error kinds, each carrying its HTTP status and a stable ``code``.

    BrokerError                      base: status, code, title, detail, headers
    ├── Unauthorized                 401 unauthorized      (no or wrong API key)
    ├── Forbidden                    403 forbidden         (the key's role may not)
    ├── NotFound                     404 account_not_found / key_not_found / service_account_not_found
    ├── InvalidInput                 422 validation_error  (carries per-field errors)
    ├── NameConflict                 409 name_conflict
    ├── VersionConflict              412 version_conflict
    ├── InvalidState                 400 invalid_state     (OAuth state unknown, expired or used)
    ├── AuthorizationDenied          400 authorization_denied (the IdP redirected with an error)
    ├── PayloadTooLarge              413 payload_too_large
    ├── InvalidProxyPath             400 invalid_path      (a proxied path that leaves the API URL)
    ├── Throttled                    429 throttled with Retry-After (the account's proxy budget)
    ├── BadGateway                   502 upstream_error    (the Dynamics Web API could not be reached)
    ├── ActionRequired               409: a person must act before tokens flow again
    │   ├── NeedsAuthorization       409 needs_authorization (no refresh token, or invalid_grant)
    │   └── InvalidCredentials       409 invalid_credentials (invalid_client: fix the secret)
    └── Unavailable                  503 with Retry-After: try again later
        ├── UpstreamUnavailable      503 upstream_unavailable (Azure AD down, slow, throttling, odd)
        ├── StorageUnavailable       503 storage_unavailable  (the database cannot be reached)
        └── IssuerUnavailable        503 issuer_unavailable   (the cluster's JWKS / TokenReview)

Everything raised inside the broker is one of these; foreign exceptions (httpx, SQLAlchemy,
JSON) are translated where they occur, and ``api/problems.py`` renders them in one place. Messages
never carry a secret: they are built from codes and Azure's sanitised descriptions only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class BrokerError(Exception):
    """A failure with an HTTP status, a stable machine-readable code and a human detail."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def extra(self) -> dict[str, Any]:
        """Members added to the problem document beside the standard ones."""
        return {}


class ConfigurationError(Exception):
    """Settings or keys are inconsistent: the service refuses to start (not an HTTP error)."""


class Unauthorized(BrokerError):
    status = 401
    code = "unauthorized"
    title = "Missing or invalid API key"

    def __init__(self, detail: str = "Send a valid API key as 'Authorization: Bearer <key>'.") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="token-broker"'})


class Forbidden(BrokerError):
    status = 403
    code = "forbidden"
    title = "Not allowed for this API key"


class NotFound(BrokerError):
    status = 404
    code = "not_found"
    title = "Not found"


class AccountNotFound(NotFound):
    code = "account_not_found"
    title = "Account not found"

    def __init__(self, account_id: str | None = None) -> None:
        # The id is not echoed: a scoped key must not learn anything from the answer.
        super().__init__("No such account, or this API key may not use it.")
        self.account_id = account_id


class KeyNotFound(NotFound):
    code = "key_not_found"
    title = "API key not found"

    def __init__(self) -> None:
        super().__init__("No such API key.")


class ServiceAccountNotFound(NotFound):
    code = "service_account_not_found"
    title = "Service-account binding not found"

    def __init__(self) -> None:
        super().__init__("No service-account binding with this id.")


class InvalidInput(BrokerError):
    status = 422
    code = "validation_error"
    title = "Invalid request"

    def __init__(self, detail: str, errors: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(detail)
        self.errors = [dict(e) for e in errors]

    def extra(self) -> dict[str, Any]:
        return {"errors": self.errors}


class NameConflict(BrokerError):
    status = 409
    code = "name_conflict"
    title = "Name already taken"


class VersionConflict(BrokerError):
    status = 412
    code = "version_conflict"
    title = "The account changed since you read it"


class InvalidState(BrokerError):
    status = 400
    code = "invalid_state"
    title = "Unknown, expired or already used authorization state"


class AuthorizationDenied(BrokerError):
    status = 400
    code = "authorization_denied"
    title = "Azure AD did not authorize the account"


class PayloadTooLarge(BrokerError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class InvalidProxyPath(BrokerError):
    status = 400
    code = "invalid_path"
    title = "The path leaves the account's API URL"


class Throttled(BrokerError):
    """The account's callers share one budget: wait ``retry_after`` seconds (a whole number)."""

    status = 429
    code = "throttled"
    title = "Too many requests for this account; try again later"

    def __init__(self, detail: str, *, retry_after: float, reason: str) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(detail, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds
        self.reason = reason

    def extra(self) -> dict[str, Any]:
        return {"reason": self.reason, "retry_after": self.retry_after}


class BadGateway(BrokerError):
    status = 502
    code = "upstream_error"
    title = "The Dynamics Web API could not be reached"


class ActionRequired(BrokerError):
    """A person must act (re-authorize, fix the secret); retrying alone will not help."""

    status = 409

    def __init__(self, detail: str, *, idp_code: str | None = None, idp_message: str | None = None) -> None:
        super().__init__(detail)
        self.idp_code = idp_code
        self.idp_message = idp_message


class NeedsAuthorization(ActionRequired):
    code = "needs_authorization"
    title = "The account must be authorized again"


class InvalidCredentials(ActionRequired):
    code = "invalid_credentials"
    title = "Azure AD rejected the account's client credentials"


class Unavailable(BrokerError):
    """Transient: the caller should retry after ``retry_after`` seconds."""

    status = 503

    def __init__(self, detail: str, *, retry_after: float = 1.0, reason: str = "unavailable") -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(detail, headers={"Retry-After": str(seconds)})
        self.retry_after = float(seconds)
        self.reason = reason

    def extra(self) -> dict[str, Any]:
        return {"reason": self.reason, "retry_after": int(self.retry_after)}


class UpstreamUnavailable(Unavailable):
    code = "upstream_unavailable"
    title = "Azure AD is unavailable; try again later"

    def __init__(
        self,
        detail: str,
        *,
        retry_after: float = 1.0,
        reason: str = "unavailable",
        idp_code: str | None = None,
    ) -> None:
        super().__init__(detail, retry_after=retry_after, reason=reason)
        self.idp_code = idp_code


class StorageUnavailable(Unavailable):
    code = "storage_unavailable"
    title = "The database is unavailable; try again later"


class IssuerUnavailable(Unavailable):
    code = "issuer_unavailable"
    title = "The cluster's service-account issuer is unavailable; try again later"
