"""backend="auto" for attention against its two sides: our kernel and torch's best, side by side.

Issues 12 (step 1) and 17: "auto" must not lose. For each case it times, in one run on the same inputs:
  auto      the public op with the default backend (its first call measures the candidates,
            dit_fast/ops/attention_planner.py, outside the timed repetitions)
  ours      the same op with backend="triton"
  torch:*   every way torch computes the call: SDPA with its own dispatch and with each SDPA backend
            forced (flash, cuDNN, efficient; dense, spatial, temporal), FlexAttention (window_tile)
and checks auto <= 1.03 x min(ours, best torch), printing PASS / FAIL per case (exit status 1 on a
FAIL: a benchmark check, not a unit test). A torch path that cannot run a case (a backend without
support for the head dim) is shown as n/a with its error.

Cases (bf16, non-causal, B = 1, 16 heads, S = 16k): dense D = 64 and D = 128; spatial and temporal over
a (16, 32, 32) grid, D = 72; a token window (8, 16, 16) (1/8 of the grid) and a tile window
window_tile (4, 8, 8), window (16, 16, 16) (25% of the tiles) on the same grid, D = 128; dense72
(D = 72) on request. Variants: fwd (no grad: auto times forwards) and fwd+bwd (grads needed: auto
times forward + backward).

Nothing is monkeypatched: "auto" is the default backend on a GPU (dit_fast._backend.resolve_backend
sends attention to the planner whenever Triton can run), as a user's call meets it.

    python -m benchmarks.bench_auto [--quick] [--cases dense64,dense128,spatial,temporal,window,window_tile]
                                    [--variants fwd,fwd+bwd] [--no-write] [--no-check] [--budget-s S]
    python -m benchmarks.bench_auto --cpu-smoke   # tiny shapes on CPU, fp32, our kernel in Triton's
                                                  # interpreter: the code path above, without the check

Rows go to benchmarks/results/<device>/attention_auto.jsonl (common.write_rows), written after each
case (a run cut short keeps what it measured): one per provider, each with the plan auto chose and
why, auto_over_best = auto / min(ours, torch's best) and auto_within_tolerance (<= 1.03). Predictions
only until a GPU run: auto = the faster of ours and cuDNN at dense D = 128 (cuDNN 1.25x ours on an
H100), ours at temporal (4.1x permute + SDPA on the H100).

The CPU smoke states the device facts of a GPU (dit_fast._backend.StatedFacts: Triton runnable) so
that "auto" takes the GPU path on CPU tensors, and times with one wall-clock call per candidate: the
decision code is the GPU's, the figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common

OP = "attention_auto"
TOLERANCE = 1.03  # auto may be at most 3% slower than the faster side
VARIANTS = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    heads: int
    D: int
    S: int
    spacetime: dict = field(default_factory=dict)  # spacetime_attention kwargs (grid, mode, window...); {}: attention()
    dtype: torch.dtype = torch.bfloat16

    @property
    def torch_base(self) -> str:
        if not self.spacetime or (self.spacetime.get("mode", "full") == "full" and "window" not in self.spacetime):
            return "sdpa"
        return "flex" if "window" in self.spacetime else "sdpa_grouped"


GRID = (16, 32, 32)
GPU_CASES = {  # the rows issue 17 names, in the order the GPU call runs them
    "dense64": Case("dense64", 1, 16, 64, 16384),
    "dense128": Case("dense128", 1, 16, 128, 16384),
    "spatial": Case("spatial", 1, 16, 72, 16384, dict(grid=GRID, mode="spatial")),
    "temporal": Case("temporal", 1, 16, 72, 16384, dict(grid=GRID, mode="temporal")),
    "window": Case("window", 1, 16, 128, 16384, dict(grid=GRID, window=(8, 16, 16))),
    "window_tile": Case("window_tile", 1, 16, 128, 16384, dict(grid=GRID, window=(16, 16, 16), window_tile=(4, 8, 8))),
    "dense72": Case("dense72", 1, 16, 72, 16384),  # on request (--cases)
}
DEFAULT_CASES = ("dense64", "dense128", "spatial", "temporal", "window", "window_tile")
SMOKE_CASES = {  # one tiny case per kind (odd sizes), fp32
    "dense": Case("dense", 2, 2, 16, 21, dtype=torch.float32),
    "spatial": Case("spatial", 1, 2, 24, 12, dict(grid=(3, 2, 2), mode="spatial"), dtype=torch.float32),
    "temporal": Case("temporal", 1, 2, 24, 12, dict(grid=(3, 2, 2), mode="temporal"), dtype=torch.float32),
    "window": Case("window", 1, 2, 16, 30, dict(grid=(2, 3, 5), window=(1, 3, 3)), dtype=torch.float32),
    "window_tile": Case("window_tile", 1, 2, 16, 48, dict(grid=(3, 4, 4), window=(2, 4, 4), window_tile=(1, 4, 4)),
                        dtype=torch.float32),
}


def torch_providers(case: Case, device) -> List[str]:
    base = case.torch_base
    if base == "flex":
        return ["torch:flex"]
    forced = ("flash", "cudnn", "efficient") if torch.device(device).type == "cuda" else ("math",)
    return [f"torch:{base}"] + [f"torch:{base}:{b}" for b in forced]


def _call(case: Case, provider: str) -> Callable:
    """(q, k, v) -> out (B, S, heads, D) for a provider."""
    from dit_fast import ops

    import dit_fast.ops.attention_planner as P
    if provider in ("auto", "ours"):
        backend = "auto" if provider == "auto" else "triton"
        if case.spacetime:
            kwargs = dict(case.spacetime)
            grid = kwargs.pop("grid")
            return lambda q, k, v: ops.spacetime_attention(q, k, v, grid, backend=backend, **kwargs)
        return lambda q, k, v: ops.attention(q, k, v, backend=backend)
    st = case.spacetime
    call = P.Call(case.D ** -0.5, grid=st.get("grid"), mode=st.get("mode", "full"), window=st.get("window"),
                  window_tile=st.get("window_tile"))
    impl = provider[len("torch:"):]
    return lambda q, k, v: P.run_torch(impl, q, k, v, None, call)


def make_inputs(case: Case, device, requires_grad: bool, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(case.B, case.S, case.heads, case.D, generator=gen).to(device=device, dtype=case.dtype)
            .requires_grad_(requires_grad) for _ in range(3)]


def setup(provider: str, case: Case, variant: str, device) -> Tuple[Callable[[], object], List[torch.Tensor]]:
    """fn() running one forward (no grad) or forward + backward, and the leaves whose grads to reset."""
    grad = variant == "fwd+bwd"
    q, k, v = make_inputs(case, device, grad)
    run = _call(case, provider)
    if not grad:
        def fn():
            with torch.no_grad():
                return run(q, k, v)
        return fn, []
    dout = torch.randn_like(q)

    def fn():
        run(q, k, v).backward(dout)
    return fn, [q, k, v]


def plan_of(case: Case, variant: str, device):
    from dit_fast import ops

    q, k, v = make_inputs(case, device, variant == "fwd+bwd")
    kwargs = dict(case.spacetime)
    grid = kwargs.pop("grid", None)
    return ops.attention_plan(q, k, v, grid, **kwargs)


def flops(case: Case, variant: str) -> float:
    """4 B heads S S_kept D forward, x 3.5 forward + backward; S_kept = keys each query sees."""
    st = case.spacetime
    T, H, W = st.get("grid", (1, 1, case.S))
    kept = {"spatial": H * W, "temporal": T}.get(st.get("mode", "full"), case.S)
    if "window_tile" in st:
        tiles = [-(-n // t) for n, t in zip((T, H, W), st["window_tile"])]
        kept_tiles = [w // t for w, t in zip(st["window"], st["window_tile"])]
        kept = case.S * (kept_tiles[0] * kept_tiles[1] * kept_tiles[2]) / (tiles[0] * tiles[1] * tiles[2])
    return 4 * case.B * case.heads * case.S * kept * case.D * (3.5 if variant == "fwd+bwd" else 1.0)


def run_case(case: Case, variant: str, device, time_fn) -> Tuple[List[dict], dict]:
    """Times every provider of one case; returns (rows, summary)."""
    rows, times, errors = [], {}, {}
    for provider in ["auto", "ours"] + torch_providers(case, device):
        try:
            fn, leaves = setup(provider, case, variant, device)
            timing = time_fn(fn, device, leaves)
        except Exception as exc:  # a torch backend that cannot run this case: shown, not fatal
            errors[provider] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
            continue
        times[provider] = timing.median_ms
        rows.append(common.make_row(OP, variant, provider, {"case": case.name, "B": case.B, "heads": case.heads,
                                                              "S": case.S, "D": case.D, **case.spacetime},
                                    case.dtype, timing, device=device, flops=flops(case, variant)))
    plan = plan_of(case, variant, device)
    torch_times = {p: t for p, t in times.items() if p.startswith("torch:")}
    best_torch = min(torch_times, key=torch_times.get) if torch_times else None
    sides = {p: times[p] for p in ("ours", best_torch) if p in times}
    best = min(sides, key=sides.get) if sides else None
    ratio = times["auto"] / sides[best] if best is not None and "auto" in times else float("nan")
    for row in rows:
        row.update(plan=plan.impl, plan_reason=plan.reason, best=best, best_torch=best_torch,
                   auto_over_best=ratio, auto_within_tolerance=bool(ratio <= TOLERANCE), tolerance=TOLERANCE)
    summary = dict(case=case.name, variant=variant, plan=plan.impl, reason=plan.reason, plan_times=plan.times_ms,
                   times=times, best=best, best_torch=best_torch, ratio=ratio, errors=errors)
    return rows, summary


def _cuda_time(fn, device, leaves):
    return common.time_fn(fn, device, grad_to_none=leaves)


def _fmt(ms: Optional[float]) -> str:
    return "n/a" if ms is None else f"{ms:.3f}"


def report(summaries: List[dict], check: bool) -> bool:
    lines, ok = [], True
    for s in summaries:
        t = s["times"]
        passed = s["ratio"] <= TOLERANCE
        ok &= passed or not check
        lines.append([s["case"], s["variant"], f"{_fmt(t.get('auto'))} ({s['plan']})", _fmt(t.get("ours")),
                      f"{_fmt(t.get(s['best_torch']))} ({s['best_torch']})" if s["best_torch"] else "n/a",
                      f"{s['ratio']:.3f}", ("PASS" if passed else "FAIL") if check else "-"])
    common.print_table(["case", "variant", "auto ms (plan)", "ours ms", "best torch ms", "auto / best",
                        f"<= {TOLERANCE}"], lines)
    for s in summaries:
        for provider, error in s["errors"].items():
            print(f"  {s['case']} {s['variant']}: {provider} n/a: {error}")
    return ok


def run(device="cuda", quick: bool = False, cases=DEFAULT_CASES, variants=VARIANTS, write: bool = True,
        check: bool = True) -> List[dict]:
    if quick:  # read when the kernels are defined: 2 tile configurations per shape class, not ~11
        os.environ.setdefault("DIT_FAST_ATTENTION_TUNE", "quick")
        if "dit_fast.triton_kernels.attention" in sys.modules:
            print(f"[{OP}] kernels already imported: DIT_FAST_ATTENTION_TUNE=quick has no effect now")
    if not common.require_cuda(device):
        return []
    rows, summaries = [], []
    for name, variant in [(n, v) for n in cases for v in variants]:
        if common.out_of_time():
            print(f"[attention_auto] out of time budget; stopping before {name} {variant}")
            break
        case_rows, summary = run_case(GPU_CASES[name], variant, device, _cuda_time)
        rows += case_rows
        summaries.append(summary)
        print(f"[attention_auto] {name} {variant}: auto={summary['plan']} ratio {summary['ratio']:.3f}",
              flush=True)
        if write:  # after each case: a run cut by its time limit keeps what it measured
            path = common.write_rows(case_rows, OP)
            if path and len(summaries) == 1:
                print(f"rows: {path}")
    ok = report(summaries, check)
    if check and not ok:
        raise SystemExit(f"auto was more than {TOLERANCE:.2f}x the faster side in some case (FAIL rows above)")
    return rows


def _once(impl, fn, device) -> float:
    """The smoke's timer (auto's and the table's): one call, wall clock; our kernel runs in the
    interpreter, so only the code path is exercised, not the figures."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _once_timing(fn) -> "common.Timing":
    ms = _once("", fn, None)
    return common.Timing(ms, ms, ms, 1)


def smoke() -> List[dict]:
    """Tiny CPU run of the whole path (cases, providers, auto's measurement with the CPU timer, report)
    with every provider's output checked against the reference; no timing check (CPU + interpreter).
    The device facts say "a GPU with Triton runnable" (the only thing stated); the real resolution and
    planner run. Facts and timer are restored after."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dit_fast defines its kernels
    from dit_fast import _backend
    from dit_fast.ops.flash_attention import attention_reference, spacetime_attention_reference

    import dit_fast.ops.attention_planner as P
    summaries = []
    previous_timer = P.set_timer(_once)
    previous_facts = _backend.set_device_facts(_backend.StatedFacts(gpu=True, runnable=("triton",)))
    try:
        for case in SMOKE_CASES.values():
            q, k, v = make_inputs(case, "cpu", False)
            st = dict(case.spacetime)
            want = (spacetime_attention_reference(q, k, v, st.pop("grid"), **st) if case.spacetime
                    else attention_reference(q, k, v))
            for provider in ["auto", "ours"] + torch_providers(case, "cpu"):
                got = _call(case, provider)(q, k, v)
                err = float((got - want).abs().max())
                assert err < 1e-4, f"{case.name} {provider}: differs from the reference by {err:.2e}"
            # fwd+bwd once (dense), to keep the smoke short; Flex has no backward on CPU anyway
            for variant in ("fwd", "fwd+bwd") if case.name == "dense" else ("fwd",):
                _, summary = run_case(case, variant, "cpu", lambda fn, device, leaves: _once_timing(fn))
                measured = summary["plan_times"]  # auto reached the planner: it measured the candidates
                assert measured and summary["plan"] == min(measured, key=measured.get), summary
                assert not summary["errors"], summary["errors"]
                summaries.append(summary)
    finally:
        _backend.set_device_facts(previous_facts)
        P.set_timer(previous_timer)
    report(summaries, check=False)
    print(f"[{OP}] smoke: {len(summaries)} case/variant pairs ran on CPU; every provider matches the reference")
    return summaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma list from {','.join(GPU_CASES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list from fwd,fwd+bwd")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append result rows")
    parser.add_argument("--no-check", action="store_true", help="report the ratios without failing")
    parser.add_argument("--quick", action="store_true", help="DIT_FAST_ATTENTION_TUNE=quick (unless set)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (rows so far are kept)")
    args = parser.parse_args(argv)
    cases, variants = tuple(args.cases.split(",")), tuple(args.variants.split(","))
    for name, given, known in (("--cases", cases, GPU_CASES), ("--variants", variants, VARIANTS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; expected a comma list from {','.join(known)}")
    if args.budget_s is not None:
        common.DEADLINE = time.monotonic() + args.budget_s
    if args.cpu_smoke:
        smoke()
        return 0
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        print(f"{common.GPU_MESSAGE}: auto's choice is timed on a CUDA device only. Exiting without numbers "
              "(--cpu-smoke runs the code path on tiny CPU shapes).")
        return 0
    run(args.device, quick=args.quick, cases=cases, variants=variants, write=not args.no_write,
        check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
