"""FSDP2 for DiTVideo: ``fully_shard`` on every block, then on the root (torchtitan's apply_fsdp).

    mesh = init_device_mesh("cuda", (world,))                       # or a dp dimension of a bigger mesh
    model = apply_fsdp(model, mesh, mixed_precision="bf16")
    opt = GaLoreAdamW(galore_param_groups(model, rank=128, refresh="randomized"), lr=1e-4)

Every parameter becomes a DTensor split by rows (``Shard(0)``) over the mesh; forward all-gathers one
block's weights at a time and frees them after it (``reshard_after_forward``), backward reduce-scatters
the gradients, so each rank holds 1 / W of the weights, gradients and optimizer state. GaLoreAdamW steps
those row shards directly (dit_fast/optim/sharded.py); checkpoints go through
dit_fast.parallel.checkpoint (torch.distributed.checkpoint, resharding on load).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

MIXED_PRECISION = (None, "bf16")


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError as e:  # torch < 2.6 kept FSDP2 under a private name
        raise RuntimeError(f"apply_fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard): {e}") from None
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision_policy(mixed_precision: Optional[str]):
    """FSDP2's MixedPrecisionPolicy: "bf16" computes in bf16 (parameters all-gathered in bf16) and
    reduces gradients in fp32 into fp32 sharded parameters; None keeps fp32 throughout."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    _, MixedPrecisionPolicy, _ = _fsdp()
    if mixed_precision is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh, mixed_precision: Optional[str] = "bf16",
               reshard_after_forward: Union[bool, int] = True,
               blocks: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """Shards ``model`` in place with FSDP2 and returns it.

    mesh: a 1-D DeviceMesh (every rank holds 1 / W of each parameter) or a 2-D one, (replicate, shard),
      for HSDP (shards within a node, replicas across).
    mixed_precision: "bf16" (compute in bf16, reduce and keep parameters in fp32) or None (fp32).
    reshard_after_forward: free each block's gathered weights after its forward (True: least memory,
      backward gathers again), keep them (False), or an int: reshard to that smaller group size.
    blocks: the modules to shard one by one (default: ``model.blocks``, DiTVideo's transformer blocks);
      whatever they do not own (embeddings, final layer) is sharded with the root.
    Apply activation checkpointing and torch.compile to the blocks before this (torchtitan's order).
    """
    FSDPModule, _, fully_shard = _fsdp()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError("model is already sharded by fully_shard (apply_fsdp was called twice?)")
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim not in (1, 2):
        raise ValueError(f"mesh must be 1-D (FSDP) or 2-D (HSDP: replicate, shard), got {mesh.ndim} dimensions "
                         f"{mesh.mesh_dim_names}; pass the data-parallel sub-mesh (e.g. mesh['dp'])")
    if isinstance(reshard_after_forward, bool):
        pass
    elif not isinstance(reshard_after_forward, int) or reshard_after_forward < 1:
        raise ValueError(f"reshard_after_forward must be a bool or an int >= 1, got {reshard_after_forward!r}")
    policy = mixed_precision_policy(mixed_precision)
    if blocks is None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList: pass blocks= (the modules to "
                             "shard one by one, e.g. the transformer layers)")
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks[{i}] must be an nn.Module, got {type(block).__name__}")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # DiTVideoBlock returns its MLP branch as a view (nn.Linear's 3-D output) and never lets anything modify
    # it in place, which is what FSDP2's "returned a view tensor" warning is about; a copy per block to
    # silence it would cost an activation's read and write. That warning is ignored for DiTVideoBlock alone,
    # and only while FSDP's post-forward hook of such a block runs: the process-wide filters are left as
    # they were (fully_shard renames the class FSDPDiTVideoBlock).
    from dit_fast.models.dit_video import DiTVideoBlock

    for block in blocks:
        if isinstance(block, DiTVideoBlock):
            _quiet_returned_view(block)
    # the root: the parameters no block owns; its gathered weights are needed again first in backward
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in model.modules():  # sequence-parallel models: hook the sharded parameters' gradient sums
        plan = getattr(module, "sequence_parallel_plan", None)
        if plan is not None:
            plan.grad_sync.track(module, fsdp=True)
    return model


_RETURNED_VIEW = r"FSDP2-wrapped module \((FSDP)?DiTVideoBlock\) returned a view tensor"


def _quiet_returned_view(block: nn.Module) -> None:
    """Ignores FSDP2's returned-view warning inside ``block``'s post-forward hooks only: a forward hook put
    before FSDP's enters a warnings.catch_warnings() context, one after it (always called) leaves it."""
    contexts = []

    def enter(module, args, output):
        context = warnings.catch_warnings()
        context.__enter__()
        contexts.append(context)
        warnings.filterwarnings("ignore", message=_RETURNED_VIEW, category=UserWarning)

    def leave(module, args, output):
        if contexts:
            contexts.pop().__exit__(None, None, None)

    block.register_forward_hook(enter, prepend=True)
    block.register_forward_hook(leave, always_call=True)
