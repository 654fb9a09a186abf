"""A small fake of the Dataverse Web API over HTTPS, run in its own process by the integration test.

``python fake_dataverse.py --cert C --key K`` listens on 127.0.0.1 (a free port), prints
``READY https://127.0.0.1:<port>`` and answers what ``DataverseClient.records.create/get`` call:

- ``GET  /api/data/v9.2/EntityDefinitions?$filter=LogicalName eq 'account'`` (entity set lookup)
- ``GET  /api/data/v9.2/EntityDefinitions(LogicalName='account')/Attributes/...PicklistAttributeMetadata``
  (the SDK looks for option sets before a create) -> none
- ``POST /api/data/v9.2/accounts`` -> 204 with ``OData-EntityId``
- ``GET  /api/data/v9.2/accounts(<guid>)`` -> the record

Every API request must carry ``Authorization: Bearer <token>``; ``GET /_stats`` tells how many
requests came and how many distinct bearer tokens they carried (as hashes, never the tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import socket
import uuid
from collections import Counter
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

API = "/api/data/v9.2"
ENTITIES = {"account": ("accounts", "accountid")}


class State:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, dict[str, Any]]] = {"accounts": {}}
        self.requests: Counter[str] = Counter()  # by "METHOD kind"
        self.tokens: Counter[str] = Counter()  # sha256 of each bearer token -> requests


def _state(request: Request) -> State:
    return request.app.state.fake  # type: ignore[no-any-return]


def _authorized(request: Request, kind: str) -> Response | None:
    st = _state(request)
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer ") or len(header) < 20:
        return JSONResponse({"error": {"code": "0x80072182", "message": "No bearer token"}}, 401)
    st.requests[f"{request.method} {kind}"] += 1
    st.tokens[hashlib.sha256(header[7:].encode()).hexdigest()[:16]] += 1
    return None


async def entity_definitions(request: Request) -> Response:
    if (denied := _authorized(request, "EntityDefinitions")) is not None:
        return denied
    match = re.search(r"LogicalName eq '([^']+)'", request.query_params.get("$filter", ""))
    name = match.group(1) if match else ""
    value = []
    if name in ENTITIES:
        entity_set, primary = ENTITIES[name]
        value = [{"LogicalName": name, "EntitySetName": entity_set, "PrimaryIdAttribute": primary}]
    return JSONResponse({"@odata.context": f"{API}/$metadata#EntityDefinitions", "value": value})


async def records(request: Request) -> Response:  # noqa: PLR0911 - one return per answer
    path = request.path_params["rest"]
    if path.startswith("EntityDefinitions(") and path.endswith(
        "/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    ):
        if (denied := _authorized(request, "PicklistAttributeMetadata")) is not None:
            return denied
        return JSONResponse({"value": []})  # the table has no picklist columns
    match = re.fullmatch(r"([a-z_]+)(?:\(([0-9a-f-]{36})\))?", path)
    if match is None or match.group(1) not in _state(request).records:
        return JSONResponse({"error": {"code": "0x80060888", "message": f"Resource not found: {path}"}}, 404)
    entity_set, record_id = match.groups()
    if (denied := _authorized(request, entity_set)) is not None:
        return denied
    table = _state(request).records[entity_set]
    base = f"{request.url.scheme}://{request.url.netloc}{API}"
    if request.method == "POST" and record_id is None:
        new_id = str(uuid.uuid4())
        table[new_id] = {**(await request.json()), "accountid": new_id}
        response = Response(status_code=204)
        # Dataverse's own casing: the async SDK looks the header up case-sensitively.
        response.raw_headers.append((b"OData-EntityId", f"{base}/{entity_set}({new_id})".encode()))
        return response
    if request.method == "GET" and record_id is not None:
        record = table.get(record_id)
        if record is None:
            return JSONResponse({"error": {"code": "0x80040217", "message": "Does Not Exist"}}, 404)
        return JSONResponse({"@odata.context": f"{base}/$metadata#{entity_set}/$entity", **record})
    return JSONResponse({"error": {"code": "0x80060888", "message": "Unsupported"}}, 405)


async def stats(request: Request) -> Response:
    st = _state(request)
    return JSONResponse(
        {"requests": dict(st.requests), "total": st.requests.total(), "tokens": dict(st.tokens)}
    )


def build_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/_stats", stats, methods=["GET"]),
            Route(f"{API}/EntityDefinitions", entity_definitions, methods=["GET"]),
            Route(API + "/{rest:path}", records, methods=["GET", "POST"]),
        ]
    )
    app.state.fake = State()
    return app


class _ReadyServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"READY {self.url}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        build_app(),
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=1,
        http="h11",  # keeps the header names' case (Dataverse sends OData-EntityId)
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
    )
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    asyncio.run(_ReadyServer(config, url).serve([sock]))


if __name__ == "__main__":
    main()
