"""An account's secrets, opened for the one request that needs them.

Invariant: a stored secret is only ever decrypted here, with the column and row it was sealed for
(a ciphertext copied to another row or column does not open), and a failure says which key id is
missing without echoing the ciphertext. Other features ask this object; none holds the keyring.
"""

from __future__ import annotations

import logging

from service.errors import StorageUnavailable
from service.idp.azure_ad import ClientCredentials
from service.kit import sealing
from service.kit.crypto import DecryptionError, Keyring, UnknownKeyError
from service.models import Account

log = logging.getLogger("service.accounts")


class AccountSecrets:
    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

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
        return ClientCredentials(
            tenant_id=account.tenant_id,
            client_id=account.client_id,
            client_secret=self.unseal(sealing.CLIENT_SECRET, account.id, account.client_secret)
            if with_secret
            else None,
            token_url=account.token_url,
            authorization_url=account.authorization_url,
            api_url=account.api_url,
        )

    def refresh_token(self, account: Account) -> str:
        return self.unseal(sealing.REFRESH_TOKEN, account.id, account.refresh_token) or ""
