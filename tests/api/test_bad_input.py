"""Bad input: schemathesis against ``openapi.yaml``, then hand-written hostile requests.

The schemathesis run drives the real ASGI stack (fast path, access log, body limit, FastAPI) in its
lifespan on a migrated SQLite database, once with the admin key and once with a client key. The
hand-written cases run on ``running`` (SQLite and MariaDB) and check, besides the answer, that
nothing stored changed: ``GET /accounts`` and ``GET /keys`` are the same before and after.
Azure AD is never contacted: the strict ``azure`` respx router answers, or the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import respx
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given
from hypothesis import errors as hypothesis_errors
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from sqlalchemy import select

from service import migrate
from service.app import create_asgi
from service.kit.outbound import OutboundPolicy
from service.models import Account
from service.tokens.fastpath import TokenFastPath
from tests.conftest import (
    ADMIN_KEY,
    API_URL,
    CLIENT_KEY,
    CLIENT_SECRET,
    REFRESH_TOKEN,
    TOKEN_URL_V1,
    Running,
    account_body,
    admin,
    client,
    make_settings,
    v1_token,
)

OPENAPI_YAML = Path(__file__).resolve().parents[2] / "openapi.yaml"
PROBLEM = "application/problem+json"
WHOAMI = f"{API_URL}/WhoAmI"
IDS = {
    "UserId": "a1a2a3a4-0000-0000-0000-000000000002",
    "OrganizationId": "c1c2c3c4-0000-0000-0000-000000000003",
    "BusinessUnitId": "b1b2b3b4-0000-0000-0000-000000000001",
}
CODE = "0.AQ8A-one-time-authorization-code_value"


# -- helpers ------------------------------------------------------------------------------------


async def snapshot(running: Running) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Everything an admin can see of what is stored: every account and every caller key."""
    accounts = await running.client.get("/accounts?limit=500", headers=admin())
    keys = await running.client.get("/keys?limit=500", headers=admin())
    assert accounts.status_code == 200, accounts.text
    assert keys.status_code == 200, keys.text
    return accounts.json()["items"], keys.json()["items"]


async def new_account(running: Running, **overrides: Any) -> dict[str, Any]:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def new_key(running: Running, **body: Any) -> dict[str, Any]:
    r = await running.client.post("/keys", json={"name": "engine", **body}, headers=admin())
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def stored_refresh_token(running: Running, account_id: str) -> str:
    async with running.ctx.sessions() as session:
        value = (
            await session.execute(select(Account.refresh_token).where(Account.id == account_id))
        ).scalar()
    assert value is not None
    return str(value)


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == PROBLEM, r.headers.get("content-type")
    problem: dict[str, Any] = r.json()
    assert problem["status"] == status
    if code is not None:
        assert problem["code"] == code, problem
    return problem


# -- 1. schemathesis ------------------------------------------------------------------------------

# Responses schemathesis validates: no 5xx, bodies match the documented schema, and the
# Content-Type is one the document lists for that status. The `/oauth/callback` success page
# (200 text/html) cannot be reached by generated data (it needs a state the broker issued), and
# text/html bodies have no JSON schema to check; its 4xx answers are checked like any other.
CHECKS = (not_a_server_error, response_schema_conformance, content_type_conformance)
MAX_EXAMPLES = 25  # per operation and generation mode: both runs together stay well under a minute


def _asgi_stack(settings: Any) -> TokenFastPath:
    """The served application, exactly as ``conftest.Running`` and ``create_asgi`` build it."""
    return create_asgi(settings)


def _failure_lines(exc: BaseException) -> list[tuple[str, str]]:
    """(title, message) of each schemathesis failure in ``exc`` (a group or a single failure)."""
    found = getattr(exc, "exceptions", None) or [exc]
    lines = []
    for failure in found:
        title = str(getattr(failure, "title", type(failure).__name__))
        message = str(getattr(failure, "message", failure)).strip()
        lines.append((title, message))
    return lines


def _fuzz(
    operation: Any,
    mode: schemathesis.GenerationMode,
    real: dict[str, str],
    key: str,
    record: Callable[[str, int, BaseException, str], None],
    statuses: Counter[tuple[str, int]],
) -> None:
    """Send ``MAX_EXAMPLES`` generated requests to one operation; record every failed check."""
    label = operation.label
    strategy = operation.as_strategy(generation_mode=mode)
    if real:  # half the time, the path names a resource that exists
        strategy = st.one_of(strategy, operation.as_strategy(generation_mode=mode, path_parameters=real))

    @given(case=strategy)
    @hsettings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,  # nothing written into the repository
        derandomize=True,  # the same requests on every run: no flaky finds
        phases=[Phase.explicit, Phase.generate],  # failures are collected below, not raised and shrunk
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(headers={"Authorization": f"Bearer {key}"})
        statuses[(label, response.status_code)] += 1
        for check in CHECKS:
            try:
                case.validate_response(response, checks=[check])
            except BaseException as exc:  # schemathesis raises a FailureGroup (a BaseExceptionGroup)
                record(label, response.status_code, exc, case.as_curl_command())

    # Negative mode on an operation with nothing to negate (/healthz) is unsatisfiable: nothing to send.
    with contextlib.suppress(hypothesis_errors.Unsatisfiable):
        run()


@pytest.mark.parametrize("role", ["admin", "client"])
def test_schemathesis_finds_no_5xx_and_every_response_matches_the_schema(role: str, tmp_path: Path) -> None:
    """Generated valid and invalid requests for every operation: no 5xx, schema and media types hold."""
    key = ADMIN_KEY if role == "admin" else CLIENT_KEY
    url = f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    asyncio.run(migrate.upgrade(url))
    settings = make_settings(url, tmp_path)
    app = _asgi_stack(settings)
    policy = OutboundPolicy(settings.allowed_host_list, settings.allow_http)
    schema = schemathesis.openapi.from_path(str(OPENAPI_YAML))
    schema.app = app  # requests go in-process through schemathesis' ASGI transport
    failures: dict[tuple[str, int, str, str], str] = {}
    statuses: Counter[tuple[str, int]] = Counter()

    def record(label: str, status: int, exc: BaseException, curl: str) -> None:
        for title, message in _failure_lines(exc):
            first = re.sub(r"\d", "#", message.splitlines()[0] if message else "")[:160]
            example = message.replace("\n", " ").replace("    ", " ")[:300]
            failures.setdefault((label, status, title, first), f"{example} | reproduce: {curl[:300]}")

    # Azure AD and Dynamics at the HTTP edge: the accounts made below get tokens and WhoAmI
    # answers; anything else fails like a dead network. No request ever leaves the process.
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as edge:
        edge.post(TOKEN_URL_V1).respond(200, json=v1_token())
        edge.get(WHOAMI).respond(200, json=IDS)
        edge.route(url__startswith=f"{API_URL}/").respond(200, json={"value": []})  # what the proxy forwards
        elsewhere = edge.route().mock(side_effect=httpx.ConnectError("no network in tests"))
        try:
            # Entering schemathesis' ASGI client runs the app's lifespan on schemathesis' own
            # event loop thread, where every generated request is then served.
            with schemathesis_asgi.get_client(app) as setup:
                for result in schema.get_all_operations():
                    operation = result.ok()
                    # A fresh account and key for each operation (DELETE removes them), so
                    # generated requests also reach existing resources, not only 404s.
                    made = setup.post(
                        "/accounts", json=account_body(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                    )
                    assert made.status_code == 201, made.text
                    made_key = setup.post(
                        "/keys", json={"name": "st"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                    )
                    assert made_key.status_code == 201, made_key.text
                    real = {"account_id": made.json()["id"], "key_id": made_key.json()["id"]}
                    real = {k: v for k, v in real.items() if "{" + k + "}" in operation.path}
                    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                        _fuzz(operation, mode, real, key, record, statuses)
        finally:
            schemathesis_asgi.shutdown_lifespans()
        outbound = [str(call.request.url) for call in edge.calls]

    assert statuses, "schemathesis sent no request"
    for url_called in outbound:
        policy.check(url_called)  # no request went to a host outside BROKER_ALLOWED_HOSTS
    assert elsewhere.call_count == 0, outbound
    # The generated requests reached real resources too, not only 404s.
    assert statuses[("GET /accounts/{account_id}/token", 200)] > 0, sorted(statuses)
    by_kind: dict[tuple[str, str], list[str]] = {}
    for (label, status, title, first), example in sorted(failures.items()):
        by_kind.setdefault((title, first), [example]).append(f"{label} -> {status}")
    report = "\n".join(
        f"- {title}: {first}\n    where: {', '.join(where[1:])}\n    e.g.: {where[0]}"
        for (title, first), where in by_kind.items()
    )
    assert not failures, f"{len(by_kind)} kinds of schemathesis failure ({role} key):\n{report}"


def test_every_documented_error_is_a_problem_document() -> None:
    """openapi.yaml describes every 4xx/5xx JSON answer as the Problem schema the service sends."""
    document = yaml.safe_load(OPENAPI_YAML.read_text(encoding="utf-8"))
    wrong = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation.get("responses", {}).items():
                if not status.isdigit() or int(status) < 400:
                    continue
                for media, content in response.get("content", {}).items():
                    ref = content.get("schema", {}).get("$ref", "")
                    if "json" in media and ref != "#/components/schemas/Problem":
                        wrong.append(f"{method.upper()} {path} {status} {media}: {ref or content}")
    assert not wrong, "error responses documented as something else than Problem:\n" + "\n".join(wrong)


# -- 2. oversized bodies ----------------------------------------------------------------------------


def _targets(account_id: str, key_id: str) -> list[tuple[str, str]]:
    return [
        ("POST", "/accounts"),
        ("PATCH", f"/accounts/{account_id}"),
        ("POST", f"/accounts/{account_id}/authorize"),
        ("POST", f"/accounts/{account_id}/authorization-code"),
        ("POST", "/keys"),
        ("PATCH", f"/keys/{key_id}"),
    ]


async def test_oversized_bodies_with_content_length_are_413_before_any_byte_is_read(running: Running) -> None:
    """A Content-Length over BROKER_MAX_BODY_BYTES is refused with 413 before the body is read."""
    account = await new_account(running)
    key = await new_key(running)
    before = await snapshot(running)
    limit = running.settings.max_body_bytes
    for method, path in _targets(account["id"], key["id"]):
        for size in (limit + 1, 10 * limit):
            pulled: list[int] = []

            async def body(size: int = size, pulled: list[int] = pulled) -> AsyncIterator[bytes]:
                sent = 0
                while sent < size:
                    chunk = b" " * min(1024, size - sent)
                    pulled.append(len(chunk))
                    sent += len(chunk)
                    yield chunk

            headers = {**admin(), "content-type": "application/json", "content-length": str(size)}
            r = await running.client.request(method, path, content=body(), headers=headers)
            problem = assert_problem(r, 413, "payload_too_large")
            assert str(limit) in problem["detail"]
            assert pulled == [], f"{method} {path}: {sum(pulled)} bytes read before refusing"
    assert await snapshot(running) == before


async def test_oversized_chunked_bodies_are_413_as_soon_as_the_limit_is_passed(running: Running) -> None:
    """A chunked body without Content-Length is cut off with 413 once it passes the limit."""
    account = await new_account(running)
    key = await new_key(running)
    before = await snapshot(running)
    limit = running.settings.max_body_bytes
    chunk = 1024
    total = 20 * limit
    for method, path in _targets(account["id"], key["id"]):
        pulled: list[int] = []

        async def body(pulled: list[int] = pulled) -> AsyncIterator[bytes]:
            yield b'{"name": "'
            for _ in range(total // chunk):
                pulled.append(chunk)
                yield b"x" * chunk
            yield b'"}'

        headers = {**admin(), "content-type": "application/json"}
        r = await running.client.request(method, path, content=body(), headers=headers)
        assert "content-length" not in r.request.headers
        assert sum(pulled) <= limit + 2 * chunk, f"{method} {path}: read {sum(pulled)} of {total} bytes"
        assert_problem(r, 413, "payload_too_large")
    assert await snapshot(running) == before


async def test_a_body_just_under_the_limit_is_not_refused_for_size(running: Running) -> None:
    """The limit is a limit, not a guess: a body of exactly BROKER_MAX_BODY_BYTES is read and judged."""
    before = await snapshot(running)
    limit = running.settings.max_body_bytes
    prefix = b'{"name": "'
    content = prefix + b"x" * (limit - len(prefix) - 2) + b'"}'
    assert len(content) == limit
    r = await running.client.post(
        "/keys", content=content, headers={**admin(), "content-type": "application/json"}
    )
    assert_problem(r, 422, "validation_error")  # too long a name: judged on content, not size
    assert await snapshot(running) == before


# -- 3. malformed JSON and wrong content types ----------------------------------------------------

MALFORMED = {
    "not-json": b"{not json",
    "trailing-comma": b'{"name": "x",}',
    "truncated": b'{"name": "x"',
    "garbage-after": b'{"name": "x"} trailing',
    "empty": b"",
    "null": b"null",
    "array": b"[]",
    "string": b'"name"',
    "nan": b'{"name": NaN}',
    "invalid-utf8": b'{"name": "\xff\xfe"}',
    "lone-surrogate": b'{"name": "a\\ud800b"}',
    "5000-digit-number": b'{"name": 1' + b"0" * 5000 + b"}",
    "arrays-20000-deep": b"[" * 20_000 + b"]" * 20_000,
    "objects-5000-deep": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
}


async def test_malformed_json_is_a_4xx_problem_and_changes_nothing(
    running: Running, azure: respx.MockRouter
) -> None:
    """Broken, hostile or pathological JSON is 400/422 problem+json on every body-taking route."""
    account = await new_account(running)
    key = await new_key(running)
    before = await snapshot(running)
    bad: list[str] = []
    for name, content in MALFORMED.items():
        for method, path in _targets(account["id"], key["id"]):
            headers = {**admin(), "content-type": "application/json"}
            r = await running.client.request(method, path, content=content, headers=headers)
            if path.endswith("/authorize") and content in (b"", b"null"):
                ok = r.status_code == 200  # the body is optional there: no body, no JSON
            else:
                ok = r.status_code in (400, 422) and r.headers["content-type"] == PROBLEM
            if not ok:
                bad.append(f"{name}: {method} {path} -> {r.status_code} {r.text[:120]}")
    assert not bad, "\n".join(bad)
    assert await snapshot(running) == before
    assert not azure.calls


async def test_wrong_content_types_are_refused_and_change_nothing(
    running: Running, azure: respx.MockRouter
) -> None:
    """A JSON body not declared as JSON (or a form) is not accepted as an account or a key."""
    before = await snapshot(running)
    bad: list[str] = []
    content_types = [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/xml",
        "application/jsonx",
        None,
    ]
    for content_type in content_types:
        for path, body in (("/accounts", account_body()), ("/keys", {"name": "k"})):
            headers = admin()
            if content_type:
                headers["content-type"] = content_type
            content = httpx.Request("POST", "http://x", json=body).content
            r = await running.client.post(path, content=content, headers=headers)
            if not (400 <= r.status_code < 500 and r.headers["content-type"] == PROBLEM):
                bad.append(f"{content_type}: POST {path} -> {r.status_code}")
    form = await running.client.post("/accounts", data={"name": "x"}, headers=admin())
    if not 400 <= form.status_code < 500:
        bad.append(f"form: POST /accounts -> {form.status_code}")
    assert not bad, "\n".join(bad)
    assert await snapshot(running) == before
    assert not azure.calls


# -- 4. ids in paths ---------------------------------------------------------------------------------

ODD_IDS = {
    "latin1": "ü" * 40,
    "cjk": "名前",
    "emoji": "😀",
    "emoji-mixed": "a😀b" * 20,
    "nul": "%00",
    "invalid-utf8-escape": "%C3%28",
    "traversal": "..%2F..%2Fetc%2Fpasswd",
    "10KB": "a" * 10_240,
    "10KB-non-ascii": "é" * 5_000,
    "sql-or": "1' OR '1'='1",
    "sql-drop": "x'; DROP TABLE ms_dynamics_365_data; --",
    "sql-double-quote": '" OR ""="',
    "sql-encoded": "%27%20OR%201%3D1%20--%20",
    "default-ish": "default'--",
}


async def test_odd_ids_in_paths_are_404_and_change_nothing(running: Running, azure: respx.MockRouter) -> None:
    """Very long, non-ASCII, NUL and SQL-looking ids are a plain 404 on every id route."""
    account = await new_account(running)
    before = await snapshot(running)
    bad: list[str] = []
    for name, raw_id in ODD_IDS.items():
        segment = raw_id if "%" in raw_id else quote(raw_id, safe="")
        requests: list[tuple[str, str, dict[str, Any] | None, str, dict[str, str]]] = [
            ("GET", f"/accounts/{segment}", None, "account_not_found", admin()),
            ("PATCH", f"/accounts/{segment}", {"name": "renamed"}, "account_not_found", admin()),
            ("DELETE", f"/accounts/{segment}", None, "account_not_found", admin()),
            ("GET", f"/accounts/{segment}/token", None, "account_not_found", admin()),
            ("GET", f"/accounts/{segment}/token", None, "account_not_found", client()),
            ("GET", f"/accounts/{segment}/events", None, "account_not_found", admin()),
            ("POST", f"/accounts/{segment}/authorize", None, "account_not_found", admin()),
            ("POST", f"/accounts/{segment}/authorization-code", {"code": CODE}, "account_not_found", admin()),
            ("POST", f"/accounts/{segment}/test", None, "account_not_found", admin()),
            ("GET", f"/keys/{segment}", None, "key_not_found", admin()),
            ("PATCH", f"/keys/{segment}", {"name": "renamed"}, "key_not_found", admin()),
            ("DELETE", f"/keys/{segment}", None, "key_not_found", admin()),
        ]
        for method, path, body, code, headers in requests:
            r = await running.client.request(method, path, json=body, headers=headers)
            # A decoded "/" (the traversal case) makes the path match no route: a generic 404.
            expected = "not_found" if "%2F" in segment else code
            got = r.json().get("code") if r.headers.get("content-type") == PROBLEM else None
            if (r.status_code, got) != (404, expected) or account["name"] in r.text:
                bad.append(f"{name}: {method} {path[:60]} -> {r.status_code} {got}")
    assert not bad, f"{len(bad)} requests were not a plain 404:\n" + "\n".join(bad)
    assert await snapshot(running) == before
    assert not azure.calls


@pytest.mark.parametrize("variant", ["upper", "trailing-space"])
async def test_ids_are_exact_a_near_miss_id_changes_nothing(running: Running, variant: str) -> None:
    """An id differing in case or by a trailing space is another id: 404, and the account stays."""
    account = await new_account(running)
    with respx.mock(assert_all_mocked=True) as edge:
        route = edge.post(TOKEN_URL_V1).respond(200, json=v1_token())
        first = await running.client.get(f"/accounts/{account['id']}/token", headers=client())
        assert first.status_code == 200, first.text
        before = await snapshot(running)
        near = account["id"].upper() if variant == "upper" else account["id"] + " "
        segment = quote(near, safe="")
        got = await running.client.get(f"/accounts/{segment}", headers=admin())
        deleted = await running.client.delete(f"/accounts/{segment}", headers=admin())
        if deleted.status_code == 204:
            # The database matched the near-miss id (MariaDB's case- and pad-insensitive utf8
            # collation). Then at least the promise of DELETE must hold: its cached tokens go too.
            served = await running.client.get(f"/accounts/{account['id']}/token", headers=client())
            assert served.status_code == 404, (
                f"DELETE /accounts/{near!r} answered 204 and removed {account['id']}, "
                f"but its cached token is still served: {served.status_code} {served.text[:120]}"
            )
        assert (got.status_code, deleted.status_code) == (404, 404), f"near-miss id {near!r}"
        assert await snapshot(running) == before
    assert route.call_count == 1


# -- 5. names: unicode, emoji, limits, SQL -----------------------------------------------------------

NAMES = {
    "latin-cjk": "Contoso Überseeküche 東京 支店",
    "fullwidth-rtl": "\uff23\uff4f\uff4e\uff54\uff4f\uff53\uff4f (fullwidth) עברית العربية",
    "combining": "e\u0301 vs \u00e9 (combining)",
    "255-cjk": "名" * 255,
    "sql-drop": "Robert'); DROP TABLE ms_dynamics_365_data;--",
    "sql-or": "x' OR '1'='1",
    "html": '<script>alert("x")</script>',
    "escapes": "%00%27 \\' \\\" `",
}


async def test_names_up_to_255_characters_are_stored_and_returned_exactly(running: Running) -> None:
    """A printable name of at most 255 characters (the BMP: the seed table is utf8) comes back unchanged."""
    bad: list[str] = []
    made: dict[str, str] = {}
    for label, name in NAMES.items():
        assert len(name) <= 255
        r = await running.client.post("/accounts", json=account_body(name=name), headers=admin())
        if r.status_code != 201:
            bad.append(f"account {label}: POST /accounts -> {r.status_code} {r.json().get('code')}")
        else:
            made[r.json()["id"]] = name
            got = await running.client.get(f"/accounts/{r.json()['id']}", headers=admin())
            if got.json().get("name") != name:
                bad.append(f"account {label}: read back {got.json().get('name')!r}")
        k = await running.client.post("/keys", json={"name": name}, headers=admin())
        if k.status_code != 201:
            bad.append(f"key {label}: POST /keys -> {k.status_code} {k.json().get('code')}")
        elif (await running.client.get(f"/keys/{k.json()['id']}", headers=admin())).json()["name"] != name:
            bad.append(f"key {label}: read back differs")
    listed = {a["id"]: a["name"] for a in (await snapshot(running))[0]}
    assert listed == made  # every accepted name exactly, nothing else
    assert (await running.client.get("/readyz")).status_code == 200  # every table is still there
    assert not bad, f"{len(bad)} names were not stored exactly:\n" + "\n".join(bad)


REFUSED_NAMES = {
    "256-ascii": "x" * 256,
    "256-emoji": "😀" * 256,
    "300-cjk": "名" * 300,
    "control-tab": "tab\there",
    "control-nul": "nul\x00here",
    "control-crlf": "line\r\nbreak",
    "blank": "   ",
    # The seed table's utf8 (3-byte) columns cannot hold 4-byte characters: refused on every database.
    "emoji": "Contoso 😀🚀 emoji",
    "zwj": "👩\u200d💻 ZWJ sequence",
    "255-emoji": "😀" * 255,
}


async def test_names_over_255_or_with_control_characters_are_refused(running: Running) -> None:
    """Too long, blank or control-character names are 422 naming the field; nothing is stored."""
    account = await new_account(running)
    before = await snapshot(running)
    for label, name in REFUSED_NAMES.items():
        create = await running.client.post("/accounts", json=account_body(name=name), headers=admin())
        problem = assert_problem(create, 422, "validation_error")
        assert ["body", "name"] in [e["loc"] for e in problem["errors"]], label
        patch = await running.client.patch(f"/accounts/{account['id']}", json={"name": name}, headers=admin())
        assert_problem(patch, 422, "validation_error")
        if label.startswith("control"):
            continue  # key names are not the seed's column: only their length is limited
        key = await running.client.post("/keys", json={"name": name}, headers=admin())
        assert_problem(key, 422, "validation_error")
    assert await snapshot(running) == before


# -- 6. SQL in query parameters -----------------------------------------------------------------------

BAD_QUERIES = [
    "limit=1;DROP TABLE ms_dynamics_365_data",
    "limit=1%3BDROP%20TABLE%20ms_dynamics_365_data",
    "limit=1 OR 1=1",
    "offset=0)%20UNION%20SELECT%20*%20FROM%20broker_api_keys--",
    "limit=-1",
    "limit=501",
    "limit=99999999999999999999999",
    "offset=-5",
    "offset=1e3",
    "limit=0x10",
]


async def test_sql_in_query_parameters_is_a_422(running: Running, azure: respx.MockRouter) -> None:
    """Query parameters are bounded integers: SQL or anything else is 422 and nothing changes."""
    account = await new_account(running)
    before = await snapshot(running)
    for query in BAD_QUERIES:
        for path in ("/accounts", "/keys", f"/accounts/{account['id']}/events"):
            r = await running.client.get(f"{path}?{query}", headers=admin())
            problem = assert_problem(r, 422, "validation_error")
            assert problem["errors"][0]["loc"][0] == "query"
        # The same on the token route's min_ttl (0-3600), which the fast path parses by itself.
        ttl = (
            query.replace("limit=501", "min_ttl=3601")
            .replace("limit", "min_ttl")
            .replace("offset", "min_ttl")
        )
        token = await running.client.get(f"/accounts/{account['id']}/token?{ttl}", headers=client())
        assert_problem(token, 422, "validation_error")
    assert await snapshot(running) == before
    assert (await running.client.get("/readyz")).status_code == 200
    assert not azure.calls


# -- 7. header injection ---------------------------------------------------------------------------

ODD_AUTHORIZATIONS = {
    "crlf-after-key": f"Bearer {ADMIN_KEY}\r\nX-Injected: yes".encode(),
    "crlf-inside-key": f"Bearer {ADMIN_KEY[:-1]}\r\n{ADMIN_KEY[-1]}".encode(),
    "nul-after-key": f"Bearer {ADMIN_KEY}\x00".encode(),
    "high-bytes": b"Bearer \xff\xfe\xfd",
    "utf8-bytes": b"Bearer " + "ключ".encode(),
    "key-twice": f"Bearer {ADMIN_KEY} {ADMIN_KEY}".encode(),
    "basic-scheme": f"Basic {ADMIN_KEY}".encode(),
    "no-scheme": ADMIN_KEY.encode(),
    "scheme-only": b"Bearer",
    "8KB-key": b"Bearer " + b"A" * 8_000,
    "sql": f"Bearer {ADMIN_KEY}' OR '1'='1".encode(),
}


async def test_odd_authorization_headers_are_401_and_echo_nothing(running: Running) -> None:
    """CR/LF, NUL, high bytes or a wrong scheme around a key: 401, and no header is injected."""
    account = await new_account(running)
    with respx.mock(assert_all_mocked=True) as edge:
        route = edge.post(TOKEN_URL_V1).respond(200, json=v1_token())
        # A cached token, so the token route's fast path sees the odd header too.
        assert (
            await running.client.get(f"/accounts/{account['id']}/token", headers=admin())
        ).status_code == 200
        before = await snapshot(running)
        for label, authorization in ODD_AUTHORIZATIONS.items():
            for method, path in (
                ("GET", "/accounts"),
                ("GET", f"/accounts/{account['id']}"),
                ("GET", f"/accounts/{account['id']}/token"),
                ("DELETE", f"/accounts/{account['id']}"),
                ("POST", "/keys"),
            ):
                body = {"name": "k"} if method == "POST" else None
                r = await running.client.request(
                    method, path, json=body, headers={"Authorization": authorization}
                )
                problem = assert_problem(r, 401, "unauthorized")
                problem.pop("instance")  # the request path, echoed as RFC 9457 says
                assert account["id"] not in str(problem), label
                assert "x-injected" not in r.headers
                for name, value in r.headers.items():
                    assert not {"\r", "\n"} & set(value), (label, name, value)
                assert "access_token" not in r.text
        assert await snapshot(running) == before
    assert route.call_count == 1


async def test_crlf_in_other_headers_is_not_reflected(running: Running) -> None:
    """CR/LF in If-Match, Accept or a fake request id never becomes a response header."""
    account = await new_account(running)
    before = await snapshot(running)
    crlf = "\r\nX-Injected: yes"
    stale = await running.client.patch(
        f"/accounts/{account['id']}", json={"name": "renamed"}, headers={**admin(), "If-Match": '"1"' + crlf}
    )
    assert_problem(stale, 422, "validation_error")
    responses = [stale]
    for name, value in (("X-Request-Id", "abc" + crlf), ("Accept", "application/json" + crlf)):
        responses.append(
            await running.client.get(f"/accounts/{account['id']}", headers={**admin(), name: value})
        )
    callback = await running.client.get(
        "/oauth/callback", params={"state": "x\r\nX-Injected: yes", "error": "a\r\nX-Injected: yes"}
    )
    assert callback.status_code == 400
    for r in [*responses, callback]:
        assert "x-injected" not in r.headers
        for header, text in r.headers.items():
            assert not {"\r", "\n"} & set(text), (header, text)
    assert await snapshot(running) == before


# -- 8. outbound URLs: no server-side request forgery ----------------------------------------------

FORBIDDEN_URLS = {
    "10/8": "https://10.0.0.1/oauth2/token",
    "10/8-port": "https://10.255.255.254:443/x",
    "192.168/16": "https://192.168.1.1/x",
    "172.16/12": "https://172.16.0.1/x",
    "loopback": "https://127.0.0.1/x",
    "loopback-port": "https://127.0.0.1:8080/x",
    "localhost": "https://localhost/x",
    "aws-metadata": "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "gcp-metadata": "https://metadata.google.internal/computeMetadata/v1/",
    "aws-metadata-v6": "https://[fd00:ec2::254]/latest/meta-data/",
    "ipv6-loopback": "https://[::1]/x",
    "ipv4-mapped": "https://[::ffff:127.0.0.1]/x",
    "zero": "https://0.0.0.0/x",
    "zero-short": "https://0/x",
    "decimal-ip": "https://2130706433/x",
    "hex-ip": "https://0x7f000001/x",
    "octal-ip": "https://017700000001/x",
    "short-ip": "https://127.1/x",
    "other-host": "https://evil.example.com/x",
    "allowed-as-prefix": "https://login.microsoftonline.com.evil.example/x",
    "suffix-without-dot": "https://evilmicrosoftonline.com/x",
    "wildcard-apex": "https://dynamics.com/x",
    "http": "http://login.microsoftonline.com/t/oauth2/token",
    "ftp": "ftp://login.microsoftonline.com/x",
    "file": "file:///etc/passwd",
    "gopher": "gopher://login.microsoftonline.com:70/x",
    "scheme-relative": "//login.microsoftonline.com/x",
    "no-scheme": "login.microsoftonline.com/x",
    "userinfo": "https://user:pw@login.microsoftonline.com/x",
    "user-only": "https://user@login.microsoftonline.com/x",
    "at-other-host": "https://login.microsoftonline.com@evil.example/x",
    "backslash-at": "https://evil.example\\@login.microsoftonline.com/x",
    "fragment-at": "https://evil.example#@login.microsoftonline.com/x",
    "fragment": "https://login.microsoftonline.com/x#fragment",
    "port-zero": "https://login.microsoftonline.com:0/x",
    "port-out-of-range": "https://login.microsoftonline.com:99999/x",
    "crlf": "https://login.microsoftonline.com/x\r\nHost: evil.example",
    "nul": "https://login.microsoftonline.com\x00.evil.example/x",
    "empty-a-label": "https://xn--.crm.dynamics.com/oauth2/token",
    "bad-a-label": "https://xn--abc.crm.dynamics.com/x",
    "zero-width-joiner": "https://a\u200db.crm.dynamics.com/x",
    "fullwidth-letter": "https://\uff41.crm.dynamics.com/x",
}


async def test_urls_to_private_addresses_or_other_hosts_are_422_naming_the_field(
    running: Running, azure: respx.MockRouter
) -> None:
    """Every outbound URL field refuses private, metadata, foreign, non-https and userinfo URLs."""
    account = await new_account(running)
    before = await snapshot(running)
    bad: list[str] = []
    for label, url in FORBIDDEN_URLS.items():
        for field in ("authorization_url", "token_url", "api_url"):
            create = await running.client.post(
                "/accounts", json=account_body(**{field: url}), headers=admin()
            )
            patch = await running.client.patch(
                f"/accounts/{account['id']}", json={field: url}, headers=admin()
            )
            for verb, r in (("POST", create), ("PATCH", patch)):
                problem = r.json() if r.headers.get("content-type") == PROBLEM else {}
                named = ["body", field] in [e.get("loc") for e in problem.get("errors", [])]
                if r.status_code != 422 or not named or field not in problem.get("detail", ""):
                    bad.append(f"{label}: {verb} {field}={url!r} -> {r.status_code}")
    assert not bad, f"{len(bad)} outbound URLs were not refused:\n" + "\n".join(bad)
    assert await snapshot(running) == before
    assert not azure.calls


async def test_a_port_needs_an_allow_list_entry_naming_it(
    running: Running, tmp_path: Path, run_app: Callable[..., Any]
) -> None:
    """A pattern without a port allows 443 only (issue 12); ``host:8443`` in the list allows 8443."""
    url = "https://login.microsoftonline.com:8443/tenant/oauth2/token"
    r = await running.client.post("/accounts", json=account_body(token_url=url), headers=admin())
    assert (r.status_code, r.json()["errors"][0]["loc"]) == (422, ["body", "token_url"]), r.text
    allowed = "login.microsoftonline.com,login.microsoftonline.com:8443,*.crm.dynamics.com"
    settings = make_settings(running.settings.database_url, tmp_path / "ported", allowed_hosts=allowed)
    async with run_app(settings) as ported:
        r = await ported.client.post("/accounts", json=account_body(token_url=url), headers=admin())
    assert r.status_code == 201, r.text
    assert r.json()["token_url"] == url


async def test_a_url_made_unsafe_in_the_database_is_not_called(
    running: Running, azure: respx.MockRouter
) -> None:
    """URLs are checked again before each call: a row edited behind the API's back is not called."""
    account = await new_account(running)
    metadata = azure.route(host="169.254.169.254").respond(200, json=v1_token())
    async with running.ctx.sessions() as session, session.begin():
        row = await session.get(Account, account["id"])
        assert row is not None
        row.token_url = "https://169.254.169.254/latest/meta-data/oauth2/token"
        row.version = (row.version or 0) + 1
    running.ctx.broker.forget(account["id"])
    r = await running.client.get(f"/accounts/{account['id']}/token", headers=admin())
    assert r.status_code in (409, 503), r.text
    assert CLIENT_SECRET not in r.text
    assert REFRESH_TOKEN not in r.text
    assert metadata.call_count == 0
    assert not azure.calls


@pytest.mark.parametrize(
    "api_url", ["https://graph.microsoft.com/v1.0", "https://contoso.crm.dynamics.com:8443/api/data/v9.2"]
)
async def test_an_api_url_written_into_the_seed_row_is_checked_when_a_token_is_minted(
    api_url: str, running: Running, azure: respx.MockRouter
) -> None:
    """API_URL outside BROKER_ALLOWED_HOSTS, written behind the API's back: 409, no token asked for."""
    account = await new_account(running)
    async with running.ctx.sessions() as session, session.begin():
        row = await session.get(Account, account["id"])
        assert row is not None
        row.api_url = api_url
        row.version = (row.version or 0) + 1
    r = await running.client.get(f"/accounts/{account['id']}/token", headers=admin())
    problem = assert_problem(r, 409, "invalid_credentials")
    assert "api_url" in problem["detail"]
    assert not azure.calls


@pytest.mark.parametrize("host", ["xn--.crm.dynamics.com", "a\u200db.crm.dynamics.com"])
async def test_a_host_httpx_cannot_send_to_in_the_database_is_a_problem_not_a_500(
    host: str, running: Running, azure: respx.MockRouter
) -> None:
    """A stored token_url or api_url whose host fails IDNA is refused before any call, never a 500."""
    account = await new_account(running)
    async with running.ctx.sessions() as session, session.begin():
        row = await session.get(Account, account["id"])
        assert row is not None
        row.token_url = f"https://{host}/oauth2/token"
        row.version = (row.version or 0) + 1
    running.ctx.broker.forget(account["id"])
    r = await running.client.get(f"/accounts/{account['id']}/token", headers=admin())
    problem = assert_problem(r, 409, "invalid_credentials")
    assert "token_url" in problem["detail"]
    assert CLIENT_SECRET not in r.text
    assert REFRESH_TOKEN not in r.text
    other = await new_account(running)
    async with running.ctx.sessions() as session, session.begin():
        row = await session.get(Account, other["id"])
        assert row is not None
        row.api_url = f"https://{host}/api/data/v9.2"
        row.version = (row.version or 0) + 1
    running.ctx.broker.forget(other["id"])
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token())
    r = await running.client.post(f"/accounts/{other['id']}/test", headers=admin())
    assert r.status_code == 200, r.text
    # Refused when the token would be minted (issue 12: api_url is checked like token_url).
    assert (r.json()["ok"], r.json()["reason"]) == (False, "invalid_credentials")
    assert "api_url" in r.json()["message"]
    assert not azure.calls


# -- 9. redirects from the IdP are never followed --------------------------------------------------


async def test_a_redirect_from_the_token_endpoint_is_a_503_and_not_followed(
    running: Running, azure: respx.MockRouter
) -> None:
    """A 3xx from Azure AD is upstream_unavailable; the refresh token stays; the target is not called."""
    followed = {
        host: azure.route(host=host).respond(200, json=v1_token(access="stolen"))
        for host in ("evil.example", "169.254.169.254")
    }
    for status in (301, 302, 303, 307, 308):
        for target in ("https://evil.example/steal", "https://169.254.169.254/latest/meta-data/"):
            tenant = secrets.token_hex(8)  # its own token URL, so each redirect has its own route
            token_url = f"https://login.microsoftonline.com/{tenant}/oauth2/token"
            account = await new_account(running, tenant_id=tenant, token_url=token_url)
            stored = await stored_refresh_token(running, account["id"])
            token = azure.post(token_url).respond(status, headers={"Location": target})
            r = await running.client.get(f"/accounts/{account['id']}/token", headers=client())
            problem = assert_problem(r, 503, "upstream_unavailable")
            assert int(r.headers["retry-after"]) >= 1
            assert "stolen" not in r.text
            assert target not in r.text
            assert problem.get("reason") == "redirect", problem
            assert token.call_count >= 1
            assert await stored_refresh_token(running, account["id"]) == stored  # the grant is not lost
            got = await running.client.get(f"/accounts/{account['id']}", headers=admin())
            assert got.json()["has_refresh_token"] is True
    assert [route.call_count for route in followed.values()] == [0, 0]


async def test_a_redirect_during_the_code_exchange_is_not_followed(
    running: Running, azure: respx.MockRouter
) -> None:
    """A 307 (which would resend the client secret and code) from the token URL is not followed."""
    account = await new_account(running, refresh_token=None)
    before = await snapshot(running)
    azure.post(TOKEN_URL_V1).respond(307, headers={"Location": "https://evil.example/collect"})
    followed = azure.route(host="evil.example").respond(200, json=v1_token(access="stolen"))
    r = await running.client.post(
        f"/accounts/{account['id']}/authorization-code", json={"code": CODE}, headers=admin()
    )
    assert_problem(r, 503, "upstream_unavailable")
    assert followed.call_count == 0
    assert await snapshot(running) == before


async def test_a_redirect_from_dynamics_whoami_is_not_followed(
    running: Running, azure: respx.MockRouter
) -> None:
    """Test connection: a 302 from WhoAmI is reported as ok false; the bearer token is not forwarded."""
    account = await new_account(running)
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token())
    azure.get(WHOAMI).respond(302, headers={"Location": "https://evil.example/whoami"})
    followed = azure.route(host="evil.example").respond(200, json=IDS)
    r = await running.client.post(f"/accounts/{account['id']}/test", headers=admin())
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is False
    assert followed.call_count == 0


# -- 10. forged and replayed OAuth state -------------------------------------------------------------


async def _authorize(running: Running, account_id: str) -> str:
    r = await running.client.post(f"/accounts/{account_id}/authorize", headers=admin())
    assert r.status_code == 200, r.text
    state: str = r.json()["state"]
    return state


def _forgeries(state: str) -> Iterator[str]:
    yield secrets.token_urlsafe(32)
    yield state[:-1] + ("A" if state[-1] != "A" else "B")
    yield state.upper() if state.upper() != state else state.lower()
    yield state + "x"
    yield state[:-1]
    yield state + state
    yield "x" * 10_240
    yield "' OR '1'='1"
    yield "ü😀名"
    yield "\x00"


async def test_forged_states_are_400_and_do_not_consume_the_real_one(
    running: Running, azure: respx.MockRouter
) -> None:
    """States the broker never issued are 400 invalid_state; Azure is not called; the real one still works."""
    account = await new_account(running, refresh_token=None)
    state = await _authorize(running, account["id"])
    before = await snapshot(running)
    for forged in _forgeries(state):
        for accept in ("text/html", "application/json"):
            r = await running.client.get(
                "/oauth/callback", params={"code": CODE, "state": forged}, headers={"Accept": accept}
            )
            assert r.status_code == 400, (forged[:40], r.status_code, r.text[:200])
            assert "invalid_state" in r.text
            assert forged[:64] not in r.text or len(forged) < 4  # the state is not echoed
        pasted = f"http://localhost/?code={CODE}&state={quote(forged)}"
        r = await running.client.post(
            f"/accounts/{account['id']}/authorization-code", json={"code": pasted}, headers=admin()
        )
        if len(pasted) > 8192:  # over the documented maxLength of `code`
            assert_problem(r, 422, "validation_error")
        else:
            assert_problem(r, 400, "invalid_state")
    assert not azure.calls
    assert await snapshot(running) == before
    token = azure.post(TOKEN_URL_V1).respond(200, json=v1_token())
    real = await running.client.get("/oauth/callback", params={"code": CODE, "state": state})
    assert real.status_code == 200, real.text
    assert token.call_count == 1


async def test_a_replayed_state_is_400_and_changes_nothing(running: Running, azure: respx.MockRouter) -> None:
    """After a successful callback, the same state again (hosted or pasted) is 400 and changes nothing."""
    account = await new_account(running, refresh_token=None)
    state = await _authorize(running, account["id"])
    token = azure.post(TOKEN_URL_V1).respond(200, json=v1_token(access="at-first", refresh="rt-first"))
    first = await running.client.get("/oauth/callback", params={"code": CODE, "state": state})
    assert first.status_code == 200, first.text
    after_first = await snapshot(running)
    stored = await stored_refresh_token(running, account["id"])
    for _ in range(3):
        again = await running.client.get("/oauth/callback", params={"code": CODE, "state": state})
        assert again.status_code == 400
        assert "invalid_state" in again.text
    pasted = f"http://localhost/?code={CODE}&state={state}"
    r = await running.client.post(
        f"/accounts/{account['id']}/authorization-code", json={"code": pasted}, headers=admin()
    )
    assert_problem(r, 400, "invalid_state")
    assert token.call_count == 1
    assert await snapshot(running) == after_first
    assert await stored_refresh_token(running, account["id"]) == stored


async def test_a_state_pasted_for_another_account_is_400_and_changes_it_not(
    running: Running, azure: respx.MockRouter
) -> None:
    """A state is bound to its account: pasting A's redirect into B's authorization-code is 400."""
    a = await new_account(running, refresh_token=None)
    b = await new_account(running, refresh_token=None)
    state = await _authorize(running, a["id"])
    before = await snapshot(running)
    pasted = f"http://127.0.0.1:8080/oauth/callback?code={CODE}&state={state}"
    r = await running.client.post(
        f"/accounts/{b['id']}/authorization-code", json={"code": pasted}, headers=admin()
    )
    assert_problem(r, 400, "invalid_state")
    assert not azure.calls
    assert await snapshot(running) == before
    token = azure.post(TOKEN_URL_V1).respond(200, json=v1_token())
    real = await running.client.get("/oauth/callback", params={"code": CODE, "state": state})
    assert real.status_code == 200, real.text  # the wrong paste did not use up A's state
    assert token.call_count == 1


# -- 11. pasted URLs the parser refuses, and If-Match values int() refuses ---------------------------


@pytest.mark.parametrize(
    "pasted",
    [
        "http://[abc/?code=x",
        "http://localhost/?code=x&" + "&".join(f"p{i}=v" for i in range(60)),
        "?code=x&" + "&".join(f"p{i}=v" for i in range(60)),
    ],
    ids=["unclosed-bracket", "too-many-fields", "bare-query-too-many-fields"],
)
async def test_an_unparseable_pasted_url_is_422_on_code_and_changes_nothing(
    pasted: str, running: Running, azure: respx.MockRouter
) -> None:
    """A pasted value urlsplit or parse_qs refuses is 422 on `code`; its pending state still works."""
    account = await new_account(running, refresh_token=None)
    state = await _authorize(running, account["id"])
    before = await snapshot(running)
    r = await running.client.post(
        f"/accounts/{account['id']}/authorization-code", json={"code": pasted}, headers=admin()
    )
    problem = assert_problem(r, 422, "validation_error")
    assert ["body", "code"] in [e["loc"] for e in problem["errors"]]
    assert "code=x" not in r.text
    assert not azure.calls
    assert await snapshot(running) == before
    token = azure.post(TOKEN_URL_V1).respond(200, json=v1_token())
    real = await running.client.get("/oauth/callback", params={"code": CODE, "state": state})
    assert real.status_code == 200, real.text
    assert token.call_count == 1


@pytest.mark.parametrize(
    "if_match",
    [
        "²".encode("latin-1"),
        '"²"'.encode("latin-1"),
        "¹".encode("latin-1"),
        '"-1"',
        '"1e3"',
        '" 3"',
        "W/",
        '""',
    ],
)
async def test_an_if_match_that_is_no_version_is_422_and_changes_nothing(
    if_match: str | bytes, running: Running
) -> None:
    """Only ASCII digits are a version: '²' passes str.isdigit() but not int(), and is no 500."""
    account = await new_account(running)
    before = await snapshot(running)
    r = await running.client.patch(
        f"/accounts/{account['id']}", json={"name": "renamed"}, headers={**admin(), "If-Match": if_match}
    )
    problem = assert_problem(r, 422, "validation_error")
    assert ["header", "If-Match"] in [e["loc"] for e in problem["errors"]]
    assert await snapshot(running) == before
