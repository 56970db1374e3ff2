"""Tooling: the crier CLI, the dev stack, the embedded servers, the benchmark and projection rebuilds."""
