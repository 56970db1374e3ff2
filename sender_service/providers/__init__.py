"""Providers: one small Protocol (open, send a batch, close) and one module per kind."""
from sender_service.providers.base import OutgoingMessage, Provider, ProviderUnavailable, SendResult
from sender_service.providers.factory import build_provider

__all__ = ["OutgoingMessage", "Provider", "ProviderUnavailable", "SendResult", "build_provider"]
