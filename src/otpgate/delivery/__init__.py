"""Delivery: the outbox worker and the providers (local inbox, SMTP, HTTP SMS)."""
