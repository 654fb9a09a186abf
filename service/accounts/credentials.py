"""An account's secrets, opened for the one request that needs them.

Invariant: a stored secret is only ever decrypted here, with the column and row it was sealed for
(a ciphertext copied to another row or column does not open), and a failure says which key id is
missing without echoing the ciphertext. Other features ask this object; none holds the keyring.
The credential kinds meet here too: ``credentials`` hands the Azure AD client exactly one way to
authenticate (a secret, with the previous one while a replacement propagates; a certificate's
signing key; or the federated token file), and what it hands out compares equal for as long as
the account's stored credential is the same (a refresh checks this before storing its result).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.accounts import certificates
from service.accounts.federated import FederatedTokenFile
from service.errors import InvalidCredentials, StorageUnavailable
from service.idp.azure_ad import ClientAssertion, ClientCredentials
from service.kit import sealing, timeutil
from service.kit.crypto import DecryptionError, Keyring, UnknownKeyError
from service.models import Account

log = logging.getLogger("service.accounts")


@dataclass(frozen=True)
class CertificateAssertion:
    """Signs a new client assertion per request with the account's certificate key."""

    client_id: str
    certificate: certificates.Certificate  # compares by thumbprint and notAfter, not the key

    def assertion(self, audience: str, now: float) -> str:
        return certificates.client_assertion(
            self.certificate, client_id=self.client_id, audience=audience, now=now
        )


@dataclass(frozen=True)
class Unusable:
    """A credential that cannot sign: refuses when the request is made, so the refusal is
    recorded on the account like Azure's own."""

    detail: str
    code: str

    def assertion(self, audience: str, now: float) -> str:
        raise InvalidCredentials(self.detail, idp_code=self.code)


class AccountSecrets:
    def __init__(self, keyring: Keyring, federated: FederatedTokenFile | None = None) -> None:
        self._keyring = keyring
        self.federated = federated or FederatedTokenFile(None)

    def unseal(self, column: str, row_id: str, stored: str | None) -> str | None:
        try:
            return sealing.unseal(self._keyring, column, row_id, stored)
        except DecryptionError as exc:
            log.error("cannot decrypt stored secret", extra={"account_id": row_id, "reason": str(exc)})
            # The keyring's message names the column and the key id, never the value.
            hint = (
                "add the key that made it to BROKER_ENCRYPTION_KEYS"
                if isinstance(exc, UnknownKeyError)
                else "check BROKER_ENCRYPTION_KEYS, or set the secret again (PATCH or authorize the account)"
            )
            raise StorageUnavailable(
                f"A stored secret of this account cannot be decrypted ({exc}); {hint}.",
                reason="decryption_failed",
            ) from None

    def credentials(self, account: Account, *, with_secret: bool = True) -> ClientCredentials:
        """What Azure AD is asked with for this account (the secret only when it will be sent)."""
        kind = account.credential.credential_type if account.credential else "client_secret"
        secret = previous = None
        assertion: ClientAssertion | None = None
        if kind == "client_secret" and with_secret:
            secret = self.unseal(sealing.CLIENT_SECRET, account.id, account.client_secret)
            if account.credential is not None:
                previous = self.unseal(
                    sealing.PREVIOUS_CLIENT_SECRET, account.id, account.credential.previous_client_secret
                )
        elif kind == "certificate" and with_secret:
            assertion = self._certificate(account)
        elif kind == "federated":
            assertion = self.federated
        return ClientCredentials(
            tenant_id=account.tenant_id,
            client_id=account.client_id,
            client_secret=secret,
            token_url=account.token_url,
            authorization_url=account.authorization_url,
            api_url=account.api_url,
            assertion=assertion,
            previous_client_secret=previous,
        )

    def _certificate(self, account: Account) -> ClientAssertion:
        assert account.credential is not None
        pem = self.unseal(sealing.CERTIFICATE, account.id, account.credential.certificate)
        if not pem:
            return Unusable(
                "The account has no certificate; PATCH it with certificate", "certificate_missing"
            )
        try:
            # Checked again on every use: an expired certificate is named, not sent to Azure.
            cert = certificates.parse(pem, now=timeutil.utcnow())
        except certificates.CertificateError as exc:
            detail = f"The account's certificate cannot be used ({exc}); PATCH it with a new certificate"
            return Unusable(detail, "certificate_invalid")
        return CertificateAssertion(account.client_id, cert)

    def as_previous(self, account: Account, new_secret: str | None) -> str | None:
        """The sealed secret to keep as the previous one when ``new_secret`` replaces the account's.

        A previous secret already kept stays: the current one has never worked (its first success
        erases the previous), so the previous is still the last one known to work."""
        if not new_secret:
            return None  # clearing the secret clears its fallback too
        if account.credential is not None and account.credential.previous_client_secret:
            return account.credential.previous_client_secret
        current = self.unseal(sealing.CLIENT_SECRET, account.id, account.client_secret)
        if not current or current == new_secret:
            return None
        return sealing.seal(self._keyring, sealing.PREVIOUS_CLIENT_SECRET, account.id, current)

    def refresh_token(self, account: Account) -> str:
        return self.unseal(sealing.REFRESH_TOKEN, account.id, account.refresh_token) or ""
