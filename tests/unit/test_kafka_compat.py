"""Pins the aiokafka and Faust internals this project uses (`captionstream.kafka.compat`,
and the Faust methods the worker's transport overrides): an upgrade that moves them fails
here, with the reason, rather than at run time."""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient

from captionstream.kafka.compat import as_current_event


async def test_a_consumer_keeps_its_client_with_the_methods_compat_calls() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
    try:
        assert isinstance(consumer._client, AIOKafkaClient)
    finally:
        await consumer._client.close()
    assert inspect.iscoroutinefunction(AIOKafkaClient.close)
    # add_topic returns an awaitable that resolves once metadata has been refreshed.
    assert "topic" in inspect.signature(AIOKafkaClient.add_topic).parameters


# --- Faust ----------------------------------------------------------------------------


class Event:
    """Stands in for a Faust event (held by weak reference, as Faust does)."""


def test_as_current_event_is_the_event_faust_tables_read() -> None:
    """`as_current_event` sets `faust.streams._current_event`; Faust's tables pick the
    partition from `current_event()` (faust.tables.base imports it from faust.streams)."""
    import faust.streams
    import faust.tables.base

    assert isinstance(faust.streams._current_event, ContextVar)
    assert faust.tables.base.current_event is faust.streams.current_event
    outer, inner = Event(), Event()
    assert faust.streams.current_event() is None
    with as_current_event(outer):
        assert faust.streams.current_event() is outer
        with as_current_event(inner):
            assert faust.streams.current_event() is inner
        assert faust.streams.current_event() is outer
    assert faust.streams.current_event() is None


def faust_overrides() -> list[tuple[type[Any], str]]:
    """Every (class, method) of ours that replaces a method of Faust's."""
    from captionstream.kafka import KafkaConnection
    from captionstream.kafka.faust_transport import (
        FetchHighwatersConsumerThread,
        IdempotentProducer,
        ListOffsetsConsumerThread,
    )
    from captionstream.processor.transport import (
        CommitGate,
        FlowSafeRecovery,
        FlowSafeTableManager,
        PartitionTransactions,
        RewindingConsumer,
        WriteTrackingTable,
        gated_consumer,
    )
    from captionstream.settings import KafkaProfile

    ours_only = {"changelog_written", "_group_for"}  # new methods, no Faust counterpart
    classes: list[type[Any]] = [
        ListOffsetsConsumerThread,
        FetchHighwatersConsumerThread,
        IdempotentProducer,
        KafkaConnection("127.0.0.1:1", KafkaProfile.EMBEDDED).faust_transport().Consumer,
        RewindingConsumer,
        gated_consumer(RewindingConsumer, CommitGate()),
        PartitionTransactions,
        FlowSafeRecovery,
        FlowSafeTableManager,
        WriteTrackingTable,
    ]
    return [
        (cls, name)
        for cls in classes
        for name, attr in vars(cls).items()
        if (inspect.isfunction(attr) or isinstance(attr, property))
        and not name.startswith("__")
        and name not in ours_only
    ]


@pytest.mark.parametrize(
    ("cls", "name"), faust_overrides(), ids=lambda v: getattr(v, "__name__", str(v))
)
def test_each_faust_method_we_override_still_exists_with_its_parameters(
    cls: type[Any], name: str
) -> None:
    """A renamed or re-signed Faust method would leave our override silently unused
    (the workaround gone) or called wrongly."""
    faust_base = next(
        (base for base in cls.__mro__[1:] if base.__module__.startswith("faust.")), None
    )
    assert faust_base is not None, f"{cls.__name__} extends no Faust class"
    assert hasattr(faust_base, name), f"Faust's {faust_base.__name__} has no {name}"
    ours, theirs = inspect.getattr_static(cls, name), inspect.getattr_static(faust_base, name)
    assert isinstance(ours, property) == isinstance(theirs, property)
    if inspect.isfunction(ours):
        params = list(inspect.signature(ours).parameters)
        if not any(p in params for p in ("args", "kwargs")):
            assert params == list(inspect.signature(theirs).parameters)
