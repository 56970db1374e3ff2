"""Turns domain events into stored events and back; the struct's tag (class name) is the type."""
from __future__ import annotations

from typing import Any

import msgspec

from shared.platform.eventstore import NewEvent, RecordedEvent


def to_new_event(event: msgspec.Struct, metadata: dict[str, Any]) -> NewEvent:
    data = msgspec.to_builtins(event)
    event_type = data.pop("type")
    return NewEvent(type=event_type, data=data, metadata=metadata)


def from_recorded(recorded: RecordedEvent, union: Any) -> Any:
    return msgspec.convert({**recorded.data, "type": recorded.type}, union, strict=False)
