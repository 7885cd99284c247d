"""adaLN benchmarks: layernorm_modulate, gated_residual, residual_layernorm_modulate.

Per backend of ours ("ours-triton", "ours-cuda" where the extension is built) against PyTorch
eager ("eager": the math written plainly in the input dtype, as DiT writes it,
``modulate(norm(x), shift, scale)``) and ``torch.compile`` of that same eager math ("compile"),
on the same inputs in one run; forward, backward and forward+backward; median and 20/80 %
quantiles; GB/s from the byte count in ``nbytes``; peak memory. The device's copy bandwidth is
measured in the same run, and the targets of issue 2 are printed as PASS/MISS:

    layernorm_modulate fwd           >= 85 % of measured copy bandwidth, >= 3x eager
    residual_layernorm_modulate fwd+bwd   >= 1.2x compile
    ours-cuda                        within 10 % of ours-triton (time <= 1.10x)

    python -m benchmarks.bench_adaln [--quick] [--device cuda|cpu]
    python benchmarks/bench_adaln.py --device cpu --quick   # CPU numbers of the PyTorch paths
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import common

OP = "adaln"
EPS = 1e-6
OPS = ("layernorm_modulate", "gated_residual", "residual_layernorm_modulate")
GPU_PROVIDERS = ("ours-triton", "ours-cuda", "eager", "compile")
# ours-torch is backend="torch": on CPU the path "auto" runs (dit_fast/ops/adaln_cpu.py, the reference's
# fp32 math in fewer passes), so its CPU time is the one a user gets.
CPU_PROVIDERS = ("ours-torch", "eager", "compile")
# the CPU path's two forms forced (dit_fast/ops/adaln_cpu.py; ours-torch picks one per shape): by name only
CPU_FORMS = {"ours-torch-per-group": True, "ours-torch-whole": False}

# ---------------------------------------------------------------------------------------------
# Baselines: the math as a user writes it in PyTorch, in the input dtype (facebookresearch/DiT's
# `modulate(self.norm(x), shift, scale)` and `x + gate.unsqueeze(1) * y`), extended to per-group
# modulation (B, G, C) by a view over the G groups of N / G tokens.
# ---------------------------------------------------------------------------------------------


def _grouped(t, mod):
    """(B, N, C) -> (B, G, N/G, C) and (B, G, C) -> (B, G, 1, C); (B, C) -> (B, 1, C) for t as is."""
    if mod.dim() == 2:
        return t, mod.unsqueeze(1)
    B, G, C = mod.shape
    return t.view(B, G, -1, C), mod.unsqueeze(2)


def modulate(x, shift, scale):
    xg, shift_ = _grouped(x, shift)
    _, scale_ = _grouped(x, scale)
    return (xg * (1 + scale_) + shift_).view(x.shape)


def eager_layernorm_modulate(x, gate, y, shift, scale):
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=EPS), shift, scale)


def eager_gated_residual(x, gate, y, shift=None, scale=None):
    xg, gate_ = _grouped(x, gate)
    yg, _ = _grouped(y, gate)
    return (xg + gate_ * yg).view(x.shape)


def eager_residual_layernorm_modulate(x, gate, y, shift, scale):
    h = eager_gated_residual(x, gate, y)
    return h, eager_layernorm_modulate(h, None, None, shift, scale)


EAGER = {
    "layernorm_modulate": eager_layernorm_modulate,
    "gated_residual": eager_gated_residual,
    "residual_layernorm_modulate": eager_residual_layernorm_modulate,
}


def _by_op(op: str, layernorm_modulate, gated_residual, residual_layernorm_modulate) -> Callable:
    """One of the three functions, called with the benchmark's argument list (x, gate, y, shift, scale)."""
    if op == "layernorm_modulate":
        return lambda x, gate, y, shift, scale: layernorm_modulate(x, shift, scale)
    if op == "gated_residual":
        return lambda x, gate, y, shift, scale: gated_residual(x, gate, y)
    return lambda x, gate, y, shift, scale: residual_layernorm_modulate(x, gate, y, shift, scale)


def ours(op: str, backend: str) -> Callable:
    from dit_fast import ops

    if "ours-" + backend in CPU_FORMS:
        from dit_fast.ops import adaln_cpu as P

        form = CPU_FORMS["ours-" + backend]
        return _by_op(op, partial(P.layernorm_modulate_cpu, eps=EPS, per_group=form), P.gated_residual_cpu,
                      partial(P.residual_layernorm_modulate_cpu, eps=EPS, per_group=form))
    return _by_op(op, partial(ops.layernorm_modulate, eps=EPS, backend=backend),
                  partial(ops.gated_residual, backend=backend),
                  partial(ops.residual_layernorm_modulate, eps=EPS, backend=backend))


def reference(op: str) -> Callable:
    """The package's readable reference (dit_fast/ops/adaln.py: fp32 math, one rounding), whatever path
    backend "torch" takes on this device."""
    from dit_fast.ops import adaln as A

    return _by_op(op, partial(A.layernorm_modulate_reference, eps=EPS), A.gated_residual_reference,
                  partial(A.residual_layernorm_modulate_reference, eps=EPS))


_compiled: Dict[str, Callable] = {}


def compiled(op: str) -> Callable:
    """torch.compile of the eager math, static shapes (one graph per shape, as a model at a fixed size)."""
    if op not in _compiled:
        limit = 256
        for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
        _compiled[op] = torch.compile(EAGER[op], dynamic=False)
    return _compiled[op]


def implementation(op: str, provider: str) -> Callable:
    if provider == "eager":
        return EAGER[op]
    if provider == "compile":
        return compiled(op)
    if provider.startswith("ours-"):
        return ours(op, provider[len("ours-"):])
    raise ValueError(f"unknown provider {provider!r}")


def provider_unavailable(provider: str, device: torch.device) -> Optional[str]:
    """None if ``provider`` can run on ``device``, else why not."""
    if provider in CPU_FORMS and device.type != "cpu":
        return "the CPU path's forms run on CPU only"
    if provider in ("ours-triton", "ours-cuda"):
        from dit_fast import _backend

        reason = _backend.unavailable_reason(provider[len("ours-"):], device)
        if reason is None and provider == "ours-cuda":
            try:
                import dit_fast.cuda.adaln  # noqa: F401
            except ImportError as exc:
                reason = f"dit_fast.cuda.adaln is missing ({exc})"
        return reason
    return None


# ---------------------------------------------------------------------------------------------
# Cases, byte counts, setup(provider, case)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    variant: str  # "fwd" | "bwd" | "fwd+bwd"
    B: int
    N: int
    C: int
    G: int  # modulation groups per sample; G == 1 is passed as (B, C), DiT's per-sample case
    dtype: torch.dtype = torch.bfloat16

    @property
    def shape(self) -> dict:
        return {"B": self.B, "N": self.N, "C": self.C, "G": self.G}


def nbytes(case: Case) -> int:
    """Fewest bytes the op must move: every input tensor read once, every output written once.

    RC = B*N*C token elements, M = B*G*C modulation elements, e bytes each. Backward inputs are
    the output grads plus what the forward saved; its outputs are the input grads. Not counted:
    the fp32 mean/rstd per row (8 bytes per row, < 0.2 % at C = 1152).
      layernorm_modulate  fwd: x, shift, scale -> out                  2 RC + 2 M
                          bwd: dout, x, scale -> dx, dshift, dscale    3 RC + 3 M
      gated_residual      fwd: x, gate, y -> h                         3 RC + 1 M
                          bwd: dh, gate, y -> dx, dy, dgate            4 RC + 2 M
      residual_layernorm_modulate
                          fwd: x, gate, y, shift, scale -> h, out      4 RC + 3 M
                          bwd: dout, dh, h, y, gate, scale
                               -> dx, dy, dgate, dshift, dscale        6 RC + 5 M
      fwd+bwd = fwd + bwd.
    """
    e = torch.tensor([], dtype=case.dtype).element_size()
    RC = case.B * case.N * case.C
    M = case.B * case.G * case.C
    per_variant = {
        "layernorm_modulate": {"fwd": 2 * RC + 2 * M, "bwd": 3 * RC + 3 * M},
        "gated_residual": {"fwd": 3 * RC + 1 * M, "bwd": 4 * RC + 2 * M},
        "residual_layernorm_modulate": {"fwd": 4 * RC + 3 * M, "bwd": 6 * RC + 5 * M},
    }[case.op]
    elems = per_variant["fwd"] + per_variant["bwd"] if case.variant == "fwd+bwd" else per_variant[case.variant]
    return e * elems


def make_inputs(case: Case, device, requires_grad: bool, seed: int = 0) -> dict:
    """Fresh random inputs (never zeros). Modulations are (B, C) when G == 1, else (B, G, C)."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: 400 MB inputs in ms

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(case.dtype)
        return t.requires_grad_(requires_grad)

    mod_shape = (case.B, case.C) if case.G == 1 else (case.B, case.G, case.C)
    x = rand(case.B, case.N, case.C)
    needs_residual = case.op != "layernorm_modulate"
    needs_norm = case.op != "gated_residual"
    return {
        "x": x,
        "gate": rand(*mod_shape, scale=0.5) if needs_residual else None,
        "y": rand(case.B, case.N, case.C) if needs_residual else None,
        "shift": rand(*mod_shape, scale=0.5) if needs_norm else None,
        "scale": rand(*mod_shape, scale=0.5) if needs_norm else None,
    }


def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def setup(provider: str, case: Case, device) -> Tuple[Callable[[], object], List[torch.Tensor]]:
    """Returns (fn, grad_to_none): fn() runs ``case.variant`` of ``case.op`` through ``provider``."""
    f = implementation(case.op, provider)
    inputs = make_inputs(case, device, requires_grad=case.variant != "fwd")
    args = [inputs[k] for k in ("x", "gate", "y", "shift", "scale")]
    leaves = [t for t in args if t is not None]
    if case.variant == "fwd":
        return (lambda: f(*args)), []
    g = torch.Generator(device=device).manual_seed(1)
    outs = _as_tuple(f(*args))
    grads = [torch.randn(o.shape, generator=g, device=device, dtype=o.dtype) for o in outs]
    if case.variant == "bwd":
        return (lambda: torch.autograd.backward(outs, grads, retain_graph=True)), leaves
    return (lambda: torch.autograd.backward(_as_tuple(f(*args)), grads)), leaves


def rel_error(case: Case, provider: str, device) -> float:
    """||out - ref|| / ||ref|| of the forward against the package's fp32-math reference, all outputs."""
    inputs = make_inputs(case, device, requires_grad=False, seed=2)
    args = [inputs[k] for k in ("x", "gate", "y", "shift", "scale")]
    got = _as_tuple(implementation(case.op, provider)(*args))
    ref = _as_tuple(reference(case.op)(*args))
    num = sum(float((a.double() - b.double()).norm() ** 2) for a, b in zip(got, ref))
    den = sum(float(b.double().norm() ** 2) for b in ref)
    return (num / max(den, 1e-30)) ** 0.5


def cases(quick: bool, device: torch.device) -> List[Case]:
    if device.type == "cuda":
        # DiT video shapes: 13 latent frames x 2520 tokens (e.g. 45 x 56 patches) = 32760 tokens;
        # C = 1152 (DiT-XL, Open-Sora, Latte) and 3072 (HunyuanVideo, Wan 14B is 5120).
        B, N, G = 2, 32760, 13
    else:  # a CPU run is a smoke of the PyTorch paths: same structure, smaller N
        B, N, G = 2, 4095 if quick else 32760, 13
    per_sample = [(B, N, 1152, 1), (B, N, 3072, 1)]
    per_frame = [(B, N, 1152, G)]
    shapes = per_sample + per_frame
    out = []
    if quick:
        plan = [("layernorm_modulate", ("fwd",), shapes),
                ("residual_layernorm_modulate", ("fwd", "bwd", "fwd+bwd"), shapes if device.type == "cuda" else per_sample),
                ("gated_residual", ("fwd",), per_sample)]
    else:
        plan = [(op, ("fwd", "bwd", "fwd+bwd"), shapes) for op in OPS]
    for op, variants, op_shapes in plan:
        for s in op_shapes:
            for v in variants:
                out.append(Case(op, v, *s))
    return out


# ---------------------------------------------------------------------------------------------
# Running, targets
# ---------------------------------------------------------------------------------------------


def measure(case: Case, providers: List[str], device, checked: Dict[tuple, float], quick: bool) -> List[dict]:
    """One row per provider that runs ``case``; on CPU the providers are timed interleaved (common.time_fns)."""
    fns, errors = {}, {}
    for p in providers:
        try:
            key = (case.op, json_shape(case), p)
            if key not in checked:
                checked[key] = rel_error(case, p, device)
            errors[p] = checked[key]
            fns[p] = setup(p, case, device)
        except Exception as exc:  # one failing provider must not hide the others' numbers
            print(f"[adaln] {case.op} {case.variant} {case.shape} {p}: FAILED {type(exc).__name__}: {exc}")
    on_gpu = torch.device(device).type == "cuda"
    rep_ms = (60 if quick else 200) if on_gpu else (200 if quick else 1000)
    timings = common.time_fns(fns, device, rep_ms=rep_ms, min_reps=10 if on_gpu else 5)
    rows = []
    for p, (fn, grad_to_none) in fns.items():
        peak = common.peak_memory(fn, device, grad_to_none=grad_to_none)
        rows.append(common.make_row(case.op, case.variant, p, case.shape, case.dtype, timings[p], device=device,
                                    nbytes=nbytes(case), peak_mem_bytes=peak, family=OP,
                                    fwd_rel_err_vs_reference=errors[p]))
    return rows


def json_shape(case: Case) -> tuple:
    return (case.B, case.N, case.C, case.G)


def run(device="cuda", quick: bool = False, providers=None, write: bool = True) -> List[dict]:
    """Times every case per provider; writes rows to results/<device>/adaln.jsonl; prints the tables."""
    device = torch.device(device)
    if not common.require_cuda(device):
        return []
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if providers is None:
        providers = GPU_PROVIDERS if device.type == "cuda" else CPU_PROVIDERS
        if device.type != "cuda" and quick:
            providers = tuple(p for p in providers if p != "compile")  # inductor's C++ build: minutes here
    runnable = []
    for p in providers:
        reason = provider_unavailable(p, device)
        if reason:
            print(f"[adaln] skipping {p}: {reason}")
        else:
            runnable.append(p)
    label = "" if device.type == "cuda" else " (CPU numbers: the PyTorch paths on this machine's cores)"
    print(f"[adaln] device: {common.device_name(device)}{label}; providers: {', '.join(runnable)}")

    rows: List[dict] = []
    copy_row = common.measure_copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 28),
                                             write=write)
    print(f"[adaln] measured copy bandwidth: {copy_row['gbps']:.1f} GB/s (read + write of "
          f"{copy_row['shape']['bytes'] / 2**20:.0f} MiB in {copy_row['median_ms']:.3f} ms)")
    checked: Dict[tuple, float] = {}
    for case in cases(quick, device):
        if common.out_of_time():
            print("[adaln] time budget spent; stopping before", case)
            break
        for row in measure(case, runnable, device, checked, quick):
            rows.append(row)
            if write:
                common.write_rows([row], OP)
            print(f"[adaln] {case.op:28s} {case.variant:7s} {common.shape_str(case.shape):28s} {row['provider']:12s} "
                  f"{row['median_ms']:9.4f} ms  {row['gbps']:8.1f} GB/s  err {row['fwd_rel_err_vs_reference']:.1e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    common.print_ratio_table(rows, metric="gbps")
    print()
    print_targets(rows, copy_row)
    return rows


def print_targets(rows: List[dict], copy_row: dict) -> None:
    """Issue 2's targets, PASS/MISS per shape; CPU rows are printed for completeness, not judged."""
    groups = common.group_rows(rows)
    copy_gbps = copy_row["gbps"]
    lines = []

    def add(name, shape, value, goal, ok):
        lines.append([name, shape, value, goal, "PASS" if ok else "MISS"])

    for (op, variant, shape, _dtype), by in groups.items():
        s = common.shape_str(json.loads(shape))
        for ours_p in ("ours-triton", "ours-cuda"):
            r = by.get(ours_p)
            if r is None:
                continue
            if op == "layernorm_modulate" and variant == "fwd":
                frac = r["gbps"] / copy_gbps
                add(f"layernorm_modulate fwd {ours_p}: % of copy bw", s, f"{100 * frac:.1f}%", ">= 85%", frac >= 0.85)
                if "eager" in by:
                    x = by["eager"]["median_ms"] / r["median_ms"]
                    add(f"layernorm_modulate fwd {ours_p} vs eager", s, f"{x:.2f}x", ">= 3x", x >= 3.0)
            if op == "residual_layernorm_modulate" and variant == "fwd+bwd" and "compile" in by:
                x = by["compile"]["median_ms"] / r["median_ms"]
                add(f"residual_layernorm_modulate fwd+bwd {ours_p} vs compile", s, f"{x:.2f}x", ">= 1.2x", x >= 1.2)
        if "ours-cuda" in by and "ours-triton" in by:
            x = by["ours-cuda"]["median_ms"] / by["ours-triton"]["median_ms"]
            add(f"{op} {variant} cuda time / triton time", s, f"{x:.2f}", "<= 1.10", x <= 1.10)
    if not lines:
        print("[adaln] no target applies to these rows (targets need ours-triton / ours-cuda on a GPU)")
        return
    print(f"Targets (copy bandwidth measured in this run: {copy_gbps:.1f} GB/s)")
    common.print_table(["target", "shape", "measured", "goal", "status"], lines)


def smoke() -> None:
    """Tiny CPU check: the eager baselines compute what the package's reference computes."""
    for op in OPS:
        for G in (1, 3):
            case = Case(op, "fwd", 2, 6, 40, G, torch.float32)
            err = rel_error(case, "eager", "cpu")
            assert err < 1e-5, f"{op} G={G}: eager baseline differs from the reference, rel err {err:.2e}"
    print("[adaln] smoke: eager baselines match dit_fast's reference (fp32, tiny shapes)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--providers", default=None,
                        help=f"comma list from {GPU_PROVIDERS + CPU_PROVIDERS + tuple(CPU_FORMS)} (default: all "
                             "that run here)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append result rows")
    args = parser.parse_args(argv)
    if not common.require_cuda(args.device):
        return 0
    providers = tuple(args.providers.split(",")) if args.providers else None
    run(args.device, quick=args.quick, providers=providers, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
