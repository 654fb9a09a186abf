"""First-start secrets and start-up checks: refuse to serve rather than serve wrong.

On the embedded SQLite default, a missing encryption key or admin key is generated once into
``BROKER_VAR_DIR`` (mode 0600) and the log names the file, never the key. With MySQL the
encryption keys must come from the environment: replicas must share them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.errors import ConfigurationError
from service.keys.store import new_key
from service.kit import sealing
from service.kit.crypto import DecryptionError, Keyring, generate_key
from service.migrate import current_revision, head_revision
from service.rotation import repository as rotation_repo
from service.settings import Settings

log = logging.getLogger("service.bootstrap")

ENCRYPTION_KEY_FILE = "encryption.key"
ADMIN_KEY_FILE = "admin.key"


def _read_or_create(path: Path, make: str) -> tuple[str, bool]:
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(make + "\n")
    return make, True


def load_keyring(settings: Settings) -> Keyring:
    keys = settings.secret_list(settings.encryption_keys)
    if keys:
        return Keyring.from_strings(keys)
    if not settings.is_sqlite:
        raise ConfigurationError(
            "BROKER_ENCRYPTION_KEYS is required with a MySQL database (every replica needs the same "
            "keys); create one with `token-broker generate-key`."
        )
    path = settings.var_dir / ENCRYPTION_KEY_FILE
    key, created = _read_or_create(path, generate_key())
    if created:
        log.warning(
            "generated an encryption key for the embedded database; back it up, or set "
            "BROKER_ENCRYPTION_KEYS",
            extra={"file": str(path.resolve())},
        )
    return Keyring.from_strings([key])


def load_admin_keys(settings: Settings) -> list[str]:
    keys = settings.secret_list(settings.admin_keys)
    if keys:
        return keys
    path = settings.var_dir / ADMIN_KEY_FILE
    try:
        key, created = _read_or_create(path, new_key())
    except OSError as exc:
        raise ConfigurationError(
            f"BROKER_ADMIN_KEYS is not set and {path} cannot be written ({exc.strerror}); "
            "set BROKER_ADMIN_KEYS."
        ) from None
    # A new key is news for whoever starts the broker; an existing one is routine.
    log.log(
        logging.WARNING if created else logging.INFO,
        "admin API key %s; read it from that file (it is not printed)",
        "generated" if created else "loaded",
        extra={"file": str(path.resolve())},
    )
    return [key]


async def check_schema(engine: AsyncEngine) -> None:
    revision = await current_revision(engine)
    head = head_revision()
    if revision != head:
        raise ConfigurationError(
            f"The database schema is at revision {revision or 'none'}, this version needs {head}: "
            "run `token-broker migrate` first."
        )


async def check_keys(sessions: async_sessionmaker[AsyncSession], keyring: Keyring) -> None:
    """Decrypt a sample of stored secrets, at least one per key id, or refuse to start."""
    async with sessions() as session:
        samples = await rotation_repo.sample_ciphertexts(session)
    tried: set[str] = set()
    for column, row_id, stored in samples:
        key_id = Keyring.key_id_of(stored) or "unknown"
        if key_id in tried:
            continue
        tried.add(key_id)
        try:
            keyring.decrypt(stored, context=sealing.context(f"ms_dynamics_365_data.{column}", row_id))
        except DecryptionError as exc:
            raise ConfigurationError(
                f"Stored {column} of account {row_id} cannot be decrypted with BROKER_ENCRYPTION_KEYS "
                f"(key id {exc.key_id or key_id}): {exc}. Add the key that made it."
            ) from None
