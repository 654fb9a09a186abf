"""Issue 12, item 8: control characters in key names, strict booleans, where a redirect_uri may
point, and no trailing-slash redirect built from the client's Host header."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import account_body, admin, make_settings


@pytest.mark.parametrize("name", ["k\u0000\u0007", "a\u001bb", "tab\there", "del\u007f"])
async def test_key_names_with_control_characters_are_422(name: str, running: Any) -> None:
    """POST and PATCH /keys refuse a name with control characters; nothing is stored."""
    r = await running.client.post("/keys", json={"name": name, "role": "client"}, headers=admin())
    assert (r.status_code, r.json()["errors"][0]["loc"]) == (422, ["body", "name"]), r.text
    assert (await running.client.get("/keys", headers=admin())).json()["items"] == []
    created = await running.client.post("/keys", json={"name": "ok", "role": "client"}, headers=admin())
    key_id = created.json()["id"]
    r = await running.client.patch(f"/keys/{key_id}", json={"name": name}, headers=admin())
    assert r.status_code == 422, r.text
    assert (await running.client.get(f"/keys/{key_id}", headers=admin())).json()["name"] == "ok"


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "1", "on"])
async def test_default_account_takes_only_json_booleans(value: Any, running: Any) -> None:
    """``default_account`` must be true or false: "yes", 1 or "true" are 422 and change nothing."""
    r = await running.client.post("/accounts", json=account_body(default_account=value), headers=admin())
    assert (r.status_code, r.json()["errors"][0]["loc"]) == (422, ["body", "default_account"]), r.text
    created = await running.client.post("/accounts", json=account_body(), headers=admin())
    account_id = created.json()["id"]
    r = await running.client.patch(
        f"/accounts/{account_id}", json={"default_account": value}, headers=admin()
    )
    assert r.status_code == 422, r.text
    assert (await running.client.get(f"/accounts/{account_id}", headers=admin())).json()[
        "default_account"
    ] is False


async def _authorize(running: Any, redirect_uri: str) -> Any:
    r = await running.client.post("/accounts", json=account_body(refresh_token=None), headers=admin())
    account_id = r.json()["id"]
    return await running.client.post(
        f"/accounts/{account_id}/authorize", json={"redirect_uri": redirect_uri}, headers=admin()
    )


@pytest.mark.parametrize(
    "uri",
    [
        "https://evil.example/steal",
        "https://127.0.0.1.evil.example/cb",
        "http://localhost.evil.example/",
        "https://localhost/",
        "http://evil.example:8080/oauth/callback",
        "https://127.0.0.1:8080/oauth/callback",
    ],
)
async def test_a_redirect_uri_elsewhere_is_422(uri: str, running: Any) -> None:
    """Only the hosted callback, loopback http, or BROKER_ALLOWED_REDIRECT_URIS may get the code."""
    r = await _authorize(running, uri)
    assert (r.status_code, r.json()["errors"][0]["loc"]) == (422, ["body", "redirect_uri"]), r.text
    assert "BROKER_ALLOWED_REDIRECT_URIS" in r.json()["detail"]


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:8080/oauth/callback",
        "http://localhost",
        "http://localhost:53682/",
        "http://127.0.0.1:9/any/path",
    ],
)
async def test_the_callback_and_loopback_redirect_uris_are_accepted(uri: str, running: Any) -> None:
    """The hosted callback ({BROKER_PUBLIC_URL}/oauth/callback) and http loopback URIs work."""
    r = await _authorize(running, uri)
    assert r.status_code == 200, r.text


async def test_allowed_redirect_uris_setting_adds_exact_uris(
    running: Any, tmp_path: Path, run_app: Callable[..., Any]
) -> None:
    """BROKER_ALLOWED_REDIRECT_URIS lists exact URIs; a near miss is still 422."""
    settings = make_settings(
        running.settings.database_url,
        tmp_path / "listed",
        allowed_redirect_uris="https://admin.example.net/cb, https://other.example.net/x",
    )
    async with run_app(settings) as listed:
        assert (await _authorize(listed, "https://admin.example.net/cb")).status_code == 200
        assert (await _authorize(listed, "https://other.example.net/x")).status_code == 200
        assert (await _authorize(listed, "https://admin.example.net/cb2")).status_code == 422


@pytest.mark.parametrize("path", ["/accounts/{id}/", "/accounts/", "/keys/"])
async def test_a_trailing_slash_is_404_and_never_a_redirect_to_the_host_header(
    path: str, running: Any
) -> None:
    """``GET /accounts/<id>/`` with ``Host: evil.example`` is 404, no Location to evil.example."""
    created = await running.client.post("/accounts", json=account_body(), headers=admin())
    url = path.replace("{id}", created.json()["id"])
    r = await running.client.get(url, headers={**admin(), "Host": "evil.example"})
    assert r.status_code == 404, r.headers
    assert "location" not in r.headers
