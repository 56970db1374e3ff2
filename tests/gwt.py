"""given/when/then for deciders: given(*events).when(command).then(*events) / .then_raises(E)."""
from __future__ import annotations

from typing import Any

import pytest


class Scenario:
    def __init__(self, decider: Any, events: tuple[Any, ...]) -> None:
        self._decider, self._given = decider, events
        self._command: Any = None

    def when(self, command: Any) -> "Scenario":
        self._command = command
        return self

    def _state(self) -> Any:
        state = self._decider.initial
        for event in self._given:
            state = self._decider.evolve(state, event)
        return state

    def then(self, *expected: Any) -> Any:
        state = self._state()
        produced = self._decider.decide(self._command, state)
        assert produced == list(expected)
        for event in produced:  # evolve must accept whatever decide produced
            state = self._decider.evolve(state, event)
        return state

    def then_raises(self, error: type[Exception], **attrs: Any) -> Exception:
        with pytest.raises(error) as info:
            self._decider.decide(self._command, self._state())
        for name, value in attrs.items():
            assert getattr(info.value, name) == value
        return info.value


def given_for(decider: Any):  # type: ignore[no-untyped-def]
    def given(*events: Any) -> Scenario:
        return Scenario(decider, events)

    return given
