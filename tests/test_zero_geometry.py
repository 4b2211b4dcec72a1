"""The shard geometry of ZeroRedundancyOptimizer (python/adamcpp/_zero_geometry.py) in one process, no MPI:
for 1 to 4 ranks, over flat buffers of several dtypes with parameters straddling shard edges, zero-size
parameters, empty shards and several groups, every rank's view is built and checked against the others: the
shards tile each buffer, every element of every parameter lies in exactly one rank's parts, runs join parts of
one group only, the per-chunk norm counts are the chunks the native norm makes of a rank's parts (and their
sums, concatenated over the ranks, are the single-process sums bit for bit), the copy-in slices and rounding
pieces name the right elements."""

from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

import adamcpp
from adamcpp import _core
from adamcpp._ranges import Range
from adamcpp._zero_geometry import ALIGNMENT_ELEMENTS, Part, ShardGeometry, padding

A = ALIGNMENT_ELEMENTS
PATTERNS = ("params[{}]", "grads[{}]")

# name -> each parameter's (element count, dtype, group), in the optimizer's order
LAYOUTS: Dict[str, List[Tuple[int, str, int]]] = {
    # Parameters straddling the edges of 8192-element shards, interleaved dtypes, zero-size ones, three groups.
    "straddling": [
        (A - 1, "float32", 0),
        (2, "float32", 0),
        (1, "float64", 0),
        (A + 5, "float32", 1),
        (0, "float32", 1),
        (3 * A, "float32", 1),
        (2 * A + 1, "float64", 2),
        (7, "float32", 2),
        (A, "float64", 0),
        (0, "float64", 2),
        (13, "float16", 1),
    ],
    # One small buffer: every rank past the first has an empty shard.
    "tiny": [(3, "float32", 0), (0, "float32", 0), (5, "float32", 1)],
    # Zero-size parameters only: an empty buffer, empty shards everywhere.
    "empty": [(0, "float32", 0), (0, "float32", 1)],
    # Exact multiples of the alignment: equal shards even without padding when N divides the count.
    "multiples": [(4 * A, "float64", 0), (12 * A, "float32", 0), (A, "float32", 1)],
}
WORLD_SIZES = [1, 2, 3, 4]


def build(name: str, world_size: int, pad: bool, order: str = "flat") -> Tuple[adamcpp.FlatParams, List[ShardGeometry]]:
    """A FlatParams of the layout (padded to padding(N) or not) and every rank's geometry of it. `order`: the
    optimizer's order of the parameters, the flat one or reversed (a caller's FlatParams in other groups)."""
    entries = LAYOUTS[name]
    flat = adamcpp.FlatParams([np.zeros(n, dt) for n, dt, _ in entries], pad_to=padding(world_size) if pad else 1)
    index = list(range(len(entries)))
    if order == "reversed":
        index.reverse()
    slots = [flat.slots[j] for j in index]
    group_of = [entries[j][2] for j in index]
    return flat, [ShardGeometry.of_flat(flat, slots, group_of, world_size, r) for r in range(world_size)]


CASES = [
    pytest.param(name, n, pad, order, id=f"{name}-N{n}-{'padded' if pad else 'unpadded'}-{order}")
    for name in LAYOUTS
    for n in WORLD_SIZES
    for pad in (False, True)
    for order in ("flat", "reversed")
]


def covered(pieces: Sequence[Tuple[int, int]], lo: int, hi: int, what: str) -> None:
    """That the (start, stop) pieces, sorted, tile [lo, hi) exactly: no gap, no overlap."""
    at = lo
    for a, z in sorted(pieces):
        assert a == at, f"{what}: expected a piece at {at}, got [{a}, {z})"
        assert a < z, f"{what}: an empty piece [{a}, {z})"
        at = z
    assert at == hi, f"{what}: covered up to {at}, expected {hi}"


@pytest.mark.parametrize(("name", "n", "pad", "order"), CASES)
def test_shards_tile_every_buffer(name, n, pad, order):
    flat, geos = build(name, n, pad, order)
    sizes = [int(b.size) for b in flat.buffers]
    for geo in geos:
        # Every rank computes the same cut.
        assert (geo.counts, geo.displs, geo.per_rank, geo.equal) == (
            geos[0].counts,
            geos[0].displs,
            geos[0].per_rank,
            geos[0].equal,
        )
        assert geo.shard == geo.bounds(geo.rank)
    geo = geos[0]
    for b, size in enumerate(sizes):
        counts, displs, per = geo.counts[b], geo.displs[b], geo.per_rank[b]
        assert sum(counts) == size and len(counts) == len(displs) == n
        assert per % A == 0 and per * n >= size and (size == 0 or per * n < size + A * n)
        for k in range(n):
            assert displs[k] == min(k * per, size), (b, k)  # shards start on chunk boundaries (or at the end)
            assert 0 <= counts[k] <= per
            assert displs[k] + counts[k] == (displs[k + 1] if k + 1 < n else size)
            assert geos[k].shard[b] == (displs[k], displs[k] + counts[k])
        covered([(d, d + c) for d, c in zip(displs, counts) if c], 0, size, f"buffer {b}")
        # Equal shards exactly when the buffer's memory holds N shards (always with one rank).
        assert geo.equal[b] == (n == 1 or flat.padded[b].size >= n * per)
    assert geo.equal_shards == all(geo.equal)
    if pad:
        assert geo.equal_shards


def test_small_buffers_leave_later_ranks_empty():
    for n in (2, 3, 4):
        _, geos = build("tiny", n, pad=False)
        assert geos[0].counts == [[8] + [0] * (n - 1)]
        for geo in geos[1:]:
            assert geo.parts == [] and geo.runs() == [] and geo.copy_in() == []
            assert geo.shard == [(8, 8)] and geo.norm_counts == [[1] + [0] * (n - 1)]
        _, geos = build("empty", n, pad=False)
        for geo in geos:
            assert geo.counts == [[0] * n] and geo.parts == [] and geo.norm_counts == [[0] * n]


@pytest.mark.parametrize(("name", "n", "pad", "order"), CASES)
def test_every_element_is_in_exactly_one_ranks_parts(name, n, pad, order):
    _, geos = build(name, n, pad, order)
    slots = geos[0].slots
    by_param: Dict[int, List[Tuple[int, int]]] = {i: [] for i in range(len(slots))}
    for geo in geos:
        assert geo.parts == sorted(geo.parts) and geo.parts == geo.parts_on(geo.rank)
        assert geo.parts_by_param == sorted(geo.parts, key=lambda p: p.param)
        assert len({p.param for p in geo.parts}) == len(geo.parts)  # at most one part per parameter and shard
        for p in geo.parts:
            assert isinstance(p, Part)
            b, off, size = slots[p.param]
            lo, hi = geo.shard[p.buffer]
            assert p.buffer == b and off <= p.start < p.stop <= off + size and lo <= p.start and p.stop <= hi
            by_param[p.param].append((p.start, p.stop))
            s = geo.shard_slice(p.buffer, p.start, p.stop)
            assert 0 <= s.start < s.stop <= hi - lo
    for i, (_, off, size) in enumerate(slots):
        if size == 0:
            assert by_param[i] == []
        else:
            covered(by_param[i], off, off + size, f"params[{i}]")


@pytest.mark.parametrize(("name", "n", "pad", "order"), CASES)
def test_runs_join_parts_of_one_group(name, n, pad, order):
    _, geos = build(name, n, pad, order)
    for geo in geos:
        runs = geo.runs()
        assert all(isinstance(r, Range) for r in runs)
        assert sorted(p for r in runs for p in geo.parts_in(r)) == geo.parts  # each part in one run
        for r in runs:
            parts = geo.parts_in(r)
            assert parts and all(p.buffer == r.buffer and geo.group_of[p.param] == r.group for p in parts)
            assert [p.param for p in parts] == list(r.members)
            covered([(p.start, p.stop) for p in parts], r.start, r.stop, repr(r))
        for prev, nxt in itertools.pairwise(runs):
            # Back-to-back runs are split only where the group (or the buffer) changes.
            assert (prev.buffer, prev.stop) <= (nxt.buffer, nxt.start)
            if prev.buffer == nxt.buffer and prev.stop == nxt.start:
                assert prev.group != nxt.group
        assert geo.runs() is not runs and [r.record() for r in geo.runs()] == [r.record() for r in runs]
        # A key per part (a loaded state's step count) splits runs where it changes, and only there.
        keys = [p.param % 2 for p in geo.parts]
        keyed = geo.runs(keys)
        for r in keyed:
            assert len({keys[geo.parts.index(p)] for p in geo.parts_in(r)}) == 1
        assert len(keyed) >= len(runs)
        assert sorted(p for r in keyed for p in geo.parts_in(r)) == geo.parts
    assert geo.parts_in(Range(0, 0, 0, 0)) == []  # a stand-in


@pytest.mark.parametrize(("name", "n", "pad", "order"), CASES)
def test_norm_counts_are_the_chunks_of_each_ranks_parts(name, n, pad, order, rng):
    flat, geos = build(name, n, pad, order)
    for b, buf in enumerate(flat.grad_buffers):
        counts = geos[0].norm_counts[b]
        assert all(geo.norm_counts == geos[0].norm_counts for geo in geos)
        assert geos[0].norm_displs[b] == [sum(counts[:k]) for k in range(n)]
        assert sum(counts) == -(-buf.size // A)  # the single-process chunk count
        if buf.dtype not in (np.float32, np.float64):
            continue  # (the native norm reads the float32 and float64 gradients a ZeroRedundancyOptimizer sums)
        buf[...] = rng.standard_normal(buf.size)
        # One process: the per-chunk sums of the parameters' gradients, concatenated in buffer order.
        views = [buf[o : o + c] for bb, o, c in sorted(geos[0].slots) if bb == b and c]
        whole = np.zeros(-(-buf.size // A))
        if views:
            _core.chunk_sum_squares(views, whole, PATTERNS, None)
        gathered = []
        for geo in geos:
            pieces = [buf[p.start : p.stop] for p in geo.parts if p.buffer == b]
            mine = np.zeros(counts[geo.rank])
            if pieces:  # the native norm refuses any other count of per-chunk sums
                _core.chunk_sum_squares(pieces, mine, PATTERNS, None)
            gathered.append(mine)
        # The chunks of every rank's parts are the single-process chunks: the same sums, bit for bit.
        assert np.concatenate(gathered).tobytes() == whole.tobytes()


@pytest.mark.parametrize(("name", "n", "pad", "order"), CASES)
def test_copy_in_slices_and_rounding_pieces(name, n, pad, order):
    flat, geos = build(name, n, pad, order)
    views = [flat.param_views[j] for j in (range(len(flat))[::-1] if order == "reversed" else range(len(flat)))]
    for k, v in enumerate(views):
        v.reshape(-1)[...] = np.arange(v.size) + 1000 * k
    seen: Dict[int, List[Tuple[int, int]]] = {i: [] for i in range(len(views))}
    for geo in geos:
        copies = geo.copy_in()
        assert [i for i, _, _, _ in copies] == [p.param for p in geo.parts_by_param]
        for i, in_param, b, in_buffer in copies:
            src, dst = views[i].reshape(-1)[in_param], flat.buffers[b][in_buffer]
            assert src.size == dst.size > 0 and np.shares_memory(src, dst) and np.array_equal(src, dst)
            seen[i].append((in_param.start, in_param.stop))
        tensors = [*geo.runs(), Range(0, 0, 0, 0)]  # a stand-in has no pieces
        pieces = geo.local_rounding_pieces(tensors)
        assert len(pieces) == len(tensors) and pieces[-1] is None
        for r, rows in zip(tensors[:-1], pieces[:-1]):
            assert rows is not None and rows.dtype == np.int64 and rows.shape == (len(r.members), 3)
            assert rows[0, 0] == 0 and list(rows[:, 1]) == list(r.members)
            for start, i, first in rows.tolist():
                assert r.start + start == geo.slots[i][1] + first  # the element's place in its parameter
    for i, v in enumerate(views):
        if v.size:
            covered(seen[i], 0, v.size, f"params[{i}]")


def test_padding_and_the_public_names():
    import adamcpp.distributed as dist  # no mpi4py needed to import it

    assert _core.chunk_elements == A and dist.ALIGNMENT_ELEMENTS == A and dist.padding is padding
    assert padding(1) == A and padding(np.int64(4)) == 4 * A
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="world_size: expected an int >= 1"):
            padding(bad)
