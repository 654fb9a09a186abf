"""``token-broker serve`` as a real process: first start, graceful SIGTERM, start-up refusals.

Each test starts ``python -m service.cli serve`` with its own ``BROKER_*`` environment (nothing
inherited), a SQLite database and var directory under ``tmp_path``, and a free port. The slow
refresh comes from the fake Azure AD (``tests/fake_idp.py``) in its own process, in ``slow`` mode.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.kit.crypto import generate_key
from tests.fake_idp import account_body, running_fake_idp
from tests.replicas import REPO_ROOT, broker_env, free_port, migrate

STOP_LIMIT = 15.0  # the contract: drained and gone within 15 s of SIGTERM
REFUSE_LIMIT = 10.0  # a refusal is immediate: no retrying, no waiting on a database
IDP_DELAY = 4.0


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def sqlite_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    return broker_env(
        {
            "BROKER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}",
            "BROKER_VAR_DIR": str(tmp_path / "var"),
            "BROKER_HOST": "127.0.0.1",
            "BROKER_PORT": str(free_port()),
            **settings,
        }
    )


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[Served]:
    """Start ``serve``, wait for /readyz 200; on the way out, make sure the process is gone."""
    url = f"http://127.0.0.1:{env['BROKER_PORT']}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(process, url, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"serve exited with {process.returncode}:\n{served.output()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready within 30 s:\n{served.output()}"
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def stop(served: Served) -> tuple[int, float]:
    """SIGTERM once; the exit status and how long the process took to go."""
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    try:
        code = served.process.wait(STOP_LIMIT)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.wait()
        raise AssertionError(f"still running {STOP_LIMIT} s after SIGTERM:\n{served.output()}") from None
    return code, time.monotonic() - started


def refused(env: dict[str, str]) -> tuple[int, str, float]:
    """Run ``serve`` expecting it to refuse: exit status, all it printed, seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line the process printed is one JSON log object with ts, level and event."""
    docs: list[dict[str, object]] = []
    for line in filter(str.strip, text.splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}\n{text}") from None
        assert isinstance(doc, dict), line
        assert {"ts", "level", "event"} <= doc.keys(), line
        docs.append(doc)
    return docs


def admin_key_lines(docs: list[dict[str, object]]) -> list[tuple[object, object]]:
    """(level, event) of each line about the admin key file."""
    return [(doc["level"], doc["event"]) for doc in docs if str(doc["event"]).startswith("admin API key")]


# -- serving and stopping -------------------------------------------------------------------------


def test_first_start_on_sqlite_writes_keys_0600_and_logs_only_the_file(tmp_path: Path) -> None:
    """No keys set: both generated into var/ (mode 0600), the log names each file once (absolute) and
    the admin key once per start (a warning when generated, info when loaded); a restart keeps them."""
    env = sqlite_env(tmp_path)
    migrate(env)
    var = tmp_path / "var"
    with serving(env, tmp_path / "first.log") as served:
        admin_key = (var / "admin.key").read_text().strip()
        encryption_key = (var / "encryption.key").read_text().strip()
        for name in ("admin.key", "encryption.key"):
            assert (var / name).stat().st_mode & 0o777 == 0o600, name
        r = httpx.get(f"{served.url}/accounts", headers={"Authorization": f"Bearer {admin_key}"})
        assert r.status_code == 200
        assert stop(served)[0] == 0
    output = served.output()
    assert admin_key not in output
    assert encryption_key not in output
    docs = json_lines(output)
    files = [doc["file"] for doc in docs if "file" in doc]
    assert sorted(files) == sorted(str((var / name).resolve()) for name in ("admin.key", "encryption.key"))
    assert admin_key_lines(docs) == [
        ("warning", "admin API key generated; read it from that file (it is not printed)")
    ]
    with serving(env, tmp_path / "second.log") as again:
        assert (var / "admin.key").read_text().strip() == admin_key
        r = httpx.get(f"{again.url}/accounts", headers={"Authorization": f"Bearer {admin_key}"})
        assert r.status_code == 200
        assert stop(again)[0] == 0
    assert admin_key not in again.output()
    assert admin_key_lines(json_lines(again.output())) == [
        ("info", "admin API key loaded; read it from that file (it is not printed)")
    ]


def test_sigterm_stops_accepting_finishes_the_slow_refresh_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM during a slow refresh: no new connections, the caller gets its token, exit 0 in 15 s."""
    admin_key = f"lc-admin-{secrets.token_urlsafe(16)}"
    tenant, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    client_secret = f"lc-secret~{secrets.token_urlsafe(16)}"
    with running_fake_idp(mode="slow", delay=IDP_DELAY) as fake:
        fake.control("clients", {"client_id": client_id, "client_secret": client_secret, "tenant": tenant})
        refresh_token = fake.control("refresh_tokens", {"client_id": client_id})["refresh_token"]
        env = sqlite_env(
            tmp_path,
            BROKER_ADMIN_KEYS=admin_key,
            BROKER_ENCRYPTION_KEYS=generate_key(),
            BROKER_ALLOW_HTTP="true",
            BROKER_ALLOWED_HOSTS="127.0.0.1:*",
            # The webhook loop runs too, and must not hold the shutdown up.
            BROKER_WEBHOOK_URL=f"{fake.url}/hooks/broker",
            BROKER_WEBHOOK_SECRET="lc-webhook-secret",
        )
        migrate(env)
        headers = {"Authorization": f"Bearer {admin_key}"}
        with serving(env, tmp_path / "serve.log") as served:
            body = account_body(
                fake.url,
                tenant=tenant,
                client_id=client_id,
                client_secret=client_secret,
                refresh_token=refresh_token,
                name="lifecycle",
            )
            r = httpx.post(f"{served.url}/accounts", json=body, headers=headers)
            assert r.status_code == 201, r.text
            token_url = f"{served.url}/accounts/{r.json()['id']}/token"
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(httpx.get, token_url, headers=headers, timeout=30)
                deadline = time.monotonic() + 10
                while fake.stats()["in_flight"] < 1:  # the refresh is at the IdP now
                    assert time.monotonic() < deadline, served.output()
                    time.sleep(0.05)
                signalled = time.monotonic()
                served.process.send_signal(signal.SIGTERM)
                while True:  # the listener closes at once, while the refresh is still running
                    try:
                        httpx.get(f"{served.url}/healthz", timeout=1)
                    except httpx.TransportError:  # refused, or accepted just before and closed unanswered
                        break
                    assert time.monotonic() - signalled < 3, "still accepting connections after SIGTERM"
                    time.sleep(0.05)
                assert not pending.done(), "the slow refresh ended before the listener closed"
                response = pending.result(timeout=STOP_LIMIT)
            code = served.process.wait(STOP_LIMIT)
            took = time.monotonic() - signalled
    output = served.output()
    assert code == 0, output
    assert took < STOP_LIMIT
    assert response.status_code == 200, response.text
    access_token = response.json()["access_token"]
    assert response.json()["expires_in"] > 3000
    docs = json_lines(output)
    assert "shutting down" in {doc["event"] for doc in docs}
    for secret in (admin_key, client_secret, refresh_token, access_token, "lc-webhook-secret"):
        assert secret not in output


# -- refusing to start ----------------------------------------------------------------------------


def test_schema_behind_refuses_quickly_naming_migrate(tmp_path: Path) -> None:
    """No migration yet: serve exits non-zero within seconds and says to run `token-broker migrate`."""
    code, output, took = refused(sqlite_env(tmp_path, BROKER_ENCRYPTION_KEYS=generate_key()))
    assert code != 0
    assert "token-broker migrate" in output
    assert took < REFUSE_LIMIT


def test_lock_wait_not_above_idp_timeout_exits_2(tmp_path: Path) -> None:
    """BROKER_LOCK_WAIT_SECONDS <= BROKER_IDP_TIMEOUT_SECONDS: exit 2 naming both settings."""
    env = sqlite_env(tmp_path, BROKER_LOCK_WAIT_SECONDS="5", BROKER_IDP_TIMEOUT_SECONDS="10")
    code, output, took = refused(env)
    assert code == 2
    assert "BROKER_LOCK_WAIT_SECONDS must be longer than BROKER_IDP_TIMEOUT_SECONDS" in output
    assert "Traceback" not in output
    assert took < REFUSE_LIMIT


def test_mysql_without_encryption_keys_refuses_before_connecting(tmp_path: Path) -> None:
    """MySQL without BROKER_ENCRYPTION_KEYS: refused at once, before connecting; password unprinted."""
    password = "lc-db-password-0001"
    env = sqlite_env(tmp_path, BROKER_DATABASE_URL=f"mysql+aiomysql://root:{password}@127.0.0.1:1/x")
    code, output, took = refused(env)
    assert code != 0
    assert "BROKER_ENCRYPTION_KEYS is required with a MySQL database" in output
    assert "token-broker generate-key" in output
    assert password not in output
    assert took < REFUSE_LIMIT


def test_a_webhook_url_against_the_rules_refuses_start_up(tmp_path: Path) -> None:
    """An http:// webhook without BROKER_ALLOW_HTTP: refused, naming the setting but not the URL."""
    env = sqlite_env(
        tmp_path,
        BROKER_ENCRYPTION_KEYS=generate_key(),
        BROKER_WEBHOOK_URL="http://hooks.example.internal/T0/B0/lc-path-secret",
        BROKER_WEBHOOK_SECRET="lc-webhook-secret",
    )
    migrate(env)
    code, output, took = refused(env)
    assert code != 0
    assert "BROKER_WEBHOOK_URL must use https" in output
    assert "lc-path-secret" not in output
    assert "lc-webhook-secret" not in output
    assert took < REFUSE_LIMIT


def test_refusals_found_at_start_up_are_one_plain_line_and_exit_2(tmp_path: Path) -> None:
    """A refusal found while starting (schema behind) reads like a settings refusal: exit 2, no traceback."""
    code, output, _ = refused(sqlite_env(tmp_path, BROKER_ENCRYPTION_KEYS=generate_key()))
    assert "Traceback" not in output
    assert code == 2
