"""The forwarding rules on their own (no sockets): what goes to a replica and back."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from shoal.controller.forwarding import answer_headers, split_target, upstream_headers


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_split_target_keeps_the_raw_rest() -> None:
    assert split_target("/s/echo/a%3Fb%3D1?x=%2F") == ("echo", "/a%3Fb%3D1?x=%2F")
    assert split_target("/s/echo") == ("echo", "/")
    assert split_target("/s/echo?q=1") == ("echo", "/?q=1")
    assert split_target("/s/%65cho/") == ("%65cho", "/")  # refused later as a bad name
    assert split_target("/api/v1/nodes") is None


def test_forwarded_for_is_extended_only_from_a_trusted_proxy() -> None:
    sent = _headers(("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https"),
                    ("X-Forwarded-Host", "app.example"), ("Forwarded", "for=1.2.3.4"))
    kw = dict(host="h:1", scheme="http", prefix="/s/x")
    trusted = upstream_headers(sent, peer="10.0.0.1", trusted=["10.0.0.1"], **kw)
    assert trusted["X-Forwarded-For"] == "1.2.3.4, 10.0.0.1"
    assert trusted["X-Forwarded-Proto"] == "https"
    assert trusted["X-Forwarded-Host"] == "app.example"
    assert trusted["Forwarded"] == "for=1.2.3.4"
    direct = upstream_headers(sent, peer="6.6.6.6", trusted=["10.0.0.1"], **kw)
    assert direct["X-Forwarded-For"] == "6.6.6.6"
    assert direct["X-Forwarded-Proto"] == "http" and direct["X-Forwarded-Host"] == "h:1"
    assert "Forwarded" not in direct


def test_credentials_and_connection_named_headers_stay_behind() -> None:
    sent = _headers(("Authorization", "Bearer t"), ("Cookie", "shoal_token=t; a=1"),
                    ("Cookie", "SHOAL_x=2"), ("Connection", "keep-alive, X-Hop"),
                    ("X-Hop", "1"), ("Upgrade", "h2c"), ("X-Other", "2"))
    out = upstream_headers(sent, peer="p", trusted=[], host="h", scheme="http", prefix="/s/x")
    assert out.getall("Cookie") == ["a=1"]
    assert not {k.lower() for k in out} & {"authorization", "connection", "x-hop", "upgrade"}
    assert out["X-Other"] == "2"
    back = answer_headers(_headers(("Connection", "X-R"), ("X-R", "1"), ("Content-Length", "3"),
                                   ("Set-Cookie", "shoal_token=x"), ("Set-Cookie", "a=1"),
                                   ("Set-Cookie", "__Host-shoal_s=1; Secure")))
    assert back.getall("Set-Cookie") == ["a=1"] and "X-R" not in back
