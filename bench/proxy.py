"""Proxied GET against calling the fake Dataverse directly, in one run: ``python -m bench.proxy``.

Also, as a reference for how loaded the machine is, the token endpoint's cache hit on the same
broker.

1. The fake Dataverse (``tests/proxy/fake_dataverse.py``, its own process) with its limits set out
   of reach (no throttling, no concurrency cap), answering a small JSON body at once;
2. ``token-broker serve`` on SQLite with one client_credentials account on that fake;
3. wrk against the fake directly (``GET /api/data/v9.2/contacts`` with the account's token, fetched
   from the broker) and against the broker (``GET /accounts/{id}/api/contacts`` with a client key),
   alternating, ``--rounds`` times, the same wrk options for both (``-c`` defaults to 16, the
   account's BROKER_PROXY_MAX_CONCURRENT, so no proxied request waits for a place).

Reported: requests/s, p50 and p99 of each; the throughput ratio; the added latency (proxied minus
direct, p50 and p99). wrk runs on CPU 0 and the broker on CPU 1 when there are two CPUs; the fake
is not pinned. The machine is shared with other engineers: read the figures as indications.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.kit.crypto import generate_key
from tests.proxy.fake_dataverse import running_fake_dataverse

from .run import ADMIN_KEY, CLIENT_KEY, Series, Server, broker_env, machine, migrate, paired, wrk

RESULTS = Path(__file__).resolve().parent / "results" / "proxy.json"
UNLIMITED = {"cap": 1_000_000, "window_limit": 1_000_000_000, "window_seconds": 300.0, "delay": 0.0}


def options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-pin", action="store_true")
    return parser.parse_args(argv)


def prepare(broker: Server, api_url: str, body: dict[str, Any]) -> tuple[str, str]:
    """The account's id and its access token (as the broker hands it out)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    made = httpx.post(broker.url + "/accounts", json=body, headers=admin, timeout=10)
    made.raise_for_status()
    account = str(made.json()["id"])
    token = httpx.get(
        f"{broker.url}/accounts/{account}/token",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
    )
    token.raise_for_status()
    proxied = httpx.get(
        f"{broker.url}/accounts/{account}/api/contacts",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
    )
    direct = httpx.get(
        f"{api_url}/contacts", headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=10
    )
    if proxied.status_code != 200 or proxied.content != direct.content:
        raise RuntimeError(f"proxied and direct answers differ: {proxied.status_code} {proxied.text[:200]}")
    return account, str(token.json()["access_token"])


def run(opts: argparse.Namespace) -> dict[str, Any]:
    cpus = (None, None) if opts.no_pin else (0, 1)
    with (
        tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp_name,
        running_fake_dataverse(**UNLIMITED) as dv,
    ):
        tmp = Path(tmp_name)
        env = broker_env(tmp, "broker.db", generate_key())
        migrate(env)
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
        broker = Server("broker", command, env, tmp / "broker.log", cpus[1])
        try:
            account, token = prepare(broker, dv.api_url, dv.account_body())
            direct, proxied = Series("direct to the fake Dataverse"), Series("through the broker's proxy")
            hit = Series("token hit (reference)")
            targets = [
                (direct, f"{dv.api_url}/contacts", token, None),
                (proxied, f"{broker.url}/accounts/{account}/api/contacts", CLIENT_KEY, broker.process.pid),
                (hit, f"{broker.url}/accounts/{account}/token", CLIENT_KEY, broker.process.pid),
            ]
            for _series, url, key, _pid in targets:
                opts.key = key
                wrk(url, opts, cpu=cpus[0], duration=opts.warmup)
            for n in range(opts.rounds):
                for series, url, key, pid in targets:
                    opts.key = key
                    result = wrk(url, opts, cpu=cpus[0], duration=opts.duration, server_pid=pid)
                    series.rounds.append(result)
                    print(
                        f"  round {n + 1}/{opts.rounds} {series.name:<32} {result.rps:>7.0f} req/s  "
                        f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                    )
            upstream = dv.stats()
        finally:
            broker.stop()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(cpus),
        "options": {k: v for k, v in vars(opts).items() if k != "key"},
        "direct": direct.summary(),
        "proxied": proxied.summary(),
        "token_hit": hit.summary(),
        "throughput_ratio": round(paired(proxied, direct, "rps"), 3),
        "added_p50_ms": round(
            statistics.median(
                p.p50_ms - d.p50_ms for p, d in zip(proxied.rounds, direct.rounds, strict=True)
            ),
            3,
        ),
        "added_p99_ms": round(
            statistics.median(
                p.p99_ms - d.p99_ms for p, d in zip(proxied.rounds, direct.rounds, strict=True)
            ),
            3,
        ),
        "upstream_unauthorized": upstream["unauthorized"],
        "upstream_throttled": upstream["throttled"],
    }


def markdown(results: dict[str, Any]) -> str:
    m, o = results["machine"], results["options"]
    lines = [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), shared with other engineers; Python {m['python']}, "
        f"uvicorn {m['uvicorn']}; `wrk -t{o['threads']} -c{o['connections']} -d{o['duration']:g}s`, "
        f"median of {o['rounds']} alternating rounds, {results['when']}.",
        "",
        "| target | requests/s | p50 ms | p99 ms | broker requests per CPU-second |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {
        "direct": "GET direct to the fake Dataverse",
        "proxied": "GET through the broker's proxy",
        "token_hit": "token cache hit on the same broker (reference)",
    }
    for name, label in labels.items():
        s = results[name]
        per_cpu = f"{s['per_cpu_second']:.0f}" if s["per_cpu_second"] else ""
        lines.append(f"| {label} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {per_cpu} |")
    lines += [
        "",
        f"Throughput proxied / direct: {results['throughput_ratio']:.2f}; added latency: "
        f"p50 +{results['added_p50_ms']:.2f} ms, p99 +{results['added_p99_ms']:.2f} ms.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    started = time.monotonic()
    results = run(opts)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print()
    print(markdown(results))
    print(f"\n({time.monotonic() - started:.0f} s; written to {RESULTS})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
