"""Sending: the job contract, batch outcomes, the audience snapshot and the ledger."""
