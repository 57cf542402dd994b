"""What an operation's handler gets besides its request (operations.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scopes import Principal
    from .server import Controller


@dataclass(frozen=True)
class Call:
    """The controller and who asks (None: a terminal link's narrow credential)."""

    ctl: Controller
    principal: Principal | None

    @property
    def user(self) -> str:
        return self.principal.user if self.principal is not None else ""
