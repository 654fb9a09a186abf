"""``sanitize_description`` removes altered echoes of a secret, not only exact ones (issue 12, item 7)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from service.idp.redaction import sanitize_description

SECRET = "Qx7~Secret.Value_0123-abcd"


@pytest.mark.parametrize(
    "echo",
    [
        SECRET,
        SECRET.lower(),
        SECRET.upper(),
        SECRET[:-1],
        SECRET[3:],
        SECRET[5:13],  # an 8-character run alone
        quote(SECRET, safe=""),
        SECRET.replace("~", "%7E").replace(".", "%2E"),
        "".join(f"%{b:02X}" for b in SECRET.encode()),
    ],
)
def test_any_run_of_eight_shared_with_a_secret_is_redacted(echo: str) -> None:
    """Lowercased, cut, or encoded: no 8 characters of the secret survive, Azure's text does."""
    out = sanitize_description(f"AADSTS7000215: Invalid client secret provided: {echo} (x).", [SECRET])
    low = out.lower()
    assert not any(SECRET.lower()[i : i + 8] in low for i in range(len(SECRET) - 7)), out
    assert out.startswith("AADSTS7000215: Invalid client secret provided: [redacted]")


def test_text_sharing_less_than_eight_characters_is_kept() -> None:
    """Short coincidences (here 'Secret.' and 'abcd') are not redacted: the message stays readable."""
    text = "AADSTS50011: The redirect URI does not match; see Secret. abcd"
    assert sanitize_description(text, [SECRET]) == text
