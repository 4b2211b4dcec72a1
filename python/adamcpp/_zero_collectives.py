"""The collectives that move a ZeroRedundancyOptimizer's numbers between
ranks: rank 0's parameters to every rank, the gradients' reduce-scatter into
each rank's shard, the parameters' all-gather, and the two reductions a step
decides by (the gradient norm from every rank's per-chunk sums, the first
non-finite gradient), which give every rank the same numbers.

The shards' sizes come from a ShardGeometry (_zero_geometry.py); when each
collective runs is the step's (distributed.py).
"""

from __future__ import annotations

from typing import Any, List

import numpy as np

from . import _core
from ._ranges import Range
from ._zero_geometry import ShardGeometry
from .flat import FlatParams, aligned_zeros

_NO_INDEX = np.iinfo(np.int64).max
_PATTERNS = ("params[{}]", "grads[{}]")


def mpi_type(MPI: Any, dtype: np.dtype) -> Any:
    """The MPI datatype that sums a buffer of `dtype`."""
    if dtype == np.float32:
        return MPI.FLOAT
    if dtype == np.float64:
        return MPI.DOUBLE
    raise TypeError(
        f"ZeroRedundancyOptimizer: parameters of dtype {dtype} cannot be summed over MPI; use float32 or float64"
    )


class ShardCollectives:
    """The collectives over the buffers of `flat` cut as `geometry` says, on
    communicator `comm` (`MPI`: the mpi4py module). `types`: each buffer's
    MPI datatype; `recv`: this rank's shard of the summed gradients, one
    array per buffer."""

    def __init__(self, comm: Any, MPI: Any, flat: FlatParams, geometry: ShardGeometry):
        self.comm = comm
        self.MPI = MPI
        self.flat = flat
        self.geometry = geometry
        self.types = [mpi_type(MPI, dt) for dt in flat.dtypes]
        # This rank's part of the summed gradients, one buffer per dtype (with one rank: the gradients themselves,
        # which the step only reads; there is nothing to reduce or gather).
        if geometry.world_size == 1:
            self.recv = [g.view() for g in flat.grad_buffers]
        else:
            self.recv = [
                aligned_zeros(per if equal else hi - lo, dt)
                for (lo, hi), dt, per, equal in zip(geometry.shard, flat.dtypes, geometry.per_rank, geometry.equal)
            ]
        # This rank's gradient pieces, one per parameter part, in the optimizer's parameter order (the order in
        # which a step names the first non-finite gradient) and per buffer in buffer order (the order of the norm).
        self.piece_grads = [self._received(b, a, z) for b, a, z, _ in geometry.parts_by_param]
        self.norm_pieces = [
            [self._received(b, a, z) for bb, a, z, _ in geometry.parts if bb == b] for b in range(len(self.recv))
        ]

    def _received(self, buffer: int, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of a buffer's summed gradients (within this rank's shard)."""
        return self.recv[buffer][self.geometry.shard_slice(buffer, start, stop)]

    def shard_grads(self, tensors: List[Range]) -> List[np.ndarray]:
        """The summed gradients of each of the local optimizer's tensors (empty for a stand-in)."""
        return [self._received(r.buffer, r.start, r.stop) for r in tensors]

    def broadcast_params(self) -> None:
        """Rank 0's parameter values to every rank."""
        for buf, t in zip(self.flat.buffers, self.types):
            self.comm.Bcast([buf, t], root=0)

    def reduce_scatter(self) -> None:
        """Sums the ranks' gradient buffers, each rank receiving its shard of the sums in `recv`."""
        MPI, flat, geometry, n = self.MPI, self.flat, self.geometry, self.geometry.world_size
        for b, (buf, t) in enumerate(zip(flat.grad_buffers, self.types)):
            if geometry.equal[b]:
                whole = flat.grad_padded[b][: n * geometry.per_rank[b]]
                self.comm.Reduce_scatter_block([whole, t], [self.recv[b], t], op=MPI.SUM)
            else:
                self.comm.Reduce_scatter([buf, t], [self.recv[b], t], recvcounts=geometry.counts[b], op=MPI.SUM)

    def all_gather(self) -> None:
        """Every rank's shard of the parameter buffers to every rank, in place."""
        MPI, flat, geometry, n = self.MPI, self.flat, self.geometry, self.geometry.world_size
        for b, (buf, t) in enumerate(zip(flat.buffers, self.types)):
            if geometry.equal[b]:
                self.comm.Allgather(MPI.IN_PLACE, [flat.padded[b][: n * geometry.per_rank[b]], t])
            else:
                self.comm.Allgatherv(MPI.IN_PLACE, [buf, geometry.counts[b], geometry.displs[b], t])

    def sum_squares(self) -> float:
        """The sum of squares of all summed gradients with the single-process
        bits: each rank computes the per-chunk sums of its chunk-aligned shard,
        every rank gathers all of them and adds them in order."""
        MPI, geometry = self.MPI, self.geometry
        total = 0.0
        for b, pieces in enumerate(self.norm_pieces):
            counts = geometry.norm_counts[b]
            mine = np.zeros(counts[geometry.rank])
            if pieces:
                _core.chunk_sum_squares(pieces, mine, _PATTERNS, None)
            parts = np.empty(sum(counts))
            self.comm.Allgatherv([mine, MPI.DOUBLE], [parts, counts, geometry.norm_displs[b], MPI.DOUBLE])
            for value in parts.tolist():
                total += value
        return total

    def first_nonfinite(self, scale: float) -> int:
        """The first parameter (in the optimizer's order) whose summed gradient
        times `scale` has a NaN or Inf, over all ranks; -1 if none."""
        MPI = self.MPI
        found = _NO_INDEX
        if self.piece_grads:
            k = _core.first_nonfinite(self.piece_grads, scale, _PATTERNS, None)
            if k >= 0:
                found = self.geometry.parts_by_param[k].param
        buf = np.array([found], np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MIN)
        return -1 if buf[0] == _NO_INDEX else int(buf[0])
