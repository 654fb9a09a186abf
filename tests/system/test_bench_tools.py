"""The refresh benchmark's parts run in CI, so a figure in the README comes from code that works:
its lean HTTP client against a real uvicorn, and ``bench.refresh`` end to end on a small wave."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.loadgen import Connection
from tests.fake_idp import running_fake_idp

ROOT = Path(__file__).resolve().parents[2]


def test_the_load_client_reuses_one_connection_and_reads_whole_bodies() -> None:
    with running_fake_idp() as fake:

        async def two_gets() -> list[tuple[int, bytes]]:
            connection = Connection(fake.url, {"X-Test": "1"})
            try:
                first = await connection.get("/_control/stats")
                writer = connection._writer
                second = await connection.get("/_control/stats")
                assert connection._writer is writer  # kept alive, not reopened
                missing = await connection.get("/no-such-path")
                return [first, second, missing]
            finally:
                await connection.close()

        (s1, b1), (s2, b2), (s3, _) = asyncio.run(two_gets())
    assert (s1, s2, s3) == (200, 200, 404)
    assert json.loads(b1)["token_calls"] == 0
    assert json.loads(b2) == json.loads(b1)


def test_the_load_client_refuses_what_it_does_not_speak() -> None:
    with pytest.raises(ValueError, match="host:port"):
        Connection("https://example.com", {})


@pytest.mark.mysql
@pytest.mark.timeout(300)
async def test_bench_refresh_runs_a_small_wave(mysql_url: str, tmp_path: Path) -> None:
    server = mysql_url.rsplit("/", 1)[0]  # the bench makes its own database there
    out = tmp_path / "refresh.json"
    command = [sys.executable, "-m", "bench.refresh", "--accounts", "20", "--callers", "5"]
    command += ["--replicas", "1", "--old", "", "--slots", "0", "--out", str(out)]
    env = {
        "PATH": "/usr/bin:/bin",
        "BROKER_BENCH_MYSQL_URL": server,
        "PYTHONPATH": str(ROOT),
    }
    done = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wave,) = json.loads(out.read_text())["waves"]
    assert wave["statuses"] == {"200": 20}
    assert wave["idp_calls"] == 20
    assert wave["503s"] == 0
    assert "IdP calls 20 (N=20)" in done.stdout
