"""Prometheus metrics, in a registry per app so tests and several apps never collide.

Label sets are bounded on purpose: routes are templates (``/v1/identities/{identity_id}``,
never the id), and per-identity gauges exist only for the worst N identities of the
last consistency report, by rank, cleared and re-set on each computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from facegate.server.thresholds import REPORTED_TEMPLATE_COUNTS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIMILARITY_BUCKETS = tuple(round(-0.2 + 0.05 * i, 2) for i in range(25))  # -0.2 .. 1.0
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """All the server's instruments, registered in ``self.registry``.

    ``identity_ids``: label the worst identities' gauges with their ids as well as their
    rank. Off by default: /metrics is usually unauthenticated, and an id names a person."""

    def __init__(self, identity_ids: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.identity_ids = identity_ids
        r = self.registry
        worst_labels = ["rank", "identity_id"] if identity_ids else ["rank"]
        self.requests = Counter(
            "facegate_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "facegate_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "facegate_stage_seconds",
            "time per pipeline stage (decode, detect, align, embed, search)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "facegate_decisions", "accept/reject decisions", ["route", "outcome"], registry=r
        )
        self.similarity = Histogram(
            "facegate_similarity",
            "cosine similarity of decided comparisons",
            ["route"],
            buckets=SIMILARITY_BUCKETS,
            registry=r,
        )
        self.gallery_identities = Gauge(
            "facegate_gallery_identities", "identities in the gallery", registry=r
        )
        self.gallery_templates = Gauge(
            "facegate_gallery_templates", "templates in the gallery", registry=r
        )
        self.gallery_quarantined = Gauge(
            "facegate_gallery_quarantined_templates", "stored templates whose vector failed the "
            "checks (never matched; listed in /v1/consistency)", registry=r,
        )
        self.threshold = Gauge(
            "facegate_threshold", "similarity threshold in force per decision (search: for the "
            "gallery's current size; identity: per template count)", ["decision", "templates"],
            registry=r,
        )
        self.batch_size = Histogram(
            "facegate_embed_batch_size", "crops per embedder call", buckets=BATCH_BUCKETS, registry=r
        )
        self.opis = Gauge(
            "facegate_consistency_opis", "OPIS of the gallery at the last report", registry=r
        )
        self.identity_frr = Gauge(
            "facegate_identity_frr",
            "false-reject rate of the worst identities at the threshold (rank 1: worst)",
            worst_labels,
            registry=r,
        )
        self.identity_far = Gauge(
            "facegate_identity_far",
            "false-accept rate of the worst identities at the threshold (rank 1: worst)",
            worst_labels,
            registry=r,
        )
        self.auth_refused = Counter(
            "facegate_auth_refused", "requests refused by authentication, by reason "
            "(wrong_key, locked_out, rate_limited, insufficient_scope)", ["reason"], registry=r,
        )
        self.retention_purged = Counter(
            "facegate_retention_purged", "records removed by retention, by kind (decisions, "
            "crops, audit)", ["what"], registry=r,
        )
        self.storage_faults = Counter(
            "facegate_storage_faults", "requests answered 507 storage_full or 503 "
            "resources_exhausted", ["code"], registry=r,
        )
        self.unrecorded_decisions = Gauge(
            "facegate_decision_records_unwritten", "live decision records that could not be "
            "written since start (full disk, database down); the decisions were answered",
            registry=r,
        )
        self.audit_failures = Counter(
            "facegate_audit_write_failures", "audit records not written, by reason (write: "
            "the database refused, e.g. disk full; dropped: too many waiting)", ["reason"],
            registry=r,
        )
        self.auth_lockouts = Counter(
            "facegate_auth_lockouts", "clients locked out for repeated wrong keys", registry=r
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_stages(self, timings_s: Mapping[str, float]) -> None:
        for stage, seconds in timings_s.items():
            self.stage.labels(stage).observe(seconds)

    def observe_decision(self, route: str, similarity: float, accepted: bool) -> None:
        self.decisions.labels(route, "match" if accepted else "no_match").inc()
        self.similarity.labels(route).observe(similarity)

    def watch_thresholds(self, *, pair: Callable[[], float], search: Callable[[], float],
                         identity: Callable[[int], float]) -> None:
        """Thresholds in force, computed at scrape time: 1:1 pairs, search of the gallery as
        it is now, and verify-against-identity at 1..5 templates."""
        self.threshold.labels("pair", "").set_function(pair)
        self.threshold.labels("search", "").set_function(search)
        for n in REPORTED_TEMPLATE_COUNTS:
            self.threshold.labels("identity", str(n)).set_function(partial(identity, n))

    def set_gallery_size(self, identities: int, templates: int, quarantined: int = 0) -> None:
        self.gallery_identities.set(identities)
        self.gallery_templates.set(templates)
        self.gallery_quarantined.set(quarantined)

    def set_consistency(self, opis: float | None, worst: Sequence[Mapping[str, Any]]) -> None:
        """Replace the per-identity gauges with the worst identities of a new report."""
        self.identity_frr.clear()
        self.identity_far.clear()
        if opis is not None:
            self.opis.set(opis)
        for rank, row in enumerate(worst, start=1):
            labels = [str(rank), str(row["identity_id"])] if self.identity_ids else [str(rank)]
            if row.get("frr") is not None:
                self.identity_frr.labels(*labels).set(row["frr"])
            if row.get("far") is not None:
                self.identity_far.labels(*labels).set(row["far"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
