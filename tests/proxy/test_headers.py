"""Header filtering both ways: hop-by-hop and the caller's credentials never cross."""

from __future__ import annotations

from service.proxy import headers

CALLER = [
    (b"Authorization", b"Bearer caller-api-key"),
    (b"Cookie", b"session=caller"),
    (b"Host", b"broker.internal"),
    (b"Connection", b"keep-alive, X-Private-Hop"),
    (b"Keep-Alive", b"timeout=5"),
    (b"X-Private-Hop", b"secret-hop"),
    (b"Proxy-Authorization", b"Basic cHJveHk="),
    (b"Proxy-Connection", b"keep-alive"),
    (b"TE", b"trailers"),
    (b"Trailer", b"X-Checksum"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Upgrade", b"h2c"),
    (b"Content-Length", b"12"),
    (b"Expect", b"100-continue"),
    (b"Accept", b"application/json"),
    (b"OData-MaxVersion", b"4.0"),
    (b"Prefer", b'odata.include-annotations="*"'),
    (b"Prefer", b"return=representation"),
    (b"If-Match", b'W/"123"'),
    (b"MSCRM.SuppressDuplicateDetection", b"false"),
]


def test_request_headers_drop_hop_by_hop_and_caller_credentials_and_add_the_token() -> None:
    """What goes upstream: end-to-end headers as sent (repeats kept), plus the account's token."""
    out = headers.request_headers(CALLER, "account-access-token")
    names = [name.lower() for name, _ in out]
    for dropped in (
        b"cookie", b"host", b"connection", b"keep-alive", b"x-private-hop", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length",
        b"expect",
    ):  # fmt: skip
        assert dropped not in names, dropped
    assert [v for n, v in out if n.lower() == b"authorization"] == [b"Bearer account-access-token"]
    assert b"caller-api-key" not in b"".join(v for _, v in out)
    assert [v for n, v in out if n == b"Prefer"] == [
        b'odata.include-annotations="*"',
        b"return=representation",
    ]
    for kept in (b"Accept", b"OData-MaxVersion", b"If-Match", b"MSCRM.SuppressDuplicateDetection"):
        assert kept in [n for n, _ in out], kept
    assert (b"accept-encoding", b"identity") in out  # httpx must not ask for gzip on the caller's behalf


def test_a_callers_accept_encoding_is_kept() -> None:
    """A caller who asks for gzip gets upstream's gzip, passed through raw."""
    out = headers.request_headers([(b"accept-encoding", b"gzip")], "t")
    assert [v for n, v in out if n == b"accept-encoding"] == [b"gzip"]


def test_response_headers_drop_hop_by_hop_but_keep_the_rest() -> None:
    """What comes back: the upstream's headers less hop-by-hop, Content-Length and Set-Cookie kept."""
    upstream = [
        (b"content-type", b"application/json; odata.metadata=minimal"),
        (b"content-length", b"42"),
        (b"connection", b"close, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"proxy-authenticate", b"Basic"),
        (b"upgrade", b"h2"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-ms-ratelimit-burst-remaining-xrm-requests", b"5999"),
        (b"odata-version", b"4.0"),
    ]
    out = headers.response_headers(upstream)
    assert out == [
        (b"content-type", b"application/json; odata.metadata=minimal"),
        (b"content-length", b"42"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-ms-ratelimit-burst-remaining-xrm-requests", b"5999"),
        (b"odata-version", b"4.0"),
    ]
