"""Connecting an account: the authorization-code flow (PKCE), the pasted code, and the WhoAmI test.

Invariants:
- ``state`` is self-checking (``state.py``: random id, expiry, HMAC with a keyring-derived key),
  so a malformed, forged or expired state is ``InvalidState`` before any query; it is bound to
  one account, valid ten minutes and single-use: only its SHA-256 is stored, and
  ``repository.take_pending`` deletes the row in the transaction that reads it, so a replayed
  state is ``InvalidState`` on every replica;
- the PKCE verifier (S256) is stored sealed, its encryption context bound to the state's hash;
- the authorize URL never carries the client secret; the code and the state are never logged,
  stored or echoed (messages are built from codes and Azure's sanitised descriptions);
- a failed exchange or a denial changes nothing but an ``authorization_failed`` event: the
  account keeps its status and any refresh token it had;
- ``test_connection`` always answers (``ok`` true or false, with what to do), except for a
  missing account.
No FastAPI here; ``endpoints.py`` renders the answers. The pure parts (PKCE, the redirect URI
rules, the pasted redirect) are ``redirects.py``'s.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.accounts.schemas import AccountOut
from service.accounts.service import AccountService
from service.authorization import repository as repo
from service.authorization.redirects import (
    Redirect,
    invalid,
    is_loopback_redirect,
    parse_pasted,
    redirect_uri_problem,
    s256,
    state_hash,
)
from service.authorization.schemas import AuthorizeOut, ConnectionTestOut
from service.authorization.state import PURPOSE, StateSigner
from service.errors import (
    AccountNotFound,
    ActionRequired,
    AuthorizationDenied,
    BrokerError,
    InvalidInput,
    InvalidState,
    UpstreamUnavailable,
)
from service.idp.azure_ad import AzureADClient
from service.idp.dynamics import ConnectionProblem, WhoAmI, who_am_i
from service.idp.redaction import sanitize_description
from service.kit import sealing, timeutil
from service.kit.crypto import Keyring
from service.kit.outbound import OutboundPolicy
from service.models import Account, AccountState, PendingAuthorization
from service.settings import Settings
from service.tokens.broker import TokenBroker

if TYPE_CHECKING:
    from service.context import Context

CALLBACK_PATH = "/oauth/callback"
PENDING_TTL = timedelta(minutes=10)
START_AGAIN = "call POST /accounts/{id}/authorize and open the new authorization_url"

# What a person does when no token could be had (by error code) or WhoAmI failed (by reason).
_TOKEN_NEXT_STEPS = {
    "needs_authorization": "authorize the account (POST /accounts/{id}/authorize)",
    "invalid_credentials": "fix client_secret/client_id (PATCH /accounts/{id}) as the message says",
    "upstream_unavailable": "Azure AD unreachable; try later / check network",
    "storage_unavailable": "check the broker's database and BROKER_ENCRYPTION_KEYS",
}
_PROBE_NEXT_STEPS = {
    "unauthorized": "check api_url (its origin must be the resource the app was authorized for), "
    "then authorize again",
    "forbidden": "give the application user a security role in Dynamics (integration guide step 2.7/2.13)",
    "not_found": "fix api_url's path, e.g. /api/data/v9.2 (PATCH /accounts/{id})",
    "unreachable": "check the network and firewall between the broker and Dynamics, and api_url",
    "bad_response": "check that api_url is the Dynamics Web API (…/api/data/v9.x)",
    "server_error": "Dynamics is failing or throttling; try again later",
    "forbidden_url": "fix api_url, or ask the operator to allow its host in BROKER_ALLOWED_HOSTS",
}


@dataclass(frozen=True)
class Claim:
    """A consumed pending authorization: the account it is for and what the exchange needs."""

    account_id: str
    redirect_uri: str
    code_verifier: str | None = field(repr=False)


def _probe_result(account_id: str, found: WhoAmI | ConnectionProblem) -> ConnectionTestOut:
    if isinstance(found, ConnectionProblem):
        step = _PROBE_NEXT_STEPS.get(found.reason, "check api_url").replace("{id}", account_id)
        return ConnectionTestOut(ok=False, reason=found.reason, message=found.message, next_step=step)
    return ConnectionTestOut(
        ok=True,
        user_id=found.user_id,
        organization_id=found.organization_id,
        business_unit_id=found.business_unit_id,
        latency_ms=round(found.latency_ms, 1),
    )


class AuthorizationService:
    def __init__(
        self,
        *,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        azure: AzureADClient,
        broker: TokenBroker,
        secrets: AccountSecrets,
        accounts: AccountService,
        http: httpx.AsyncClient,
        policy: OutboundPolicy,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._keyring = keyring
        self._azure = azure
        self._broker = broker
        self._secrets = secrets
        self._accounts = accounts
        self._http = http
        self._policy = policy
        self._signer = StateSigner(keyring.derive(PURPOSE))

    @classmethod
    def from_context(cls, ctx: Context) -> AuthorizationService:
        return cls(
            settings=ctx.settings,
            sessions=ctx.sessions,
            keyring=ctx.keyring,
            azure=ctx.azure,
            broker=ctx.broker,
            secrets=ctx.secrets,
            accounts=ctx.accounts,
            http=ctx.http,
            policy=ctx.policy,
        )

    @property
    def default_redirect_uri(self) -> str:
        return f"{self._settings.effective_public_url}{CALLBACK_PATH}"

    # -- the flow ---------------------------------------------------------------------------------

    async def start(self, account_id: str, redirect_uri: str | None, *, actor: str | None) -> AuthorizeOut:
        """A sign-in URL with a fresh state and PKCE challenge; the pending row remembers both."""
        redirect = self._redirect_uri(redirect_uri)
        account, _ = await self._load(account_id)
        state = self._signer.issue(int(PENDING_TTL.total_seconds()))
        verifier = secrets.token_urlsafe(64)
        url = self._azure.authorization_url(
            self._secrets.credentials(account, with_secret=False),
            redirect_uri=redirect,
            state=state,
            code_challenge=s256(verifier),
        )
        digest = state_hash(state)
        now = timeutil.utcnow()
        pending = PendingAuthorization(
            state_hash=digest,
            account_id=account_id,
            redirect_uri=redirect,
            code_verifier=sealing.seal(self._keyring, sealing.CODE_VERIFIER, digest, verifier),
            created_at=now,
            expires_at=now + PENDING_TTL,
        )
        expires_at = pending.expires_at.replace(tzinfo=UTC)
        try:
            async with self._sessions() as session, session.begin():
                await repo.add_pending(session, pending)
                await accounts_repo.add_event(
                    session,
                    account_id=account_id,
                    kind="authorization_started",
                    actor=actor,
                    detail={"redirect_uri": redirect, "expires_at": expires_at.isoformat()},
                )
        except IntegrityError:
            # The account was deleted after it was read: answer as if the DELETE had come first.
            async with self._sessions() as session:
                if await accounts_repo.get_account(session, account_id) is None:
                    raise AccountNotFound(account_id) from None
            raise
        return AuthorizeOut(authorization_url=url, state=state, expires_at=expires_at)

    async def claim(self, state: str | None, *, account_id: str | None = None) -> Claim:
        """Consume the pending authorization ``state`` names; InvalidState if none is valid.

        With ``account_id``, only that account's: another account's state is left pending."""
        if not state:
            raise InvalidState(f"The redirect carries no state; to start again, {START_AGAIN}.")
        pending: PendingAuthorization | None = None
        # Checked in memory first: a state the broker did not issue, or an expired one, costs no query.
        if self._signer.check(state):
            async with self._sessions() as session, session.begin():
                pending = await repo.take_pending(session, state_hash(state), account_id=account_id)
        # Consumed even when expired: an expired state must not linger, and is invalid all the same.
        if pending is None or pending.expires_at <= timeutil.utcnow():
            whose = " for this account" if account_id else ""
            raise InvalidState(
                f"This authorization is unknown{whose}, expired (they last {PENDING_TTL.seconds // 60} "
                f"minutes) or already used; to start again, {START_AGAIN}."
            )
        verifier = self._secrets.unseal(sealing.CODE_VERIFIER, pending.state_hash, pending.code_verifier)
        return Claim(pending.account_id, pending.redirect_uri, verifier or None)

    async def complete(
        self,
        state: str | None,
        code: str | None,
        *,
        error: str | None = None,
        error_description: str | None = None,
    ) -> AccountOut:
        """The hosted callback: consume the state, then exchange the code (or report the denial)."""
        claim = await self.claim(state)
        return await self.finish(claim, Redirect(code, state, error, error_description), actor=None)

    async def finish(self, claim: Claim, redirect: Redirect, *, actor: str | None) -> AccountOut:
        if redirect.error:
            await self._deny(claim.account_id, redirect, actor=actor)
        if not redirect.code:
            again = START_AGAIN.replace("{id}", claim.account_id)
            raise InvalidInput(f"The redirect carries neither a code nor an error; to start again, {again}.")
        return await self._redeem(
            claim.account_id, redirect.code, claim.redirect_uri, claim.code_verifier, actor=actor
        )

    async def paste(
        self, account_id: str, code_or_url: str, redirect_uri: str | None, *, actor: str | None
    ) -> AccountOut:
        """The seed's manual flow; a pasted URL's state finds the pending authorization."""
        await self._load(account_id)
        pasted = parse_pasted(code_or_url)
        if pasted.state:
            # Bound to this account, so a state pasted into the wrong account is not used up.
            claim = await self.claim(pasted.state, account_id=account_id)
            if claim.account_id != account_id:
                again = START_AGAIN.replace("{id}", account_id)
                raise InvalidState(
                    f"This state belongs to another account's authorization; to start again, {again}."
                )
            return await self.finish(claim, pasted, actor=actor)
        if pasted.error:
            await self._deny(account_id, pasted, actor=actor)
        if not pasted.code:
            raise invalid("code", "the pasted URL has an empty code")
        return await self._redeem(
            account_id, pasted.code, self._redirect_uri(redirect_uri), None, actor=actor
        )

    async def _redeem(
        self, account_id: str, code: str, redirect_uri: str, verifier: str | None, *, actor: str | None
    ) -> AccountOut:
        account, _ = await self._load(account_id)
        try:
            grant = await self._azure.redeem_code(
                self._secrets.credentials(account),
                code=code,
                redirect_uri=redirect_uri,
                code_verifier=verifier,
            )
            await self._broker.store_authorization(account_id, grant, actor=actor)
        except (ActionRequired, UpstreamUnavailable) as exc:
            detail = {"code": exc.code, "idp_code": exc.idp_code, "message": exc.detail[:300]}
            await self._event(account_id, "authorization_failed", actor, detail)
            raise
        return await self._accounts.get(account_id)

    async def _deny(self, account_id: str, redirect: Redirect, *, actor: str | None) -> NoReturn:
        error = sanitize_description(redirect.error or "")[:64] or "error"
        said = sanitize_description(redirect.error_description or "").rstrip(". ")
        detail = {"code": AuthorizationDenied.code, "idp_code": error, "message": said or None}
        await self._event(account_id, "authorization_failed", actor, detail)
        raise AuthorizationDenied(
            f"Azure AD did not authorize the account ({error}{': ' + said if said else ''}). Nothing was "
            f"changed; to try again, {START_AGAIN.replace('{id}', account_id)}."
        )

    # -- test connection --------------------------------------------------------------------------

    async def test_connection(self, account_id: str, *, actor: str | None) -> ConnectionTestOut:
        """Get a token through the broker, then call WhoAmI; ``ok`` false says what to do."""
        try:
            entry = await self._broker.get_token(account_id)
        except AccountNotFound:
            raise
        except BrokerError as exc:
            step = _TOKEN_NEXT_STEPS.get(exc.code, "read the message, fix the account, and test again")
            result = ConnectionTestOut(
                ok=False, reason=exc.code, message=exc.detail, next_step=step.replace("{id}", account_id)
            )
        else:
            found = await who_am_i(
                self._http,
                self._policy,
                api_url=entry.api_url,
                access_token=entry.access_token,
                timeout=self._settings.idp_timeout_seconds,
            )
            result = _probe_result(account_id, found)
        await self._event(account_id, "connection_tested", actor, {"ok": result.ok, "reason": result.reason})
        return result

    # -- helpers ----------------------------------------------------------------------------------

    def _redirect_uri(self, value: str | None) -> str:
        if value is None:
            return self.default_redirect_uri
        problem = redirect_uri_problem(value)
        if problem:
            raise invalid("redirect_uri", problem)
        # Where Azure sends the code: the broker itself, the admin's own machine, or what the
        # operator listed; never an arbitrary site an API caller names.
        allowed = {self.default_redirect_uri, *self._settings.allowed_redirect_uri_list}
        if value not in allowed and not is_loopback_redirect(value):
            raise invalid(
                "redirect_uri",
                f"must be the broker's callback ({self.default_redirect_uri}), http://localhost[:port] "
                "or http://127.0.0.1[:port], or one of BROKER_ALLOWED_REDIRECT_URIS",
            )
        return value

    async def _load(self, account_id: str) -> tuple[Account, AccountState]:
        """The account, which must exist and use the authorization-code grant."""
        async with self._sessions() as session:
            row = await accounts_repo.get_account(session, account_id)
        if row is None:
            raise AccountNotFound(account_id)
        if row[1].grant_type == "client_credentials":
            raise InvalidInput(
                "client_credentials accounts need no authorization: they get tokens with the "
                "client secret alone"
            )
        return row

    async def _event(self, account_id: str, kind: str, actor: str | None, detail: dict[str, Any]) -> None:
        async with self._sessions() as session, session.begin():
            await accounts_repo.add_event(
                session,
                account_id=account_id,
                kind=kind,
                actor=actor,
                detail={k: v for k, v in detail.items() if v is not None},
            )
