"""Deadlines on the PostgreSQL gallery's database calls, so that a database which stops
answering costs a request seconds, never for ever.

PostgreSQL's own ``statement_timeout`` ends a slow statement on a live server, and
libpq's ``connect_timeout`` a connection attempt; neither helps when the server does
not run at all but its host does (processes paused or swapped out, a VM frozen, a
network path that drops nothing): the kernel still accepts connections and acknowledges
every byte, so no TCP timeout fires and the query waits for an answer that never comes.
:class:`Watchdog` bounds that case from the client: a connection still busy past its
deadline has its socket shut down (``shutdown(2)``), the blocked psycopg call returns at
once with an error, and the pool replaces the connection. PostgreSQL rolls back the
transaction of a connection it finds gone.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool

CUT_GRACE_S = 0.25  # the server's statement_timeout answers first when the server runs
# A lost connection is re-made in the background for this long (psycopg_pool retries at
# 1 s, 2 s, 4 s... for 5 minutes by default, so after an outage requests waited seconds
# for the next scheduled try); after it the pool makes one on demand, at once.
RECONNECT_GIVE_UP_S = 2.0
LONG_READ_TIMEOUT_S = 600.0  # an index build or a re-embed scan of a large gallery


def connect_timeout(timeout_s: float) -> int:
    """libpq's connect_timeout for a budget (whole seconds; psycopg enforces at least 2)."""
    return max(2, math.ceil(timeout_s))


class DeadlinePool:
    """A psycopg_pool ``ConnectionPool`` in which each use, from asking for a connection
    (the pool's liveness check included) to giving it back, ends within a budget:
    ``timeout_s`` by default, PostgreSQL's ``statement_timeout`` too; a longer one for
    the few long reads (an index build), for which the statement limit is lifted."""

    def __init__(self, url: str, *, size: int, timeout_s: float, name: str) -> None:
        self.timeout_s = timeout_s
        self.watchdog = Watchdog()
        self._local = threading.local()  # the current use's (deadline, budget), for _check
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=size,
            timeout=timeout_s,
            kwargs={
                "autocommit": True,
                "connect_timeout": connect_timeout(timeout_s),
                "options": f"-c statement_timeout={round(timeout_s * 1000)}",
            },
            check=self._check,
            reconnect_timeout=RECONNECT_GIVE_UP_S,
            open=False,
            name=name,
        )

    def open(self, timeout_s: float) -> None:
        self._pool.open(wait=True, timeout=timeout_s)

    @contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection for one use of at most ``timeout_s`` (default the pool's)."""
        budget = timeout_s or self.timeout_s
        deadline = time.monotonic() + budget
        self._local.use = (deadline, budget)
        with self._pool.connection(timeout=budget) as conn, \
                self.watchdog.guard(conn, deadline + CUT_GRACE_S, budget):
            if budget <= self.timeout_s:
                yield conn
                return
            conn.execute("SET statement_timeout = 0")  # the watchdog still bounds it
            try:
                yield conn
            finally:
                if not conn.broken:
                    conn.execute("RESET statement_timeout")

    def drain(self) -> None:
        """Replace every idle connection (after an outage they are all dead)."""
        self._pool.drain()

    def close(self) -> None:
        self._pool.close()
        self.watchdog.close()

    def _check(self, conn: psycopg.Connection) -> None:
        """The pool's liveness check of a connection it hands out, within the use's budget."""
        deadline, budget = getattr(self._local, "use", (time.monotonic() + self.timeout_s,
                                                         self.timeout_s))
        with self.watchdog.guard(conn, deadline, budget):
            conn.execute("")


class Watchdog:
    """One thread that cuts the connections of calls past their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy: dict[object, tuple[float, psycopg.Connection]] = {}
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, conn: psycopg.Connection, deadline: float, budget_s: float) -> Iterator[None]:
        """Run the block on ``conn``; past ``deadline`` (time.monotonic) its socket is cut
        and the block's database error becomes ``TimeoutError`` (naming ``budget_s``)."""
        key = object()
        with self._cond:
            self._busy[key] = (deadline, conn)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="gallery-deadline",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        except psycopg.Error as e:
            if self._release(key):
                raise
            raise TimeoutError(f"no answer within {budget_s:g} s") from e
        finally:
            self._release(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _release(self, key: object) -> bool:
        """Forget ``key``; False when the watchdog had already cut its connection."""
        with self._cond:
            return self._busy.pop(key, None) is not None

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for key, (deadline, conn) in list(self._busy.items()):
                    if deadline <= now:
                        del self._busy[key]
                        cut(conn)
                due = min((d for d, _ in self._busy.values()), default=None)
                self._cond.wait(None if due is None else max(due - now, 0.01))


def cut(conn: psycopg.Connection) -> None:
    """Shut down ``conn``'s socket: both directions, so a blocked read or write returns."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:  # already closed
        return
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
