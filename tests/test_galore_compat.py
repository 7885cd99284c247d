"""GaLoreAdamW vs galore-torch's GaLoreAdamW: same trajectory over 20 steps across refreshes.

galore-torch's package __init__ imports bitsandbytes (for its 8-bit optimizer) and its adamw.py
imports transformers only for ``require_version``. Neither is needed for GaLoreAdamW, so when the
plain import fails for that reason we load its two module files (adamw.py, galore_projector.py)
directly, with a no-op ``require_version``. The test is skipped only when galore-torch is absent
(`pip install galore-torch --no-deps` installs it without pulling torch, transformers or
bitsandbytes).
"""

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from dit_fast.optim import GaLoreAdamW


def _load_module(name, path, package):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def galore_torch_adamw():
    try:
        from galore_torch import GaLoreAdamW as Theirs

        return Theirs
    except ImportError:
        pass
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("galore-torch is not installed (`pip install galore-torch --no-deps`)")
    root = Path(list(spec.submodule_search_locations)[0])
    package = "_galore_torch_files"
    if f"{package}.adamw" in sys.modules:
        return sys.modules[f"{package}.adamw"].AdamW
    pkg = types.ModuleType(package)
    pkg.__path__ = [str(root)]
    sys.modules[package] = pkg
    shim = {name: types.ModuleType(name) for name in ("transformers", "transformers.utils", "transformers.utils.versions")}
    shim["transformers.utils.versions"].require_version = lambda *a, **k: None
    saved = {name: sys.modules.get(name) for name in shim}
    sys.modules.update(shim)
    try:
        _load_module(f"{package}.galore_projector", root / "galore_projector.py", package)
        adamw = _load_module(f"{package}.adamw", root / "adamw.py", package)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return adamw.AdamW


def _model(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.1)
    b = torch.nn.Parameter(torch.randn(shape[0], generator=g) * 0.1)
    x = torch.randn(64, shape[1], generator=g)
    y = torch.randn(64, shape[0], generator=g)
    return [w, b], x, y


def _loss(params, x, y):
    w, b = params
    return ((torch.tanh(x @ w.t() + b) - y) ** 2).mean()


def _groups(params, rank, proj_type, gap, scale):
    return [dict(params=[params[0]], rank=rank, update_proj_gap=gap, scale=scale, proj_type=proj_type),
            dict(params=[params[1]])]


@pytest.mark.parametrize("shape", [(37, 53), (53, 37)])
@pytest.mark.parametrize("proj_type,rank", [("std", 8), ("reverse_std", 8), ("left", 8), ("right", 8), ("full", 8),
                                            ("std", 64)])
def test_trajectory_matches_galore_torch(shape, proj_type, rank):
    Theirs = galore_torch_adamw()
    ours_p, x, y = _model(shape, 1)
    theirs_p, _, _ = _model(shape, 1)
    kw = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = Theirs(_groups(theirs_p, rank, proj_type, 7, 0.5), no_deprecation_warning=True, **kw)
    ours = GaLoreAdamW(_groups(ours_p, rank, proj_type, 7, 0.5), weight_decay_mode="galore", backend="torch", **kw)
    for step in range(20):  # refreshes at steps 0, 7, 14
        for opt, params in ((ours, ours_p), (theirs, theirs_p)):
            opt.zero_grad()
            _loss(params, x, y).backward()
            opt.step()
        for a, b in zip(ours_p, theirs_p):
            # same ops in the same order: equal to fp32 rounding (in practice bitwise)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {step}")
    moved = (ours_p[0] - _model(shape, 1)[0][0]).abs().max()
    assert moved > 1e-2, "the weights did not move: the comparison would be vacuous"
