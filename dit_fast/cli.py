"""The ``dit-fast`` command.

    dit-fast generate "a red circle moving right" -o out.gif       # bundled model, CPU or GPU
    dit-fast generate "a blue square bouncing" -o out.mp4 --seed 3 --steps 30 --cfg 4 --checkpoint runs/shapes
    dit-fast train --out-dir runs/shapes --steps 2000              # torchrun --nproc_per_node 2 -m dit_fast.cli train ...
    torchrun --standalone --nproc-per-node 4 -m dit_fast.cli train --sp 2 --fsdp --out-dir runs/big
    torchrun --standalone --nproc-per-node 2 -m dit_fast.cli generate "a red circle moving right" --sp 2
    dit-fast export runs/shapes my_model.safetensors               # a run's EMA weights as a standalone model file
    dit-fast vocab                                                  # what a prompt may say
    dit-fast bench                                                  # the fused-ops speed table (benchmarks/run.py)

Every mistake in the arguments ends the same way: one line on stderr, ``dit-fast <command>: error:
argument <name>: <what was expected>``, exit status 2, no traceback. Values are checked as they are
parsed (the ``type=`` functions below); what needs a file, a device or the model (the checkpoint
reads, the device and backend exist, the prompt fits the model) is checked by the command before any
sampling or training. Those checks raise ``UsageError`` (or ``dit_fast.train.ConfigError`` for a
training setting, ``CheckpointError`` for a file that cannot be read), caught once, in ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, List, Optional

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


class UsageError(Exception):
    """A command-line argument that cannot work: ``argument`` names it ("--checkpoint", "prompt")."""

    def __init__(self, argument: str, detail: str):
        super().__init__(f"argument {argument}: {detail}")
        self.argument, self.detail = argument, detail


# --------------------------------------------------------------------------------------------
# Value checks (argparse type= functions: each raises ArgumentTypeError, which argparse reports as
# "argument --flag: <message>")
# --------------------------------------------------------------------------------------------


def int_range(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}")
        return value
    return parse


def finite_float(low: Optional[float] = None, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = value == value and abs(value) != float("inf")
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if not ok:
            bound = "" if low is None else (f" > {low}" if low_open else f" >= {low}")
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}")
        return value
    return parse


def video_path(text: str) -> str:
    from dit_fast.generate import check_output_path

    try:
        return check_output_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model_path(text: str) -> str:
    from dit_fast.generate import check_output_path

    try:
        return check_output_path(text, (".safetensors",))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_name(text: str) -> str:
    """auto, cpu, cuda, cuda:<index>, and only if it exists here."""
    from dit_fast.train import ConfigError, resolve_device

    try:
        resolve_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.detail) from None
    return text


def _checked(argument: str, fn: Callable, *args):
    """fn(*args), with a file behind ``argument`` that cannot be read, does not fit or cannot be written
    (CheckpointError, or any ValueError or OSError that reading or writing it raises) reported as a
    UsageError on ``argument``."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        raise UsageError(argument, str(e)) from None


def _warn(command: str, message: str) -> None:
    print(f"dit-fast {command}: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    import torch

    from dit_fast.data import parse_caption
    from dit_fast.generate import generate, load_model, save_video
    from dit_fast.train import (ConfigError, check_backend, check_launch, launched_world_size, resolve_device,
                                sequence_parallel_degrees)

    start = time.time()
    check_launch(args.sp, False, "generate")
    world = launched_world_size()
    if world > 1 and args.sp != world:
        raise ConfigError("sp", f"torchrun started {world} ranks and generate splits one video over all of them: pass "
                                f"--sp {world} (got --sp {args.sp})")
    device = resolve_device(args.device)
    if args.backend is not None:
        check_backend(args.backend, device)
    prompt = " ".join(args.prompt)
    try:
        parse_caption(prompt)
    except ValueError as e:
        raise UsageError("prompt", str(e)) from None
    if args.threads or device.type == "cpu":
        # one thread by default on CPU: the bundled model is tiny, and on a busy machine two OpenMP
        # threads spin against each other (measured: 38.5 s with 2 threads vs 7.3 s with 1 while two
        # trainings shared the 2 cores)
        torch.set_num_threads(args.threads or 1)
    backend = args.backend or ("auto" if device.type == "cuda" else None)
    model, cfg = _checked("--checkpoint", load_model, args.checkpoint, device, not args.no_ema, backend)
    try:  # what this model was trained on: its vocabulary, and one object per clip unless it saw two
        parse_caption(prompt, max_objects=None if cfg.two_object_prob > 0 else 1)
        model.tokenizer([prompt])
    except ValueError as e:
        raise UsageError("prompt", str(e)) from None
    frames = cfg.num_frames if args.frames is None else args.frames
    if frames % cfg.patch[0]:
        raise UsageError("--frames", f"expected a multiple of the model's temporal patch {cfg.patch[0]}, got {frames}")
    grid = (frames // cfg.patch[0], cfg.size // cfg.patch[1], cfg.size // cfg.patch[2])
    ulysses, ring = sequence_parallel_degrees(args.sp, args.sp_mode, args.ring, cfg.num_heads, grid, world)
    info = None
    if args.sp > 1:  # every check above ran on every rank: from here on the ranks talk
        from dit_fast.train_parallel import join_mesh, split_sequence

        info, dims, mesh = join_mesh(ulysses, ring, device)
        split_sequence(model.dit, mesh, dims)  # every rank computes the same full video
    main_rank, ok = info is None or info.is_main, False
    if frames != cfg.num_frames and main_rank:
        _warn("generate", f"--frames {frames}: this model was trained on {cfg.num_frames}-frame clips; "
                          "other lengths may look worse")
    try:
        video = generate(model, cfg, [prompt], seed=args.seed, steps=args.steps, cfg_scale=args.cfg, frames=frames,
                         progress_bar=not args.quiet and main_rank)
        if main_rank:
            _checked("--output", save_video, video[0], args.output, args.fps, args.scale)  # e.g. a full disk
        if not args.quiet and main_rank:
            T, H, W = video.shape[2:]
            split = f" ({args.sp} ranks, sequence parallel: {args.sp_mode})" if args.sp > 1 else ""
            print(f"wrote {args.output}: {T} frames of {H}x{W} (x{args.scale}) at {args.fps} fps for {prompt!r} "
                  f"in {time.time() - start:.1f} s on {device}{split}")
        ok = True
    finally:
        if info is not None:
            from dit_fast.train import cleanup_distributed
            cleanup_distributed(info, ok)
    return 0


def cmd_train(args) -> int:
    from dit_fast.train import (TrainConfig, Trainer, check_backend, check_launch, cleanup_distributed, find_run,
                                launched_world_size, read_weights, resolve_device, resolve_run)
    from dit_fast.train_config import prepare_out_dir

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    cfg.patch = tuple(cfg.patch)
    check_launch(cfg.sp, cfg.fsdp)
    cfg.validate(launched_world_size())
    check_backend(cfg.backend, resolve_device(cfg.device))
    if args.resume:
        _checked("--resume", resolve_run, args.resume)
    if cfg.init_from:
        _checked("--init-from", read_weights, cfg.init_from)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    resume = None if args.no_resume else (args.resume or "auto")
    prepare_out_dir(cfg.out_dir)  # last of the checks: creates it; before any model is built
    trainer = Trainer(cfg, resume=resume, progress_bar=not args.quiet)
    ok = False
    try:
        main_rank = trainer.dist.is_main
        if trainer.step >= cfg.steps:
            if main_rank:
                print(f"{trainer.resumed_from} is already at step {trainer.step} (--steps {cfg.steps}): nothing to "
                      f"train; pass a larger --steps to continue it, or --no-resume to start over")
            ok = True
            return 0
        if trainer.resumed_from and main_rank:
            print(f"resuming {trainer.resumed_from} at step {trainer.step} of {cfg.steps}")
        elif args.no_resume and find_run(cfg.out_dir) and main_rank:
            print(f"starting {cfg.out_dir} afresh (--no-resume): its earlier run's checkpoints are replaced as "
                  "this one saves")
        losses = trainer.train()
        if main_rank and losses:
            where = os.path.join(cfg.out_dir, "dcp") if cfg.fsdp else cfg.out_dir
            print(f"trained to step {trainer.step}; last loss {losses[-1]:.4f}; checkpoints in {where}")
        ok = True
    finally:
        cleanup_distributed(trainer.dist, ok)
    return 0


def cmd_export(args) -> int:
    from dit_fast.generate import export_model
    from dit_fast.train import resolve_run

    _checked("run_dir", resolve_run, args.run_dir)
    extra = {}
    if args.command_line:
        extra["training_command"] = args.command_line
    if args.note:
        extra["note"] = args.note
    info = _checked("run_dir", export_model, args.run_dir, args.dest, extra)
    print(f"wrote {args.dest} (step {info['step']}) and {os.path.splitext(args.dest)[0]}.json")
    return 0


def cmd_vocab(args) -> int:
    import json

    from dit_fast.data import describe_prompts
    from dit_fast.generate import BUNDLED_JSON, read_config

    if args.checkpoint is None:
        with open(BUNDLED_JSON) as f:
            two_object_prob = json.load(f)["config"]["two_object_prob"]
    else:
        two_object_prob = _checked("--checkpoint", read_config, args.checkpoint).two_object_prob
    print(describe_prompts(two_objects=two_object_prob > 0))
    return 0


def bench_runner() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "benchmarks", "run.py")


def cmd_bench(bench_args: List[str]) -> int:
    """``python benchmarks/run.py ARGS`` (its own --help included): every argument is the bench's."""
    import subprocess

    runner = bench_runner()
    if not os.path.exists(runner):
        raise UsageError("bench", "benchmarks/run.py is not installed with the package; run it from a checkout "
                                  "(pip install -e .)")
    env = dict(os.environ, DIT_FAST_BENCH_PROG="dit-fast bench")  # its --help and errors name this command
    return subprocess.call([sys.executable, runner, *bench_args], env=env)


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


# What each TrainConfig field means on the command line (dit-fast train --help; every field needs one).
TRAIN_HELP = {
    "out_dir": "run directory: checkpoints, log.jsonl; an existing run there is resumed",
    "num_frames": "frames per training clip",
    "size": "clip height and width in pixels",
    "two_object_prob": "fraction of clips with two objects ('... and ...' captions)",
    "data_seed": "seed of the synthetic dataset",
    "patch": "3D patch (frames, height, width); must divide (num-frames, size, size)",
    "hidden_size": "transformer width; a multiple of --num-heads",
    "depth": "transformer blocks",
    "num_heads": "attention heads; must divide --hidden-size",
    "mlp_ratio": "MLP width / hidden size",
    "text_dim": "text encoder width; a multiple of 4",
    "text_dropout": "fraction of captions dropped (for classifier-free guidance)",
    "backend": "op backend (auto: the fastest kernels on a GPU, torch on CPU)",
    "sparse": "block-sparse self-attention, PATTERN[+PATTERN][:key=value,...] with patterns sliding_tile, radial, "
              "topk and keys density, dense_layers (0/3), tile (4x4x4), local, tolerance "
              "(e.g. sliding_tile:density=0.25); kept in the run's config: resume and generate use it",
    "steps": "optimizer steps in total (a resumed run trains up to this)",
    "batch_size": "global batch, over all ranks and micro-batches",
    "grad_accum": "micro-batches per step",
    "lr": "peak learning rate",
    "min_lr_ratio": "cosine decay to lr * this at the last step (1: constant)",
    "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay of the matrices",
    "grad_clip": "gradient-norm clip (0: off)",
    "optimizer": "adamw, or galore (low-rank projected moments, dit_fast.optim.GaLoreAdamW)",
    "galore_rank": "GaLore projection rank",
    "galore_update_proj_gap": "steps between GaLore subspace refreshes",
    "ema_decay": "EMA decay of the weights that generation uses",
    "bf16": "bf16 autocast",
    "seed": "seed of the initial weights, noise and timesteps",
    "init_from": "start from another run's (or a model file's) EMA weights",
    "timestep_sampling": "how training draws timesteps",
    "shift": "timestep shift, training and sampling",
    "prediction": "what the DiT outputs: the velocity, or the clean clip (x0)",
    "t_min": "x0-prediction: the smallest t the velocity divides by",
    "sp": "sequence parallelism under torchrun: ranks that share each clip's tokens (must divide the ranks; the "
          "other world / sp groups take different samples)",
    "sp_mode": "how --sp ranks exchange attention: ulysses (all-to-all over heads; --sp must divide --num-heads), "
               "ring (K/V passed around a ring; any degree) or usp (ring x ulysses, with --ring)",
    "ring": "--sp-mode usp: the ring degree (a divisor of --sp; the Ulysses degree is --sp / --ring)",
    "fsdp": "FSDP2 under torchrun: every parameter, gradient and optimizer state sharded over all ranks (bf16 "
            "compute with --bf16); checkpoints sharded in --out-dir/dcp, resumable on any number of ranks",
    "gradient_checkpointing": "recompute each block's activations in backward (less memory; composes with --sp "
                              "and --fsdp)",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept (older ones are removed)",
    "log_every": "steps between log.jsonl lines",
    "device": "auto, cpu, cuda or cuda:<index> (cuda under torchrun: the local rank's GPU)",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the help says it, or it is an off switch), and the
    descriptions' line breaks kept."""

    def _get_help_string(self, action):
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _rank_prefix() -> str:
    """"[rank R] " under torchrun with several ranks (each rank prints its own error line), else ""."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK")
    return f"[rank {rank}] " if rank is not None and world.isdigit() and int(world) > 1 else ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage block + message, as the one line every error gets
        self.exit(2, f"{_rank_prefix()}{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from dit_fast.train import BACKEND_CHOICES, OPTIMIZERS, PREDICTIONS, SP_MODES, TIMESTEP_SAMPLING, TrainConfig

    choices = {"optimizer": OPTIMIZERS, "prediction": PREDICTIONS, "timestep_sampling": TIMESTEP_SAMPLING,
               "backend": BACKEND_CHOICES, "sp_mode": SP_MODES}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default, help_ = f.default, TRAIN_HELP.get(f.name, f.name.replace("_", " "))  # a test wants them all
        if f.name == "patch":
            p.add_argument(flag, type=int_range(1), nargs=3, metavar=("PT", "PH", "PW"), default=default, help=help_)
        elif f.name == "device":
            p.add_argument(flag, type=device_name, default=default, help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(default, int):
            p.add_argument(flag, type=int_range(-2**63, 2**63 - 1), default=default, help=help_)
        elif isinstance(default, float):
            p.add_argument(flag, type=finite_float(), default=default, help=help_)
        else:
            p.add_argument(flag, default=default, choices=choices.get(f.name), help=help_)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", default=None,
                        help="continue this run directory or ckpt_<step>.safetensors, or a sharded (--fsdp) run's "
                             "directory or dcp/step_* directory (default: --out-dir's latest checkpoint, if any)")
    resume.add_argument("--no-resume", action="store_true", help="start fresh even if --out-dir has a checkpoint")
    p.add_argument("--threads", type=int_range(0), default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from dit_fast import __version__
    from dit_fast.generate import DEFAULT_CFG, DEFAULT_STEPS, MAX_FPS, MAX_SCALE
    from dit_fast.train import BACKEND_CHOICES, SP_MODES

    examples = __doc__.split("\n\n")[1]
    parser = _Parser(prog="dit-fast", formatter_class=_Formatter,
                     description="Fused kernels for video DiTs, and a small text-to-video model to try them.\n\n"
                                 + examples)
    parser.add_argument("--version", action="version", version=f"dit-fast {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{generate,train,export,vocab,bench}")
    kw = dict(formatter_class=_Formatter)

    g = sub.add_parser("generate", help="text to video (the bundled model by default)", **kw,
                       description="Text to video with the bundled model or a checkpoint of yours.")
    g.add_argument("prompt", nargs="+", help='what to draw, "a <color> <shape> <motion>" (see: dit-fast vocab)')
    g.add_argument("-o", "--output", type=video_path, default="out.gif",
                   help=".gif, or .mp4 (needs imageio-ffmpeg: pip install 'dit_fast[video]')")
    g.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="seed of the starting noise")
    g.add_argument("--steps", type=int_range(1), default=DEFAULT_STEPS, help="Euler sampling steps")
    g.add_argument("--cfg", type=finite_float(0.0), default=DEFAULT_CFG, help="classifier-free guidance scale (1: off)")
    g.add_argument("--frames", type=int_range(1), default=None, help="frames to generate (default: the model's training length)")
    g.add_argument("--checkpoint", default=None,
                   help="a training directory, ckpt_<step>.safetensors or model file (default: the bundled model)")
    g.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:<index>")
    g.add_argument("--backend", default=None, choices=BACKEND_CHOICES,
                   help="op backend (default: the model's on CPU, auto on a GPU)")
    g.add_argument("--no-ema", action="store_true", help="training checkpoints: the raw weights instead of the EMA")
    g.add_argument("--fps", type=int_range(1, MAX_FPS), default=8, help="frames per second of the written video")
    g.add_argument("--scale", type=int_range(1, MAX_SCALE), default=4,
                   help="nearest-neighbour upscaling of the written frames")
    g.add_argument("--threads", type=int_range(0), default=0, help="torch CPU threads (0: one on CPU)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    g.add_argument("--sp", type=int_range(1), default=1,
                   help="sequence parallelism under torchrun: split the video's tokens over this many ranks (all of "
                        "them: torchrun --nproc-per-node N ... --sp N); every rank computes the same video, rank 0 "
                        "writes it")
    g.add_argument("--sp-mode", default="ulysses", choices=SP_MODES,
                   help="ulysses (all-to-all over heads; --sp must divide the model's heads), ring (any degree) or "
                        "usp (ring x ulysses, with --ring)")
    g.add_argument("--ring", type=int_range(1), default=1, help="--sp-mode usp: the ring degree (a divisor of --sp)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a text-to-video model on the synthetic shapes dataset", **kw,
                       description="Train a text-to-video DiT on the synthetic shapes dataset (CPU, GPU, or "
                                   "torchrun --nproc_per_node N -m dit_fast.cli train ...).")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a run's EMA weights as a standalone model file (+ .json)", **kw,
                       description="Write a run's EMA weights as a standalone model file and a .json beside it. "
                                   "A sharded (--fsdp) run is read in this one process, whatever the number of "
                                   "ranks that wrote it.")
    e.add_argument("run_dir", help="a training directory or its ckpt_<step>.safetensors; a sharded run's directory, "
                                   "its dcp/ root or one dcp/step_* directory")
    e.add_argument("dest", type=model_path, help="the model file to write, e.g. model.safetensors")
    e.add_argument("--command-line", default=None, help="the training command, recorded in the json")
    e.add_argument("--note", default=None, help="free text recorded in the json (device, wall time, ...)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("vocab", help="what a prompt may say", **kw,
                       description="The prompt grammar and words a model understands.")
    v.add_argument("--checkpoint", default=None, help="describe this model's prompts (default: the bundled model)")
    v.set_defaults(func=cmd_vocab)

    # listed for `dit-fast --help`; main() hands `dit-fast bench ARGS` to benchmarks/run.py unparsed
    sub.add_parser("bench", help="the fused-ops speed table: python benchmarks/run.py ARGS (--help: its options)",
                   add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit status (2 for a usage error, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "dit-fast"
    try:
        if argv[:1] == ["bench"]:
            command = "dit-fast bench"
            return cmd_bench(argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, or a parse error already reported in one line
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        command = f"dit-fast {args.cmd}"
        return args.func(args)
    except UsageError as e:
        message = str(e)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # only the kinds a user's input causes; anything else keeps its traceback
        from dit_fast.models.checkpoint import CheckpointError
        from dit_fast.train import ConfigError

        if isinstance(e, ConfigError):
            message = f"argument --{e.field.replace('_', '-')}: {e.detail}"
        elif isinstance(e, CheckpointError):
            message = str(e)
        else:
            raise
    print(f"{_rank_prefix()}{command}: error: {_one_line(message)} (see {command} --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
