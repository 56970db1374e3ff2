"""Crier's sender service: plans broadcasts into batch jobs and delivers them through providers."""
