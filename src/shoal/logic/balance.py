"""Choosing a replica: health with rise and fall, peak-EWMA latency, power of two choices.

Pure: no I/O and no clock of its own (every call takes ``now``), so it is tested directly.

Health (as HAProxy's checks): a replica starts ``init`` and is not chosen. In ``init`` its
first check decides (passed: ``up``, failed: ``down``). An ``up`` replica goes ``down``
after ``fall`` failed checks in a row; a ``down`` one comes back ``up`` after ``rise``
passed checks in a row. A failed connection of a proxied request counts as a failed check.

Latency (as Finagle's peak EWMA): every sample (a probe's round trip, a proxied request's
time to its response headers) moves the estimate. A sample above the estimate replaces it
at once (peak: a replica that slows down is avoided at once); a sample below it is blended
in with weight ``1 - exp(-elapsed / decay)``, so the estimate comes down over ``decay``
seconds, not in one lucky sample. A replica with no sample yet costs ``UNMEASURED``: a
new replica must prove itself before it is preferred.

Load: requests in flight (counted by the proxy) plus, for redirects the balancer cannot
see finish, ``recent``: the redirects handed out, fading with a one-second time constant.

Choice: among the replicas that are ``up`` and not draining, take two at random and keep
the one of lower cost = EWMA x (in flight + recent + 1). Two random choices keep a fast
replica from being flooded (the best one is only as likely as its pair allows) and need
no global sort; the in-flight factor sends the next request elsewhere while one is busy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

Health = Literal["init", "up", "down"]

DECAY = 10.0  # seconds for a lower latency to take over the estimate (Finagle's default)
RECENT_DECAY = 1.0  # seconds: how long a redirect counts as load
UNMEASURED = 1.0  # seconds: the latency assumed before a replica's first sample


@dataclass
class Replica:
    """One replica as the balancer sees it."""

    key: str
    host: str
    port: int
    rise: int = 2
    fall: int = 3
    health: Health = "init"
    passes: int = 0  # consecutive passed checks (while down)
    failures: int = 0  # consecutive failed checks (while up)
    ewma: float | None = None
    last_sample: float = 0.0
    inflight: int = 0
    recent: float = 0.0
    recent_at: float = 0.0
    draining: bool = False
    chosen: int = 0  # times handed out (redirect or proxy), for `service show`
    checks: int = 0
    last_error: str = ""
    changed_at: float = 0.0  # when health last changed

    @property
    def available(self) -> bool:
        return self.health == "up" and not self.draining

    # ------------------------------------------------------------------ health

    def check(self, ok: bool, now: float, latency: float | None = None,
              error: str = "") -> bool:
        """Record one check; returns True when the health changed."""
        self.checks += 1
        self.last_error = "" if ok else error
        if ok and latency is not None:
            self.sample(latency, now)
        before = self.health
        if self.health == "init":
            self.health = "up" if ok else "down"
            self.passes = self.failures = 0
        elif self.health == "up":
            self.failures = 0 if ok else self.failures + 1
            if self.failures >= self.fall:
                self.health, self.failures, self.passes = "down", 0, 0
        else:
            self.passes = self.passes + 1 if ok else 0
            if self.passes >= self.rise:
                self.health, self.failures, self.passes = "up", 0, 0
        if self.health != before:
            self.changed_at = now
            return True
        return False

    # ------------------------------------------------------------------ latency

    def sample(self, latency: float, now: float) -> None:
        """Peak EWMA: a higher sample takes over at once, a lower one decays in."""
        latency = max(0.0, latency)
        if self.ewma is None or latency > self.ewma:
            self.ewma = latency
        else:
            elapsed = max(0.0, now - self.last_sample)
            w = math.exp(-elapsed / DECAY)
            self.ewma = self.ewma * w + latency * (1.0 - w)
        self.last_sample = now

    # ------------------------------------------------------------------ load

    def _recent(self, now: float) -> float:
        if self.recent and now > self.recent_at:
            return self.recent * math.exp(-(now - self.recent_at) / RECENT_DECAY)
        return self.recent

    def assign(self, now: float) -> None:
        """Handed to a client by a redirect: counts as load for a while."""
        self.recent = self._recent(now) + 1.0
        self.recent_at = now
        self.chosen += 1

    def begin(self, now: float) -> None:
        """A proxied request starts."""
        self.inflight += 1
        self.chosen += 1

    def end(self, now: float, latency: float | None) -> None:
        """A proxied request got its answer (``latency``) or failed (None)."""
        self.inflight = max(0, self.inflight - 1)
        if latency is not None:
            self.sample(latency, now)

    def cost(self, now: float) -> float:
        latency = UNMEASURED if self.ewma is None else self.ewma
        # A floor so that a replica measured at ~0 s still counts its load.
        return max(latency, 1e-6) * (self.inflight + self._recent(now) + 1.0)


@dataclass
class Pool:
    """The replicas of one service."""

    replicas: dict[str, Replica] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def available(self, exclude: Collection[str] = ()) -> list[Replica]:
        return [r for r in self.replicas.values() if r.available and r.key not in exclude]

    def choose(self, now: float, exclude: Collection[str] = ()) -> Replica | None:
        """Power of two random choices on cost; None when no replica is available."""
        return choose(self.available(exclude), now, self.rng)

    def counts(self) -> dict[str, int]:
        out = {"up": 0, "down": 0, "init": 0, "draining": 0}
        for r in self.replicas.values():
            out[r.health] += 1
            out["draining"] += r.draining
        return out


def choose(candidates: Iterable[Replica], now: float,
           rng: random.Random | None = None) -> Replica | None:
    pool = list(candidates)
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    rng = rng or random.Random()
    a, b = rng.sample(pool, 2)
    ca, cb = a.cost(now), b.cost(now)
    if ca == cb:
        return a  # already a random one of the two
    return a if ca < cb else b
