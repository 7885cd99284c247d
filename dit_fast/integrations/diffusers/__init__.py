"""dit_fast inside diffusers: an attention backend and in-place model patches for the video DiTs.

    import dit_fast.integrations.diffusers            # registers the "dit_fast" attention backend
    pipe.transformer.set_attention_backend("dit_fast")  # diffusers' dispatcher -> dit_fast.ops.attention
    dit_fast.patch(pipe.transformer)                   # or: RoPE, attention and fused adaLN, in place

Importing this package checks the installed diffusers against ``TESTED_DIFFUSERS`` (the range the
tests run on; the integration reaches into diffusers' dispatcher internals, which change between
minor releases) and raises ImportError outside it. ``DIT_FAST_ALLOW_UNTESTED_DIFFUSERS=1`` turns
that error into a warning. ``import dit_fast`` never imports this package.

Layout: backend.py (the registered attention backend, its fallback and context parallelism),
reach.py (which attention calls the backend reaches; the warning when it reaches none),
_processor.py (the processor skeleton and adaLN helpers every model module shares), generic.py
(diffusers' generic AttnProcessor2_0 on dit_fast's attention), one module per model family (wan.py
with VACE, Animate, SkyReels-V2 and ChronoEdit; hunyuan_video.py, hunyuan_video15.py, ltx.py, ltx2.py,
cosmos.py, cogvideox.py, consisid.py, mochi.py, easyanimate.py, allegro.py, latte.py), each with
``patch(model, backend)``; the registry from class name to module is
``dit_fast.integrations.DIFFUSERS_MODELS``.
"""

import importlib
import os
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from dit_fast import _backend
from dit_fast.integrations import DIFFUSERS_MODELS, diffusers_model_name

TESTED_DIFFUSERS = ">=0.42.1,<0.43"  # keep equal to pyproject's `diffusers` extra (a test checks)
ALLOW_ENV = "DIT_FAST_ALLOW_UNTESTED_DIFFUSERS"
INSTALL_HINT = f"pip install 'dit_fast[diffusers]' (diffusers{TESTED_DIFFUSERS})"


def check_diffusers_version(version: str) -> None:
    """ImportError naming the tested range when ``version`` is outside it (a warning with $ALLOW_ENV=1)."""
    try:
        inside = Version(version) in SpecifierSet(TESTED_DIFFUSERS)
    except InvalidVersion:
        inside = False
    if inside:
        return
    message = (f"dit_fast.integrations.diffusers is tested with diffusers{TESTED_DIFFUSERS} but diffusers "
               f"{version} is installed: {INSTALL_HINT}")
    if os.environ.get(ALLOW_ENV, "") == "1":
        warnings.warn(message + f" ({ALLOW_ENV}=1: continuing untested)", RuntimeWarning, stacklevel=3)
        return
    raise ImportError(message + f", or set {ALLOW_ENV}=1 to try it anyway")


try:
    import diffusers as _diffusers
except ImportError as _exc:
    raise ImportError(f"dit_fast.integrations.diffusers needs diffusers, which is not installed ({_exc}): "
                      f"{INSTALL_HINT}") from _exc
check_diffusers_version(getattr(_diffusers, "__version__", "unknown"))

from dit_fast.integrations.diffusers.backend import (BACKEND_NAME, backend_member,  # noqa: E402
                                                     dit_fast_attention, register_backend)
from dit_fast.integrations.diffusers.reach import install_set_attention_backend_hook, what_applies  # noqa: E402

register_backend()
install_set_attention_backend_hook()  # set_attention_backend("dit_fast") on a model it cannot reach warns

SUPPORTED_MODELS = tuple(DIFFUSERS_MODELS)


def patch(model, backend: str = "auto", sparse=None):
    """Patches a supported diffusers video transformer in place (what ``dit_fast.patch`` calls); returns it.
    sparse: a dit_fast.SparseAttention for Wan and HunyuanVideo's self-attention (sparse.py)."""
    _backend._check_name(backend, "backend")
    name = diffusers_model_name(model)
    if name is None:
        raise ValueError(f"dit_fast.patch has no plan for the diffusers model {type(model).__name__}; "
                         f"{what_applies(model)}; dit_fast.patch supports {', '.join(SUPPORTED_MODELS)}")
    module = importlib.import_module(f"{__name__}.{DIFFUSERS_MODELS[name]}")
    if sparse is not None:  # checked before anything is patched
        from dit_fast.integrations.diffusers import sparse as sparse_attention
        sparse_attention.check(name, sparse)
    model = module.patch(model, backend=backend)
    if sparse is not None:
        sparse_attention.install(model, name, sparse)
    return model


__all__ = ["BACKEND_NAME", "SUPPORTED_MODELS", "TESTED_DIFFUSERS", "backend_member", "check_diffusers_version",
           "dit_fast_attention", "patch", "register_backend"]
