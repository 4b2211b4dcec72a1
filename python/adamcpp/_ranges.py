"""A range of a flat buffer stepped as one native tensor: the unit of the flat
layout (parameters back to back that share a group, a step count and state) and
of a ZeroRedundancyOptimizer's shard (a rank's part of such parameters)."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np


class Range:
    """Elements [start, stop) of flat buffer `buffer`, of group `group`: the
    parameters `members` (optimizer indices, in buffer order) and the state
    dict `state` they share (its "step" and 1-D arrays over the range; shaped
    arrays when there is one member). start == stop marks a stand-in with no
    elements."""

    __slots__ = ("buffer", "group", "members", "start", "state", "stop")

    def __init__(
        self, buffer: int, start: int, stop: int, group: int, members: Tuple[int, ...] = (), state: Any = None
    ):
        self.buffer = buffer
        self.start = start
        self.stop = stop
        self.group = group
        self.members = members
        self.state = state

    def record(self) -> List[int]:
        """(buffer, start, stop, group): how a checkpoint names the range."""
        return [self.buffer, self.start, self.stop, self.group]

    def __repr__(self) -> str:
        return f"Range(buffer={self.buffer}, [{self.start}, {self.stop}), group={self.group}, members={self.members})"


def rounding_pieces(parts: Sequence[Tuple[int, int, int, int]]) -> Optional[np.ndarray]:
    """The native step's rounding pieces of one tensor from its parameter parts
    (start in the tensor, parameter index, first element of the parameter,
    count), in tensor order: rows (start, parameter, first) of the non-empty
    parts, or None when the tensor has no elements."""
    rows = [(start, i, first) for start, i, first, count in parts if count > 0]
    return np.array(rows, dtype=np.int64).reshape(-1, 3) if rows else None
