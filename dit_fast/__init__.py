"""dit_fast: fused Triton and CUDA kernels for video Diffusion Transformers.

    import dit_fast
    y = dit_fast.ops.layernorm_modulate(x, shift, scale)          # fused adaLN
    with dit_fast.use_backend("torch"): ...                         # pick a backend for a block
    dit_fast.patch(dit_model)                                       # fused ops into a DiT, in place
"""

__version__ = "0.1.0"

from dit_fast import _extension  # noqa: F401  (logs why the CUDA extension is missing, never raises)
from dit_fast._backend import BACKENDS, BackendUnavailableError, use_backend
from dit_fast import ops, nn  # noqa: E402
from dit_fast.models.patching import patch  # noqa: E402  (dit_fast.patch(model): fused ops into a DiT)

__all__ = ["ops", "nn", "patch", "use_backend", "BACKENDS", "BackendUnavailableError", "__version__"]
