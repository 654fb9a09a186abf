"""Microsoft's Dataverse SDK with BrokerCredential, against a really running broker process.

Processes: the fake Azure AD (``tests.fake_idp``), one ``token-broker serve`` (``tests.replicas``,
SQLite), and a fake Dataverse Web API over HTTPS (``fake_dataverse.py``, a trustme certificate).
The SDK trusts the fake's CA the way an application would: ``REQUESTS_CA_BUNDLE`` (requests) and
``SSL_CERT_FILE`` (aiohttp, in a process of its own since aiohttp reads it at import time).
Skips on a laptop without the packages, fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

from dynamics_token_broker_client import BrokerCredential

HERE = Path(__file__).resolve().parent
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

pytestmark = pytest.mark.multiprocess


def _require(condition: bool, reason: str) -> None:
    try:
        from tests.conftest import require
    except ImportError:  # the client outside the server repository: nothing to run against
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)
    require(condition, reason)


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@dataclass
class Stack:
    broker_url: str
    dataverse_url: str
    ca_file: str
    client_key: str
    admin: httpx.Client
    idp: Any
    dataverse: httpx.Client
    logs: Any

    def account(self, *, grant: str = "client_credentials") -> tuple[str, str]:
        """A new broker account on the fake IdP whose api_url is the fake Dataverse: (id, client_id)."""
        from tests.fake_idp import account_body

        tenant, client_id = str(uuid.uuid4()), str(uuid.uuid4())
        secret = f"dv-secret~{secrets.token_urlsafe(16)}"
        self.idp.control("clients", {"client_id": client_id, "client_secret": secret, "tenant": tenant})
        body = account_body(
            self.idp.url,
            tenant=tenant,
            client_id=client_id,
            client_secret=secret,
            refresh_token="",
            v2=True,
            grant_type=grant,
            api_url=f"{self.dataverse_url}/api/data/v9.2",
            name=f"dataverse-{client_id[:8]}",
        )
        body["refresh_token"] = (
            None  # client_credentials needs none; authorization_code: a person must sign in
        )
        response = self.admin.post("/accounts", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"], client_id

    def broker_token_requests(self) -> int:
        """Token requests the broker answered: the sum of broker_token_requests_total over outcomes.

        A hit, a stale token served and each error count one per request; a miss counts once as
        ``loaded``/``refreshed``. One request of this client at a time adds exactly one.
        """
        text = httpx.get(f"{self.broker_url}/metrics", trust_env=False).text
        found = re.findall(r'^broker_token_requests_total\{outcome="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M)
        assert found, text[:2000]
        return int(sum(float(v) for _, v in found))

    def idp_token_calls(self, client_id: str) -> int:
        return int(self.idp.stats()["by_client"].get(client_id, 0))

    def dataverse_stats(self) -> dict[str, Any]:
        return self.dataverse.get("/_stats").json()  # type: ignore[no-any-return]


@contextlib.contextmanager
def _fake_dataverse(cert: Path, key: Path) -> Iterator[str]:
    from tests import fake_process

    command = [sys.executable, str(HERE / "fake_dataverse.py"), "--cert", str(cert), "--key", str(key)]
    with fake_process.running(command, name="fake Dataverse (TLS)", cwd=HERE) as (url, _):
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _require(_have("tests.fake_idp") and _have("service"), "the token broker's repository (service/, tests/)")
    _require(_have("trustme"), "trustme is not installed (pip install trustme)")
    _require(_have("PowerPlatform.Dataverse.client"), "powerplatform-dataverse-client is not installed")
    import trustme
    from service.kit.crypto import generate_key
    from tests.fake_idp import running_fake_idp
    from tests.replicas import ReplicaSet, broker_env, migrate

    tmp = tmp_path_factory.mktemp("dataverse")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    server.private_key_pem.write_to_path(str(key_file))
    admin_key, client_key = f"dv-admin-{secrets.token_urlsafe(16)}", f"dv-client-{secrets.token_urlsafe(16)}"
    env = broker_env(
        {
            "BROKER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'broker.db'}",
            "BROKER_ENCRYPTION_KEYS": generate_key(),
            "BROKER_ADMIN_KEYS": admin_key,
            "BROKER_CLIENT_KEYS": client_key,
            "BROKER_ALLOW_HTTP": "true",
            "BROKER_ALLOWED_HOSTS": "127.0.0.1:*",
            "BROKER_VAR_DIR": str(tmp / "var"),
            "BROKER_LOG_LEVEL": "INFO",
        }
    )
    migrate(env)
    with (
        _fake_dataverse(cert_file, key_file) as dataverse_url,
        running_fake_idp() as idp,
        ReplicaSet(env, 1, tmp / "logs") as replicas,
        httpx.Client(
            base_url=replicas[0].url, headers={"Authorization": f"Bearer {admin_key}"}, trust_env=False
        ) as admin,
        httpx.Client(
            base_url=dataverse_url, verify=ssl.create_default_context(cafile=ca_file), trust_env=False
        ) as dataverse,
    ):
        yield Stack(replicas[0].url, dataverse_url, str(ca_file), client_key, admin, idp, dataverse, replicas)


@pytest.fixture
def trusting(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """requests (inside the SDK) trusts the fake's CA through REQUESTS_CA_BUNDLE, with no proxy."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", stack.ca_file)
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return stack


def test_sdk_creates_and_reads_records_with_one_broker_request(
    trusting: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """20 creates and 20 reads (42 Dataverse requests with the look-ups) cost one broker request;
    nothing logged at DEBUG (SDK, httpx, httpcore, requests, this client) shows the key or token."""
    from PowerPlatform.Dataverse.client import DataverseClient

    stack = trusting
    caplog.set_level(logging.DEBUG)
    account_id, client_id = stack.account()
    before_broker, before_dv = stack.broker_token_requests(), stack.dataverse_stats()["total"]
    before_tokens = stack.dataverse_stats()["tokens"]
    with (
        BrokerCredential(stack.broker_url, account_id, key=stack.client_key) as credential,
        DataverseClient(stack.dataverse_url, credential) as client,
    ):
        ids = [client.records.create("account", {"name": f"Contoso {n}"}) for n in range(20)]
        records = [client.records.retrieve("account", record_id) for record_id in ids]
        names = [record["name"] if record is not None else None for record in records]
    assert names == [f"Contoso {n}" for n in range(20)]
    stats = stack.dataverse_stats()
    sdk_requests = stats["total"] - before_dv
    # The entity set and picklist look-ups, 20 POST, 20 GET: all with the one token.
    assert sdk_requests == 42
    assert stats["requests"]["GET EntityDefinitions"] >= 1
    assert stats["requests"]["GET PicklistAttributeMetadata"] >= 1
    assert stack.broker_token_requests() - before_broker == 1
    assert stack.idp_token_calls(client_id) == 1
    assert len(stats["tokens"]) == len(before_tokens) + 1  # every SDK request carried the one token
    token = _broker_token(stack, account_id)["access_token"]
    assert caplog.records
    assert token not in caplog.text
    assert stack.client_key not in caplog.text
    print(f"\n{sdk_requests} Dataverse SDK requests -> 1 broker token request -> 1 Azure AD token call")


def _broker_token(stack: Stack, account_id: str) -> dict[str, Any]:
    r = httpx.get(
        f"{stack.broker_url}/accounts/{account_id}/token",
        headers={"Authorization": f"Bearer {stack.client_key}"},
        trust_env=False,
    )
    return r.json()  # type: ignore[no-any-return]


def test_sdk_caller_sees_what_a_person_must_do(trusting: Stack) -> None:
    """needs_authorization, account_not_found and a bad key reach the SDK's caller as
    ClientAuthenticationError with the broker's detail; no Dataverse request is made."""
    from PowerPlatform.Dataverse.client import DataverseClient

    stack = trusting
    blocked, _ = stack.account(grant="authorization_code")  # no refresh token yet: a person must sign in
    missing = str(uuid.uuid4())
    before_dv = stack.dataverse_stats()["total"]
    cases = [
        (blocked, stack.client_key, "needs_authorization", 409),
        (missing, stack.client_key, "account_not_found", 404),
        (blocked, "not-a-broker-key-0123456789", "unauthorized", 401),
    ]
    for account_id, key, code, status in cases:
        with (
            BrokerCredential(stack.broker_url, account_id, key=key) as credential,
            DataverseClient(stack.dataverse_url, credential) as client,
            pytest.raises(ClientAuthenticationError) as caught,
        ):
            client.records.create("account", {"name": "never sent"})
        err: Any = caught.value
        assert (err.code, err.status) == (code, status), str(err)
        if key == stack.client_key:
            detail = _broker_token(stack, account_id)["detail"]
            assert err.detail == detail
            assert detail in str(err)
        assert key not in str(err)
    assert stack.dataverse_stats()["total"] == before_dv


def test_sdk_for_another_organization_is_refused(trusting: Stack) -> None:
    """The SDK asks for '<base_url>/.default'; a base URL other than the account's api_url is refused."""
    from PowerPlatform.Dataverse.client import DataverseClient

    stack = trusting
    account_id, _ = stack.account()
    other = stack.dataverse_url.replace("127.0.0.1", "localhost")
    with (
        BrokerCredential(stack.broker_url, account_id, key=stack.client_key) as credential,
        DataverseClient(other, credential) as client,
        pytest.raises(ClientAuthenticationError, match="does not name this account's Dynamics organization"),
    ):
        client.records.create("account", {"name": "wrong org"})


def test_sdk_caller_sees_retry_after_when_azure_ad_is_throttling(trusting: Stack) -> None:
    """Azure AD throttling: the broker answers 503 with Retry-After; the SDK's caller gets
    ServiceRequestError with retry_after. A broker that is down is a ServiceRequestError too."""
    from PowerPlatform.Dataverse.client import DataverseClient

    stack = trusting
    account_id, _ = stack.account()
    stack.idp.control("mode", {"mode": "throttle", "retry_after": 7})
    try:
        with (
            BrokerCredential(stack.broker_url, account_id, key=stack.client_key) as credential,
            DataverseClient(stack.dataverse_url, credential) as client,
            pytest.raises(ServiceRequestError) as caught,
        ):
            client.records.create("account", {"name": "later"})
    finally:
        stack.idp.control("mode", {"mode": "normal"})
    err: Any = caught.value
    assert err.code == "upstream_unavailable"
    assert err.retry_after is not None
    assert err.retry_after >= 1
    assert f"Retry after {err.retry_after:g} s" in str(err)
    from tests.replicas import free_port

    with (
        BrokerCredential(f"http://127.0.0.1:{free_port()}", account_id, key=stack.client_key) as credential,
        DataverseClient(stack.dataverse_url, credential) as client,
        pytest.raises(ServiceRequestError, match="Could not reach the token broker"),
    ):
        client.records.create("account", {"name": "later"})


def test_async_sdk_concurrent_requests_share_one_broker_request(stack: Stack) -> None:
    """AsyncDataverseClient with AsyncBrokerCredential: 42 SDK requests (38 of them concurrent), one
    broker request."""
    _require(_have("aiohttp"), "aiohttp is not installed (powerplatform-dataverse-client[async])")
    from tests.replicas import free_port

    account_id, client_id = stack.account()
    blocked, _ = stack.account(grant="authorization_code")
    before_broker, before_dv = stack.broker_token_requests(), stack.dataverse_stats()["total"]
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env.update({"SSL_CERT_FILE": stack.ca_file, "NO_PROXY": "127.0.0.1,localhost"})
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "sdk_async_run.py"),
            *(stack.dataverse_url, stack.broker_url, account_id, blocked, stack.client_key),
            f"http://127.0.0.1:{free_port()}",  # a broker that is not there
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["names"] == [f"Fabrikam {n}" for n in range(20)]
    assert stack.dataverse_stats()["total"] - before_dv == 42
    # One for the 42 SDK requests, one for the blocked account; the unreachable broker counts none.
    assert stack.broker_token_requests() - before_broker == 2
    assert stack.idp_token_calls(client_id) == 1
    assert out["blocked"]["type"] == "BrokerAuthenticationError"
    assert out["blocked"]["code"] == "needs_authorization"
    assert _broker_token(stack, blocked)["detail"] in out["blocked"]["message"]
    assert "Could not reach the token broker" in out["down"]["message"]
    assert stack.client_key not in done.stdout + done.stderr


def test_broker_log_holds_no_key_or_token(stack: Stack) -> None:
    """After the tests above: the broker's output never shows the client key."""
    output = stack.logs.output()
    assert output
    assert stack.client_key not in output
