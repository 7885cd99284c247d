"""GaLoreAdamW vs galore-torch's GaLoreAdamW: same trajectory over 20 steps across refreshes.

galore-torch's package __init__ imports bitsandbytes (for its 8-bit optimizer) and its adamw.py
imports transformers only for ``require_version``. Neither is needed for GaLoreAdamW, so when the
plain import fails for that reason we load its two module files (adamw.py, galore_projector.py)
directly, with a no-op ``require_version``. The comparison with the package is skipped only when
galore-torch is absent (`pip install galore-torch --no-deps` installs it without pulling torch,
transformers or bitsandbytes; its declared dependencies make it unfit for the test extra); the same
comparison against ``GaLoreTorchMath``, an independent transcription of its step, always runs.
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


class GaLoreTorchMath(torch.optim.Optimizer):
    """galore-torch's GaLoreAdamW step written out independently of dit_fast (its projector's side rules,
    SVD refresh at step % gap == 0, HF AdamW with eps outside the bias correction, scale after the
    project-back, decay of the updated weight), so that the comparison also runs where the package
    is not installed."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _svd(g, rank, kind):
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        return {"right": vh[:rank, :], "left": u[:, :rank], "full": (u[:, :rank], vh[:rank, :])}[kind]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st, g = self.state[p], p.grad
                st.setdefault("step", 0)
                if "rank" in group:
                    m, n = g.shape
                    kind = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(
                        group["proj_type"], group["proj_type"])
                    if "ortho" not in st or st["step"] % group["update_proj_gap"] == 0:
                        st["ortho"] = self._svd(g, group["rank"], kind)
                    o = st["ortho"]
                    g = {"right": lambda: g @ o.t(), "left": lambda: o.t() @ g,
                         "full": lambda: (o[0].t() @ g) @ o[1].t()}[kind]()
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                b1, b2 = group["betas"]
                st["step"] += 1
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = group["lr"] * (1 - b2 ** st["step"]) ** 0.5 / (1 - b1 ** st["step"])
                norm = st["exp_avg"] / st["exp_avg_sq"].sqrt().add_(group["eps"])
                if "rank" in group:
                    o = st["ortho"]
                    norm = {"right": lambda: norm @ o, "left": lambda: o @ norm,
                            "full": lambda: (o[0] @ norm) @ o[1]}[kind]() * group["scale"]
                p.add_(norm, alpha=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


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


@pytest.mark.parametrize("against", ["galore-torch", "transcript"])
@pytest.mark.parametrize("shape", [(37, 53), (53, 37)])
@pytest.mark.parametrize("proj_type,rank", [("std", 8), ("reverse_std", 8), ("left", 8), ("right", 8), ("full", 8),
                                            ("std", 64)])
def test_trajectory_matches_galore_torch(against, shape, proj_type, rank):
    ours_p, x, y = _model(shape, 1)
    theirs_p, _, _ = _model(shape, 1)
    kw = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    if against == "galore-torch":
        Theirs = galore_torch_adamw()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            theirs = Theirs(_groups(theirs_p, rank, proj_type, 7, 0.5), no_deprecation_warning=True, **kw)
    else:
        theirs = GaLoreTorchMath(_groups(theirs_p, rank, proj_type, 7, 0.5), **kw)
    # plain_step="galore": galore-torch steps the bias (a group without rank) with HF AdamW's bias correction
    ours = GaLoreAdamW(_groups(ours_p, rank, proj_type, 7, 0.5), weight_decay_mode="galore", plain_step="galore",
                       backend="torch", **kw)
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
