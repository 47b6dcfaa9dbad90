"""Who is calling and what they may do: keys (``server.keys``) checked against the scope a
route needs, with the abuse controls (``server.abuse``) in front.

Order per request: a client locked out for failed authentications gets 429; each key it
presents (``X-API-Key``, and ``X-Admin-Key`` as before) must be known (else 403, counted
towards the lockout); the keys' scopes together must include the route's (else 403
``insufficient_scope``, or 401 when the admin key that would grant it is missing); a key
with a request rate over it gets 429. The caller's key name is left in
``request.state.caller`` for the audit trail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from facegate.server.abuse import AuthFailures, RateLimiter
from facegate.server.errors import InsufficientScope, MissingAPIKey, TooManyRequests, WrongAPIKey
from facegate.server.keys import KeyRecord, KeyRing, check_scopes
from facegate.server.metrics import ServerMetrics
from facegate.server.settings import Settings

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    name: str  # the key's name ("anonymous" on an open route), never its secret
    scopes: tuple[str, ...]
    client: str


class Auth:
    """The server's keys and abuse state; one per app."""

    def __init__(self, settings: Settings, metrics: ServerMetrics) -> None:
        self.keys = KeyRing(
            settings.keys_file, settings.api_key, settings.admin_key,
            check_scopes(settings.api_key_scopes),
        )
        self.failures = AuthFailures(
            settings.auth_failure_limit, settings.auth_failure_window_s, settings.auth_lockout_s
        )
        self.rates = RateLimiter()
        self.metrics = metrics

    def identify(self, client: str, api_key: str | None, admin_key: str | None) -> Caller:
        """The caller behind the presented keys (429 when locked out, 403 for a wrong key)."""
        now = time.monotonic()
        wait = self.failures.retry_after(client, now)
        if wait is not None:
            self.metrics.auth_refused.labels("locked_out").inc()
            raise TooManyRequests(
                "auth_locked_out",
                f"too many failed authentications from this client; retry in {wait} s", wait,
            )
        records: list[KeyRecord] = []
        ring = self.keys
        for header, secret, checked in (
            ("X-API-Key", api_key, ring.api_key_set or ring.has_file),
            ("X-Admin-Key", admin_key, ring.admin_key_set),
        ):
            if not secret or not checked:  # a header the server has no key for is ignored, as before
                continue
            record = self.keys.lookup(secret)
            if record is None:
                self.metrics.auth_refused.labels("wrong_key").inc()
                if self.failures.fail(client, now):
                    self.metrics.auth_lockouts.inc()
                raise WrongAPIKey(f"wrong {header}")
            records.append(record)
        if not records:
            return Caller(ANONYMOUS, self.keys.open_scopes, client)
        for record in records:
            if record.rate_per_s:
                wait = self.rates.take(record.name, record.rate_per_s, now)
                if wait is not None:
                    self.metrics.auth_refused.labels("rate_limited").inc()
                    raise TooManyRequests(
                        "rate_limited",
                        f"key {record.name!r} is over its {record.rate_per_s:g} requests/s",
                        wait,
                    )
        scopes = {s for r in records for s in r.scopes}
        return Caller("+".join(r.name for r in records), tuple(sorted(scopes)), client)

    def require(self, caller: Caller, scope: str) -> None:
        """403 (or 401 for a missing key) unless ``caller`` holds ``scope``."""
        if "admin" in caller.scopes or scope in caller.scopes:
            return
        self.metrics.auth_refused.labels("insufficient_scope").inc()
        if caller.name == ANONYMOUS:
            header = "X-Admin-Key" if scope != "verify" and self.keys.admin_key_set else "X-API-Key"
            raise MissingAPIKey(f"missing {header} header")
        if caller.name == "api-key" and self.keys.admin_key_set:  # the pair, as before keys
            raise MissingAPIKey(f"missing X-Admin-Key header (the API key has no {scope!r} scope)")
        raise InsufficientScope(f"key {caller.name!r} has no {scope!r} scope")
