"""Prometheus metrics shared by the services (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Event time to processing time, per stage: 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

PINGS_IN = Counter("dosewatch_pings_in_total", "Pings received", ["service", "source"])
PINGS_REJECTED = Counter(
    "dosewatch_pings_rejected_total", "Pings refused, by first failing field", ["service", "reason"]
)
EVENTS_OUT = Counter("dosewatch_events_out_total", "Records produced", ["service", "topic"])
LATENCY = Histogram(
    "dosewatch_event_latency_seconds",
    "Ping event time to the moment this stage produced its output",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "dosewatch_consumer_lag", "Records behind the log end", ["service", "topic", "partition"]
)
OPEN_VISITS = Gauge("dosewatch_open_visits", "Visits open now", ["service"])
SAVE_SECONDS = Histogram(
    "dosewatch_state_save_seconds",
    "A save's database transaction (state, outputs and offsets), retries included",
    ["service"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SAVE_WAIT = Counter(
    "dosewatch_state_save_wait_seconds_total",
    "Time the stream stood still for the save before a due one (one save is in flight at most)",
    ["service"],
)
DB_RETRIES = Counter("dosewatch_db_retries_total", "Database operations retried", ["service"])
BROKER_ROLLOVERS = Counter(
    "dosewatch_embedded_broker_rollovers_total",
    "`dosewatch up` moving to a fresh embedded broker (done, or abandoned before anything moved)",
    ["outcome"],
)
