"""Audience: contacts and lists."""
