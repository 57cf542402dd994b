"""Allocating TCP ports from the agent's range for sessions that ask for them."""

from __future__ import annotations

import socket

from ..errors import ConfigError


class PortPool:
    @classmethod
    def parse(cls, text: str) -> PortPool:
        """``ports = "FIRST-LAST"`` (or one port) of the agent's settings."""
        first, _, last = text.partition("-")
        try:
            return cls(int(first), int(last or first))
        except ValueError:
            raise ConfigError(f"ports {text!r}: give a range such as 20000-20999") from None

    def __init__(self, first: int, last: int) -> None:
        if not 1 <= first <= last <= 65535:
            raise ConfigError(f"bad port range {first}-{last}: give ports within 1-65535, "
                              "the first no higher than the last")
        self.first = first
        self.last = last
        self.taken: set[int] = set()
        self._next = first

    @staticmethod
    def _free(port: int) -> bool:
        # Checked by binding: a port some other program holds is skipped.
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return True
            except OSError:
                return False

    def allocate(self, count: int) -> list[int] | None:
        """``count`` free ports, or None (and nothing taken) when the range has no room."""
        got: list[int] = []
        size = self.last - self.first + 1
        for _ in range(size):
            if len(got) == count:
                break
            port = self._next
            self._next = self.first if port >= self.last else port + 1
            if port not in self.taken and self._free(port):
                got.append(port)
                self.taken.add(port)
        if len(got) < count:
            self.release(got)
            return None
        return got

    def release(self, ports: list[int]) -> None:
        self.taken.difference_update(ports)
