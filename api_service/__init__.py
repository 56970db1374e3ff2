"""Crier's API service: REST commands in, events out, queries over projections."""
