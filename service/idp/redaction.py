"""What Azure says back, made fit to store and show: no secret we sent survives in it.

Invariant: ``sanitize_description`` removes every secret of the request, whole or as any run of
``_SHARED_RUN`` or more characters shared with it (case-insensitively, and in URL-, form- and
percent-encoded spellings), and any token-like run; it keeps one printable line, without Azure's
diagnostics, of bounded length. Everything the broker stores or shows of Azure's text passes here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote

_DIAGNOSTICS = re.compile(r"\s*(?:Trace ID|Correlation ID|Timestamp)\s*:.*$", re.IGNORECASE)
_TOKENISH = re.compile(r"[A-Za-z0-9._~+/=-]{64,}")  # a token-like run: redacted even if not ours
_MAX_MESSAGE = 300
_REDACTED = "[redacted]"
# Any run this long shared with a secret is redacted (issue 12): an altered echo is still an echo.
_SHARED_RUN = 8


def _shared_runs(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every run of ``_SHARED_RUN``+ characters that also occurs in a secret redacted.

    Case-insensitive, and against the secrets' URL- and form-encoded spellings too, so an echo that
    was lowercased, cut short, encoded or embedded in other text is caught, not only an exact one.
    """
    grams: set[str] = set()
    for secret in secrets:
        every = "".join(c if c.isalnum() else "".join(f"%{b:02x}" for b in c.encode()) for c in secret)
        for form in {secret, quote(secret, safe=""), quote_plus(secret), every}:
            low = form.lower()
            grams.update(low[i : i + _SHARED_RUN] for i in range(len(low) - _SHARED_RUN + 1))
    if not grams:
        return text
    low = text.lower()
    covered = [False] * len(text)
    for i in range(len(low) - _SHARED_RUN + 1):
        if low[i : i + _SHARED_RUN] in grams:
            covered[i : i + _SHARED_RUN] = [True] * _SHARED_RUN
    out: list[str] = []
    for i, ch in enumerate(text):
        if not covered[i]:
            out.append(ch)
        elif i == 0 or not covered[i - 1]:
            out.append(_REDACTED)
    return "".join(out)


def sanitize_description(text: str, secrets: Iterable[str] = ()) -> str:
    """Azure's error_description made fit for a message: one line, no diagnostics, no secrets."""
    known = sorted({s for s in secrets if s}, key=len, reverse=True)
    for secret in known:  # secrets shorter than a shared run are still removed when echoed whole
        for form in (secret, quote(secret, safe=""), quote_plus(secret)):
            text = text.replace(form, _REDACTED)
    redacted = _shared_runs(text, known)
    decoded = unquote(text)
    if decoded != text:  # an echo in mixed encodings: judged decoded, shown decoded when it hid one
        plain = _shared_runs(decoded, known)
        if plain != decoded:
            redacted = plain
    text = _TOKENISH.sub(_REDACTED, redacted)
    lines = text.strip().splitlines()
    line = _DIAGNOSTICS.sub("", lines[0] if lines else "")
    line = "".join(ch if ch.isprintable() else " " for ch in line).strip()
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 1].rstrip() + "…"
