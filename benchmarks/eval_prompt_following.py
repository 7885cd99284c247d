"""Prompt following of a text-to-video model, scored automatically on held-out combinations.

    python benchmarks/eval_prompt_following.py                       # bundled model, held-out split
    python benchmarks/eval_prompt_following.py --checkpoint runs/shapes_t2v --split train --seeds 4

For every (color, shape, motion) combination of the split (``dit_fast.data.HELD_OUT``: combinations
the model never saw in training, each of whose words it did see) and ``--seeds`` seeds, it generates
a clip from the caption "a <color> <shape> <motion>" and reads the attributes back with
``dit_fast.data.score_clip``:
  color   hue of the object pixels, nearest of the six vocabulary hues
  shape   fill ratio of the object's bounding box (square ~1, circle ~pi/4, triangle ~1/2)
  motion  net centroid displacement across frames (left/right/up/down); "bouncing": a rise and return
The scorer reads the training data itself back at 100% / >=97% / 100% (tests/test_data.py), so a
miss is the model's. Accuracy per attribute, all three at once, and per combination go to
benchmarks/results/prompt_following.json with the command, device and versions.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dit_fast.data import ALL_COMBOS, HELD_OUT, TRAIN_COMBOS, caption_for, score_clip
from dit_fast.generate import DEFAULT_CFG, DEFAULT_STEPS, generate, load_model, save_video

ROOT = Path(__file__).resolve().parent.parent


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def evaluate(model, cfg, combos, seeds: int, steps: int, cfg_scale: float, batch: int, seed0: int = 1000,
             progress: bool = True):
    """Generate and score every (combo, seed); returns (rows, videos by combo index of the first seed)."""
    jobs = [(combo, seed0 + k * seeds + s) for k, combo in enumerate(combos) for s in range(seeds)]
    rows, first = [], {}
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        prompts = [caption_for([c]) for c, _ in chunk]
        videos = generate(model, cfg, prompts, steps=steps, cfg_scale=cfg_scale, seeds=[s for _, s in chunk],
                          progress_bar=progress)
        for (combo, seed), video in zip(chunk, videos):
            got = score_clip(video)
            color, shape, motion = combo
            rows.append({"prompt": caption_for([combo]), "seed": seed, "color": color, "shape": shape,
                         "motion": motion, "got_color": got["color"], "got_shape": got["shape"],
                         "got_motion": got["motion"], "hue": got["hue"], "fill": got["fill"]})
            first.setdefault(combo, video)
    return rows, first


def summarize(rows):
    n = len(rows)
    acc = {a: sum(r[f"got_{a}"] == r[a] for r in rows) / n for a in ("color", "shape", "motion")}
    acc["all_three"] = sum(all(r[f"got_{a}"] == r[a] for a in ("color", "shape", "motion")) for r in rows) / n
    per_combo = collections.defaultdict(lambda: collections.Counter())
    for r in rows:
        c = per_combo[r["prompt"]]
        c["n"] += 1
        for a in ("color", "shape", "motion"):
            c[a] += r[f"got_{a}"] == r[a]
    table = {p: {a: c[a] / c["n"] for a in ("color", "shape", "motion")} for p, c in per_combo.items()}
    confusion = {a: dict(collections.Counter(f"{r[a]}->{r[f'got_{a}']}" for r in rows if r[f"got_{a}"] != r[a]))
                 for a in ("color", "shape", "motion")}
    return acc, table, confusion


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the bundled model")
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    p.add_argument("--seeds", type=int, default=8, help="clips per combination")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prompt_following.json"),
                   help="results json ('-': print only)")
    p.add_argument("--samples-gif", default=None, help="also write the first clip of every combination, side by side")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    combos = {"heldout": HELD_OUT, "train": TRAIN_COMBOS, "all": ALL_COMBOS}[args.split]
    model, cfg = load_model(args.checkpoint, device=args.device)
    start = time.time()
    rows, first = evaluate(model, cfg, combos, args.seeds, args.steps, args.cfg, args.batch, progress=not args.quiet)
    elapsed = time.time() - start
    acc, table, confusion = summarize(rows)

    result = {
        "what": "prompt following of the text-to-video model, automatic scoring (dit_fast.data.score_clip)",
        "checkpoint": args.checkpoint or "bundled: dit_fast/assets/shapes_t2v.safetensors",
        "split": args.split, "combinations": len(combos), "seeds_per_combination": args.seeds, "clips": len(rows),
        "steps": args.steps, "cfg_scale": args.cfg, "frames": cfg.num_frames, "size": cfg.size,
        "accuracy": acc, "targets": {"color": 0.9, "motion": 0.9, "shape": 0.8},
        "per_prompt": table, "errors": confusion,
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "device": f"{args.device} ({_cpu_name()}, {torch.get_num_threads()} threads)" if args.device == "cpu"
        else f"{args.device} ({torch.cuda.get_device_name()})",
        "seconds": round(elapsed, 1), "torch": torch.__version__, "commit": _commit(),
    }
    print(json.dumps({k: result[k] for k in ("split", "clips", "accuracy", "errors", "seconds")}, indent=1))
    if args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}")
    if args.samples_gif:
        grid = torch.cat([first[c] for c in combos], dim=3)  # (3, T, H, W * n) side by side
        save_video(grid, args.samples_gif, scale=3)
        print(f"wrote {args.samples_gif}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
