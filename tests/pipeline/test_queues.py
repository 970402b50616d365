"""The queue names and their drain order."""

from __future__ import annotations

import pytest

from pipeline.queues import QUEUE_NAMES, Queue, queue_for


def test_members_are_in_drain_order_highest_first() -> None:
    assert [q.value for q in Queue] == ["critical", "high", "normal", "low"]
    assert QUEUE_NAMES == ("critical", "high", "normal", "low")
    assert [q.name for q in Queue] == ["CRITICAL", "HIGH", "NORMAL", "LOW"]


def test_a_queue_is_its_name_as_a_string() -> None:
    assert Queue.HIGH == "high"
    assert str(Queue.HIGH) == "high"
    assert f"{Queue.LOW}" == "low"


@pytest.mark.parametrize("name", ["critical", "high", "normal", "low"])
def test_queue_for_each_priority(name: str) -> None:
    assert queue_for(name) is Queue(name)
    assert queue_for(Queue(name)) is Queue(name)


@pytest.mark.parametrize("name", ["urgent", "HIGH", " high", "", "celery"])
def test_queue_for_an_unknown_priority_names_it_and_the_choices(name: str) -> None:
    with pytest.raises(ValueError) as e:
        queue_for(name)
    assert str(e.value) == f"unknown priority {name!r}; use one of critical, high, normal, low"


def test_the_database_stores_the_same_priorities_in_the_same_order() -> None:
    from db.enums import Priority

    assert [p.value for p in Priority] == list(QUEUE_NAMES)
