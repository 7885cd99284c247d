"""Block-sparse self-attention in patched diffusers video transformers: ``dit_fast.patch(model, sparse=...)``.

    sparse = dit_fast.SparseAttention(pattern="sliding_tile", density=0.25, dense_steps=10)
    dit_fast.patch(pipe.transformer, sparse=sparse)    # WanTransformer3DModel, HunyuanVideoTransformer3DModel

``install`` runs after the family's own patch: it gives the model a ``SparseRuntime``
(dit_fast/sparse/runtime.py), a forward pre-hook that reads the denoising step from the ``timestep``
argument (``TimestepRecorder``), and each self-attention processor a ``SparseLayer`` (its layer index
in ``SELF_ATTENTION``'s order). ``DitFastProcessor.attend`` asks the layer first; None means dense at
this step, and the processor's usual path (diffusers' dispatcher) runs.

The layout of a call: the processor's recorded (T, H, W) grid, and ``extra`` = the tokens after the
video ones (HunyuanVideo's text in its joint attention; Wan has none); the text key-padding mask
(B, 1, 1, N) becomes the op's (B, S) mask. Tokens stay in the model's raster order (the op gathers
into tile order and back).

Context parallelism (``model.enable_parallelism``): Ulysses exchanges q, k, v here (all-to-all over
its mesh: the whole sequence, heads / N per rank), runs this rank's heads' blocks, and exchanges the
output back; ring attention is refused with a ValueError (a ring step would need the blocks of every
(query chunk, key chunk) pair).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from dit_fast.integrations.diffusers.backend import key_padding_mask
from dit_fast.ops.flash_attention import attention
from dit_fast.sparse.config import SparseAttention
from dit_fast.sparse.runtime import SparseRuntime

# class name -> the self-attention modules whose processors go sparse, in layer order
SELF_ATTENTION: Dict[str, Callable[[nn.Module], List[nn.Module]]] = {
    "WanTransformer3DModel": lambda m: [block.attn1 for block in m.blocks],
    "HunyuanVideoTransformer3DModel": lambda m: ([block.attn for block in m.transformer_blocks]
                                                 + [block.attn for block in m.single_transformer_blocks]),
}


class TimestepRecorder:
    """The transformer's forward pre-hook: the runtime's step from the call's ``timestep`` (keyword, or
    the second positional argument); no schedule while the model trains with gradients."""

    def __init__(self, runtime: SparseRuntime):
        self.runtime = runtime

    def __call__(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1] if len(args) > 1 else None
        training = module.training and torch.is_grad_enabled()
        if timestep is not None or training:
            self.runtime.observe(timestep, training=training)


class SparseLayer:
    """What a sparse self-attention processor asks first: (runtime, layer index)."""

    def __init__(self, runtime: SparseRuntime, layer: int):
        self.runtime, self.layer = runtime, layer

    def attend(self, processor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
               parallel: bool) -> Optional[Tensor]:
        """Block-sparse attention of q, k, v (B, S, heads, D), or None: the processor's dense path runs."""
        grid = None if processor.grid is None else processor.grid.grid
        if grid is None or not self.runtime.is_sparse(self.layer):
            self.runtime.last_blocks[self.layer] = None  # dense at this step
            return None
        config = processor._parallel_config
        cp = config.context_parallel_config if parallel and config is not None else None
        if cp is not None and cp.ring_degree > 1:
            raise ValueError(f"sparse attention (dit_fast.patch(..., sparse=...)) does not run under ring context "
                             f"parallelism (ring_degree = {cp.ring_degree}): use ulysses_degree (each rank whole "
                             "heads), or patch without sparse=")
        B, S, heads, _ = query.shape
        group, first, total = None, 0, heads
        if cp is not None and cp.ulysses_degree > 1:
            from dit_fast.parallel import comm

            group = cp._ulysses_mesh.get_group()
            rank = comm.group_rank(group)
            local_keys = key.shape[1]
            query, key, value = (comm.all_to_all(t, scatter_dim=2, gather_dim=1, group=group)
                                 for t in (query, key, value))  # (B, S, heads / N, D): every token
            if attn_mask is not None and attn_mask.shape[-1] == local_keys:  # sharded with the keys: gathered,
                attn_mask = _gather_mask(attn_mask, group)  # as diffusers' Ulysses does
            S, first, total = query.shape[1], rank * query.shape[2], heads  # this rank's heads of all the heads
            heads = query.shape[2]
        extra = S - math.prod(grid)
        if extra < 0:
            raise ValueError(f"sparse attention: the recorded token grid {grid} has {math.prod(grid)} tokens but "
                             f"the attention sees {S}: a sequence shard without Ulysses context parallelism")
        kpm, reason = key_padding_mask(attn_mask, B, heads, S, S)
        if reason is not None:
            warnings.warn(f"dit_fast sparse attention: layer {self.layer} runs dense ({reason})", RuntimeWarning,
                          stacklevel=2)
            if group is None:
                return None  # the processor's own path, with the mask
            # q, k, v hold every token already: diffusers' attention on them with the whole mask, then back
            return _exchange_back(_dense_with_mask(processor, query, key, value, attn_mask), group)
        layout = self.runtime.config.layout(grid, extra)
        with processor.ops_backend():
            out = self.runtime.attend(self.layer, query, key, value, layout, key_padding_mask=kpm,
                                      backend=processor.backend, heads=(first, total), group=group)
            if group is None:
                return out
            if out is None:  # every local head chose dense: the exchange is done, so run it here
                out = attention(query, key, value, key_padding_mask=kpm, backend=processor.backend)
        return _exchange_back(out, group)


def _dense_with_mask(processor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor) -> Tensor:
    """Dense attention of exchanged q, k, v (B, S, heads / N, D) with a mask that is no key padding mask, through
    diffusers' dispatcher on this processor's backend (what diffusers' Ulysses runs after its exchange)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from dit_fast.integrations.diffusers.backend import backend_member

    with processor.ops_backend():
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask,
                                     backend=processor._attention_backend or backend_member())


def _exchange_back(out: Tensor, group) -> Tensor:
    from dit_fast.parallel import comm

    return comm.all_to_all(out, scatter_dim=1, gather_dim=2, group=group)  # (B, S / N, heads, D)


def _gather_mask(attn_mask: Tensor, group) -> Tensor:
    """A key mask sharded with the keys (..., S / N) -> the whole (..., S) (diffusers' Ulysses gathers it too)."""
    from dit_fast.parallel import comm

    return comm.gather_tokens(attn_mask, attn_mask.dim() - 1, group)


def check(name: str, sparse) -> None:
    """The model class takes sparse attention and ``sparse`` is a SparseAttention (before any patching)."""
    if not isinstance(sparse, SparseAttention):
        raise TypeError(f"sparse must be a dit_fast.SparseAttention, got {type(sparse).__name__}")
    if name not in SELF_ATTENTION:
        raise ValueError(f"dit_fast.patch(..., sparse=...) supports {', '.join(SELF_ATTENTION)}; got {name} (patch it "
                         "without sparse=)")


def install(model: nn.Module, name: str, sparse: SparseAttention) -> int:
    """Gives a patched ``model`` (diffusers class ``name``) sparse self-attention; returns the layer count."""
    check(name, sparse)
    modules = SELF_ATTENTION[name](model)
    if any(i >= len(modules) for i in sparse.dense_layers):
        raise ValueError(f"sparse.dense_layers {sparse.dense_layers} names layers past the model's {len(modules)} "
                         "self-attention layers (0-based)")
    from dit_fast.integrations.diffusers._processor import DitFastProcessor

    unpatched = [i for i, m in enumerate(modules) if not isinstance(m.processor, DitFastProcessor)]
    if unpatched:  # a processor dit_fast did not install would ignore the sparse layer: never silently dense
        raise ValueError(f"sparse attention: self-attention layers {unpatched} of this {name} do not run dit_fast's "
                         "processor (a variant dit_fast.patch leaves as it is)")
    runtime = SparseRuntime(sparse, name)
    for layer, module in enumerate(modules):
        module.processor.sparse = SparseLayer(runtime, layer)
    model.register_forward_pre_hook(TimestepRecorder(runtime), with_kwargs=True)
    model._dit_fast_sparse = runtime
    return len(modules)


__all__ = ["SELF_ATTENTION", "SparseLayer", "TimestepRecorder", "check", "install"]
