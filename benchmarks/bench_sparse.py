"""Block-sparse attention (issue 18's GPU call, the kernel rows): ours at a kept density vs dense attention.

Cases (bf16, B = 1, D = 128, sliding-tile windows from dit_fast.sparse.patterns at the target density,
tiles of 4 x 4 x 4 tokens as Video Sparse Attention's; q, k, v already in tile order, as a model holds
them after permuting once at its input):
  per_tile   ours-sparse at 25% vs our own dense kernel at the same shape: TFLOP/s on the kept pairs over
             the dense kernel's TFLOP/s on all pairs (target >= 0.85, VSA's bar). Two grids of ~33k tokens,
             12 heads: wan480 (21, 30, 52), Wan2.1-1.3B at 480p, whose edge tiles are partial, and whole
             (20, 32, 52), whose tiles are all whole (the kernel's efficiency without the edges' waste).
  speedup    ours-sparse at 25% and 10% vs SDPA's cuDNN backend dense (targets: >= 3x and >= 6x forward,
             >= 2.5x forward + backward at 25%), at wan480 (32,760 tokens) and wan720 (21, 45, 80) =
             75,600 tokens (Wan 720p, 81 frames), 12 heads; also ours-sparse-raster (tokens in raster
             order: the op's gathers each way) and ours-dense.
Variants: fwd and fwd+bwd. FLOPs and pairs from benchmarks/sparse_flops.py (the one FLOP accounting):
4 * kept (query, key) token pairs * D forward, 2.5x that for the backward (fwd+bwd = 3.5x): TFLOP/s are
useful work (masked rows of partial tiles not counted; the issued fraction says what the kernels compute).

    python -m benchmarks.bench_sparse [--cases per_tile,speedup] [--variants fwd,fwd+bwd] [--no-write]
                                      [--quick] [--budget-s S]
    python -m benchmarks.bench_sparse --flops [--tile 3,5,4]   # no GPU: sparse_flops' kept and issued pairs
                                                    # per pattern and density at the Wan-1.3B and HunyuanVideo-
                                                    # 720p shapes, and the kernel speedups over cuDNN dense
                                                    # they predict (predictions, not timings)
    python -m benchmarks.bench_sparse --cpu-smoke   # tiny CPU shapes, our kernels in Triton's interpreter,
                                                    # every provider checked against the reference

Rows go to benchmarks/results/<device>/attention_sparse.jsonl (common.write_rows), after each case, with
kept_fraction, the ratio the case is judged by and its target. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.sparse_flops import SHAPES, VARIANTS, attention_flops, choice_pairs, pair_counts, parse_tile

OP = "attention_sparse"
TILE = (4, 4, 4)  # Video Sparse Attention's cubes: 64 tokens, one 64 x 64 block pair per kept tile pair
TARGETS = {("per_tile", "fwd"): 0.85, ("per_tile", "fwd+bwd"): 0.85, ("speedup", "fwd", 0.25): 3.0,
           ("speedup", "fwd", 0.10): 6.0, ("speedup", "fwd+bwd", 0.25): 2.5}
# measured on an H100 (benchmarks/NOTES.md, issue 12's run): our dense kernel over SDPA cuDNN, D = 128, S = 16k
OURS_DENSE_OVER_CUDNN = {"fwd": 0.80, "fwd+bwd": 0.68}


@dataclass(frozen=True)
class Case:
    kind: str  # "per_tile" | "speedup"
    grid: Tuple[int, int, int]
    density: float
    heads: int = 12
    D: int = 128
    B: int = 1
    tile: Tuple[int, int, int] = TILE
    extra: int = 0
    pattern: str = "sliding_tile"
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        return f"{self.kind}-{'x'.join(map(str, self.grid))}-{round(self.density * 100)}%"


GRIDS = {"wan480": (21, 30, 52), "whole": (20, 32, 52), "wan720": (21, 45, 80)}
CASES = {
    "per_tile": [Case("per_tile", GRIDS["wan480"], 0.25), Case("per_tile", GRIDS["whole"], 0.25)],
    "speedup": [Case("speedup", GRIDS[g], d) for g in ("wan480", "wan720") for d in (0.25, 0.10)],
}
PROVIDERS = {"per_tile": ("ours-sparse", "ours-dense"),
             "speedup": ("ours-sparse", "ours-sparse-raster", "ours-dense", "sdpa-cudnn")}
SMOKE_CASE = Case("speedup", (2, 3, 5), 0.5, heads=1, D=16, tile=(1, 2, 3), extra=3, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Blocks (their pairs and FLOPs: benchmarks/sparse_flops.py)
# ---------------------------------------------------------------------------------------------


def layout_of(case: Case):
    from dit_fast.ops.sparse_layout import TileLayout

    return TileLayout(case.grid, case.tile, case.extra)


def pattern_blocks(layout, pattern: str, density: float, q=None, k=None):
    """SparseBlocks of `pattern` at the parameters dit_fast.sparse.patterns picks for `density` (its
    registry's for_density; topk scores the given q and k)."""
    from dit_fast.sparse.patterns import PATTERNS, blocks_from_video_mask, video_mask

    params = PATTERNS[pattern].for_density(layout, density)
    return blocks_from_video_mask(layout, video_mask({"pattern": pattern, **params}, layout, q, k)), params


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


def make_inputs(case: Case, device, requires_grad: bool):
    layout = layout_of(case)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(case.B, layout.tokens, case.heads, case.D, generator=gen).to(device, case.dtype)
               .requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def provider_fn(case: Case, provider: str, blocks, backend: str = "triton") -> Callable:
    """fn(q, k, v) -> out, q, k, v in tile order (B, S, heads, D)."""
    from dit_fast.ops import attention, block_sparse_attention

    if provider == "ours-sparse":
        return lambda q, k, v: block_sparse_attention(q, k, v, blocks, order="tiles", backend=backend)
    if provider == "ours-sparse-raster":  # the same inputs seen as raster order: a gather each way
        return lambda q, k, v: block_sparse_attention(q, k, v, blocks, order="raster", backend=backend)
    if provider == "ours-dense":
        return lambda q, k, v: attention(q, k, v, backend=backend)
    if provider.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        choice = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}[provider]

        def sdpa(q, k, v):
            with sdpa_kernel(choice):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        return sdpa
    raise ValueError(f"unknown provider {provider!r}")


def timed_call(fn: Callable, q, k, v, variant: str) -> Callable[[], object]:
    if variant == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v)
        return run
    grad = torch.randn_like(q)
    return lambda: fn(q, k, v).backward(grad)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def run_case(case: Case, variant: str, device, timer, providers, backend: str = "triton", baseline: str = "sdpa-cudnn"):
    """Times every provider on one case and variant; returns (rows, summary). baseline: the dense provider
    a speedup case is judged against."""
    q, k, v = make_inputs(case, device, variant == "fwd+bwd")
    blocks, params = pattern_blocks(layout_of(case), case.pattern, case.density)
    blocks = blocks.to(device)
    kept, issued = pair_counts(blocks)
    S = layout_of(case).tokens
    dense_pairs = case.B * case.heads * S * S
    kept *= case.B * case.heads // (blocks.kv_count.shape[0] * blocks.kv_count.shape[1])
    issued *= case.B * case.heads // (blocks.kv_count.shape[0] * blocks.kv_count.shape[1])
    shape = {"case": case.name, "B": case.B, "heads": case.heads, "S": S, "D": case.D, "grid": list(case.grid),
             "tile": list(case.tile), "pattern": case.pattern, "params": params}
    times, rows, errors = {}, [], {}
    for provider in providers:
        fn = provider_fn(case, provider, blocks, backend)
        try:
            timing = timer(timed_call(fn, q, k, v, variant), device, [q, k, v])
        except Exception as exc:  # a baseline this device cannot run (cuDNN off): say why, keep the others
            errors[provider] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            print(f"[{OP}] {case.name} {variant}: {provider} n/a: {errors[provider]}", flush=True)
            continue
        times[provider] = timing.median_ms
        pairs = kept if provider.startswith("ours-sparse") else dense_pairs
        rows.append(common.make_row(OP, variant, provider, shape, case.dtype, timing, device=device,
                                    flops=attention_flops(pairs, case.D, variant), kept_fraction=kept / dense_pairs,
                                    issued_fraction=issued / dense_pairs))
    tflops = {r["provider"]: r["tflops"] for r in rows}
    if case.kind == "per_tile":
        over, under, judged = "ours-sparse", "ours-dense", "sparse TFLOP/s / dense TFLOP/s"
        target = TARGETS[("per_tile", variant)]
        ratio = tflops[over] / tflops[under] if over in tflops and under in tflops else float("nan")
    else:
        judged, target = f"{baseline} dense ms / sparse ms", TARGETS.get(("speedup", variant, case.density))
        ratio = times[baseline] / times["ours-sparse"] if baseline in times and "ours-sparse" in times else float("nan")
    for row in rows:
        row.update(ratio=ratio, ratio_of=judged, target=target)
    summary = dict(case=case.name, variant=variant, kept=kept / dense_pairs, issued=issued / dense_pairs, times=times,
                   ratio=ratio, judged=judged, target=target, errors=errors)
    return rows, summary


def report(summaries: List[dict]) -> None:
    lines = []
    for s in summaries:
        times = ", ".join(f"{p} {ms:.3f}" for p, ms in s["times"].items())
        verdict = "n/a" if s["ratio"] != s["ratio"] else ("PASS" if s["ratio"] >= (s["target"] or 0) else "MISS")
        target = "-" if s["target"] is None else f">= {s['target']}: {verdict}"
        lines.append([s["case"], s["variant"], f"{s['kept']:.3f}", f"{s['issued']:.3f}", times,
                      f"{s['ratio']:.2f} ({s['judged']})", target])
    common.print_table(["case", "variant", "kept", "issued", "ms", "ratio", "target"], lines)


def run(device="cuda", cases=tuple(CASES), variants=VARIANTS, write: bool = True) -> List[dict]:
    if not common.require_cuda(device):
        return []
    rows, summaries = [], []
    for kind in cases:
        for case in CASES[kind]:
            for variant in variants:
                if common.out_of_time():
                    print(f"[{OP}] out of time budget; stopping")
                    report(summaries)
                    return rows
                case_rows, summary = run_case(case, variant, device,
                                              lambda fn, dev, leaves: common.time_fn(fn, dev, grad_to_none=leaves),
                                              PROVIDERS[kind])
                rows += case_rows
                summaries.append(summary)
                print(f"[{OP}] {case.name} {variant}: {summary['ratio']:.2f} ({summary['judged']})", flush=True)
                if write:  # after each case: a run cut by its time limit keeps what it measured
                    common.write_rows(case_rows, OP)
    report(summaries)
    return rows


# ---------------------------------------------------------------------------------------------
# FLOP accounting and predictions (no GPU)
# ---------------------------------------------------------------------------------------------

def flop_table(patterns=("sliding_tile", "radial", "topk"), densities=(0.25, 0.10), efficiency: float = 0.85,
               tile=TILE, shapes=tuple(SHAPES)):
    """Per shape (sparse_flops.SHAPES), pattern and density: kept and issued fractions (sparse_flops.choice_pairs:
    the blocks the pattern builds, topk's expectation), forward TFLOP (kept pairs, one layer, all heads) against
    dense, and the speedups over cuDNN dense they predict: (dense pairs / issued pairs) x `efficiency` (our sparse
    kernel's TFLOP/s over our dense kernel's per issued pair: VSA's 0.85 bar, an assumption until a GPU run) x
    our dense kernel over cuDNN (OURS_DENSE_OVER_CUDNN, measured)."""
    from dit_fast.ops.sparse_layout import TileLayout
    from dit_fast.sparse.patterns import PATTERNS

    out = []
    for shape in (SHAPES[name] for name in shapes):
        layout = TileLayout(shape["grid"], tuple(tile), shape["text_in_attention"])
        S, heads, D = layout.tokens, shape["heads"], shape["head_dim"]
        for pattern in patterns:
            for density in densities:
                params = PATTERNS[pattern].for_density(layout, density)
                kept, issued = (pairs / S ** 2 for pairs in choice_pairs(layout, {"pattern": pattern, **params}))
                predicted = {v: efficiency * OURS_DENSE_OVER_CUDNN[v] / issued for v in VARIANTS}
                out.append(dict(shape=shape["label"], S=S, pattern=pattern, density=density, params=params, kept=kept,
                                issued=issued, fwd_tflop=attention_flops(heads * kept * S ** 2, D) / 1e12,
                                dense_tflop=attention_flops(heads * S * S, D) / 1e12, predicted_fwd=predicted["fwd"],
                                predicted_fwd_bwd=predicted["fwd+bwd"]))
    return out


def print_flop_table(rows: List[dict], tile=TILE) -> None:
    common.print_table(
        ["shape", "S", "pattern", "target", "kept", "issued", "fwd TFLOP (dense)", "pred. fwd x cuDNN",
         "pred. fwd+bwd x cuDNN"],
        [[r["shape"], str(r["S"]), r["pattern"], f"{r['density']:.2f}", f"{r['kept']:.3f}", f"{r['issued']:.3f}",
          f"{r['fwd_tflop']:.2f} ({r['dense_tflop']:.2f})", f"{r['predicted_fwd']:.2f}",
          f"{r['predicted_fwd_bwd']:.2f}"] for r in rows])
    print("Predictions, not timings: speedup = efficiency 0.85 (assumed) x ours/cuDNN dense (0.80 fwd, 0.68 "
          "fwd+bwd, measured on an H100) / issued fraction; one attention layer, D = 128, tiles "
          f"{' x '.join(map(str, tile))}.")


# ---------------------------------------------------------------------------------------------
# CPU smoke
# ---------------------------------------------------------------------------------------------


def _once(fn, device, leaves) -> "common.Timing":
    """The smoke's timer: one wall-clock call (our kernels run in the interpreter: the code path, not figures)."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return common.Timing(ms, ms, ms, 1)


def smoke() -> List[dict]:
    """The GPU run's code path on a tiny CPU case (partial tiles, text tokens, fp32): every provider's
    forward against the reference first, then run_case for both variants with the one-call timer."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dit_fast defines its kernels
    from dit_fast.ops.block_sparse import block_sparse_attention_reference
    from dit_fast.ops.flash_attention import attention_reference

    case = SMOKE_CASE
    providers = ("ours-sparse", "ours-sparse-raster", "ours-dense", "sdpa-math")
    q, k, v = make_inputs(case, "cpu", False)
    blocks, _ = pattern_blocks(layout_of(case), case.pattern, case.density)
    want = {"sparse": block_sparse_attention_reference(q, k, v, blocks, order="tiles"),
            "dense": attention_reference(q, k, v)}
    for provider in providers:
        got = provider_fn(case, provider, blocks)(q, k, v)
        expected = want["sparse" if provider.startswith("ours-sparse") else "dense"]
        if provider == "ours-sparse-raster":  # the same tensors read as raster order
            expected = block_sparse_attention_reference(q, k, v, blocks, order="raster")
        err = float((got - expected).abs().max())
        assert err < 1e-4, f"{provider}: differs from the reference by {err:.2e}"
    summaries = []
    for variant in VARIANTS:
        _, summary = run_case(case, variant, "cpu", _once, providers, baseline="sdpa-math")
        assert not summary["errors"], summary["errors"]
        summaries.append(summary)
    report(summaries)
    print(f"[{OP}] smoke: {len(summaries)} variants ran on CPU; every provider matches the reference")
    return summaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list from {','.join(CASES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list from fwd,fwd+bwd")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append result rows")
    parser.add_argument("--flops", action="store_true", help="FLOP accounting and predicted speedups (no GPU)")
    parser.add_argument("--tile", default=",".join(map(str, TILE)), help="--flops: the 3D tile, e.g. 3,5,4")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (no GPU needed)")
    parser.add_argument("--quick", action="store_true",
                        help="DIT_FAST_ATTENTION_TUNE=quick (unless set): 3 tile configurations per kernel, not 5-6")
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    args = parser.parse_args(argv)
    if args.quick:  # read when the kernels are defined
        os.environ.setdefault("DIT_FAST_ATTENTION_TUNE", "quick")
    if args.budget_s is not None:
        common.DEADLINE = time.monotonic() + args.budget_s
    if args.cpu_smoke:
        smoke()
        return 0
    if args.flops:
        tile = parse_tile(parser, args.tile)
        print_flop_table(flop_table(tile=tile), tile)
        return 0
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        print(f"{common.GPU_MESSAGE}: the sparse kernels are timed on a CUDA device only. Exiting without numbers "
              "(--flops prints the FLOP accounting and predictions; --cpu-smoke runs the code path on CPU).")
        return 0
    run(args.device, cases=tuple(args.cases.split(",")), variants=tuple(args.variants.split(",")),
        write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
