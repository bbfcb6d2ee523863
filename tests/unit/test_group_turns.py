"""Group member choice (``ipcbus._groups``): fewest in progress, ties in turn."""
from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcbus._groups import GroupTurns


def test_equal_members_take_turns() -> None:
    turns = GroupTurns()
    members = ["a", "b", "c"]
    picks = [turns.choose("jobs", "pool", members, lambda m: 0) for _ in range(7)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]


def test_the_least_loaded_member_is_chosen() -> None:
    turns = GroupTurns()
    load = {"a": 3, "b": 1, "c": 2}
    assert turns.choose("jobs", "pool", ["a", "b", "c"], load.__getitem__) == "b"


def test_a_member_that_left_does_not_break_the_turn() -> None:
    turns = GroupTurns()
    assert turns.choose("jobs", "pool", ["a", "b"], lambda m: 0) == "a"
    assert turns.choose("jobs", "pool", ["b", "c"], lambda m: 0) == "b"  # "a" left
    assert turns.choose("jobs", "pool", ["b", "c"], lambda m: 0) == "c"


def test_groups_and_channels_keep_separate_turns() -> None:
    turns = GroupTurns()
    assert turns.choose("jobs", "pool", ["a", "b"], lambda m: 0) == "a"
    assert turns.choose("jobs", "other", ["a", "b"], lambda m: 0) == "a"
    assert turns.choose("work", "pool", ["a", "b"], lambda m: 0) == "a"
    turns.forget("jobs", "pool")
    assert turns.choose("jobs", "pool", ["a", "b"], lambda m: 0) == "a"


def test_no_member_is_an_error() -> None:
    with pytest.raises(ValueError):
        GroupTurns().choose("jobs", "pool", [], lambda m: 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(0, 5), min_size=1, max_size=80))
def test_choices_have_the_least_load_and_ties_are_shared_evenly(
        n: int, finishes: list[int]) -> None:
    """Simulate requests: each choice adds one in progress to the chosen member; the generated
    numbers finish some of a member's requests. The chosen member always has the least load, and
    while loads stay equal no member gets two more than another."""
    turns = GroupTurns()
    members = [f"m{i}" for i in range(n)]
    load = collections.Counter({m: 0 for m in members})
    for finish in finishes:
        chosen = turns.choose("c", "g", members, load.__getitem__)
        assert load[chosen] == min(load[m] for m in members)
        load[chosen] += 1
        done = members[finish % n]
        if load[done]:
            load[done] -= 1
    even = GroupTurns()
    counts = collections.Counter(even.choose("c", "g", members, lambda m: 0)
                                 for _ in range(len(finishes)))
    assert max(counts.values()) - min(counts.get(m, 0) for m in members) <= 1
