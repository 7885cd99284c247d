"""Every collective of dit_fast.parallel's sequence parallelism, in one place.

    all_to_all(x, scatter_dim, gather_dim, group)   Ulysses' exchange, differentiable
    gather_tokens(x, dim, group)                    the shards of a replicated result, differentiable
    RingExchange(tensors, group).wait()             pass tensors to the next rank of a ring, receive
                                                    the previous rank's (ring attention's K/V, dK/dV)
    all_reduce_sum(tensors, group)                  sum in place (gradients of replicated parameters)
    count_traffic()                                 with-block counting the bytes this rank sends, by
                                                    kind (tests check benchmarks/parallel_plan.py's
                                                    formulas against it)

Model code never calls these: dit_fast/parallel/sequence.py does, in the attention modules it
swaps into a model. Every function is a no-op copy for a group of one rank.

Backends: NCCL on GPUs; gloo on CPU (tests) supports all_to_all_single, all_gather, all_reduce and
isend/irecv for float32, float64, float16 and bfloat16 (checked with torch 2.13). The timeouts are
the process group's (init_process_group(timeout=...)): a peer that never answers raises there.
"""

import contextlib
from collections import Counter
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class Traffic:
    """Bytes this rank sent, by kind ("all_to_all", "all_gather", "ring", "all_reduce"), and call counts.

    The payload leaving the rank: an all-to-all sends (N - 1) / N of its input, an all-gather its part
    to N - 1 peers, a ring step its tensors once, an all-reduce 2 (N - 1) / N of the tensor (ring
    algorithm)."""

    def __init__(self):
        self.bytes, self.calls = Counter(), Counter()

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1


_traffic: Optional[Traffic] = None


@contextlib.contextmanager
def count_traffic():
    """``with count_traffic() as t:`` ... ``t.bytes["all_to_all"]``: what this rank sent inside the block."""
    global _traffic
    outer, _traffic = _traffic, Traffic()
    try:
        yield _traffic
    finally:
        _traffic = outer


def _record(kind: str, nbytes: int) -> None:
    if _traffic is not None:
        _traffic.record(kind, nbytes)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


# ---------------------------------------------------------------------------------------------
# all-to-all (Ulysses)
# ---------------------------------------------------------------------------------------------


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dim {scatter_dim} of x {tuple(x.shape)} must split into {world} equal parts")
    send = torch.stack(x.tensor_split(world, dim=scatter_dim), dim=0).contiguous()  # (world, ...): part j -> rank j
    recv = torch.empty_like(send)
    _record("all_to_all", _nbytes(send) * (world - 1) // world)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's part for this rank
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        # the inverse exchange: each part goes back to the rank it came from
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
    """Splits x into world equal parts along scatter_dim, sends part j to rank j, and concatenates the
    parts received (in rank order) along gather_dim. Differentiable: the backward is the inverse exchange.

    Ulysses: (B, S / N, heads, D) with scatter_dim=heads, gather_dim=tokens -> (B, S, heads / N, D).
    """
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


# ---------------------------------------------------------------------------------------------
# all-gather of a replicated result
# ---------------------------------------------------------------------------------------------


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        _record("all_gather", _nbytes(x) * (len(parts) - 1))
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the whole result and back-propagates the same loss through it, so each
        # rank's gradient of the whole already is the full one: keep this rank's part, no exchange.
        return grad.chunk(group_size(ctx.group), dim=ctx.dim)[group_rank(ctx.group)], None, None


def gather_tokens(x: Tensor, dim: int, group) -> Tensor:
    """The parts x of every rank concatenated along dim in rank order (equal shapes), on every rank.

    Differentiable for a replicated consumer: the backward assumes every rank computes the same loss
    from the gathered tensor (the sequence-parallel model's output) and returns this rank's slice of
    the gradient, without communication.
    """
    if group_size(group) == 1:
        return x
    return _GatherTokens.apply(x, dim, group)


# ---------------------------------------------------------------------------------------------
# ring exchange (ring attention)
# ---------------------------------------------------------------------------------------------


class RingExchange:
    """Sends ``tensors`` to the next rank of the group's ring and receives the previous rank's.

    Starts the transfers at construction (isend / irecv, batched), so compute can run meanwhile;
    ``wait()`` returns the received tensors (same shapes and dtypes). Not differentiable: the ring
    attention Function calls it in its forward (K, V) and its backward (K, V, dK, dV) itself.
    """

    def __init__(self, tensors: Sequence[Tensor], group):
        world, rank = group_size(group), group_rank(group)
        self.received = [torch.empty_like(t) for t in tensors]
        self._works = []
        if world == 1:
            self.received = [t.clone() for t in tensors]
            return
        nxt = dist.get_global_rank(group, (rank + 1) % world)
        prev = dist.get_global_rank(group, (rank - 1) % world)
        _record("ring", sum(_nbytes(t) for t in tensors))
        ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, buf, prev, group) for buf in self.received]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> List[Tensor]:
        for work in self._works:
            work.wait()
        self._works = []
        return self.received


# ---------------------------------------------------------------------------------------------
# sums (gradients of replicated parameters)
# ---------------------------------------------------------------------------------------------


def _buckets(tensors: Sequence[Tensor], limit: int):
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce_sum(tensors: Sequence[Tensor], group, bucket_bytes: int = 64 << 20) -> None:
    """Sums each tensor over the group, in place; same-dtype tensors travel flattened in buckets."""
    if group_size(group) == 1:
        return
    by_kind = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for same_kind in by_kind.values():
        for bucket in _buckets(same_kind, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            _record("all_reduce", 2 * _nbytes(flat) * (group_size(group) - 1) // group_size(group))
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            parts = flat.split([t.numel() for t in bucket])
            torch._foreach_copy_(bucket, [part.view_as(t) for part, t in zip(parts, bucket, strict=True)])


__all__ = ["all_to_all", "gather_tokens", "RingExchange", "all_reduce_sum", "count_traffic", "Traffic", "group_size",
           "group_rank"]
