"""Drop-ins for DiT's ``modulate(norm(x), shift, scale)`` and ``x + gate * y``."""

import torch
from torch import nn

from dit_fast import ops
from dit_fast._checks import check_backend, check_bool, check_fp32_positive, check_int


class ModulatedLayerNorm(nn.Module):
    """LayerNorm followed by adaLN modulation: ``forward(x, shift, scale) = LN(x) * (1 + scale) + shift``.

    ``elementwise_affine=False`` with eps=1e-6 is DiT's ``nn.LayerNorm(hidden, elementwise_affine=False,
    eps=1e-6)``; a DiT state dict has no parameters for it, so loading stays key-compatible.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = False, backend: str = "auto"):
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.eps = check_fp32_positive("eps", eps)
        self.backend = check_backend(backend)
        if check_bool("elementwise_affine", elementwise_affine):
            self.weight = nn.Parameter(torch.ones(hidden_size))
            self.bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x, shift, scale):
        return ops.layernorm_modulate(x, shift, scale, weight=self.weight, bias=self.bias, eps=self.eps,
                                      backend=self.backend)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class GatedResidual(nn.Module):
    """``forward(x, gate, y) = x + gate * y``, adaLN-Zero's gated residual."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)

    def forward(self, x, gate, y):
        return ops.gated_residual(x, gate, y, backend=self.backend)
