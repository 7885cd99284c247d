"""Parameter groups for GaLoreAdamW and the bytes of its state, per parameter."""

from __future__ import annotations

import math
from typing import Optional

import torch

from dit_fast.optim import reference as ref
from dit_fast.optim.checks import STATE_TORCH_DTYPES as _STATE_TORCH_DTYPES
from dit_fast.optim.galore import resolve_side

DEFAULT_TARGETS = ("attn", "attention", "mlp", "ffn", "feed_forward")


def galore_param_groups(model: torch.nn.Module, rank: int = 128, target=DEFAULT_TARGETS, update_proj_gap: int = 200,
                        scale: float = 0.25, proj_type: str = "std", min_dim: Optional[int] = None,
                        weight_decay: Optional[float] = None, **group_options) -> list:
    """[projected group, plain group] for ``GaLoreAdamW``.

    A parameter goes to the projected group when it is the 2-D ``weight`` of an ``nn.Linear`` whose
    qualified module name matches ``target`` and whose smaller dimension exceeds ``min_dim``
    (default: ``rank``; a smaller matrix would need more state projected than plain). Everything
    else (biases, norms, embeddings, convolutions, small or non-matching linears) goes to the plain
    group. ``target``: an iterable of substrings of the module name (default: attention and MLP
    names), "linear" for every Linear, or a callable ``(name, module) -> bool``. In DiT the adaLN
    modulation linears (D -> 6 D per block) hold a third of the parameters: pass
    ``target=("attn", "mlp", "adaLN_modulation")`` or ``"linear"`` to project them too
    (benchmarks/galore_memory.py: DiT-XL/2 at rank 256 keeps 51% of AdamW's state bytes with the
    default target and 26% with every linear projected, 9% with int8 moments).
    Extra keyword arguments become keys of both groups (for example ``state_dtype``).
    """
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    if isinstance(target, str) and target != "linear":
        target = (target,)
    if not (target == "linear" or callable(target) or isinstance(target, (tuple, list, set))):
        raise TypeError("target must be 'linear', a callable (name, module) -> bool, or an iterable of substrings")
    min_dim = rank if min_dim is None else min_dim

    def matches(name: str, module: torch.nn.Module) -> bool:
        if target == "linear":
            return True
        if callable(target):
            return bool(target(name, module))
        return any(t in name for t in target)

    projected, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and matches(name, module):
            w = module.weight
            if w.requires_grad and w.dim() == 2 and min(w.shape) > min_dim and id(w) not in seen:
                projected.append(w)
                seen.add(id(w))
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    extra = dict(group_options)
    if weight_decay is not None:
        extra["weight_decay"] = weight_decay
    groups = []
    if projected:
        groups.append(dict(params=projected, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                           proj_type=proj_type, **extra))
    if plain:
        groups.append(dict(params=plain, **extra))
    return groups


def state_bytes_for(shape, param_dtype: torch.dtype = torch.float32, rank: Optional[int] = None,
                    proj_type: str = "std", state_dtype: str = "fp32") -> int:
    """Bytes of the state tensors GaLoreAdamW allocates for one parameter (moments, absmaxes, bases).

    ``rank=None``: a plain (non-projected) parameter. Mirrors the allocation in ``_step_param``; plain
    Python values in the state (step, side, refresh count) are not tensors and not counted.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    basis = 0
    low_shape = shape
    if rank is not None and len(shape) == 2:
        m, n = shape
        k = min(rank, m, n)
        side = resolve_side(proj_type, shape)
        item = torch.empty((), dtype=param_dtype).element_size()
        if side == "right":
            low_shape, basis = (m, k), k * n * item
        elif side == "left":
            low_shape, basis = (k, n), m * k * item
        else:
            low_shape, basis = (k, k), (m * k + k * n) * item
    low = math.prod(low_shape)
    if state_dtype == "int8":
        return basis + 2 * low + 2 * 4 * (-(-low // ref.QBLOCK))
    return basis + 2 * low * _STATE_TORCH_DTYPES[state_dtype].itemsize
