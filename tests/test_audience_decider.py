"""Given/when/then for a broadcast's audience in the decider: one list (the shorthand) or an
audience of lists, segments, excludes and recipients, never both, carried into each run."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from shared.broadcasts import decider as b
from shared.broadcasts.handlers import DECIDER
from shared.kernel.audience import Audience
from shared.kernel.errors import Invalid
from tests.gwt import given_for

given = given_for(DECIDER)
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
T1 = datetime(2026, 12, 1, 9, 5, tzinfo=timezone.utc)
BID, TENANT, LIST, PROVIDER, SEGMENT, VIPS = (uuid.UUID(int=i) for i in (1, 2, 3, 4, 5, 6))
CONTENT = b.Content(subject="Hello", text="Hi")
AUDIENCE = Audience(segments=(SEGMENT,), exclude_lists=(LIST,), recipients=(7, 9))

CREATED_FOR_LIST = b.BroadcastCreated(
    broadcast_id=BID, tenant_id=TENANT, name="News", channel="email", list_id=LIST, provider_id=PROVIDER,
    content=CONTENT, at=T0,
)
CREATED_FOR_AUDIENCE = b.BroadcastCreated(
    broadcast_id=BID, tenant_id=TENANT, name="News", channel="email", list_id=None, provider_id=PROVIDER,
    content=CONTENT, at=T0, audience=AUDIENCE,
)


def test_create_with_an_audience_records_it_and_no_list():
    create = b.CreateBroadcast(broadcast_id=BID, tenant_id=TENANT, name="News", audience=AUDIENCE,
                               provider_id=PROVIDER, content=CONTENT, at=T0)
    state = given().when(create).then(CREATED_FOR_AUDIENCE)
    assert state.target == AUDIENCE and state.list_id is None


def test_a_list_is_the_audience_of_that_one_list():
    state = given(CREATED_FOR_LIST).when(b.EditBroadcast(at=T1)).then()
    assert state.target == Audience(lists=(LIST,)) and state.target.single_list == LIST


def test_setting_an_audience_clears_the_list_and_the_other_way_round():
    vips = Audience(lists=(LIST, VIPS))
    state = given(CREATED_FOR_LIST).when(b.EditBroadcast(audience=vips, at=T1)).then(
        b.BroadcastEdited(audience=vips, list_id=None, at=T1))
    assert state.target == vips and state.target.single_list is None
    state = given(CREATED_FOR_AUDIENCE).when(b.EditBroadcast(list_id=VIPS, at=T1)).then(
        b.BroadcastEdited(list_id=VIPS, audience=None, at=T1))
    assert state.target == Audience(lists=(VIPS,))


def test_the_same_audience_again_is_no_change():
    given(CREATED_FOR_AUDIENCE).when(b.EditBroadcast(audience=AUDIENCE, at=T1)).then()


def test_a_run_carries_the_audience_it_goes_to():
    started = b.BroadcastStarted(run=1, tenant_id=TENANT, channel="email", list_id=None, audience=AUDIENCE,
                                 provider_id=PROVIDER, audience_size=40, at=T1)
    given(CREATED_FOR_AUDIENCE).when(b.SendBroadcast(audience_size=40, at=T1)).then(started)
    assert started.target == AUDIENCE


def test_a_run_of_a_list_carries_the_list():
    started = b.BroadcastStarted(run=1, tenant_id=TENANT, channel="email", list_id=LIST, provider_id=PROVIDER,
                                 audience_size=3, at=T1)
    given(CREATED_FOR_LIST).when(b.SendBroadcast(audience_size=3, at=T1)).then(started)
    assert started.target == Audience(lists=(LIST,))


def test_excludes_alone_are_nobody_to_send_to():
    only_excludes = b.BroadcastEdited(audience=Audience(exclude_lists=(LIST,)), list_id=None, at=T1)
    given(CREATED_FOR_LIST, only_excludes).when(b.SendBroadcast(audience_size=0, at=T1)).then_raises(
        Invalid, field="audience")


def test_without_list_or_audience_there_is_nobody_to_send_to():
    given(CREATED_FOR_LIST, b.BroadcastEdited(list_id=None, at=T1)).when(
        b.SendBroadcast(audience_size=0, at=T1)).then_raises(Invalid, field="list_id")
