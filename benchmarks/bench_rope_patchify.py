"""Memory-bound companions of spacetime attention: standalone 3D RoPE and 3D patchify / unpatchify.

Per kernel backend of ours ("ours-triton", "ours-cuda" where the extension is built) against the
package's readable PyTorch reference run eagerly ("eager": ``apply_rope_3d_reference`` /
``patchify_3d_reference`` / ``unpatchify_3d_reference``) and ``torch.compile`` of that same
reference ("compile"), on the same inputs in one run; median and 20/80 % quantiles; GB/s from the
byte count in ``nbytes``; the device's copy bandwidth measured in the same run as the ceiling.
The eager RoPE reference recomputes its angles every call; "eager-table" is the way models run
RoPE eagerly (Wan, CogVideoX): cos/sin tables (S, D / 2) built once, outside the timed region, then
the rotation as PyTorch elementwise ops in fp32.

    python -m benchmarks.bench_rope_patchify [--quick] [--device cuda|cpu] [--ops rope,patchify]
    python -m benchmarks.run --ops rope,patchify      # through the shared runner

On a machine without a CUDA GPU it prints that GPU numbers need a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common

GPU_PROVIDERS = ("ours-triton", "ours-cuda", "eager", "eager-table", "compile")
CPU_PROVIDERS = ("ours-torch", "eager")  # ours-torch is what backend="auto" runs on CPU


@dataclass(frozen=True)
class Case:
    op: str  # "rope_3d" | "patchify_3d" | "unpatchify_3d"
    variant: str  # "fwd" | "bwd" | "fwd+bwd"
    shape: Tuple[int, ...]  # rope: (B, S, heads, D); patchify: video (B, C, T, H, W)
    grid: Tuple[int, int, int]  # rope: token grid; patchify: patch (pt, ph, pw)
    order: str = ""  # patchify feature order
    dtype: torch.dtype = torch.bfloat16

    @property
    def family(self) -> str:
        return "rope" if self.op == "rope_3d" else "patchify"

    def shape_dict(self) -> dict:
        if self.family == "rope":
            B, S, heads, D = self.shape
            return {"B": B, "T": self.grid[0], "H": self.grid[1], "W": self.grid[2], "heads": heads, "D": D}
        B, C, T, H, W = self.shape
        return {"B": B, "C": C, "T": T, "H": H, "W": W, "patch": "x".join(map(str, self.grid)), "order": self.order}


def nbytes(case: Case) -> int:
    """Fewest bytes the op must move: its input read once and its output written once.

    rope fwd: x -> out; bwd: dout -> dx (the (D / 2,) frequency table, <= 2 KB, is not counted):
        2 * numel * e each, fwd+bwd 4 * numel * e.
    patchify / unpatchify: a permutation, 2 * numel * e (its backward is the inverse permutation).
    """
    e = torch.tensor([], dtype=case.dtype).element_size()
    moved = 2 * math.prod(case.shape) * e
    return 2 * moved if case.variant == "fwd+bwd" else moved


# ---------------------------------------------------------------------------------------------
# Providers and setup(provider, case)
# ---------------------------------------------------------------------------------------------


def reference_fn(case: Case) -> Callable:
    from dit_fast.ops import patchify as P
    from dit_fast.ops import rope as R

    if case.op == "rope_3d":
        return lambda x: R.apply_rope_3d_reference(x, case.grid)
    if case.op == "patchify_3d":
        return lambda v: P.patchify_3d_reference(v, case.grid, case.order)
    B, C, T, H, W = case.shape
    token_grid = (T // case.grid[0], H // case.grid[1], W // case.grid[2])
    return lambda t: P.unpatchify_3d_reference(t, case.grid, token_grid, case.order).contiguous()


def rope_with_table(case: Case) -> Callable:
    """RoPE as models run it eagerly: cos/sin (S, D / 2) precomputed once, the rotation in fp32."""
    from dit_fast.ops import rope as R

    cache: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def f(x):
        if x.device not in cache:
            angles = R.rope_3d_angles(case.grid, x.shape[-1], device=x.device)  # (S, D / 2)
            cache[x.device] = (angles.cos()[None, :, None], angles.sin()[None, :, None])
        cos, sin = cache[x.device]
        pairs = x.float().unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2).to(x.dtype)

    return f


_compiled: Dict[Case, Callable] = {}


def implementation(case: Case, provider: str) -> Callable:
    from dit_fast import ops

    if provider == "eager":
        return reference_fn(case)
    if provider == "eager-table":
        return rope_with_table(case)
    if provider == "compile":
        key = Case(case.op, "fwd", case.shape, case.grid, case.order, case.dtype)
        if key not in _compiled:
            _compiled[key] = torch.compile(reference_fn(case), dynamic=False)
        return _compiled[key]
    backend = provider[len("ours-"):]
    if case.op == "rope_3d":
        return lambda x: ops.apply_rope_3d(x, case.grid, backend=backend)
    if case.op == "patchify_3d":
        return lambda v: ops.patchify_3d(v, case.grid, order=case.order, backend=backend)
    B, C, T, H, W = case.shape
    return lambda t: ops.unpatchify_3d(t, case.grid, video_shape=(T, H, W), order=case.order, backend=backend)


def make_input(case: Case, device, requires_grad: bool) -> torch.Tensor:
    """Fresh random input (never zeros): x for rope, the video for patchify, tokens for unpatchify."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = case.shape
    if case.op == "unpatchify_3d":
        B, C, T, H, W = case.shape
        pt, ph, pw = case.grid
        shape = (B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)
    return torch.randn(shape, generator=g).to(device=device, dtype=case.dtype).requires_grad_(requires_grad)


def setup(provider: str, case: Case, device) -> Tuple[Callable[[], object], List[torch.Tensor]]:
    """(fn, grad_to_none): fn() runs ``case.variant`` of ``case.op`` through ``provider``."""
    f = implementation(case, provider)
    x = make_input(case, device, requires_grad=case.variant != "fwd")
    if case.variant == "fwd":
        return (lambda: f(x)), []
    out = f(x)
    grad = torch.randn(out.shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(device=device, dtype=out.dtype)
    if case.variant == "bwd":
        return (lambda: torch.autograd.backward(out, grad, retain_graph=True)), [x]
    return (lambda: torch.autograd.backward(f(x), grad)), [x]


def max_abs_error(case: Case, provider: str, device) -> float:
    """Forward against the eager reference on the same input (0 for the permutations)."""
    x = make_input(case, device, requires_grad=False)
    return float((implementation(case, provider)(x).double() - reference_fn(case)(x).double()).abs().max())


def provider_unavailable(provider: str, device: torch.device) -> Optional[str]:
    if provider in ("ours-triton", "ours-cuda"):
        from dit_fast import _backend

        return _backend.unavailable_reason(provider[len("ours-"):], device)
    return None


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def cases(families, quick: bool, device: torch.device) -> List[Case]:
    out: List[Case] = []
    small = device.type != "cuda"
    if "rope" in families:
        # q or k of CogVideoX-5B (13 x 30 x 45 tokens, 48 heads x 64), Wan2.1-14B 480p (21 x 30 x 52,
        # 40 x 128) and Open-Sora / Latte (16 x 32 x 32, 16 x 72); CPU: a tiny grid (per-call overhead) and
        # CogVideoX's grid with 12 heads (27 MB of bf16 q)
        shapes = [((13, 30, 45), 48, 64), ((21, 30, 52), 40, 128), ((16, 32, 32), 16, 72)]
        if small:
            shapes = [((3, 8, 8), 4, 72), ((13, 30, 45), 12, 64)]
        elif quick:
            shapes = shapes[:2]
        for grid, heads, D in shapes:
            for variant in (("fwd", "fwd+bwd") if quick else ("fwd", "bwd", "fwd+bwd")):
                out.append(Case("rope_3d", variant, (1, math.prod(grid), heads, D), grid))
    if "patchify" in families:
        # Wan / CogVideoX / HunyuanVideo latents: 16 channels, patch (1, 2, 2); a (2, 2, 2) patch
        shapes = [((1, 16, 21, 60, 104), (1, 2, 2)), ((1, 16, 22, 60, 90), (2, 2, 2))]
        if small:
            shapes = [((1, 4, 4, 16, 16), (1, 2, 2)), ((1, 16, 21, 60, 104), (1, 2, 2))]
        elif quick:
            shapes = shapes[:1]
        for shape, patch in shapes:
            out.append(Case("patchify_3d", "fwd", shape, patch, "cthw"))
            out.append(Case("unpatchify_3d", "fwd", shape, patch, "thwc"))
            if not quick:
                out.append(Case("patchify_3d", "fwd+bwd", shape, patch, "cthw"))
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run(device="cuda", quick: bool = False, families=("rope", "patchify"), providers=None,
        write: bool = True) -> List[dict]:
    """Times every case per provider; writes rows to results/<device>/<rope|patchify>.jsonl."""
    device = torch.device(device)
    if not common.require_cuda(device):
        return []
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    providers = providers or (GPU_PROVIDERS if device.type == "cuda" else CPU_PROVIDERS)
    runnable = []
    for p in providers:
        reason = provider_unavailable(p, device)
        if reason:
            print(f"[rope/patchify] skipping {p}: {reason}")
        else:
            runnable.append(p)
    label = "" if device.type == "cuda" else " (CPU numbers: the PyTorch paths on this machine's cores)"
    print(f"[rope/patchify] device: {common.device_name(device)}{label}; providers: {', '.join(runnable)}")
    copy_row = common.measure_copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26),
                                             write=write)
    print(f"[rope/patchify] measured copy bandwidth: {copy_row['gbps']:.1f} GB/s")

    rows: List[dict] = []
    on_gpu = device.type == "cuda"
    for case in cases(families, quick, device):
        if common.out_of_time():
            print("[rope/patchify] time budget spent; stopping before", case)
            break
        fns, errors = {}, {}
        for p in runnable:
            if p == "eager-table" and case.family != "rope":
                continue
            try:
                errors[p] = max_abs_error(case, p, device)
                fns[p] = setup(p, case, device)
            except Exception as exc:  # one failing provider must not hide the others' numbers
                print(f"[rope/patchify] {case.op} {case.variant} {case.shape_dict()} {p}: FAILED {type(exc).__name__}: {exc}")
        # on CPU the providers of a case are timed interleaved, call by call (common.time_fns)
        timings = common.time_fns(fns, device, rep_ms=(60 if quick else 200) if on_gpu else 200,
                                  min_reps=10 if on_gpu else 5)
        for p, (fn, grad_to_none) in fns.items():
            timing, err = timings[p], errors[p]
            peak = common.peak_memory(fn, device, grad_to_none=grad_to_none)
            row = common.make_row(case.op, case.variant, p, case.shape_dict(), case.dtype, timing, device=device,
                                  nbytes=nbytes(case), peak_mem_bytes=peak, family=case.family,
                                  fwd_max_abs_err_vs_reference=err,
                                  frac_of_copy_bw=(nbytes(case) / (timing.median_ms * 1e-3) / 1e9) / copy_row["gbps"])
            rows.append(row)
            if write:
                common.write_rows([row], case.family)
            print(f"[rope/patchify] {case.op:14s} {case.variant:7s} {common.shape_str(case.shape_dict()):50s} {p:12s} "
                  f"{row['median_ms']:9.4f} ms  {row['gbps']:8.1f} GB/s ({100 * row['frac_of_copy_bw']:.0f}% of copy)  "
                  f"err {err:.1e}")
        if on_gpu:
            torch.cuda.empty_cache()
    print()
    common.print_ratio_table(rows, metric="gbps")
    return rows


def run_rope(device="cuda", quick: bool = False) -> List[dict]:
    return run(device, quick, families=("rope",))


def run_patchify(device="cuda", quick: bool = False) -> List[dict]:
    return run(device, quick, families=("patchify",))


def smoke() -> None:
    """Tiny CPU check of the harness: every case builds, the ours-torch path matches eager, bytes count."""
    for case in cases(("rope", "patchify"), quick=True, device=torch.device("cpu")):
        c = Case(case.op, case.variant, case.shape, case.grid, case.order, torch.float32)
        assert max_abs_error(c, "ours-torch", "cpu") == 0.0, c
        if c.family == "rope":
            assert max_abs_error(c, "eager-table", "cpu") < 1e-5, c
        fn, _ = setup("ours-torch", c, "cpu")
        fn()
        assert nbytes(c) >= 2 * 4 * math.prod(c.shape)
    print("[rope/patchify] smoke: every case runs on the PyTorch path and matches the reference (fp32, tiny shapes)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--ops", default="rope,patchify", help="comma list from rope,patchify")
    parser.add_argument("--providers", default=None, help=f"comma list from {GPU_PROVIDERS + CPU_PROVIDERS}")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append result rows")
    args = parser.parse_args(argv)
    if not common.require_cuda(args.device):
        return 0
    providers = tuple(args.providers.split(",")) if args.providers else None
    run(args.device, quick=args.quick, families=tuple(args.ops.split(",")), providers=providers, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
