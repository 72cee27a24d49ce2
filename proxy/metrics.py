"""Prometheus metrics.

With several workers, PROMETHEUS_MULTIPROC_DIR is set by the CLI before this
module is imported, every worker writes its samples to files there, and a
scrape of any worker aggregates all of them, so counts are whole.
"""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ledger.db import statements_sent

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "tollway_requests_total", "Proxied requests by service and outcome", ["service", "outcome"]
)
UPSTREAM_LATENCY = Histogram(
    "tollway_upstream_latency_seconds",
    "Time from forwarding to the upstream's response headers",
    buckets=_LAT,
)
OVERHEAD = Histogram(
    "tollway_proxy_overhead_seconds",
    "Time the proxy itself adds: auth, limits, billing, ledger, before and after the upstream",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
CHARGED = Counter(
    "tollway_charged_units_total", "Amount charged, in the asset's smallest unit", ["asset"]
)
RATE_LIMITED = Counter("tollway_rate_limited_total", "Requests refused with 429", ["limit"])
RATELIMIT_FALLBACK = Counter(
    "tollway_ratelimit_fallback_total", "Rate-limit checks decided without Redis (Redis down)"
)
LEDGER_BATCH = Histogram(
    "tollway_ledger_batch_size",
    "Operations per group-commit transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
LEDGER_COMMIT = Histogram(
    "tollway_ledger_commit_seconds", "Group-commit transaction latency", buckets=_LAT
)
LEDGER_QUEUE = Gauge(
    "tollway_ledger_queue_depth",
    "Operations waiting for the next commit",
    multiprocess_mode="livesum",
)
HOLDS_EXPIRED = Counter(
    "tollway_holds_expired_total", "Holds voided because they passed their expiry"
)
LEASES_EXPIRED = Counter(
    "tollway_leases_expired_total",
    "Balance and free-call leases given back at expiry (their worker stopped renewing them)",
)
PAYMENTS = Counter(
    "tollway_payments_total", "Payments carried on requests, by rail and result", ["rail", "result"]
)
WEBHOOKS = Counter(
    "tollway_webhook_deliveries_total", "Webhook delivery attempts by result", ["result"]
)


LEDGER_STATEMENTS = Counter(
    "tollway_ledger_statements_total",
    "SQL statements sent to the ledger database, BEGIN and COMMIT included",
)
_statements_seen = [0]


def observe_batch(size: int, seconds: float, depth: int) -> None:
    LEDGER_BATCH.observe(size)
    LEDGER_COMMIT.observe(seconds)
    LEDGER_QUEUE.set(depth)
    sent = statements_sent()
    LEDGER_STATEMENTS.inc(sent - _statements_seen[0])
    _statements_seen[0] = sent


class RequestCounters:
    """Label children resolved once per (service, outcome): labels() is not free."""

    def __init__(self) -> None:
        self._c: dict[tuple[str, str], object] = {}

    def inc(self, service: str, outcome: str) -> None:
        c = self._c.get((service, outcome))
        if c is None:
            c = self._c[(service, outcome)] = REQUESTS.labels(service, outcome)
        c.inc()  # type: ignore[attr-defined]


async def metrics_handler(request: web.Request) -> web.Response:
    if MULTIPROC:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp
