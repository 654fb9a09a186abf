"""Where each stored secret's encryption context comes from: table, column and row.

The context is AES-GCM associated data, so a ciphertext copied to another row or column does
not decrypt. ``REFRESH_TOKEN`` is stored as '' (not encrypted) before authorization, because the
seed's consumers read an empty column as "not authorized yet".
"""

from __future__ import annotations

from service.kit.crypto import Keyring

CLIENT_SECRET = "ms_dynamics_365_data.CLIENT_SECRET"
REFRESH_TOKEN = "ms_dynamics_365_data.REFRESH_TOKEN"
ACCESS_TOKEN = "broker_account_state.access_token"
CODE_VERIFIER = "broker_pending_authorizations.code_verifier"
CERTIFICATE = "broker_account_credentials.certificate"
PREVIOUS_CLIENT_SECRET = "broker_account_credentials.previous_client_secret"


def context(column: str, row_id: str) -> str:
    return f"{column}:{row_id}"


def seal(keyring: Keyring, column: str, row_id: str, plaintext: str | None) -> str | None:
    if plaintext is None:
        return None
    if plaintext == "":
        return ""
    return keyring.encrypt(plaintext, context=context(column, row_id))


def unseal(keyring: Keyring, column: str, row_id: str, stored: str | None) -> str | None:
    if stored is None:
        return None
    if stored == "":
        return ""
    return keyring.decrypt(stored, context=context(column, row_id))
