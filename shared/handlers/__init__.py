"""The service layer: command handlers that load, fold, decide and append."""
