"""A fake Kubernetes service-account issuer and API server, for tests.

Serves OIDC discovery (``/.well-known/openid-configuration``), the JWKS (``/openid/v1/jwks``) and
TokenReview (``/apis/authentication.k8s.io/v1/tokenreviews``). The signing keys stay with the test
(``SigningKey``): it publishes their public halves with ``/_control/jwks`` (a rotation is a new
set) and marks tokens the API server no longer accepts with ``/_control/revoke``. Counts and the
bearer each request carried are at ``/_control/stats``.

Own process: ``python -m tests.keys.fake_issuer --port 0`` prints ``READY http://127.0.0.1:<port>``;
``running_fake_issuer()`` wraps that. Handlers never await between checking and updating state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests import fake_process

JWKS_PATH = "/openid/v1/jwks"


@dataclass
class IssuerState:
    url: str = ""
    jwks: list[dict[str, Any]] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)  # sha256 of tokens TokenReview refuses
    counts: dict[str, int] = field(default_factory=lambda: {"discovery": 0, "jwks": 0, "review": 0})
    bearers: list[str | None] = field(default_factory=list)


def _state(request: Request) -> IssuerState:
    state: IssuerState = request.app.state.issuer
    return state


async def discovery(request: Request) -> Response:
    state = _state(request)
    state.counts["discovery"] += 1
    state.bearers.append(request.headers.get("authorization"))
    return JSONResponse({"issuer": state.url, "jwks_uri": state.url + JWKS_PATH})


async def jwks(request: Request) -> Response:
    state = _state(request)
    state.counts["jwks"] += 1
    state.bearers.append(request.headers.get("authorization"))
    return JSONResponse({"keys": state.jwks})


async def token_review(request: Request) -> Response:
    state = _state(request)
    body = await request.json()
    state.counts["review"] += 1
    state.bearers.append(request.headers.get("authorization"))
    token = body["spec"]["token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    k8s = claims.get("kubernetes.io", {})
    authenticated = hashlib.sha256(token.encode()).hexdigest() not in state.revoked
    status: dict[str, Any] = {"authenticated": authenticated}
    if authenticated:
        username = f"system:serviceaccount:{k8s['namespace']}:{k8s['serviceaccount']['name']}"
        status["user"] = {"username": username, "uid": k8s["serviceaccount"].get("uid", "")}
        status["audiences"] = body["spec"].get("audiences", [])
    return JSONResponse({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})


async def control(request: Request) -> Response:
    state = _state(request)
    what = request.path_params["what"]
    if what == "stats":
        return JSONResponse({"counts": state.counts, "bearers": state.bearers, "url": state.url})
    body = await request.json()
    if what == "jwks":
        state.jwks = body["keys"]
    elif what == "revoke":
        state.revoked.add(hashlib.sha256(body["token"].encode()).hexdigest())
    else:
        return JSONResponse({"error": what}, status_code=404)
    return JSONResponse({"ok": True})


def build_app(state: IssuerState) -> Starlette:
    app = Starlette(
        routes=[
            Route("/.well-known/openid-configuration", discovery),
            Route(JWKS_PATH, jwks),
            Route("/apis/authentication.k8s.io/v1/tokenreviews", token_review, methods=["POST"]),
            Route("/_control/{what}", control, methods=["GET", "POST"]),
        ]
    )
    app.state.issuer = state
    return app


async def serve(host: str, port: int) -> None:
    sock = fake_process.listening_socket(host, port)
    await fake_process.serve(build_app(IssuerState(url=fake_process.url_of(sock))), sock)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.keys.fake_issuer", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


# -- the test's side ----------------------------------------------------------------------------------


@dataclass
class SigningKey:
    """A cluster signing key: RS256 (RSA 2048) or ES256 (P-256), with its kid."""

    alg: str = "RS256"
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    private: Any = None

    def __post_init__(self) -> None:
        if self.private is None:
            self.private = (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                if self.alg == "RS256"
                else ec.generate_private_key(ec.SECP256R1())
            )

    def public_jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header})


def claims_for(
    issuer: str,
    namespace: str,
    name: str,
    *,
    audience: str | list[str] = "dynamics-token-broker",
    lifetime: int = 3600,
    **overrides: Any,
) -> dict[str, Any]:
    """The claims of a real projected service-account token."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": [audience] if isinstance(audience, str) else audience,
        "exp": now + lifetime,
        "iat": now,
        "nbf": now,
        "iss": issuer,
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": f"{name}-7d4b9c-x2x9k", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
        },
    }
    claims.update(overrides)
    return claims


@dataclass
class FakeIssuerHandle:
    url: str
    client: httpx.Client

    def publish(self, *keys: SigningKey) -> None:
        """Serve exactly these keys' public halves in the JWKS (a rotation is a new call)."""
        self.client.post("/_control/jwks", json={"keys": [k.public_jwk() for k in keys]}).raise_for_status()

    def revoke(self, token: str) -> None:
        """TokenReview answers ``authenticated: false`` for this token from now on."""
        self.client.post("/_control/revoke", json={"token": token}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self.client.get("/_control/stats")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


@contextlib.contextmanager
def running_fake_issuer(ready_timeout: float = 20.0) -> Iterator[FakeIssuerHandle]:
    """Run the fake issuer in a subprocess on a free port."""
    command = fake_process.module_command("tests.keys.fake_issuer")
    with (
        fake_process.running(command, name="fake issuer", ready_timeout=ready_timeout) as (url, _),
        httpx.Client(base_url=url, timeout=10.0, trust_env=False) as client,
    ):
        yield FakeIssuerHandle(url, client)


if __name__ == "__main__":
    main()
