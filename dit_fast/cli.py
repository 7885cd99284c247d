"""The ``dit-fast`` command.

    dit-fast generate "a red circle moving right" -o out.gif       # bundled model, CPU or GPU
    dit-fast generate "a blue square bouncing" -o out.mp4 --seed 3 --steps 30 --cfg 4 --checkpoint runs/shapes
    dit-fast train --out-dir runs/shapes --steps 2000              # torchrun --nproc_per_node 2 -m dit_fast.cli train ...
    dit-fast export runs/shapes my_model.safetensors               # a run's EMA weights as a standalone model file
    dit-fast vocab                                                  # the words a prompt may use
    dit-fast bench                                                  # the fused-ops speed table (benchmarks/run.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional


def _device(name: str) -> str:
    if name == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_generate(args) -> int:
    import torch

    from dit_fast.generate import load_model, generate, save_video

    start = time.time()
    device = _device(args.device)
    if args.threads or device == "cpu":
        # one thread by default on CPU: the bundled model is tiny, and on a busy machine two OpenMP
        # threads spin against each other (measured: 38.5 s with 2 threads vs 7.3 s with 1 while two
        # trainings shared the 2 cores)
        torch.set_num_threads(args.threads or 1)
    backend = args.backend or ("auto" if device.startswith("cuda") else None)
    model, cfg = load_model(args.checkpoint, device=device, ema=not args.no_ema, backend=backend)
    prompt = " ".join(args.prompt)
    try:
        video = generate(model, cfg, [prompt], seed=args.seed, steps=args.steps, cfg_scale=args.cfg,
                         frames=args.frames, progress_bar=not args.quiet)
    except ValueError as e:  # unknown word, bad --frames: a message, not a traceback
        print(f"dit-fast generate: error: {e}", file=sys.stderr)
        return 2
    save_video(video[0], args.output, fps=args.fps, scale=args.scale)
    if not args.quiet:
        T, H, W = video.shape[2:]
        print(f"wrote {args.output}: {T} frames of {H}x{W} (x{args.scale}) for {prompt!r} "
              f"in {time.time() - start:.1f} s on {device}")
    return 0


def cmd_train(args) -> int:
    from dit_fast.train import TrainConfig, Trainer, cleanup_distributed

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for name in fields:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = tuple(value) if name == "patch" else value
    cfg = TrainConfig(**overrides)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    resume = None if args.no_resume else (args.resume or "auto")
    trainer = Trainer(cfg, resume=resume, progress_bar=not args.quiet)
    try:
        losses = trainer.train()
        if trainer.dist.is_main and losses:
            print(f"trained to step {trainer.step}; last loss {losses[-1]:.4f}; checkpoints in {cfg.out_dir}")
    finally:
        cleanup_distributed(trainer.dist)
    return 0


def cmd_export(args) -> int:
    from dit_fast.generate import export_model

    extra = {}
    if args.command_line:
        extra["training_command"] = args.command_line
    if args.note:
        extra["note"] = args.note
    info = export_model(args.run_dir, args.dest, extra)
    print(f"wrote {args.dest} (step {info['step']}) and {os.path.splitext(args.dest)[0]}.json")
    return 0


def cmd_vocab(args) -> int:
    from dit_fast.data import VOCABULARY, caption_for

    print(" ".join(VOCABULARY))
    print(f"e.g. {caption_for([('red', 'circle', 'right')])!r}")
    return 0


def cmd_bench(args) -> int:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runner = os.path.join(root, "benchmarks", "run.py")
    if not os.path.exists(runner):
        print("dit-fast bench: benchmarks/run.py is not installed with the package; run it from a checkout",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, runner, *args.bench_args])


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from dit_fast.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "patch":
            p.add_argument(flag, type=int, nargs=3, metavar=("PT", "PH", "PW"), help=f"default {default}")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {default}")
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"default {default}")
    p.add_argument("--resume", help="a run directory or ckpt_<step>.safetensors (default: out-dir's latest, if any)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if out-dir has a checkpoint")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from dit_fast.generate import DEFAULT_CFG, DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="dit-fast", description="Fused kernels for video DiTs; text-to-video demo.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="text to video (bundled model by default)")
    g.add_argument("prompt", nargs="+", help='e.g. "a red circle moving right" (see: dit-fast vocab)')
    g.add_argument("-o", "--output", default="out.gif", help=".gif or .mp4 (mp4 needs dit_fast[video])")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Euler steps")
    g.add_argument("--cfg", type=float, default=DEFAULT_CFG, help="classifier-free guidance scale (1: off)")
    g.add_argument("--frames", type=int, default=None, help="frames to generate (default: the model's)")
    g.add_argument("--checkpoint", default=None, help="a training directory, ckpt_<step>.safetensors or model file")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--backend", default=None, help="op backend (default: torch on CPU, auto on GPU)")
    g.add_argument("--no-ema", action="store_true", help="training checkpoints: raw weights instead of EMA")
    g.add_argument("--fps", type=int, default=8)
    g.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the written frames")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (default on CPU: 1)")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a text-to-video model on the synthetic shapes dataset")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a run's EMA weights as a standalone model file (+ .json)")
    e.add_argument("run_dir")
    e.add_argument("dest", help="e.g. model.safetensors")
    e.add_argument("--command-line", default=None, help="the training command, recorded in the json")
    e.add_argument("--note", default=None, help="free text recorded in the json (device, wall time, ...)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("vocab", help="print the prompt vocabulary")
    v.set_defaults(func=cmd_vocab)

    b = sub.add_parser("bench", help="the fused-ops speed table: python benchmarks/run.py ARGS")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
