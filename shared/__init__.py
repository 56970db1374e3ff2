"""Crier's shared core: domain, event store, bus, settings and logging used by both services."""
