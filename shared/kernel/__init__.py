"""The pure vocabulary every feature shares: domain errors and stream names."""
