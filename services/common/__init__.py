"""Adapters shared by the services: settings, Kafka and PostgreSQL clients, logs, HTTP probes."""
