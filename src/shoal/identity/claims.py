"""NATS decentralized-auth JWTs (operator, account, user) and ``.creds`` files.

A NATS JWT is ``base64url(header).base64url(claims).base64url(signature)`` where the header
is ``{"typ":"JWT","alg":"ed25519-nkey"}`` and the signature is the issuer's nkey (ed25519,
the ``nkeys`` library) over the first two parts. Nothing here does cryptography itself:
keys are made, and bytes signed and verified, by ``nkeys`` (PyNaCl underneath). We build the
claims ourselves rather than with the ``nats-jwt`` package (docs/security.md says why).
The claim names are those of nats-io/jwt v2, which nats-server reads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from ..errors import ConfigError

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
# No limit (nats-io/jwt's NoLimit) on everything an account or user may hold.
_UNLIMITED = {"subs": -1, "data": -1, "payload": -1}
_ACCOUNT_LIMITS = {**_UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
                   "leaf": -1}
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}

_PREFIXES = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
             "user": nkeys.PREFIX_BYTE_USER}


def new_seed(kind: str) -> str:
    """A fresh nkey seed (``S...``) for an ``operator``, ``account`` or ``user``."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), _PREFIXES[kind])
    return seed.decode()


def public_key(seed: str) -> str:
    kp = nkeys.from_seed(seed.encode())
    try:
        return str(kp.public_key.decode())
    finally:
        kp.wipe()


def verify_key(public: str) -> nacl.signing.VerifyKey:
    """The ed25519 key inside an nkey public key (prefix byte, 32 bytes, CRC-16)."""
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    if len(raw) != 35 or nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise ValueError(f"{public!r} is not an nkey public key")
    return nacl.signing.VerifyKey(raw[1:33])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], signer_seed: str) -> str:
    """Sign ``claims`` (``jti`` and ``iss`` filled in here) with the issuer's seed."""
    kp = nkeys.from_seed(signer_seed.encode())
    try:
        body = {**claims, "iss": kp.public_key.decode(), "jti": ""}
        # The id is a hash of the claims without it, as nats-io/jwt computes it.
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        body["jti"] = base64.b32encode(hashlib.new("sha512_256", raw).digest()) \
            .rstrip(b"=").decode()
        head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
        payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        signature = kp.sign(f"{head}.{payload}".encode())
    finally:
        kp.wipe()
    return f"{head}.{payload}.{_b64(signature)}"


def decode(token: str, issuers: set[str] | None = None) -> dict[str, Any]:
    """The claims of ``token`` once its signature checks out (against ``issuers``, when
    given: the public keys allowed to have signed it). Raises ValueError otherwise."""
    try:
        head, payload, sig = token.strip().split(".")
        claims: dict[str, Any] = json.loads(_unb64(payload))
        issuer = str(claims["iss"])
        verify_key(issuer).verify(f"{head}.{payload}".encode(), _unb64(sig))
    except (ValueError, KeyError, binascii.Error, nacl.exceptions.BadSignatureError) as e:
        raise ValueError(f"not a valid NATS JWT: {e or type(e).__name__}") from None
    if issuers is not None and issuer not in issuers:
        raise ValueError(f"JWT signed by {issuer}, which is not one of ours")
    return claims


def operator_jwt(operator_seed: str, name: str, system_account: str, now: int) -> str:
    return encode({"iat": now, "name": name, "sub": public_key(operator_seed),
                   "nats": {"type": "operator", "version": 2,
                            "system_account": system_account}}, operator_seed)


def account_jwt(operator_seed: str, account_pub: str, name: str, now: int, *,
                jetstream: bool, revocations: dict[str, int] | None = None) -> str:
    """An account the operator vouches for. ``revocations``: user public key -> time; the
    server refuses (and disconnects) that user's credentials issued at or before it."""
    limits = {**_ACCOUNT_LIMITS, **(_JETSTREAM if jetstream else {})}
    nats: dict[str, Any] = {"type": "account", "version": 2, "limits": limits}
    if revocations:
        nats["revocations"] = dict(revocations)
    return encode({"iat": now, "name": name, "sub": account_pub, "nats": nats}, operator_seed)


def user_jwt(account_seed: str, user_pub: str, name: str, now: int, *,
             expires: int = 0, pub_allow: list[str] | None = None,
             sub_allow: list[str] | None = None, responses: bool = False,
             tags: list[str] | None = None) -> str:
    """A user of the account. With ``pub_allow``/``sub_allow`` it may publish/subscribe only
    there (None: anywhere); ``responses``: it may also answer requests sent to it, once
    each, to the reply subject they name."""
    nats: dict[str, Any] = {"type": "user", "version": 2, **_UNLIMITED,
                            "pub": {} if pub_allow is None else {"allow": pub_allow},
                            "sub": {} if sub_allow is None else {"allow": sub_allow}}
    if responses:
        nats["resp"] = {"max": 1, "ttl": 0}
    if tags:
        nats["tags"] = tags
    claims: dict[str, Any] = {"iat": now, "name": name, "sub": user_pub, "nats": nats}
    if expires:
        claims["exp"] = expires
    return encode(claims, account_seed)


_CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""
_CREDS_PART = re.compile(r"-{3,}BEGIN ([A-Z ]+)-{3,}\s*\n\s*(\S+)\s*\n")


def creds(jwt: str, seed: str) -> str:
    """The standard ``.creds`` text (what ``nsc`` writes and every NATS client reads)."""
    return _CREDS.format(jwt=jwt, seed=seed)


@dataclass(frozen=True)
class Creds:
    jwt: str
    seed: str


def parse_creds(text: str, where: str = "the .creds file") -> Creds:
    parts = {k: v for k, v in _CREDS_PART.findall(text)}
    jwt, seed = parts.get("NATS USER JWT"), parts.get("USER NKEY SEED")
    if not jwt or not seed:
        raise ConfigError(f"{where} is not a NATS .creds file (it needs a user JWT and a user "
                          "nkey seed); enroll again with shoal agent --join URL --token T")
    return Creds(jwt, seed)
