"""dit_fast: fused Triton and CUDA kernels for video Diffusion Transformers.

    import dit_fast
    y = dit_fast.ops.layernorm_modulate(x, shift, scale)          # fused adaLN
    with dit_fast.use_backend("torch"): ...                         # pick a backend for a block
    dit_fast.patch(dit_model)                                       # fused ops into a DiT, in place
    opt = dit_fast.optim.GaLoreAdamW(params, rank=128)              # subpackages load on first use

``ops`` and ``nn`` load with the package; ``models``, ``diffusion``, ``optim``, ``integrations``,
``parallel`` (and ``data``, ``train``, ``generate``, ``cli``) load on first attribute access, so
``import dit_fast`` pulls in neither the models, the optimizer nor diffusers.
"""

import importlib

__version__ = "0.1.0"

from dit_fast import _extension  # noqa: F401,E402  (logs why the CUDA extension is missing, never raises)
from dit_fast._backend import BACKENDS, BackendUnavailableError, use_backend  # noqa: E402
from dit_fast import ops, nn  # noqa: E402

# Imported on first access (module __getattr__, PEP 562): name -> module, or (module, attribute).
_LAZY_SUBMODULES = ("models", "diffusion", "optim", "integrations", "parallel", "sparse", "data", "train", "generate",
                    "cli")
_LAZY_ATTRIBUTES = {"patch": ("dit_fast.models.patching", "patch"),  # dit_fast.patch(model)
                    "SparseAttention": ("dit_fast.sparse.config", "SparseAttention")}  # patch(..., sparse=...)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import also sets it on this package
    if name in _LAZY_ATTRIBUTES:
        module, attribute = _LAZY_ATTRIBUTES[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | set(_LAZY_ATTRIBUTES))


__all__ = ["ops", "nn", "models", "diffusion", "optim", "integrations", "parallel", "sparse", "patch",
           "SparseAttention", "use_backend",
           "BACKENDS", "BackendUnavailableError", "__version__"]
