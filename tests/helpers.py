"""The one set of test data every test and the fake IdP share: keys, Azure URLs, an account body.

Pure data and functions (no fixtures, no app): ``tests/fake_idp.py`` runs as its own process and
imports this without pulling in pytest or the service.
"""

from __future__ import annotations

import uuid
from typing import Any

from service.kit.crypto import generate_key

ADMIN_KEY = "test-admin-key-0123456789abcdef"
CLIENT_KEY = "test-client-key-0123456789abcdef"
ENCRYPTION_KEY = generate_key()
TENANT = "7f3b7d01-a049-4dfd-9dbd-d394e711c3a0"
TOKEN_URL_V1 = f"https://login.microsoftonline.com/{TENANT}/oauth2/token"
TOKEN_URL_V2 = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
AUTHORIZE_URL_V1 = f"https://login.microsoftonline.com/{TENANT}/oauth2/authorize"
AUTHORIZE_URL_V2 = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/authorize"
API_URL = "https://contoso.crm.dynamics.com/api/data/v9.2"
CLIENT_SECRET = "s3cr3t-Client-Value~abc.123"
REFRESH_TOKEN = "0.ARwA-refresh-token-initial-value"


def account_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": f"contoso-{uuid.uuid4().hex[:8]}",
        "tenant_id": TENANT,
        "client_id": "dc40e7c1-86fa-484e-a38b-bec0d31c945a",
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH_TOKEN,
        "authorization_url": AUTHORIZE_URL_V1,
        "token_url": TOKEN_URL_V1,
        "api_url": API_URL,
    }
    body.update(overrides)
    return body


def fake_urls(fake_url: str, *, tenant: str = TENANT, v2: bool = False) -> dict[str, str]:
    """The three URLs of an account whose Azure AD and Dynamics are the fakes at ``fake_url``."""
    style = "/v2.0" if v2 else ""
    return {
        "authorization_url": f"{fake_url}/{tenant}/oauth2{style}/authorize",
        "token_url": f"{fake_url}/{tenant}/oauth2{style}/token",
        "api_url": f"{fake_url}/api/data/v9.2",
    }


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def client() -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEY}"}
