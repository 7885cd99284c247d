"""FLOP accounting of block-sparse attention per pattern at Wan2.1-1.3B and HunyuanVideo 720p shapes.

Counts, does not time: for each pattern (dit_fast.sparse.PATTERNS) at each target density, the kept
fraction of the token pairs (text dense both ways, as the patterns build them), the self-attention FLOPs
per step, and PREDICTED speedups of the attention and of a whole denoising step. Nothing here ran on a
GPU: every speedup is a prediction from the counts and the assumptions stated below.

Shapes (tile 4 x 4 x 4 tokens, the default SparseAttention tile):
    wan2.1-1.3b    480p x 81 frames: latent grid 21 x 30 x 52 = 32,760 tokens, 12 heads of 128, 30 layers,
                   FFN 8960, 512 text tokens in cross-attention (not in the self-attention)
    hunyuan-720p   720 x 1280 x 129 frames: latent 33 x 90 x 160, patch 1 x 2 x 2 -> 33 x 45 x 80 = 118,800
                   tokens, 24 heads of 128, 20 dual- + 40 single-stream blocks, 256 text tokens inside the
                   joint self-attention (the extra tiles)

FLOPs per layer (forward; multiply-add = 2): self-attention 4 * kept_pairs * D * heads (Q K^T and P V over
the kept pairs only); the rest as benchmarks/NOTES.md counts it (Wan: projections 8 S C^2, cross-attention
4 S C^2 + 4 S L C, FFN 4 S C F; HunyuanVideo: 24 S C^2 in either block kind: q, k, v, o and an MLP of 4 C).

Predictions (labelled so in every row):
    attention speedup = dense FLOPs / (sparse FLOPs / efficiency), efficiency = the sparse kernel's
                        throughput per kept tile relative to the dense kernel: 0.85 (VSA's bar, the
                        issue's target) and 1.0 (an upper bound)
    step speedup      = 1 / ((1 - a) + a * kept / efficiency), a = the step's self-attention share of
                        FLOPs at dense (Wan 70%, as NOTES.md counts; HunyuanVideo 720p ~87%), counting
                        the rest as unchanged and the step as FLOP-bound (NOTES.md: the memory-bound rest
                        is ~3% of Wan's step)
    with the schedule: dense_steps of steps dense: 1 / (dense_steps / steps + (1 - dense_steps / steps) / step)

    python -m benchmarks.sparse_flops [--densities 0.1,0.25,0.5] [--steps 50 --dense-steps 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dit_fast.ops.sparse_layout import TileLayout
from dit_fast.sparse.config import SparseAttention
from dit_fast.sparse.patterns import PATTERNS, blocks_for_heads

SHAPES = {
    "wan2.1-1.3b": dict(grid=(21, 30, 52), heads=12, head_dim=128, layers=30, text_in_attention=0, cross_text=512,
                        ffn=8960, family="wan"),
    "hunyuan-720p": dict(grid=(33, 45, 80), heads=24, head_dim=128, layers=60, text_in_attention=256, cross_text=0,
                         ffn=None, family="hunyuan"),
}
EFFICIENCIES = (0.85, 1.0)
TILE = (4, 4, 4)


def other_flops(shape: dict) -> float:
    """Forward FLOPs per layer outside the self-attention's scores and weighted sum."""
    S = math.prod(shape["grid"]) + shape["text_in_attention"]
    C = shape["heads"] * shape["head_dim"]
    if shape["family"] == "wan":  # NOTES.md: projections, cross-attention (q, o + scores on 512 keys), FFN
        L, F = shape["cross_text"], shape["ffn"]
        return 8 * S * C * C + (4 * S * C * C + 4 * S * L * C) + 4 * S * C * F
    return 24 * S * C * C  # HunyuanVideo: q, k, v, o (8 S C^2) and an MLP of 4 C (16 S C^2)


def kept_pairs(layout: TileLayout, choice: dict) -> float:
    """Kept token pairs of one head. Static patterns: counted on their blocks. topk: its video tiles per query
    tile are exactly keep + local, of the average tile size (which tiles depends on q and k)."""
    V, E = layout.video_tokens, layout.extra
    if choice["pattern"] == "topk":
        video = V * V * (choice["keep"] + math.prod(choice["local"])) / layout.n_video_tiles
        return video + 2 * V * E + E * E
    return float(blocks_for_heads([choice], layout).kept_pairs().double().mean())


def account(name: str, densities: List[float], steps: int, dense_steps: int) -> List[dict]:
    shape = SHAPES[name]
    grid, heads, D, layers = shape["grid"], shape["heads"], shape["head_dim"], shape["layers"]
    layout = TileLayout(grid, TILE, shape["text_in_attention"])
    S = layout.tokens
    dense_attention = 4.0 * S * S * D * heads  # per layer
    rest = other_flops(shape)
    share = dense_attention / (dense_attention + rest)
    rows = [dict(model=name, pattern="dense", params={}, density_asked=1.0, kept_fraction=1.0,
                 attention_tflop_per_step=dense_attention * layers / 1e12,
                 step_tflop=(dense_attention + rest) * layers / 1e12, attention_share=share,
                 prediction={"attention_speedup": {str(e): 1.0 for e in EFFICIENCIES},
                             "step_speedup": {str(e): 1.0 for e in EFFICIENCIES}})]
    for pattern in (p for p in PATTERNS if p != "dense"):
        for density in densities:
            choice = SparseAttention(pattern=pattern, density=density, tile=TILE).density_choice(layout)
            kept = kept_pairs(layout, choice) / S ** 2
            attention = dense_attention * kept
            row = dict(model=name, pattern=pattern, params={k: v for k, v in choice.items() if k != "pattern"},
                       density_asked=density, kept_fraction=kept, attention_tflop_per_step=attention * layers / 1e12,
                       step_tflop=(attention + rest) * layers / 1e12, attention_share=share, prediction={})
            for key, fn in (("attention_speedup", lambda e: e / kept),
                            ("step_speedup", lambda e: 1 / ((1 - share) + share * kept / e))):
                row["prediction"][key] = {str(e): fn(e) for e in EFFICIENCIES}
            step = row["prediction"]["step_speedup"]
            fraction = dense_steps / steps
            row["prediction"][f"generation_speedup_{dense_steps}_of_{steps}_dense"] = {
                str(e): 1 / (fraction + (1 - fraction) / step[str(e)]) for e in EFFICIENCIES}
            rows.append(row)
    return rows


def print_rows(rows: List[dict]) -> None:
    gen_key = next((k for k in rows[-1]["prediction"] if k.startswith("generation")), None)
    first, shape = rows[0], SHAPES[rows[0]["model"]]
    print(f"\n{first['model']}: S = {shape['grid']} + {shape['text_in_attention']} text, self-attention "
          f"{first['attention_share']:.0%} of the dense step's {first['step_tflop']:.0f} TFLOP")
    print(f"{'pattern':<13} {'asked':>6} {'kept':>7} {'attn TFLOP':>11} {'PRED attn x':>13} {'PRED step x':>13} "
          f"{'PRED gen x':>12}  params")
    for r in rows:
        p = r["prediction"]
        att = "/".join(f"{p['attention_speedup'][str(e)]:.2f}" for e in EFFICIENCIES)
        stp = "/".join(f"{p['step_speedup'][str(e)]:.2f}" for e in EFFICIENCIES)
        gen = "/".join(f"{p[gen_key][str(e)]:.2f}" for e in EFFICIENCIES) if gen_key in p else "-"
        print(f"{r['pattern']:<13} {r['density_asked']:>6.2f} {r['kept_fraction']:>7.3f} "
              f"{r['attention_tflop_per_step']:>11.1f} {att:>13} {stp:>13} {gen:>12}  {r['params']}")
    print(f"(PRED: predictions at efficiency {' / '.join(map(str, EFFICIENCIES))}; not measured)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    p.add_argument("--densities", default="0.1,0.25,0.5", help="target kept fractions of the video token pairs")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of a generation")
    p.add_argument("--dense-steps", type=int, default=10, help="steps run dense by the schedule")
    p.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = p.parse_args(argv)
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
        model_rows = account(model, densities, args.steps, args.dense_steps)
        print_rows(model_rows)
        rows += model_rows
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m benchmarks.sparse_flops", *(sys.argv[1:] if argv is None else argv)])
        with open(args.json, "w") as f:
            json.dump({"note": "FLOP counts; every speedup is a PREDICTION (no GPU run)", "command": command,
                       "tile": TILE, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
