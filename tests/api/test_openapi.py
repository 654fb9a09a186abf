"""The OpenAPI document: committed copy in step with the app, and /docs rendering offline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service.openapi import document
from tests.conftest import ADMIN_KEY, require

ROOT = Path(__file__).resolve().parents[2]


def test_committed_openapi_yaml_matches_the_app() -> None:
    """openapi.yaml is regenerated (`make openapi`) whenever the API changes."""
    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert committed == document(), "openapi.yaml is stale: run `make openapi`"


def test_every_contract_path_is_documented() -> None:
    """The contract's endpoints are all in the document, with an API-key security scheme."""
    spec = document()
    expected = {
        ("post", "/accounts"), ("get", "/accounts"), ("get", "/accounts/{account_id}"),
        ("patch", "/accounts/{account_id}"), ("delete", "/accounts/{account_id}"),
        ("get", "/accounts/{account_id}/token"), ("post", "/accounts/{account_id}/authorize"),
        ("get", "/oauth/callback"), ("post", "/accounts/{account_id}/authorization-code"),
        ("post", "/accounts/{account_id}/test"), ("get", "/accounts/{account_id}/events"),
        ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"),
        ("post", "/keys"), ("get", "/keys"), ("get", "/keys/{key_id}"),
        ("patch", "/keys/{key_id}"), ("delete", "/keys/{key_id}"),
    }  # fmt: skip
    present = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert expected <= present
    assert spec["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    token = spec["paths"]["/accounts/{account_id}/token"]["get"]
    assert {"200", "401", "404", "409", "503"} <= set(token["responses"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.browser
def test_docs_render_offline_in_headless_chromium(tmp_path: Path) -> None:
    """/docs loads Swagger UI from the service itself and renders every operation in Chromium."""
    chromium = shutil.which("chromium")
    require(chromium is not None, "Debian's chromium is not installed (apt-get install chromium)")
    assert chromium is not None
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {
        "BROKER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'docs.db'}",
        "BROKER_VAR_DIR": str(tmp_path / "var"),
        "BROKER_ADMIN_KEYS": ADMIN_KEY,
        "BROKER_PORT": str(port),
    }
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, check=True, capture_output=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        html = httpx.get(f"{base}/docs").text
        assert "cdn" not in html.lower()
        assert "/docs/static/swagger-ui-bundle.js" in html
        assert httpx.get(f"{base}/docs/static/swagger-ui-bundle.js").status_code == 200
        shot = tmp_path / "docs.png"
        common = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
            "--window-size=1280,2400",
        ]  # fmt: skip
        dom = subprocess.run(
            [*common, "--dump-dom", f"{base}/docs"], capture_output=True, text=True, timeout=90, check=False
        ).stdout
        subprocess.run(
            [*common, f"--screenshot={shot}", f"{base}/docs"], capture_output=True, timeout=90, check=False
        )
    finally:
        server.terminate()
        assert server.wait(timeout=20) == 0
    assert "swagger-ui" in dom
    assert "Dynamics Token Broker" in dom
    for path in (
        "/accounts/{account_id}/token",
        "/accounts/{account_id}/authorize",
        "/oauth/callback",
        "/keys",
    ):
        assert f'data-path="{path}"' in dom, f"operation {path} did not render"
    assert "btn authorize" in dom  # the Authorize button that takes an API key
    assert shot.exists()
    assert shot.stat().st_size > 10_000
