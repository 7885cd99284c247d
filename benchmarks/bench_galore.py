"""GaLoreAdamW benchmarks: the optimizer step (excluding refresh) and the subspace refresh.

Step, same weight, gradient and basis for every provider in one run (fp32 weights, fp32 moments):
  ours-triton          GaLoreAdamW(backend="triton", kernel="hybrid"): cuBLAS down-projection, Triton
                       Adam on the low-rank gradient, Triton up-projection with the weight update fused
  ours-triton-fused    kernel="fused": Triton down-projection with the Adam epilogue, same up-projection
  ours-triton-int8     hybrid with 8-bit moments
  ours-cuda            CUDA Adam step (csrc/galore.cu) + cuBLAS addmm epilogue
  galore-torch         galore-torch's GaLoreAdamW (when installed)
  eager                the same math written plainly in PyTorch (project, Adam, project back, decay, add)
shapes 4096x4096 and 4096x11008 at rank 128 and 512; the refresh never runs inside the timed region.
Step FLOPs: 2 matmuls of 2 * m * n * r each.

Refresh (GPU: 4096x4096, rank 128; CPU: 1024x1024, rank 32, one thread): torch.linalg.svd vs the randomized
refresh (subspace iteration, cold and warm-started from the previous basis), time and captured energy
||P G||^2 / ||G||^2 relative to the exact SVD's. The gradient has a decaying spectrum plus noise.

    python -m benchmarks.bench_galore [--quick] [--device cuda|cpu] [--only step|refresh]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from dit_fast import _backend
from dit_fast.optim import GaLoreAdamW
from dit_fast.optim import reference as ref

OP = "galore"
STEP_SHAPES = ((4096, 4096), (4096, 11008))
RANKS = (128, 512)
STEP_PROVIDERS = ("ours-triton", "ours-triton-fused", "ours-triton-int8", "ours-cuda", "galore-torch", "eager")
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-6, 0.01


def galore_torch_adamw():
    """galore-torch's AdamW class, or None. Its __init__ imports bitsandbytes and its adamw.py imports
    transformers for ``require_version`` only: when those are missing, load the two files directly."""
    try:
        from galore_torch import GaLoreAdamW as Theirs

        return Theirs
    except ImportError:
        pass
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    package = "_galore_torch_files"
    if f"{package}.adamw" not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(root)]
        sys.modules[package] = pkg
        names = ("transformers", "transformers.utils", "transformers.utils.versions")
        saved = {n: sys.modules.get(n) for n in names}
        shim = {n: types.ModuleType(n) for n in names}
        shim["transformers.utils.versions"].require_version = lambda *a, **k: None
        sys.modules.update(shim)
        try:
            for name in ("galore_projector", "adamw"):
                s = importlib.util.spec_from_file_location(f"{package}.{name}", root / f"{name}.py")
                module = importlib.util.module_from_spec(s)
                module.__package__ = package
                sys.modules[f"{package}.{name}"] = module
                s.loader.exec_module(module)
        finally:
            for n, m in saved.items():
                if m is None:
                    sys.modules.pop(n, None)
                else:
                    sys.modules[n] = m
    return sys.modules[f"{package}.adamw"].AdamW


# ------------------------------------------------------------------ step


class EagerGaLore:
    """The GaLore AdamW step written plainly in PyTorch (what a user would write), fixed basis."""

    def __init__(self, w, basis, side):
        self.w, self.basis, self.side = w, basis, side
        low = ref.project(torch.zeros_like(w), side, (basis,))
        self.m, self.v, self.t = torch.zeros_like(low), torch.zeros_like(low), 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        r = ref.project(self.w.grad, self.side, (self.basis,))
        self.m.mul_(BETAS[0]).add_(r, alpha=1 - BETAS[0])
        self.v.mul_(BETAS[1]).addcmul_(r, r, value=1 - BETAS[1])
        n = self.m / (self.v.sqrt() + EPS)
        update = ref.project_back(n, self.side, (self.basis,))
        step_size = LR * (1 - BETAS[1] ** self.t) ** 0.5 / (1 - BETAS[0] ** self.t)
        self.w.mul_(1 - LR * WD).add_(update, alpha=-step_size)


def setup_step(provider: str, shape, rank: int, device) -> Optional[Callable[[], object]]:
    """fn() runs one optimizer step (the first step, with its refresh, has already run)."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, generator=g, device=device) * 0.02)
    w.grad = torch.randn(shape, generator=g, device=device) * 1e-3
    group = dict(params=[w], rank=rank, update_proj_gap=10 ** 9, scale=1.0, proj_type="std")
    if provider == "eager":
        side = "right" if shape[0] >= shape[1] else "left"
        opt = EagerGaLore(w, ref.svd_basis(w.grad, rank, side, torch.float32)[0], side)
    elif provider == "galore-torch":
        theirs = galore_torch_adamw()
        if theirs is None:
            return None
        opt = theirs([group], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, no_deprecation_warning=True)
    else:
        backend = "cuda" if provider == "ours-cuda" else "triton"
        kernel = "fused" if provider.endswith("fused") else "hybrid"
        state_dtype = "int8" if provider.endswith("int8") else "fp32"
        opt = GaLoreAdamW([group], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend=backend, kernel=kernel,
                          state_dtype=state_dtype)
    opt.step()  # refresh + state allocation outside the timed region
    return opt.step


def provider_unavailable(provider: str, device) -> Optional[str]:
    device = torch.device(device)
    if provider.startswith("ours-"):
        return _backend.unavailable_reason("cuda" if provider == "ours-cuda" else "triton", device)
    if provider == "galore-torch" and galore_torch_adamw() is None:
        return "galore-torch is not installed (pip install galore-torch --no-deps)"
    return None


def run_step(device, quick: bool, write: bool) -> List[dict]:
    rows = []
    shapes = STEP_SHAPES[:1] if quick else STEP_SHAPES
    providers = [p for p in STEP_PROVIDERS if not provider_unavailable(p, device)]
    for p in STEP_PROVIDERS:
        if p not in providers:
            print(f"[galore] skipping {p}: {provider_unavailable(p, device)}")
    for shape in shapes:
        for rank in RANKS:
            for provider in providers:
                if common.out_of_time():
                    return rows
                fn = setup_step(provider, shape, rank, device)
                timing = common.time_fn(fn, device)
                flops = 2 * 2 * shape[0] * shape[1] * rank
                rows.append(common.make_row(OP, "step", provider, {"m": shape[0], "n": shape[1], "rank": rank},
                                            torch.float32, timing, device=device, flops=flops))
                del fn
                torch.cuda.empty_cache()
    if write:
        common.write_rows(rows, OP)
    common.print_ratio_table(rows, metric="tflops")
    return rows


# ------------------------------------------------------------------ refresh


def make_gradient(m, n, device, seed=0):
    """A gradient-like matrix: a decaying spectrum (s_i ~ 1 / (1 + i / 8)) on 4 r directions plus noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n, 512)
    decay = 1.0 / (1.0 + torch.arange(k, device=device, dtype=torch.float32) / 8)
    a = torch.randn(m, k, generator=g, device=device) * decay
    return a @ torch.randn(k, n, generator=g, device=device) / n ** 0.5 + 0.05 * torch.randn(m, n, generator=g, device=device) / n ** 0.5


def run_refresh(device, quick: bool, write: bool) -> List[dict]:
    device = torch.device(device)
    m, n, rank = (4096, 4096, 128) if device.type == "cuda" else (1024, 1024, 32)
    threads = None
    if device.type != "cuda":
        # one thread: on a shared machine MKL's OpenMP threads oversubscribe the cores and the SVD's
        # time swings by ~100x; single-threaded times are stable and comparable between providers
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    grad = make_gradient(m, n, device)
    previous = ref.svd_basis(make_gradient(m, n, device, seed=0) + 0.1 * make_gradient(m, n, device, seed=1),
                             rank, "right", torch.float32)  # last refresh's basis: a nearby gradient
    exact_basis = ref.svd_basis(grad, rank, "right", torch.float32)
    exact_energy = ref.captured_energy(grad, "right", exact_basis)
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = {
        "torch.linalg.svd": lambda: ref.svd_basis(grad, rank, "right", torch.float32),
        "randomized-cold-2it": lambda: ref.randomized_basis(grad, rank, "right", torch.float32, iters=2, generator=gen),
        "randomized-warm-1it": lambda: ref.randomized_basis(grad, rank, "right", torch.float32, previous=previous,
                                                            iters=1, generator=gen),
        "randomized-warm-2it": lambda: ref.randomized_basis(grad, rank, "right", torch.float32, previous=previous,
                                                            iters=2, generator=gen),
    }
    rows = []
    for name, fn in cases.items():
        timing = common.time_fn(fn, device, warmup_ms=50 if device.type == "cuda" else 0, rep_ms=200,
                                min_reps=3 if device.type != "cuda" else 10)
        energy = ref.captured_energy(grad, "right", fn())
        provider = "baseline-svd" if name == "torch.linalg.svd" else f"ours-{name}"
        rows.append(common.make_row(OP, "refresh", provider, {"m": m, "n": n, "rank": rank}, torch.float32, timing,
                                    device=device, captured_energy=energy, energy_vs_svd=energy / exact_energy,
                                    cpu_threads=1 if device.type != "cuda" else None))
    if threads is not None:
        torch.set_num_threads(threads)
    base = rows[0]["median_ms"]
    print(f"[galore] refresh {m}x{n} rank {rank} on {common.device_name(device)}")
    for r in rows:
        print(f"  {r['provider']:28s} {r['median_ms']:10.2f} ms  {base / r['median_ms']:6.1f}x faster than svd   "
              f"energy {r['captured_energy']:.4f} ({r['energy_vs_svd']:.2%} of svd's)")
    if write:
        common.write_rows(rows, OP)
    return rows


def run(device="cuda", quick: bool = False, only: Optional[str] = None, write: bool = True) -> List[dict]:
    device = torch.device(device)
    if not common.require_cuda(device):
        return []
    rows = []
    if only in (None, "refresh"):
        rows += run_refresh(device, quick, write)
    if only in (None, "step") and device.type == "cuda":
        rows += run_step(device, quick, write)
    elif only == "step":
        print("[galore] step timings are GPU numbers (the Triton/CUDA kernels); skipped on CPU")
    return rows


def smoke() -> None:
    """Tiny CPU check: the eager baseline computes what GaLoreAdamW's reference path computes."""
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(40, 24))
    w2 = torch.nn.Parameter(w1.detach().clone())
    w1.grad = torch.randn(40, 24)
    w2.grad = w1.grad.clone()
    ours = GaLoreAdamW([dict(params=[w1], rank=6, update_proj_gap=100, scale=1.0, proj_type="std")], lr=LR,
                       betas=BETAS, eps=EPS, weight_decay=WD, backend="torch")
    eager = EagerGaLore(w2, ref.svd_basis(w2.grad, 6, "right", torch.float32)[0], "right")
    for _ in range(3):
        ours.step()
        eager.step()
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    print("[galore] smoke: the eager baseline matches GaLoreAdamW's reference (fp32, 40x24, rank 6)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (refresh comparison only)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("step", "refresh"), default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not common.require_cuda(args.device):
        return 0
    run(args.device, quick=args.quick, only=args.only, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
