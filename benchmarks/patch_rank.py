"""Why the bundled model drew squares as circles: the rank of its final layer.

    python benchmarks/patch_rank.py

DiT's final layer maps each token's hidden vector (width D) linearly to its patch of pt*ph*pw*C pixel
values, so every patch the model can output lies in one D-dimensional affine subspace. This script
takes training clips (ground truth), projects their patches onto the best such subspace of rank r
(PCA: the optimum in squared error) and scores the projected clips with ``dit_fast.data.score_clip``.
A patch shape whose rank-D projection already loses the shape cannot be fixed by training.
Writes benchmarks/results/patch_rank.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dit_fast.data import SHAPES, ShapesVideoDataset, score_clip

ROOT = Path(__file__).resolve().parent.parent


def patches(x: torch.Tensor, patch) -> torch.Tensor:
    """(N, C, T, H, W) -> (N * tokens, pt * ph * pw * C), the final layer's 'thwc' order."""
    n, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(n, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, pt * ph * pw * c)


def unpatches(p: torch.Tensor, shape, patch) -> torch.Tensor:
    n, c, t, h, w = shape
    pt, ph, pw = patch
    x = p.reshape(n, t // pt, h // ph, w // pw, pt, ph, pw, c)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(shape)


def shape_accuracy(clips, shapes) -> dict:
    hits = {s: [] for s in SHAPES}
    for clip, shape in zip(clips, shapes):
        hits[shape].append(score_clip(clip)["shape"] == shape)
    return {s: round(sum(v) / len(v), 3) for s, v in hits.items() if v}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fit-clips", type=int, default=2000, help="training clips the subspace is fitted on")
    p.add_argument("--score-clips", type=int, default=300, help="of those, clips scored after projection")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "patch_rank.json"))
    args = p.parse_args(argv)

    ds = ShapesVideoDataset(num_frames=8, size=32, split="train")
    items = [ds[i] for i in range(args.fit_clips)]
    video = torch.stack([it["video"] for it in items])  # (N, 3, 8, 32, 32)
    shapes = [next(w for w in it["caption"].split() if w in SHAPES) for it in items][: args.score_clips]
    rows = []
    for patch, ranks in (((2, 8, 8), (64, 128, 160, 192)), ((1, 8, 8), (64, 96, 128))):
        flat = patches(video, patch)
        mean = flat.mean(0)
        _, sv, basis = torch.linalg.svd(flat - mean, full_matrices=False)
        energy = (sv ** 2).cumsum(0) / (sv ** 2).sum()
        for r in ranks:
            proj = (flat - mean) @ basis[:r].T @ basis[:r] + mean
            clips = unpatches(proj, video.shape, patch)[: args.score_clips]
            row = {"patch": list(patch), "patch_values": flat.shape[1], "rank": r,
                   "variance_kept": round(float(energy[r - 1]), 4), "shape_accuracy": shape_accuracy(clips, shapes)}
            print(row, flush=True)
            rows.append(row)
    result = {"what": __doc__.split("\n")[0], "fit_clips": args.fit_clips, "score_clips": args.score_clips,
              "rows": rows, "command": "python benchmarks/patch_rank.py", "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
