"""Platform: Postgres, the event store, NATS, the relay, projections, leader locks, settings, logging and migrations."""
