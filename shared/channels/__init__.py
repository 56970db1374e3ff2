"""Channels: the provider Protocol, the registry of provider kinds, one module per provider, and provider accounts."""
