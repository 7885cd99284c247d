"""fp32 partial sums of the adaLN backward, shared by its Triton and CUDA launchers.

Each backward program owns a chunk of the rows of one modulation group and writes its partial sums
of the per-group gradients (dshift, dscale, dgate) and of the per-column ones (dweight, dbias), each
as (B * G, chunks, C) fp32. The launcher then adds the partials (Liger's per-program partial sums).
"""

from typing import NamedTuple, Optional

import torch


class AdalnPartials(NamedTuple):
    dshift: Optional[torch.Tensor]
    dscale: Optional[torch.Tensor]
    dgate: Optional[torch.Tensor]
    dweight: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]


def allocate(num_groups_total, chunks, C, device, has_norm, has_residual, has_weight, has_bias) -> AdalnPartials:
    """Uninitialised buffers (every kernel program writes its whole row); None where a flag is off."""
    def partial(flag):
        return torch.empty((num_groups_total, chunks, C), device=device, dtype=torch.float32) if flag else None

    return AdalnPartials(partial(has_norm), partial(has_norm), partial(has_residual), partial(has_weight),
                         partial(has_bias))


def reduce(partials: AdalnPartials, B, G, C, dtype, weight, bias):
    """(dgate, dshift, dscale) as (B, G, C) in ``dtype``; (dweight, dbias) as (C,) in the parameters' dtype."""
    def per_group(p):
        return None if p is None else p.sum(dim=1).view(B, G, C).to(dtype)

    def per_column(p, param):
        return None if p is None else p.sum(dim=(0, 1)).to(param.dtype)

    return (per_group(partials.dgate), per_group(partials.dshift), per_group(partials.dscale),
            per_column(partials.dweight, weight), per_column(partials.dbias, bias))
