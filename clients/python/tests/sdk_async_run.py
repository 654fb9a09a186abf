"""Run by the integration test in a process of its own: AsyncDataverseClient with AsyncBrokerCredential.

aiohttp builds its default TLS context when it is imported, so the fake Dataverse's CA is trusted
the way an application would do it: ``SSL_CERT_FILE`` in the environment of a fresh process.
Prints one JSON line with what the SDK's caller saw.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from PowerPlatform.Dataverse.aio import AsyncDataverseClient

from dynamics_token_broker_client import AsyncBrokerCredential


async def main(
    dataverse_url: str, broker_url: str, account_id: str, blocked_id: str, key: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with (
        AsyncBrokerCredential(broker_url, account_id, key=key) as credential,
        AsyncDataverseClient(dataverse_url, credential) as client,
    ):
        first = await client.records.create("account", {"name": "Fabrikam 0"})  # resolves the entity set
        ids = [
            first,
            *await asyncio.gather(
                *(client.records.create("account", {"name": f"Fabrikam {n}"}) for n in range(1, 20))
            ),
        ]
        records = await asyncio.gather(*(client.records.retrieve("account", i) for i in ids))
        out["names"] = [r["name"] if r is not None else None for r in records]
    async with (
        AsyncBrokerCredential(broker_url, blocked_id, key=key) as credential,
        AsyncDataverseClient(dataverse_url, credential) as client,
    ):
        try:
            await client.records.retrieve("account", first)
        except ClientAuthenticationError as exc:
            out["blocked"] = {
                "type": type(exc).__name__,
                "code": getattr(exc, "code", None),
                "message": str(exc),
            }
    async with (
        AsyncBrokerCredential(sys.argv[6], account_id, key=key) as credential,
        AsyncDataverseClient(dataverse_url, credential) as client,
    ):
        try:
            await client.records.retrieve("account", first)
        except ServiceRequestError as exc:
            out["down"] = {"type": type(exc).__name__, "message": str(exc)}
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:6]))), flush=True)
