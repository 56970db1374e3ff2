"""Random sequences of lifecycle commands through the API against the real stack (Postgres,
JetStream, an in-process sender, an SMTP peer that records every message).

A hypothesis state machine plays a user who sends, pauses, resumes, cancels, stops, resets,
schedules and edits one broadcast while its audience changes under it. After every step the
status must be one the transition table (tests/test_broadcast_lifecycle.py) allows; at the end of each sequence
a final top-up send must leave nobody in the final audience unreached, and nobody may have
received the same run twice, nor the broadcast twice between two resets.

The runs are paced (batches of 3, 150 ms apart) so that commands land while batches are in flight.
Between a read and the next command the sender may move a run on (queued → sending → finished),
so each step accepts any outcome that fits a status the broadcast could have had meanwhile.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from datetime import datetime, timezone
from typing import Any, TypeVar

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process

T = TypeVar("T")
PEOPLE = 30
# A one-off schedule far enough ahead never to fire during the test, within the 10 years allowed.
SOMEDAY = f"{datetime.now(timezone.utc).year + 2}-01-01T00:00:00Z"
RUNNING = {"queued", "sending"}
FINISHED = {"completed", "partially_failed", "failed"}
SENDABLE = {"draft", "scheduled", "cancelled"} | FINISHED
CANCELLABLE = {"scheduled", "paused"} | RUNNING
# The transition table: for a command and the status it met, the statuses it may leave behind
# (a missing entry is a 409). "~" stands for "unchanged".
ALLOWED: dict[str, dict[str, set[str]]] = {
    "pause": {"sending": {"paused"}, "paused": {"paused"}},
    "resume": {"paused": RUNNING, **{s: {"~"} for s in RUNNING}},
    "cancel": {**{s: {"cancelled"} for s in CANCELLABLE}, "cancelled": {"cancelled"}},
    "stop": {**{s: {"draft"} for s in CANCELLABLE}, "draft": {"draft"}},
    "reset": {s: {"draft"} for s in FINISHED | {"cancelled", "draft"}},
    "schedule": {s: {"scheduled"} for s in ("draft", "scheduled")},
    "edit": {s: {"~"} for s in ("draft", "scheduled", "paused")},
    "send": {**{s: RUNNING | {"~"} for s in SENDABLE}, **{s: {"~"} for s in RUNNING}},
}
MESSAGE_ID = re.compile(r"<([0-9a-f-]{36})\.(\d+)\.(\d+)\.email@crier>")


def meanwhile(status: str) -> set[str]:
    """The statuses a broadcast seen in `status` may have a moment later without any command."""
    if status in RUNNING:
        return {status, "sending"} | FINISHED
    if status == "paused":  # the batches in flight at the pause were the run's last ones
        return {status} | FINISHED
    return {status}


class Stack:
    """The API and a sender serving from an event loop in a thread of their own, so the (sync)
    state machine can drive them step by step."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.exit = AsyncExitStack()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> Api:
        api = await self.exit.enter_async_context(api_for(self.settings))
        await self.exit.enter_async_context(sender_in_process(self.settings))
        return api

    def __enter__(self) -> Stack:
        self.thread.start()
        self.api = self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.exit.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def test_random_command_sequences_keep_status_and_recipients_right(settings):
    with SmtpPeer(delay=0.04) as peer, Stack(settings) as stack:
        api = stack.api
        people = stack.call(api.post("/v1/contacts", [
            {"external_id": f"p{i}", "email": f"p{i}@example.com", "attributes": {"first_name": f"P{i}"}}
            for i in range(PEOPLE)]))["ids"]
        provider = stack.call(api.post("/v1/providers", {
            "name": "peer", "channel": "email", "kind": "smtp", **peer.provider_config(),
            "batch_size": 3, "batch_delay_ms": 0, "max_retries": 2}))

        class Lifecycle(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                self.status = "draft"
                self.audience: set[int] = set()
                self.resets: list[int] = []  # each reset cleared the runs up to this one
                # A run was called off (cancel, stop): its unsent messages stay counted as dropped,
                # in `total`, even once a later run reached those recipients.
                self.called_off = False

            def do(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
                async def request() -> tuple[int, Any]:
                    r = await api.client.request(method, path, json=body, headers=api.headers)
                    return r.status_code, r.json() if r.content else None
                return stack.call(request())

            def get(self) -> dict:
                return stack.call(api.get(f"/v1/broadcasts/{self.id}"))

            def members(self, method: str, ids: set[int]) -> None:
                code, body = self.do(method, f"/v1/lists/{self.list_id}/members", {"contact_ids": sorted(ids)})
                assert code == 200, body

            @initialize(members=st.sets(st.sampled_from(people), min_size=1))
            def create(self, members: set[int]) -> None:
                self.list_id = stack.call(api.post("/v1/lists", {"name": "random"}))["id"]
                self.members("POST", members)
                self.audience = set(members)
                self.id = stack.call(api.post("/v1/broadcasts", {
                    "name": "random", "list_id": self.list_id, "provider_id": provider["id"],
                    "content": {"subject": "Hi {{ first_name }}", "text": "Hello {{ first_name }}"}}))["id"]

            def command(self, name: str, method: str, path: str, body: Any = None) -> Any:
                """Run one command and check its answer against the table for every status the
                broadcast could have been in when the command met it."""
                could_be = meanwhile(self.status)
                code, answer = self.do(method, f"/v1/broadcasts/{self.id}{path}", body)
                allowed = {s: ALLOWED[name][s] for s in could_be if s in ALLOWED[name]}
                if code == 409:
                    assert answer["current_status"] in could_be, (name, could_be, answer)
                    assert answer["current_status"] not in ALLOWED[name], (name, answer)
                    self.status = answer["current_status"]
                    return None
                assert code in (200, 202), (name, code, answer)
                assert allowed, f"{name} in {could_be} should have been refused, got {code} {answer}"
                after = answer["status"]
                could_leave = set().union(*(
                    meanwhile(s if result == "~" else result) for s, results in allowed.items() for result in results))
                assert after in could_leave, f"{name} in {could_be} left {after}, expected one of {could_leave}"
                self.status = after
                return answer

            @rule()
            def send(self) -> None:
                before = self.get()
                answer = self.command("send", "POST", "/send")
                if answer is not None and before["status"] in SENDABLE and before["remaining"] is not None:
                    # A top-up queues only those not reached yet (fewer if a batch still in flight
                    # from a cancelled run reached some meanwhile).
                    assert 0 <= answer["queued"] <= before["remaining"], (before, answer)

            @rule()
            def pause(self) -> None:
                if self.status == "queued":  # as a user would: pause once the batches go out
                    self.until(lambda status: status != "queued")
                self.command("pause", "POST", "/pause")

            @rule()
            def resume(self) -> None:
                self.command("resume", "POST", "/resume")

            @rule()
            def cancel(self) -> None:
                self.called_off |= self.command("cancel", "POST", "/cancel") is not None

            @rule()
            def stop(self) -> None:
                self.called_off |= self.command("stop", "POST", "/stop") is not None

            @rule()
            def reset(self) -> None:
                answer = self.command("reset", "POST", "/reset")
                if answer is not None:
                    self.resets.append(answer["run"])

            @rule()
            def schedule(self) -> None:
                self.command("schedule", "POST", "/schedule", {"scheduled_at": SOMEDAY})

            @rule(subject=st.sampled_from(["Hi {{ first_name }}", "Hello again {{ first_name }}"]))
            def edit(self, subject: str) -> None:
                self.command("edit", "PATCH", "", {"content": {"subject": subject}})

            @rule(who=st.sets(st.sampled_from(people), min_size=1, max_size=5))
            def join(self, who: set[int]) -> None:
                self.members("POST", who)
                self.audience |= who

            @rule(who=st.sets(st.sampled_from(people), min_size=1, max_size=5))
            def leave(self, who: set[int]) -> None:
                self.members("DELETE", who)
                self.audience -= who

            @rule(seconds=st.sampled_from([0.2, 0.5, 1.0]))
            def wait(self, seconds: float) -> None:
                time.sleep(seconds)

            @invariant()
            def status_is_one_the_table_allows(self) -> None:
                if not hasattr(self, "id"):
                    return
                got = self.get()
                seen, counters = got["status"], got["counters"]
                assert seen in meanwhile(self.status), f"expected {meanwhile(self.status)}, saw {seen}"
                if seen in FINISHED:  # a finished run attempted every recipient it planned
                    attempted = counters["sent"] + counters["failed"] + counters["unknown"]
                    assert attempted + counters["dropped"] == counters["total"], got
                    # Only a run called off leaves any unsent (dropped); the others attempted everyone.
                    assert counters["dropped"] == 0 or self.called_off, got
                self.status = seen

            def until(self, done: Callable[[str], bool], timeout: float = 60) -> dict:
                deadline = time.monotonic() + timeout
                while not done((got := self.get())["status"]):
                    assert got["status"] in meanwhile(self.status), (self.status, got)
                    assert time.monotonic() < deadline, got
                    time.sleep(0.05)
                self.status = got["status"]
                return got

            def settle(self) -> dict:
                return self.until(lambda status: status not in RUNNING)

            def teardown(self) -> None:
                if not hasattr(self, "id"):
                    return
                # Finish what is under way, then one last top-up.
                if self.settle()["status"] == "paused":
                    self.command("resume", "POST", "/resume")
                    self.settle()
                self.command("send", "POST", "/send")
                final = self.settle()
                assert final["remaining"] == 0, final
                assert final["audience_total"] == len(self.audience), final

                received = Counter()  # (run, contact id) -> messages
                for message in peer.received:
                    match = MESSAGE_ID.fullmatch(message.message_id or "")
                    if match and match[1] == self.id:
                        received[int(match[2]), int(match[3])] += 1
                twice = [key for key, n in received.items() if n > 1]
                assert not twice, f"(run, contact) received twice: {twice}"
                # Top-ups go only to those not reached since the last reset: between two resets,
                # nobody gets the broadcast twice, whatever was cancelled, stopped or paused.
                per_epoch = Counter((sum(run > r for r in self.resets), contact) for run, contact in received)
                assert not [k for k, n in per_epoch.items() if n > 1], f"reached twice between resets: {per_epoch}"
                last_reset = max(self.resets, default=0)
                reached = {contact for run, contact in received if run > last_reset}
                assert self.audience <= reached, f"never reached: {self.audience - reached}"

        run_state_machine_as_test(Lifecycle, settings=hypothesis_settings(
            max_examples=20, stateful_step_count=20, deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck)))
