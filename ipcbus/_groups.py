"""Request groups: which member of a group gets the next message of a channel (pure).

A group is a name listeners share on one channel (``client.on(channel, listener,
group="pool")``): each message on the channel goes to one member of each group, while every
listener without a group gets everything (SPEC, "Requests: failures, groups, gathering,
cancelling"). The member chosen is the one with the fewest requests in progress; among those
tied, the next one in turn after the member chosen last, so that equal members share the work
evenly and no member is starved by the order of subscription.

:class:`GroupTurns` keeps only the last choice per (channel, group); the members, their order
(the order they joined) and their loads are the router's, passed in at each choice.
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["GroupTurns"]


class GroupTurns:
    """Chooses the member of a group that gets the next message of a channel."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], str] = {}  # (channel, group) -> member chosen last

    def choose(self, channel: str, group: str, members: Sequence[str],
               load: Callable[[str], int]) -> str:
        """The member of ``group`` on ``channel`` to deliver to: fewest ``load`` (requests in
        progress), ties in turn after the last one chosen. ``members`` is never empty, in a
        stable order (the order they joined)."""
        if not members:
            raise ValueError(f"group {group!r} of {channel!r} has no members")
        loads = [load(m) for m in members]
        least = min(loads)
        last = self._last.get((channel, group))
        start = members.index(last) + 1 if last in members else 0
        n = len(members)
        for step in range(n):
            i = (start + step) % n
            if loads[i] == least:
                chosen = members[i]
                self._last[(channel, group)] = chosen
                return chosen
        raise AssertionError("unreachable: the least load is some member's")

    def forget(self, channel: str, group: str) -> None:
        """The group has no member left on ``channel``."""
        self._last.pop((channel, group), None)
