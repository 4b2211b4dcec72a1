"""The shard geometry of a ZeroRedundancyOptimizer: how its flat buffers are
cut among the ranks (each rank's bounds, the counts and displacements of the
collectives, whether a buffer takes the equal-shard block collectives), each
parameter's part in a rank's shard, the runs those parts join into, and what
the local step and the norm read from them (the shard's slices, the copy-in
slices, the rounding pieces, the per-chunk norm counts).

Arithmetic over the flat layout only: no MPI and no arrays, so that
tests/test_zero_geometry.py checks it for any number of ranks in one process.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._ranges import Range, rounding_pieces
from .flat import FlatParams

# Shards start on multiples of this many elements: the chunk of the native
# step, so a rank's part of a gradient norm has the single-process bits.
ALIGNMENT_ELEMENTS = int(_core.chunk_elements)


def padding(world_size: int) -> int:
    """The `pad_to` of a FlatParams that a ZeroRedundancyOptimizer over
    `world_size` ranks cuts into equal shards (ALIGNMENT_ELEMENTS x N), so
    that its reduce-scatter and all-gather are the block collectives."""
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    return ALIGNMENT_ELEMENTS * int(world_size)


class Part(NamedTuple):
    """Elements [start, stop) of flat buffer `buffer`: the part of parameter
    `param` (its index in the optimizer's order) in one rank's shard."""

    buffer: int
    start: int
    stop: int
    param: int


class ShardGeometry:
    """Rank `rank`'s view of flat buffers of `sizes` elements (`padded`: the
    elements of their memory, padding included) cut among `world_size`
    ranks, which hold parameters at `slots` ((buffer, first element, element
    count) in the optimizer's order) of the groups `group_of`.

    Each buffer is cut as if padded to a multiple of ALIGNMENT_ELEMENTS x N:
    rank r owns elements [r*S, (r+1)*S) of it, clipped to its size, with S
    (`per_rank`) the padded size / N (the padding is never allocated).
    `counts` and `displs` give every rank's shard of each buffer, `shard`
    this rank's (first, end) per buffer, `parts` this rank's parameter parts
    in buffer order (`parts_by_param`: in the optimizer's order)."""

    def __init__(
        self,
        sizes: Sequence[int],
        padded: Sequence[int],
        slots: Sequence[Tuple[int, int, int]],
        group_of: Sequence[int],
        world_size: int,
        rank: int,
    ):
        n = world_size
        self.world_size = world_size
        self.rank = rank
        self.slots: List[Tuple[int, int, int]] = [(int(b), int(o), int(c)) for b, o, c in slots]
        self.group_of: List[int] = list(group_of)
        self.counts: List[List[int]] = []
        self.displs: List[List[int]] = []
        self.per_rank: List[int] = []
        # Equal shards when the buffer's memory reaches N x S (a FlatParams padded to padding(N)): then the
        # block collectives, which MPICH runs markedly faster than their v-forms with unequal counts.
        self.equal: List[bool] = []
        for used, memory in zip(sizes, padded):
            used = int(used)
            per_rank = -(-used // (ALIGNMENT_ELEMENTS * n)) * ALIGNMENT_ELEMENTS
            bounds = [(min(k * per_rank, used), min((k + 1) * per_rank, used)) for k in range(n)]
            self.counts.append([hi - lo for lo, hi in bounds])
            self.displs.append([lo for lo, _ in bounds])
            self.per_rank.append(per_rank)
            self.equal.append(n == 1 or int(memory) >= n * per_rank)  # one rank: no collective at all
        self.equal_shards = all(self.equal)
        self.shard: List[Tuple[int, int]] = self.bounds(rank)
        self.parts: List[Part] = self.parts_on(rank)
        self.parts_by_param: List[Part] = sorted(self.parts, key=lambda p: p.param)
        self._part_of = {p.param: p for p in self.parts}  # a parameter has at most one part in a shard
        # How many per-chunk sums each rank contributes to a norm, per buffer (and where they go in the gathered
        # whole): every rank knows every rank's parts, so the gathers need no exchange of counts.
        self.norm_counts: List[List[int]] = [
            [-(-self._covered(b, k) // ALIGNMENT_ELEMENTS) for k in range(n)] for b in range(len(self.counts))
        ]
        self.norm_displs: List[List[int]] = [[sum(c[:k]) for k in range(n)] for c in self.norm_counts]

    @classmethod
    def of_flat(
        cls,
        flat: FlatParams,
        slots: Sequence[Tuple[int, int, int]],
        group_of: Sequence[int],
        world_size: int,
        rank: int,
    ) -> ShardGeometry:
        """The geometry of the buffers of FlatParams `flat` (its parameters at `slots`, in the optimizer's order)."""
        return cls(
            [int(b.size) for b in flat.buffers], [int(p.size) for p in flat.padded], slots, group_of, world_size, rank
        )

    def bounds(self, rank: int) -> List[Tuple[int, int]]:
        """Rank `rank`'s shard: (first, end) of each buffer."""
        return [(d[rank], d[rank] + c[rank]) for d, c in zip(self.displs, self.counts)]

    def parts_on(self, rank: int) -> List[Part]:
        """Every parameter's part in rank `rank`'s shard (the parameters with elements there), in buffer order."""
        shard = self.bounds(rank)
        parts = []
        for i, (b, off, size) in enumerate(self.slots):
            lo, hi = shard[b]
            a, z = max(off, lo), min(off + size, hi)
            if a < z:
                parts.append(Part(b, a, z, i))
        parts.sort()
        return parts

    def _covered(self, b: int, rank: int) -> int:
        """The elements of buffer b's parameters in rank `rank`'s shard."""
        lo, hi = self.displs[b][rank], self.displs[b][rank] + self.counts[b][rank]
        return sum(max(0, min(o + n, hi) - max(o, lo)) for bb, o, n in self.slots if bb == b)

    def runs(self, keys: Optional[Sequence[Any]] = None) -> List[Range]:
        """This rank's parts joined into runs: back-to-back parts of one group
        (and of one key, when `keys` gives one per part) make one Range, whose
        members are their parameters. New objects at every call."""
        runs: List[Range] = []
        last_key = None
        for n, (b, a, z, i) in enumerate(self.parts):
            gi = self.group_of[i]
            key = keys[n] if keys is not None else None
            prev = runs[-1] if runs else None
            if prev is not None and prev.buffer == b and prev.stop == a and prev.group == gi and key == last_key:
                prev.stop = z
                prev.members = (*prev.members, i)
            else:
                runs.append(Range(b, a, z, gi, (i,)))
            last_key = key
        return runs

    def parts_in(self, run: Range) -> List[Part]:
        """The parts that make up a run of runs() (none for a stand-in without members), in buffer order."""
        return [self._part_of[i] for i in run.members]

    def shard_slice(self, buffer: int, start: int, stop: int) -> slice:
        """Elements [start, stop) of a buffer within this rank's shard of it (a shard-sized array's slice)."""
        lo = self.shard[buffer][0]
        return slice(start - lo, stop - lo)

    def copy_in(self) -> List[Tuple[int, slice, int, slice]]:
        """(parameter, its elements, buffer, the buffer's elements) of every
        part in this rank's shard, in the optimizer's order: what a step
        copies from the caller's arrays into the flat buffers."""
        out = []
        for b, a, z, i in self.parts_by_param:
            off = self.slots[i][1]
            out.append((i, slice(a - off, z - off), b, slice(a, z)))
        return out

    def local_rounding_pieces(self, tensors: Sequence[Range]) -> List[Optional[np.ndarray]]:
        """The native step's rounding pieces of each local tensor: stochastic
        rounding keys every element by its parameter and its index there, as
        the single-process optimizer does, whichever rank's shard and run it
        falls in."""
        return [
            rounding_pieces([(a - r.start, i, a - self.slots[i][1], z - a) for _, a, z, i in self.parts_in(r)])
            for r in tensors
        ]
