"""The fleet's signing keys for NATS decentralized auth, and the JWTs they sign.

Three nkeys, made once (``Authority.create``) and kept 0600 in one file the controllers read
(``identity`` in controller.toml): the *operator* (nats-server trusts its JWT and nothing
else), the *system account* (the server's own; its users may push account updates) and the
*shoal account* (every shoal client is a user of it; its key signs the user JWTs). An
agent's private key is never here: the agent makes it, and only its public key is signed.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..config import write_secret_file
from ..errors import ConfigError
from ..natsio.natsd import JwtAuth, node_permissions
from . import claims

OPERATOR_NAME = "shoal"
ACCOUNT_NAME = "SHOAL"
SYSTEM_NAME = "SYS"
NODE_TAG = "shoal-node:"  # a user JWT's tags: the node names it was issued for
LABEL_TAG = "shoal-label:"


@dataclass(frozen=True)
class Authority:
    operator_seed: str
    system_seed: str
    account_seed: str
    created: int  # the preloaded account JWTs' issue time (see jwt_auth)

    @classmethod
    def create(cls, now: int | None = None) -> Authority:
        return cls(claims.new_seed("operator"), claims.new_seed("account"),
                   claims.new_seed("account"), int(now if now is not None else time.time()))

    @classmethod
    def load(cls, path: Path) -> Authority:
        try:
            data = tomllib.loads(path.read_text())
            return cls(data["operator_seed"], data["system_seed"], data["account_seed"],
                       int(data["created"]))
        except (OSError, tomllib.TOMLDecodeError, KeyError, ValueError) as e:
            raise ConfigError(f"cannot read the fleet's NATS signing keys from {path}: {e}; "
                              "shoal up makes it (node identities), or shoal admin "
                              "node-identities DIR") from e

    @classmethod
    def load_or_create(cls, path: Path) -> Authority:
        if path.exists():
            return cls.load(path)
        made = cls.create()
        made.save(path)
        return made

    def save(self, path: Path) -> None:
        write_secret_file(path, "".join(f'{k} = "{v}"\n' for k, v in (
            ("operator_seed", self.operator_seed), ("system_seed", self.system_seed),
            ("account_seed", self.account_seed))) + f"created = {self.created}\n")

    @property
    def account(self) -> str:
        return claims.public_key(self.account_seed)

    @property
    def system_account(self) -> str:
        return claims.public_key(self.system_seed)

    def account_jwt(self, now: int, revocations: dict[str, int] | None = None) -> str:
        return claims.account_jwt(self.operator_seed, self.account, ACCOUNT_NAME, now,
                                  jetstream=True, revocations=revocations)

    def jwt_auth(self) -> JwtAuth:
        """The server's side. The accounts are preloaded as of ``created``: an update a
        controller pushed since (a revocation) is newer, and the resolver keeps the newer."""
        op = claims.operator_jwt(self.operator_seed, OPERATOR_NAME, self.system_account,
                                 self.created)
        sys_jwt = claims.account_jwt(self.operator_seed, self.system_account, SYSTEM_NAME,
                                     self.created, jetstream=False)
        return JwtAuth(op, self.system_account, {
            self.system_account: sys_jwt, self.account: self.account_jwt(self.created)})

    def controller_creds(self, now: int) -> str:
        """A controller's credential: a user of the shoal account with no limits."""
        seed = claims.new_seed("user")
        jwt = claims.user_jwt(self.account_seed, claims.public_key(seed), "controller", now)
        return claims.creds(jwt, seed)

    def system_creds(self, now: int) -> str:
        """A user of the system account: it may push account updates (revocations)."""
        seed = claims.new_seed("user")
        jwt = claims.user_jwt(self.system_seed, claims.public_key(seed), "shoal-controller",
                              now)
        return claims.creds(jwt, seed)

    def node_jwt(self, user_pub: str, names: list[str], now: int, lifetime: float,
                 labels: dict[str, str] | None = None) -> str:
        """The credential of the agent whose public key is ``user_pub``, for ``names``:
        what it may publish and subscribe names those nodes only; it expires after
        ``lifetime`` seconds (the agent renews it before)."""
        pub, sub = node_permissions(names)
        tags = [f"{NODE_TAG}{n}" for n in names]
        tags += [f"{LABEL_TAG}{k}={v}" for k, v in sorted((labels or {}).items())]
        return claims.user_jwt(self.account_seed, user_pub, names[0], now,
                               expires=now + int(lifetime), pub_allow=pub, sub_allow=sub,
                               responses=True, tags=tags)


def node_names(user_jwt: str) -> list[str]:
    """The node names a user JWT was issued for (its tags), unverified."""
    tags = claims.decode(user_jwt).get("nats", {}).get("tags", [])
    return [t[len(NODE_TAG):] for t in tags if isinstance(t, str) and t.startswith(NODE_TAG)]
