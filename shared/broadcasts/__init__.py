"""Broadcasts: the decider, schedules, command handlers, views, run completion, previews, progress and the scheduler."""
