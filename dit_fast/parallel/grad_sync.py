"""Summing a sequence-parallel model's gradients over its ranks: automatically, as DDP does, or by hand.

    sequence_parallel(model, mesh)                        # grad_sync="auto"
    loss.backward()                                       # ends with every gradient summed over the ranks
    opt.step()

    sequence_parallel(model, mesh, grad_sync="manual")
    loss.backward(); loss2.backward()                     # local shares accumulate
    reduce_gradients(model)                               # one sum; without it opt.step() raises
    opt.step()

Each rank of a sequence-parallel group back-propagates through its own tokens, so after backward its
parameter gradients hold its share only. GradSync keeps one invariant: outside a backward, a parameter's
``.grad`` is either fully summed or the parameter is *pending* (its gradient holds unsummed shares), and an
optimizer step on a pending parameter raises (a global ``Optimizer`` step pre-hook that costs nothing while
nothing is pending).

How the shares are kept apart from what is already summed (gradient accumulation, exact): a hook that runs
before autograd accumulates into a parameter sets an already-summed ``.grad`` aside (``held``) and lets the
new shares accumulate into an empty one; the sum over the ranks (bucketed, one all-reduce per group and
dtype: dit_fast.parallel.comm.all_reduce_sum) runs on those shares only, then the held gradient is added
back in place (the optimizer keeps the same tensor). "auto" runs that sum in a callback at the end of each
backward (``queue_callback``, as FSDP2 does); "manual" runs it in ``reduce_gradients``. Calling
``reduce_gradients`` when nothing is pending does nothing, so it never sums twice.

FSDP2 (dit_fast.parallel.apply_fsdp) replaces the parameters with row-sharded DTensors: the hooks are
installed by sequence_parallel, again by apply_fsdp once it has sharded, and on new DTensor parameters
before each forward (inside a forward FSDP2 shows its unsharded parameters, which it sums itself; a
gradient taken away before the sum, by a bare fully_shard on an enclosing module, raises). For each sequence-parallel process
group: if FSDP's mesh holds all of its ranks, FSDP's reduce-scatter already sums over them (it divides by
its world size: multiply the loss by the sequence-parallel degree), and nothing more is done; if it holds
none of them but this rank (FSDP over the "dp" dimension), the local shards are summed over the group
after FSDP's own reduction (FSDP2 runs post-accumulate-grad hooks on its sharded parameters). FSDP
accumulates into its sharded gradients itself, past any hook: accumulating over several backwards is
supported as FSDP2 does it (``set_requires_gradient_sync(False)`` on all but the last); adding a new
backward onto a gradient already summed raises instead of summing it twice.

Every rank must back-propagate through the same parameters in the same order (they run the same model on
the same inputs): the sums then pair up across ranks. Parameters are summed in the order they were first
seen, never in the order their hooks happened to run.
"""

from __future__ import annotations

import itertools
import weakref
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from dit_fast.parallel import comm

GRAD_SYNC = ("auto", "manual")

# every pending parameter of every GradSync -> (its GradSync, its name): what the optimizer guard looks up
_PENDING: "WeakIdKeyDictionary" = WeakIdKeyDictionary()
_guard_handle = None


def _optimizer_guard(optimizer, args, kwargs):
    """Optimizer step pre-hook: refuses to step on a gradient that holds one rank's share only."""
    if not _PENDING:
        return None
    names = [_PENDING[p][1] for group in optimizer.param_groups for p in group["params"] if p in _PENDING]
    if names:
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() on gradients that hold this rank's share only: {len(names)} "
            f"parameter(s) of a sequence-parallel model ({shown}) were not summed over the sequence-parallel "
            "ranks; call dit_fast.parallel.reduce_gradients(model) after backward (the model was made with "
            "grad_sync='manual'), or let every backward sum them (grad_sync='auto', the default)")
    return None


def _install_guard() -> None:
    global _guard_handle
    if _guard_handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _guard_handle = register_optimizer_step_pre_hook(_optimizer_guard)


def _fsdp_module():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, nothing to recognise
        return ()
    return FSDPModule


def _ranks(group) -> frozenset:
    return frozenset(dist.get_process_group_ranks(group))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class GradSync:
    """The gradient sums of one sequence-parallel model over ``groups`` (its Ulysses and ring groups)."""

    def __init__(self, groups: Sequence, mode: str):
        if mode not in GRAD_SYNC:
            raise ValueError(f"grad_sync must be one of {GRAD_SYNC}, got {mode!r}")
        self.mode = mode
        self.groups = [g for g in groups if g is not None and comm.group_size(g) > 1]
        # parameter -> (first-seen index, name, the groups its gradient is summed over here)
        self._params: "WeakIdKeyDictionary" = WeakIdKeyDictionary()
        self._held: "WeakIdKeyDictionary" = WeakIdKeyDictionary()  # parameter -> its summed .grad, set aside
        self._summed: "WeakIdKeyDictionary" = WeakIdKeyDictionary()  # DTensor gradients summed here (FSDP)
        self._order = itertools.count()
        self._queued_task: Optional[int] = None
        self.fsdp = False  # FSDP2 manages this model's parameters (set by track)
        _install_guard()

    # -- which parameters, which groups --------------------------------------------------------

    def _groups_for(self, name: str, p: Tensor) -> List:
        """The groups this parameter's gradient must still be summed over (FSDP's mesh may cover some)."""
        mesh = getattr(p, "device_mesh", None)
        if mesh is None:
            return list(self.groups)
        mesh_ranks, me = frozenset(mesh.mesh.flatten().tolist()), dist.get_rank()
        todo = []
        for group in self.groups:
            ranks = _ranks(group)
            if ranks <= mesh_ranks:
                continue  # FSDP's reduce-scatter sums over these ranks
            if ranks & mesh_ranks != {me}:
                raise ValueError(
                    f"parameter {name!r} is sharded over ranks {sorted(mesh_ranks)}, which hold some but not all "
                    f"of the sequence-parallel group {sorted(ranks)}: shard with FSDP over every rank of the "
                    "sequence-parallel groups, or over the mesh's 'dp' dimension only")
            todo.append(group)
        return todo

    def track(self, model: nn.Module, *, fsdp: Optional[bool] = None) -> None:
        """Installs the hooks on the parameters ``model`` holds now (once each).

        Runs at sequence_parallel, after apply_fsdp shards the model, and before each forward. Inside a
        forward, FSDP2 has swapped its sharded parameters for unsharded ones (plain tensors that it sums
        itself): with FSDP on the model (``fsdp``, else any fully_shard module inside it) only DTensor
        parameters are new ones to hook."""
        if fsdp is None:  # once FSDP is seen it stays: no walk of the modules on every forward after that
            fsdp = self.fsdp or any(isinstance(m, _fsdp_module()) for m in model.modules())
        self.fsdp = self.fsdp or fsdp
        for name, p in model.named_parameters():
            if p in self._params or not p.requires_grad:
                continue
            sharded = getattr(p, "device_mesh", None) is not None
            if self.fsdp and not sharded:
                continue
            groups = self._groups_for(name, p)
            self._params[p] = (next(self._order), name, groups)
            if not groups:
                continue
            if sharded:  # FSDP2 calls post-accumulate-grad hooks on its sharded parameters
                p.register_post_accumulate_grad_hook(self._after_fsdp_accumulate)
            else:
                p.register_hook(self._before_accumulate_hook(weakref.ref(p)))

    # -- the hooks -----------------------------------------------------------------------------

    def _mark_pending(self, p: Tensor) -> None:
        if p not in _PENDING:
            _PENDING[p] = (self, self._params[p][1])
        if self.mode == "auto":
            task = torch._C._current_graph_task_id()
            if task != self._queued_task:  # once per backward (and per reentrant inner backward)
                self._queued_task = task
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _before_accumulate_hook(self, ref):
        def hook(grad: Tensor) -> None:
            p = ref()
            if p is None:
                return None
            if p not in _PENDING and p.grad is not None:  # summed already: keep it out of this sum
                self._held[p] = p.grad
                p.grad = None
            self._mark_pending(p)
            return None
        return hook

    def _after_fsdp_accumulate(self, p: Tensor) -> None:
        if p not in _PENDING and p.grad in self._summed:
            raise RuntimeError(
                f"a backward accumulated into the gradient of {self._params[p][1]!r} after it was summed over the "
                "sequence-parallel ranks (FSDP adds into its sharded gradients itself, so the sum cannot be kept "
                "apart): accumulate with model.set_requires_gradient_sync(False) on all but the last backward, "
                "and set gradients to None between steps (optimizer.zero_grad(), the default)")
        self._mark_pending(p)

    def _end_of_backward(self) -> None:
        self._queued_task = None
        self.reduce()

    # -- the sum -------------------------------------------------------------------------------

    def pending(self) -> List[Tensor]:
        """This model's parameters whose gradients hold unsummed shares, in first-seen order."""
        mine = [p for p in self._params.keys() if p in _PENDING and _PENDING[p][0] is self]
        return sorted(mine, key=lambda p: self._params[p][0])

    def reduce(self) -> None:
        """Sums every pending gradient over its groups, adds back what was set aside; a no-op if none."""
        params = self.pending()
        lost = [self._params[p][1] for p in params if p.grad is None]
        if lost:  # the same on every rank: raised before any sum
            self.settle(params)
            raise RuntimeError(
                f"the gradients of {lost[:3]} (sequence-parallel parameters) were taken before they could be summed "
                "over the sequence-parallel ranks: shard the model with dit_fast.parallel.apply_fsdp (not a bare "
                "fully_shard on an enclosing module), and do not use torch.autograd.grad on its parameters")
        for group in self.groups:
            grads = [_local(p.grad) for p in params if group in self._params[p][2]]
            comm.all_reduce_sum(grads, group)
        self.settle(params)

    def settle(self, params: Optional[Sequence[Tensor]] = None) -> None:
        """Marks ``params`` (default: every pending one) summed: the held gradients are added back."""
        for p in self.pending() if params is None else params:
            held = self._held.pop(p, None)
            if held is not None:
                if p.grad is not None:
                    held.add_(p.grad)
                p.grad = held
            if p.grad is not None and getattr(p.grad, "device_mesh", None) is not None:
                self._summed[p.grad] = True
            _PENDING.pop(p, None)


__all__ = ["GradSync", "GRAD_SYNC"]
