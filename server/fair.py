"""Fair admission to the face workers: clients take turns, none holds them all.

The face path is CPU-bound and runs on a few workers. First come, first served lets
one client that sends many expensive photos at once fill every worker while everyone
else queues behind them (four uploads held detection for ~55 s, and a search sent
meanwhile waited 42 s). :class:`FairGate` admits at most ``capacity`` photos at once and
at most ``per_client`` of them from one client (its key, else its address), and
when a worker frees up it goes to the next client in turn, not to the longest queue.
A photo that waits longer than ``timeout_s`` is answered 503 ``busy``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from facegate.core.errors import FacegateError
from facegate.server.auth import ANONYMOUS

# The address the current request comes from; set once per request by the middleware.
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("facegate_client", default="")


class Busy(FacegateError):
    """The photo waited its whole queue time for a worker."""

    code = "busy"
    status = 503


def client_key(caller: str | None, address: str | None) -> str:
    """Who a request counts as: the key it authenticated with (``server.auth``'s caller
    name), else its address. Never a header as sent: the server ignores a key header it
    has no key for, so counting one would let a client take a share per made-up key."""
    if caller and caller != ANONYMOUS:
        return "key:" + caller
    return "addr:" + (address or "?")


class FairGate:
    """At most ``capacity`` holders at once, ``per_client`` of them per client, round robin."""

    def __init__(self, capacity: int, per_client: int, timeout_s: float) -> None:
        if capacity < 1 or per_client < 1:
            raise ValueError("capacity and per_client must be >= 1")
        self.capacity, self.per_client, self.timeout_s = capacity, per_client, timeout_s
        self._running: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def running(self) -> int:
        return sum(self._running.values())

    @asynccontextmanager
    async def slot(self, client: str) -> AsyncIterator[None]:
        await self._acquire(client)
        try:
            yield
        finally:
            self._running[client] -= 1
            if not self._running[client]:
                del self._running[client]
            self._dispatch()

    async def _acquire(self, client: str) -> None:
        if self.running < self.capacity and self._running[client] < self.per_client:
            self._running[client] += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():  # granted just as we gave up
                self._running[client] -= 1
                if not self._running[client]:
                    del self._running[client]
                self._dispatch()
            else:
                future.cancel()
                self._forget(client, future)
            if isinstance(exc, TimeoutError):
                raise Busy(f"no face worker was free within {self.timeout_s:g} s; retry later") from None
            raise

    def _dispatch(self) -> None:
        """Hand free slots to waiting clients, one each in turn."""
        while self.running < self.capacity:
            for client in list(self._waiting):
                if self._running[client] < self.per_client:
                    break
            else:
                return
            queue = self._waiting.pop(client)
            future = queue.popleft()
            if queue:
                self._waiting[client] = queue  # to the back of the turn order
            self._running[client] += 1
            future.set_result(None)

    def _forget(self, client: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(client)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiting[client]
