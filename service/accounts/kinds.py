"""Which fields each credential kind takes, and what a kind stores in the broker's credentials row.

Invariants: a request that sends a field another kind uses is refused whole (422, nothing
changes); a certificate is parsed and checked (key matches, not expired) before anything is
stored, and stored sealed to its row and column; switching kinds erases what the old kind stored,
so no secret outlives the kind that needed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from service.accounts import certificates
from service.accounts.credentials import AccountSecrets
from service.errors import InvalidInput
from service.kit import sealing, timeutil
from service.kit.crypto import Keyring
from service.models import Account

# Fields only one kind takes (a null client_secret, which clears, is allowed whatever the kind).
OWN_FIELDS = {
    "client_secret": frozenset({"client_secret", "client_secret_expires_at"}),
    "certificate": frozenset({"certificate"}),
    "federated": frozenset(),
}


def _problem(name: str, message: str, kind: str = "credential_type") -> InvalidInput:
    return InvalidInput(f"{name} {message}", [{"loc": ["body", name], "msg": message, "type": kind}])


def check(kind: str, values: Mapping[str, Any], *, needs_certificate: bool) -> None:
    """Refuse the fields ``kind`` does not use; a certificate kind without one stored needs it."""
    for other, fields in OWN_FIELDS.items():
        if other == kind:
            continue
        for name in sorted(fields & values.keys()):
            if values[name] is not None:
                raise _problem(name, f"is not used by credential_type {kind!r} (only by {other!r})")
    if kind == "certificate" and needs_certificate and not values.get("certificate"):
        raise _problem("certificate", "is required for credential_type 'certificate'", "missing")


def certificate_columns(keyring: Keyring, account_id: str, pem: str) -> dict[str, Any]:
    """The sealed PEM, its thumbprint and notAfter; 422 with a plain reason when it is unusable."""
    try:
        cert = certificates.parse(pem, now=timeutil.utcnow())
    except certificates.CertificateError as exc:
        raise _problem("certificate", str(exc), "certificate") from None
    return {
        "certificate": sealing.seal(keyring, sealing.CERTIFICATE, account_id, pem),
        "certificate_thumbprint": cert.thumbprint,
        "credential_expires_at": cert.not_after,
        "expiry_notified": None,
    }


def cleared_for(kind: str) -> dict[str, Any]:
    """The credentials row columns another kind left behind, erased when switching to ``kind``."""
    values: dict[str, Any] = {"credential_type": kind, "expiry_notified": None}
    if kind != "certificate":
        values |= {"certificate": None, "certificate_thumbprint": None}
    if kind != "client_secret":
        values |= {"previous_client_secret": None, "previous_secret_in_use": False}
    values["credential_expires_at"] = None
    return values


def naive_utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC).replace(tzinfo=None) if value and value.tzinfo else value


def patch_values(
    keyring: Keyring, secrets: AccountSecrets, account: Account, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """The credentials row's new columns for a PATCH (422 for a field the account's kind does not
    use); a replaced client secret is kept as the previous one (``AccountSecrets.as_previous``)."""
    stored = account.credential.credential_type if account.credential else "client_secret"
    kind = changes.get("credential_type") or stored
    check(kind, changes, needs_certificate=kind != stored)
    values: dict[str, Any] = cleared_for(kind) if kind != stored else {}
    if changes.get("certificate"):
        values |= certificate_columns(keyring, account.id, changes["certificate"])
    if kind == "client_secret" and "client_secret" in changes:
        values |= {
            "previous_client_secret": secrets.as_previous(account, changes["client_secret"]),
            "previous_secret_in_use": False,
            "credential_expires_at": None,  # the old secret's expiry says nothing of the new one
            "expiry_notified": None,
        }
    if kind == "client_secret" and "client_secret_expires_at" in changes:
        values |= {
            "credential_expires_at": naive_utc(changes["client_secret_expires_at"]),
            "expiry_notified": None,
        }
    return values
