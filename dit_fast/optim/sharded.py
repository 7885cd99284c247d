"""GaLoreAdamW on parameters split by rows across ranks: FSDP2's ``fully_shard`` (DTensor ``Shard(0)``).

No rank ever holds a whole weight or gradient: each works on its own rows, and only r- or w-sized
products cross ranks. Notation: G is (m, n), its rows split over the W ranks of the shard group as
torch.chunk splits them (FSDP2's layout); k = min(rank, m, n); w = min(k + oversample, m, n).

  side    basis (stored as)                  moments (stored as)     collectives per step
  right   P (k, n), whole on every rank      (m, k): rows with G's   none: R_i = G_i P^T and W_i -= a N_i P are row-local
  left    P (m, k): rows with G's            (k, n): chunks of k     reduce-scatter of the (k, n) partials P_i^T G_i,
                                                                     all-gather of N (k, n) for W_i -= a P_i N
  full    A (m, k): rows; B (k, n) whole     (k, k): chunks of k     reduce-scatter (k, k), all-gather (k, k)

(reduce-scatters pad k to a multiple of W rows). Every step also all-reduces one finite-gradient flag
per parameter, so that all ranks raise or skip together.

"std" picks right when m >= n (no communication at all: the common tall weights) and left otherwise;
"reverse_std" the opposite; every side works with any split.

Refresh (``refresh="randomized"`` only: an exact SVD needs the whole gradient) runs the same subspace
iteration as one process (reference.randomized_svd / randomized_left), with:
  * G q and G z row-local, and their orthonormalisation a TSQR: a local QR, then an all-gather of the
    W (w, w) R factors, one QR of their (W w, w) stack, and Q_i = Q_local @ its block of the stack's Q.
    With diag(R) >= 0 this Q equals one process's QR of the stacked rows up to rounding;
  * G^T z an all-reduce of (n, w); the start block (n, w) (right/full) or its local rows (left: (m, w)
    drawn whole from the shared seed, rows sliced) come from the same generator on every rank;
  * the small SVDs (w x w for right/full, n x w for left) repeated on every rank on identical
    all-reduced inputs. So every collective is at most max(n w, k n, W w^2) elements, below the weight's
    m n whenever k + oversample < m (a rank so close to m that w = m would all-reduce (n, m): as many
    elements as the weight, though never the weight itself).
  * ``rotate_moments`` adds an all-reduce of the (k, k) change of basis and a reduce-scatter of the
    rotated (k, n) / (k, k) moments for left / full.

int8 moments keep the single-process layout exactly (blocks of 256 consecutive elements of the whole
flattened moment): a rank's rows start at a global offset, and a block that straddles two ranks gets
its absmax as the max of both halves (an all-gather of 2 floats per moment per rank, only when some
block straddles). The optimizer's ``state_dict()`` returns the row-split tensors as DTensors
(``Shard(0)`` on the parameter's mesh, any global layout torch.distributed.checkpoint can reshard) and
the int8 absmax whole (an all-reduce of numel / 256 floats), so a checkpoint saved on W ranks loads on
any other count, or into one process.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from dit_fast.optim import reference as ref


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be sharded
        return None
    return DTensor


def is_dtensor(x) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(x, cls)


def local(x: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (a view: in-place updates reach it), else x."""
    return x.to_local() if is_dtensor(x) else x


def span(size: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of rank's chunk of ``size`` rows, as torch.chunk (and FSDP2, DTensor Shard) cut."""
    chunk = -(-size // world) if world else size
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


class ShardGroup:
    """The ranks that hold row chunks of one parameter (one mesh dimension) and the collectives on them."""

    def __init__(self, mesh, placements, shard_dim: Optional[int]):
        self.mesh, self.placements = mesh, tuple(placements)
        if shard_dim is None:  # every mesh dimension replicates: the local tensor is whole
            self.group, self.world, self.rank = None, 1, 0
        else:
            self.group = mesh.get_group(shard_dim)
            self.world = mesh.size(shard_dim)
            self.rank = mesh.get_local_rank(shard_dim)

    def span(self, size: int) -> Tuple[int, int]:
        return span(size, self.world, self.rank)

    # ---------------------------------------------------------------- collectives

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the group (all-reduce of x's size)."""
        if self.world == 1:
            return x
        x = x.contiguous().clone()
        dist.all_reduce(x, group=self.group)
        return x

    def gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """(world, *x.shape): every rank's x (all-gather of x's size)."""
        if self.world == 1:
            return x[None].clone()
        flat = x.reshape(-1).contiguous()
        out = flat.new_empty(self.world * flat.numel())  # gloo wants the output as the inputs end to end
        dist.all_gather_into_tensor(out, flat, group=self.group)
        return out.view((self.world,) + tuple(x.shape))

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of the rows of x summed over the group (x: (d, ...) on every rank)."""
        d = x.shape[0]
        if self.world == 1:
            return x
        chunk = -(-d // self.world)
        padded = x.new_zeros((chunk * self.world,) + tuple(x.shape[1:]))
        padded[:d] = x
        out = x.new_empty((chunk,) + tuple(x.shape[1:]))
        dist.reduce_scatter_tensor(out, padded, group=self.group)
        start, stop = self.span(d)
        return out[:stop - start]

    def all_gather_rows(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """The (total, ...) tensor whose row chunks the ranks hold (x: this rank's chunk)."""
        if self.world == 1:
            return x
        chunk = -(-total // self.world)
        padded = x.new_zeros((chunk,) + tuple(x.shape[1:]))
        padded[:x.shape[0]] = x
        # chunks are full up to the last non-empty one: the first `total` gathered rows are the tensor
        return self.gather_stack(padded).reshape((chunk * self.world,) + tuple(x.shape[1:]))[:total]

    def qr_rows(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """TSQR of the row-stacked y (local rows (m_i, w)): (local rows of Q, R (w, w)), diag(R) >= 0."""
        if self.world == 1:
            return ref.canonical_qr(y)
        w = y.shape[1]
        q1, r1 = torch.linalg.qr(y)  # q1 (m_i, min(m_i, w)), r1 (min(m_i, w), w)
        r_pad = y.new_zeros(w, w)
        r_pad[:r1.shape[0]] = r1
        stack = self.gather_stack(r_pad).reshape(self.world * w, w)  # all-gather W x (w, w)
        q2, r = ref.canonical_qr(stack)
        return q1 @ q2[self.rank * w:self.rank * w + q1.shape[1]], r

    def rows(self, total: int) -> "_Rows":
        """This group seen as the row split of a (total, n) matrix, for the randomized refresh."""
        return _Rows(self, total)

    # ---------------------------------------------------------------- int8 blocks across rank boundaries

    def _block_spans(self, total_rows: int, row_numel: int) -> List[Optional[Tuple[int, int]]]:
        out = []
        for r in range(self.world):
            lo, hi = span(total_rows, self.world, r)
            lo, hi = lo * row_numel, hi * row_numel
            out.append((lo // ref.QBLOCK, (hi - 1) // ref.QBLOCK) if hi > lo else None)
        return out

    def fix_absmax(self, absmaxes: Sequence[torch.Tensor], total_rows: int, row_numel: int) -> None:
        """Replaces, in place, the partial absmax of the blocks this rank shares with a neighbour by the
        block's true absmax (the max over every rank that holds part of it)."""
        blocks = self._block_spans(total_rows, row_numel)
        shared = any(a is not None and b is not None and a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        if self.world == 1 or not shared:  # the same answer on every rank: all skip or all gather
            return
        mine = blocks[self.rank]
        ends = torch.zeros(len(absmaxes), 2, dtype=torch.float32, device=absmaxes[0].device)
        if mine is not None:
            for i, a in enumerate(absmaxes):
                ends[i, 0], ends[i, 1] = a[0], a[-1]
        every = self.gather_stack(ends)  # (world, len(absmaxes), 2)
        if mine is None:
            return
        for end, block in ((0, mine[0]), (-1, mine[1])):
            holders = [(r, 0) for r, b in enumerate(blocks) if b is not None and b[0] == block] + \
                      [(r, 1) for r, b in enumerate(blocks) if b is not None and b[1] == block]
            for i, a in enumerate(absmaxes):
                a[end] = torch.stack([every[r, i, j] for r, j in holders]).max()

    def whole_absmax(self, absmax: torch.Tensor, total_rows: int, row_numel: int) -> torch.Tensor:
        """The absmax of every block of the whole moment (all-reduce max of numel / 256 floats)."""
        count = ref.block_count(total_rows * row_numel)
        out = torch.zeros(count, dtype=torch.float32, device=absmax.device)
        mine = self._block_spans(total_rows, row_numel)[self.rank]
        if mine is not None:
            out[mine[0]:mine[1] + 1] = absmax
        if self.world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def local_absmax(self, whole: torch.Tensor, total_rows: int, row_numel: int) -> torch.Tensor:
        mine = self._block_spans(total_rows, row_numel)[self.rank]
        return whole[:0].clone() if mine is None else whole[mine[0]:mine[1] + 1].clone()

    # ---------------------------------------------------------------- DTensors for state_dict

    def dtensor(self, local_rows: torch.Tensor, global_shape) -> torch.Tensor:
        """A row-split state tensor as a DTensor laid out like the parameter (Shard(0) on its mesh)."""
        from torch.distributed.tensor import DTensor

        shape = torch.Size(global_shape)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(local_rows, self.mesh, self.placements, run_check=False, shape=shape,
                                  stride=stride)


class _Rows(ref.WholeRows):
    """reference.WholeRows for a matrix whose rows a ShardGroup splits."""

    def __init__(self, shards: ShardGroup, total: int):
        self.shards, self.total = shards, int(total)
        self.start = shards.span(total)[0]

    def sum(self, x):
        return self.shards.sum(x)

    def qr_rows(self, y):
        return self.shards.qr_rows(y)


def shard_group_of(p: torch.Tensor, where: str) -> Optional[ShardGroup]:
    """None for a plain tensor; the ShardGroup of a DTensor parameter split by rows (FSDP2's layout).

    Raises ValueError for any other layout (a split along another dimension, partial sums)."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    # type() is Shard: a _StridedShard (FSDP over tensor parallelism) is a subclass with another layout
    bad = [pl for pl in placements if not (isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0))]
    if bad or len(shard_dims) > 1:
        raise ValueError(f"{where}: GaLoreAdamW steps DTensor parameters split by rows (FSDP2's Shard(0) on one "
                         f"mesh dimension, Replicate on the others), got placements {placements}")
    shards = ShardGroup(p.device_mesh, placements, shard_dims[0] if shard_dims else None)
    start, stop = shards.span(p.shape[0])
    if p.to_local().shape[0] != stop - start:
        raise ValueError(f"{where}: local shard has {p.to_local().shape[0]} rows, expected torch.chunk's "
                         f"{stop - start} of {p.shape[0]} (rank {shards.rank} of {shards.world})")
    return shards


def rotate_moments_rows(m: torch.Tensor, v: torch.Tensor, side: str, old, new, shards: ShardGroup,
                        k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """reference.rotate_moments for row-split moments and bases (fp32 m, v: this rank's rows)."""
    if side == "right":  # moments (m, k) split with G's rows, bases whole: local
        return ref.rotate_moments(m, v, side, ref.rotation(old, new, side))
    start, stop = shards.span(k)
    a = shards.sum(old[0].float().t() @ new[0].float())  # (k_old, k_new) = P_old^T P_new over all rows
    if side == "left":  # new m = a^T m: rank i holds rows [start, stop) of m
        mt = a.t()[:, start:stop] @ m
        vt = (a * a).t()[:, start:stop] @ v
    else:  # full: a^T m b
        b = old[1].float() @ new[1].float().t()
        mt = a.t()[:, start:stop] @ m @ b
        vt = (a * a).t()[:, start:stop] @ v @ (b * b)
    return shards.reduce_scatter_rows(mt), shards.reduce_scatter_rows(vt)
