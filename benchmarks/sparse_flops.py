"""FLOP accounting of block-sparse attention: the one place that counts kept pairs and FLOPs.

Counts, does not time. ``attention_flops`` (the FLOP formula), ``pair_counts`` (the kept (query, key)
token pairs of a SparseBlocks, and the pairs the kernels issue: whole BLOCK x BLOCK blocks, rows past a
partial tile's end computed and masked) and ``choice_pairs`` (the same for a pattern's choice at a model
shape, topk's expected count) are what benchmarks/bench_sparse.py uses too, for its timed rows' TFLOP/s
and for ``--flops``. This module's command line: for each pattern (dit_fast.sparse.PATTERNS) at each
target density, the kept and issued fractions (text dense both ways, as the patterns build them), the
self-attention FLOPs per step, and PREDICTED speedups of the attention and of a whole denoising step.
Nothing here ran on a GPU: every speedup is a prediction from the counts and the assumptions below.

Shapes (tile 4 x 4 x 4 tokens, the default SparseAttention tile; --tile for others):
    wan2.1-1.3b    480p x 81 frames: latent grid 21 x 30 x 52 = 32,760 tokens, 12 heads of 128, 30 layers,
                   FFN 8960, 512 text tokens in cross-attention (not in the self-attention)
    hunyuan-720p   720 x 1280 x 129 frames: latent 33 x 90 x 160, patch 1 x 2 x 2 -> 33 x 45 x 80 = 118,800
                   tokens, 24 heads of 128, 20 dual- + 40 single-stream blocks, 256 text tokens inside the
                   joint self-attention (the extra tiles)

FLOPs per layer (forward; multiply-add = 2): self-attention 4 * kept_pairs * D * heads (Q K^T and P V over
the kept pairs only), 2.5x that for the backward (dQ, dK, dV and the recomputed P: fwd+bwd = 3.5x); the
rest as benchmarks/NOTES.md counts it (Wan: projections 8 S C^2, cross-attention 4 S C^2 + 4 S L C, FFN
4 S C F; HunyuanVideo: 24 S C^2 in either block kind: q, k, v, o and an MLP of 4 C).

Kept pairs. Static patterns (sliding_tile, radial): counted on their blocks. topk: which key tiles a query
tile keeps depends on q and k; it keeps its local window and ``keep`` of the other video tiles, so the
count is the expectation with each of those equally likely (``tile_weights``): exact for whole tiles,
and for partial edge tiles it assumes the scores do not favour tiles by size. (Random q, k do: a small
edge tile's mean varies more, so it scores higher; measured on the Wan grid at 10%: 0.077 kept instead
of 0.10.)

Predictions (labelled so in every row):
    attention speedup = dense FLOPs / (sparse FLOPs / efficiency), efficiency = the sparse kernel's
                        throughput per kept tile relative to the dense kernel: 0.85 (VSA's bar, the
                        issue's target) and 1.0 (an upper bound)
    step speedup      = 1 / ((1 - a) + a * kept / efficiency), a = the step's self-attention share of
                        FLOPs at dense (Wan 70%, as NOTES.md counts; HunyuanVideo 720p ~87%), counting
                        the rest as unchanged and the step as FLOP-bound (NOTES.md: the memory-bound rest
                        is ~3% of Wan's step)
    with the schedule: dense_steps of steps dense: 1 / (dense_steps / steps + (1 - dense_steps / steps) / step)

    python -m benchmarks.sparse_flops [--densities 0.1,0.25,0.5] [--steps 50 --dense-steps 10] [--tile 4,4,4]
                                      [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout
from dit_fast.sparse.config import SparseAttention
from dit_fast.sparse.patterns import PATTERNS, blocks_for_heads, sliding_tile_video_mask

SHAPES = {
    "wan2.1-1.3b": dict(grid=(21, 30, 52), heads=12, head_dim=128, layers=30, text_in_attention=0, cross_text=512,
                        ffn=8960, family="wan", label="Wan2.1-1.3B 480p (81 frames)"),
    "hunyuan-720p": dict(grid=(33, 45, 80), heads=24, head_dim=128, layers=60, text_in_attention=256, cross_text=0,
                         ffn=None, family="hunyuan", label="HunyuanVideo 720p (129 frames)"),
}
EFFICIENCIES = (0.85, 1.0)
TILE = (4, 4, 4)
VARIANTS = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------
# The accounting every sparse benchmark uses: FLOPs of kept pairs, kept and issued pairs
# ---------------------------------------------------------------------------------------------


def attention_flops(pairs: float, head_dim: int, variant: str = "fwd") -> float:
    """4 * pairs * D forward (Q K^T and P V: 2 * D FLOPs each per (query, key) pair), 2.5x that for the
    backward (fwd+bwd: 3.5x)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return 4.0 * pairs * head_dim * (3.5 if variant == "fwd+bwd" else 1.0)


def kernel_block(volume: int) -> int:
    """The block (rows) the kernels stream a tile of ``volume`` tokens in: the volume rounded up to a power
    of two in [16, 64] (what the tile spaces pick for 4 x 4 x 4 tiles: 64)."""
    return max(16, min(64, 1 << (volume - 1).bit_length()))


def _pairs(layout: TileLayout, weights: Tensor, block: Optional[int]) -> Tuple[float, float]:
    """(kept, issued) token pairs of (..., n, n) tile-pair weights (1 = kept), summed over the leading dims.
    Issued: each kept tile pair costs whole BLOCK x BLOCK blocks (rows past a partial tile's end are
    computed and masked), the work a GPU spends."""
    block = block or kernel_block(layout.volume)
    sizes = layout.tile_sizes().to(device=weights.device, dtype=torch.float64)
    padded = torch.ceil(sizes / block) * block
    weights = weights.to(torch.float64).reshape(-1, *weights.shape[-2:]).sum(0)
    return float(sizes @ weights @ sizes), float(padded @ weights @ padded)


def pair_counts(blocks: SparseBlocks, block: Optional[int] = None) -> Tuple[int, int]:
    """(kept, issued) (query, key) token pairs of these blocks, summed over their batch and heads (a size-1
    dim counted once); block defaults to kernel_block(volume)."""
    kept, issued = _pairs(blocks.layout, blocks.tile_mask(), block)
    return round(kept), round(issued)


def tile_weights(layout: TileLayout, choice: dict) -> Tensor:
    """(n_tiles, n_tiles) float64: the fraction of (batch, head) pairs that keep each (query tile, key tile):
    0 or 1 for a static pattern (blocks shared by every head); for topk the expectation (module docstring):
    1 on the local window and the text, keep / (n_video - local) on every other video tile pair."""
    if choice["pattern"] != "topk":
        return blocks_for_heads([choice], layout).tile_mask().to(torch.float64).mean((0, 1))
    nv, n = layout.n_video_tiles, layout.n_tiles
    local = sliding_tile_video_mask(layout, tuple(min(w, t) for w, t in zip(choice["local"], layout.tiles_per_axis,
                                                                            strict=True)))
    others = nv - int(local.sum(-1)[0])
    weights = torch.ones(n, n, dtype=torch.float64)  # the text tiles: dense both ways
    weights[:nv, :nv] = torch.where(local, 1.0, min(choice["keep"], others) / max(others, 1))
    return weights


def choice_pairs(layout: TileLayout, choice: dict, block: Optional[int] = None) -> Tuple[float, float]:
    """(kept, issued) token pairs of one head under a pattern's choice {"pattern": ..., **params}."""
    return _pairs(layout, tile_weights(layout, choice), block)


# ---------------------------------------------------------------------------------------------
# Per model: FLOPs per step and the speedups they predict
# ---------------------------------------------------------------------------------------------


def other_flops(shape: dict) -> float:
    """Forward FLOPs per layer outside the self-attention's scores and weighted sum."""
    S = math.prod(shape["grid"]) + shape["text_in_attention"]
    C = shape["heads"] * shape["head_dim"]
    if shape["family"] == "wan":  # NOTES.md: projections, cross-attention (q, o + scores on 512 keys), FFN
        L, F = shape["cross_text"], shape["ffn"]
        return 8 * S * C * C + (4 * S * C * C + 4 * S * L * C) + 4 * S * C * F
    return 24 * S * C * C  # HunyuanVideo: q, k, v, o (8 S C^2) and an MLP of 4 C (16 S C^2)


def account(name: str, densities: List[float], steps: int, dense_steps: int, tile=TILE) -> List[dict]:
    """The rows of one model shape: dense, then each pattern at each density."""
    shape = SHAPES[name]
    grid, heads, D, layers = shape["grid"], shape["heads"], shape["head_dim"], shape["layers"]
    layout = TileLayout(grid, tuple(tile), shape["text_in_attention"])
    S = layout.tokens
    dense_attention = attention_flops(heads * S * S, D)  # per layer
    rest = other_flops(shape)
    share = dense_attention / (dense_attention + rest)
    dense_issued = _pairs(layout, torch.ones(layout.n_tiles, layout.n_tiles), None)[1] / S ** 2
    rows = [dict(model=name, pattern="dense", params={}, density_asked=1.0, kept_fraction=1.0,
                 issued_fraction=dense_issued, attention_tflop_per_step=dense_attention * layers / 1e12,
                 step_tflop=(dense_attention + rest) * layers / 1e12, attention_share=share,
                 prediction={"attention_speedup": {str(e): 1.0 for e in EFFICIENCIES},
                             "step_speedup": {str(e): 1.0 for e in EFFICIENCIES}})]
    for pattern in (p for p in PATTERNS if p != "dense"):
        for density in densities:
            choice = SparseAttention(pattern=pattern, density=density, tile=tile).density_choice(layout)
            kept, issued = (pairs / S ** 2 for pairs in choice_pairs(layout, choice))
            attention = dense_attention * kept
            prediction = {"attention_speedup": {str(e): e / kept for e in EFFICIENCIES},
                          "step_speedup": {str(e): 1 / ((1 - share) + share * kept / e) for e in EFFICIENCIES}}
            fraction = dense_steps / steps
            prediction[f"generation_speedup_{dense_steps}_of_{steps}_dense"] = {
                str(e): 1 / (fraction + (1 - fraction) / prediction["step_speedup"][str(e)]) for e in EFFICIENCIES}
            rows.append(dict(model=name, pattern=pattern, params={k: v for k, v in choice.items() if k != "pattern"},
                             density_asked=density, kept_fraction=kept, issued_fraction=issued,
                             attention_tflop_per_step=attention * layers / 1e12,
                             step_tflop=(attention + rest) * layers / 1e12, attention_share=share,
                             prediction=prediction))
    return rows


def print_rows(rows: List[dict]) -> None:
    gen_key = next((k for k in rows[-1]["prediction"] if k.startswith("generation")), None)
    first, shape = rows[0], SHAPES[rows[0]["model"]]
    print(f"\n{first['model']}: S = {shape['grid']} + {shape['text_in_attention']} text, self-attention "
          f"{first['attention_share']:.0%} of the dense step's {first['step_tflop']:.0f} TFLOP")
    print(f"{'pattern':<13} {'asked':>6} {'kept':>7} {'issued':>7} {'attn TFLOP':>11} {'PRED attn x':>13} "
          f"{'PRED step x':>13} {'PRED gen x':>12}  params")
    for r in rows:
        p = r["prediction"]
        att = "/".join(f"{p['attention_speedup'][str(e)]:.2f}" for e in EFFICIENCIES)
        stp = "/".join(f"{p['step_speedup'][str(e)]:.2f}" for e in EFFICIENCIES)
        gen = "/".join(f"{p[gen_key][str(e)]:.2f}" for e in EFFICIENCIES) if gen_key in p else "-"
        print(f"{r['pattern']:<13} {r['density_asked']:>6.2f} {r['kept_fraction']:>7.3f} {r['issued_fraction']:>7.3f} "
              f"{r['attention_tflop_per_step']:>11.1f} {att:>13} {stp:>13} {gen:>12}  {r['params']}")
    print(f"(PRED: predictions at efficiency {' / '.join(map(str, EFFICIENCIES))}; not measured. issued: the pairs "
          "the kernels compute, whole blocks of partial tiles)")


def parse_tile(parser: argparse.ArgumentParser, text: str) -> Tuple[int, int, int]:
    """--tile "tt,th,tw": three positive ints, else the parser's usage error (exit 2)."""
    try:
        tile = tuple(int(x) for x in text.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 3 or min(tile) < 1:
        parser.error(f"--tile must be three positive ints tt,th,tw, got {text!r}")
    return tile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    p.add_argument("--densities", default="0.1,0.25,0.5", help="target kept fractions of the video token pairs")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of a generation")
    p.add_argument("--dense-steps", type=int, default=10, help="steps run dense by the schedule")
    p.add_argument("--tile", default=",".join(map(str, TILE)), help="the 3D tile in tokens, e.g. 4,4,4")
    p.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = p.parse_args(argv)
    tile = parse_tile(p, args.tile)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {', '.join(SHAPES)}")
    densities = [float(d) for d in args.densities.split(",") if d]
    if not densities or any(not 0 < d < 1 for d in densities):
        p.error(f"--densities must be numbers in (0, 1), got {args.densities!r}")
    if not 0 <= args.dense_steps <= args.steps:
        p.error("--dense-steps must be in [0, --steps]")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: List[Dict] = []
    for model in models:
        model_rows = account(model, densities, args.steps, args.dense_steps, tile)
        print_rows(model_rows)
        rows += model_rows
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m benchmarks.sparse_flops", *(sys.argv[1:] if argv is None else argv)])
        with open(args.json, "w") as f:
            json.dump({"note": "FLOP counts; every speedup is a PREDICTION (no GPU run)", "command": command,
                       "tile": tile, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
