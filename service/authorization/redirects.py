"""The pure parts of the authorization flow: PKCE (S256), what a redirect URI may be, and reading
a redirect the admin pasted.

Invariant: nothing here touches the network or the database, and no message built here echoes the
pasted code or state (they are secrets until redeemed): a ``Redirect``'s repr hides them.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from service.errors import InvalidInput

# More fields than any Azure AD redirect carries: a pasted value beyond it is refused unparsed.
_MAX_PASTED_FIELDS = 50


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()


def s256(verifier: str) -> str:
    """The PKCE S256 challenge: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def redirect_uri_problem(value: str) -> str | None:
    """Why ``value`` cannot be a redirect URI (absolute http(s), no fragment), or None."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "must be an absolute http(s) URL"
    if "#" in value:
        return "must not contain a fragment"
    if parts.username is not None or parts.password is not None:
        return "must not contain a user name or password"
    return None


def is_loopback_redirect(value: str) -> bool:
    """``http://localhost[:port][/path]`` or the same on 127.0.0.1: the seed's manual flow."""
    parts = urlsplit(value)
    return (
        parts.scheme == "http"
        and parts.netloc.lower().split(":")[0] in ("localhost", "127.0.0.1")
        and (parts.netloc.count(":") == 0 or parts.netloc.rsplit(":", 1)[1].isdigit())
    )


@dataclass(frozen=True)
class Redirect:
    """What an authorization server's redirect carried (the hosted callback, or a pasted URL)."""

    code: str | None = field(default=None, repr=False)
    state: str | None = field(default=None, repr=False)
    error: str | None = None
    error_description: str | None = None


def parse_pasted(value: str) -> Redirect:
    """The seed's manual flow: a bare code, or the whole ``http://localhost/?code=…`` address."""
    text = value.strip()
    is_url = "://" in text
    if is_url:
        try:
            parts = urlsplit(text)
        except ValueError as exc:  # e.g. an unclosed '[' in the host
            raise invalid(
                "code", "the pasted URL is not a valid URL: paste it again, or only the code"
            ) from exc
        candidates = [parts.query, parts.fragment]  # response_mode=fragment puts them after '#'
    else:
        candidates = [text.lstrip("?#")]
    for raw in candidates:
        try:
            params = parse_qs(raw, keep_blank_values=True, max_num_fields=_MAX_PASTED_FIELDS)
        except ValueError as exc:  # more fields than any Azure AD redirect carries
            raise invalid(
                "code", f"the pasted value has more than {_MAX_PASTED_FIELDS} parameters: paste only the code"
            ) from exc
        if "code" in params or "error" in params:
            first = {k: (v[0].strip() or None) for k, v in params.items()}
            return Redirect(
                first.get("code"), first.get("state"), first.get("error"), first.get("error_description")
            )
    if is_url:
        raise invalid(
            "code",
            "the pasted URL has no code parameter: paste the whole address Azure AD "
            "redirected to, or only the code",
        )
    return Redirect(code=text)


def invalid(name: str, message: str) -> InvalidInput:
    return InvalidInput(
        f"{name}: {message}", [{"loc": ["body", name], "msg": message, "type": "value_error"}]
    )
