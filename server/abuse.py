"""Abuse controls: a lockout for clients that keep presenting wrong keys, and per-key
request rates. Pure bookkeeping on monotonic time (the caller passes ``now``), so the
rules are tested without sleeping; memory is bounded by ``max_clients``."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque


class AuthFailures:
    """``limit`` failed authentications within ``window_s`` lock the client out for
    ``lockout_s``: every request of it then gets 429 with ``Retry-After``. A success
    does not reset the count (a guesser holding one valid key gains nothing)."""

    def __init__(self, limit: int, window_s: float, lockout_s: float, max_clients: int = 10_000) -> None:
        self.limit, self.window_s, self.lockout_s = limit, window_s, lockout_s
        self.max_clients = max_clients
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until a locked-out client may try again; None when it is not locked."""
        with self._lock:
            until = self._locked.get(client)
            if until is None:
                return None
            if now >= until:
                del self._locked[client]
                return None
            return max(1, math.ceil(until - now))

    def fail(self, client: str, now: float) -> bool:
        """Count a failure; True when it locks the client out."""
        with self._lock:
            times = self._fails.pop(client, None) or deque()
            times.append(now)
            while times and times[0] <= now - self.window_s:
                times.popleft()
            self._fails[client] = times
            while len(self._fails) > self.max_clients:
                self._fails.popitem(last=False)
            if len(times) < self.limit:
                return False
            self._locked[client] = now + self.lockout_s
            if len(self._locked) > self.max_clients:
                self._locked = {c: t for c, t in self._locked.items() if t > now}
            times.clear()
            return True


class RateLimiter:
    """A token bucket per key name: ``rate`` requests per second, bursts of ``2 * rate``."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_keys = max_keys

    def take(self, key: str, rate: float, now: float) -> int | None:
        """None when the request may go; else the seconds to wait for a token."""
        burst = max(1.0, 2.0 * rate)
        with self._lock:
            tokens, last = self._buckets.pop(key, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                allowed = True
            else:
                self._buckets[key] = (tokens, now)
                allowed = False
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return None if allowed else max(1, math.ceil((1.0 - tokens) / rate))
