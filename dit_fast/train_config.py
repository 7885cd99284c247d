"""``dit-fast train``'s configuration: ``TrainConfig``, its checks (``ConfigError`` naming the field), and the
sequence-parallel / launch checks that run on every rank before any process group exists.

dit_fast/train.py (the trainer) and dit_fast/cli.py import from here; ``dit_fast.train`` re-exports every
public name, so ``from dit_fast.train import TrainConfig`` keeps working.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

import torch.distributed as dist

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in every checkpoint and in the bundled model's json."""

    out_dir: str = "runs/shapes"
    # data
    num_frames: int = 8
    size: int = 32
    two_object_prob: float = 0.0
    data_seed: int = 0
    # model (dit_fast.models.DiTVideo + dit_fast.models.text.TextEncoder)
    patch: Tuple[int, int, int] = (1, 4, 4)
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 64
    text_dropout: float = 0.1  # caption dropped (empty prompt) this often, for classifier-free guidance
    backend: str = "torch"
    # block-sparse self-attention (dit_fast.SparseAttention.from_spec), e.g. "sliding_tile:density=0.25"; "": dense
    sparse: str = ""
    # optimisation
    steps: int = 1000
    batch_size: int = 32  # global batch, over all ranks and micro-batches
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # "adamw" | "galore"
    galore_rank: int = 32
    galore_update_proj_gap: int = 200
    ema_decay: float = 0.999
    bf16: bool = False
    seed: int = 0
    # start from another run's weights (its EMA) instead of random ones; see load_initial_weights
    init_from: str = ""
    # rectified flow
    timestep_sampling: str = "logit_normal"  # "uniform" | "logit_normal"
    shift: float = 2.0  # timestep shift, training and sampling (dit_fast.diffusion.rectified_flow)
    # What the DiT outputs. "velocity": v = noise - x_0 directly. "x0": the clean clip, turned into
    # v = (x_t - x0_hat) / max(t, t_min) by TextToVideo, so loss and sampler stay the rectified flow's.
    # Large pixel patches (2x8x8x3 = 384 values through a 128-wide model) cannot carry the noise that
    # a velocity contains, but they can carry a clean patch (Li & He 2025, "Back to Basics: Let
    # Denoising Generative Models Denoise", JiT: x-prediction with the velocity loss).
    prediction: str = "velocity"
    t_min: float = 0.05
    # past one GPU (under torchrun; see Trainer): sequence parallelism, FSDP2, activation checkpointing
    sp: int = 1  # ranks that share each clip's tokens (dit_fast.parallel.sequence_parallel)
    sp_mode: str = "ulysses"  # "ulysses" (all-to-all over heads) | "ring" | "usp" (ring x ulysses)
    ring: int = 1  # usp only: the ring degree; the Ulysses degree is sp / ring
    fsdp: bool = False  # FSDP2 over every rank; checkpoints sharded (torch.distributed.checkpoint)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    device: str = "auto"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        d = dict(d)
        if "patch" in d:
            d["patch"] = tuple(d["patch"])
        return cls(**d)

    def validate(self, world_size: int = 1) -> None:
        """ConfigError (a ValueError naming the field) for the first setting that cannot run.

        Checks every field's type and range, then the ones that depend on each other (the patch
        divides the clip, the heads divide the width, the batch splits over ranks and micro-batches).
        Whether the device, the backend and the checkpoints exist is checked where they are used
        (resolve_device, check_backend, Trainer).
        """
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ConfigError("out_dir", f"expected a directory path, got {self.out_dir!r}")
        _check_out_dir(self.out_dir)
        _check_int("num_frames", self.num_frames, 2, "motion needs two frames")
        _check_int("size", self.size, 16, "the shapes need 16 pixels")
        _check_float("two_object_prob", self.two_object_prob, 0.0, 1.0)
        _check_int("data_seed", self.data_seed, 0)
        patch = tuple(self.patch) if isinstance(self.patch, (tuple, list)) else ()
        if len(patch) != 3 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch):
            raise ConfigError("patch", f"expected three positive ints (PT, PH, PW), got {self.patch!r}")
        pt, ph, pw = patch
        if self.num_frames % pt or self.size % ph or self.size % pw:
            raise ConfigError("patch", f"patch {patch} must divide (frames, size, size) = "
                                       f"({self.num_frames}, {self.size}, {self.size})")
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("depth", self.depth, 1)
        _check_int("num_heads", self.num_heads, 1)
        if self.hidden_size % self.num_heads:
            raise ConfigError("num_heads", f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        _check_float("mlp_ratio", self.mlp_ratio, 0.0, None, low_open=True)
        _check_int("text_dim", self.text_dim, 4)
        if self.text_dim % TEXT_HEADS:
            raise ConfigError("text_dim", f"must be a multiple of the text encoder's {TEXT_HEADS} heads, "
                                          f"got {self.text_dim}")
        _check_float("text_dropout", self.text_dropout, 0.0, 1.0)
        _check_choice("backend", self.backend, BACKEND_CHOICES)
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("grad_accum", self.grad_accum, 1)
        self.check_parallel(world_size)
        self.sparse_attention()  # ConfigError("sparse", ...) for a bad spec
        dp = world_size // self.sp  # data-parallel replicas (or FSDP shards with their own samples)
        if self.batch_size % (dp * self.grad_accum):
            what = f"world_size / sp * grad_accum = {world_size} / {self.sp} * {self.grad_accum}" if self.sp > 1 \
                else f"world_size * grad_accum = {world_size} * {self.grad_accum}"
            raise ConfigError("batch_size", f"batch_size {self.batch_size} must be divisible by {what}")
        _check_float("lr", self.lr, 0.0, None, low_open=True)
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_int("warmup", self.warmup, 0)
        _check_float("weight_decay", self.weight_decay, 0.0, None)
        _check_float("grad_clip", self.grad_clip, 0.0, None)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_int("galore_rank", self.galore_rank, 1)
        _check_int("galore_update_proj_gap", self.galore_update_proj_gap, 1)
        _check_float("ema_decay", self.ema_decay, 0.0, 1.0)
        if not isinstance(self.bf16, bool):
            raise ConfigError("bf16", f"expected True or False, got {self.bf16!r}")
        _check_int("seed", self.seed, 0)
        if not isinstance(self.init_from, str):
            raise ConfigError("init_from", f"expected a path or '', got {self.init_from!r}")
        _check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        _check_float("shift", self.shift, 0.0, None, low_open=True)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_float("t_min", self.t_min, 0.0, 1.0, low_open=True)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError("gradient_checkpointing", f"expected True or False, got {self.gradient_checkpointing!r}")
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        _check_int("log_every", self.log_every, 1)
        if not isinstance(self.device, str):
            raise ConfigError("device", f"expected a device name, got {self.device!r}")

    def sparse_attention(self):
        """The DiT's SparseAttention from ``sparse`` (None when ""); ConfigError naming the field if it cannot run."""
        if not isinstance(self.sparse, str):
            raise ConfigError("sparse", f"expected a spec such as 'sliding_tile:density=0.25' or '', got "
                                        f"{self.sparse!r}")
        if not self.sparse:
            return None
        from dit_fast.sparse.config import SparseAttention

        try:
            sparse = SparseAttention.from_spec(self.sparse)
        except (TypeError, ValueError) as exc:
            raise ConfigError("sparse", str(exc)) from None
        if any(i >= self.depth for i in sparse.dense_layers):
            raise ConfigError("sparse", f"dense_layers {sparse.dense_layers} name blocks past depth = {self.depth}")
        if self.sp > 1 and self.sp_mode != "ulysses":
            raise ConfigError("sparse", f"block-sparse attention runs under --sp-mode ulysses (each rank whole heads), "
                                        f"not {self.sp_mode!r}")
        return sparse

    def check_parallel(self, world_size: int) -> Tuple[int, int]:
        """(ulysses, ring) degrees of --sp / --sp-mode / --ring; ConfigError if they cannot split this
        model's heads and tokens over ``world_size`` ranks. Needs valid patch, size and heads."""
        _check_int("sp", self.sp, 1)
        _check_choice("sp_mode", self.sp_mode, SP_MODES)
        _check_int("ring", self.ring, 1)
        if not isinstance(self.fsdp, bool):
            raise ConfigError("fsdp", f"expected True or False, got {self.fsdp!r}")
        grid = tuple(n // p for n, p in zip((self.num_frames, self.size, self.size), self.patch, strict=True))
        return sequence_parallel_degrees(self.sp, self.sp_mode, self.ring, self.num_heads, grid, world_size)


# The choices of the string fields (dit-fast train --help lists them).
OPTIMIZERS = ("adamw", "galore")
SP_MODES = ("ulysses", "ring", "usp")  # dit_fast.parallel.mesh.SP_MODES
PREDICTIONS = ("velocity", "x0")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
BACKEND_CHOICES = ("torch", "triton", "cuda", "auto")
TEXT_HEADS = 4  # TextToVideo's text encoder heads: text_dim must be a multiple
# The fields that fix the shapes of the weights and the optimizer state: a run resumes only with the
# same values (Trainer.load_checkpoint says which differ).
ARCHITECTURE_FIELDS = ("num_frames", "size", "patch", "hidden_size", "depth", "num_heads", "mlp_ratio", "text_dim",
                       "prediction", "optimizer", "galore_rank")


class ConfigError(ValueError):
    """A TrainConfig field (``field``) that cannot run; ``detail`` says what was expected."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


def _check_int(name: str, value, low: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(name, f"expected an integer >= {low}{' (' + why + ')' if why else ''}, got {value!r}")


def _check_float(name: str, value, low: float, high: Optional[float], low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        span = f"a finite number {lo}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(name, f"expected {span}, got {value!r}")


def _check_choice(name: str, value, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")


def sequence_parallel_degrees(sp: int, sp_mode: str, ring: int, num_heads: int, grid: Tuple[int, int, int],
                              world_size: Optional[int]) -> Tuple[int, int]:
    """(ulysses, ring) for ``--sp sp --sp-mode sp_mode --ring ring``, checked against the model's heads,
    its token grid (T, H, W) and the number of ranks (None: not known yet). ConfigError naming the flag.

    Shared by ``dit-fast train`` and ``dit-fast generate``: every rank runs the same checks before any
    process group exists, so a bad setting is the same one-line error on every rank, never a hang."""
    if sp_mode == "usp":
        if sp == 1:
            return 1, 1
        if not 1 < ring < sp or sp % ring:
            raise ConfigError("ring", f"--sp-mode usp splits --sp {sp} ranks into ring x ulysses: --ring must divide "
                                      f"{sp} and lie strictly between 1 and {sp}, got {ring} (or use --sp-mode ring "
                                      "or ulysses)")
        ulysses = sp // ring
    elif ring != 1:
        raise ConfigError("ring", f"--ring {ring} is USP's ring degree: pass --sp-mode usp (with --sp a multiple of "
                                  f"--ring), or drop --ring (--sp-mode ring uses all --sp ranks as the ring)")
    else:
        ulysses, ring = (sp, 1) if sp_mode == "ulysses" else (1, sp)
    if world_size is not None and world_size % sp:
        raise ConfigError("sp", f"--sp {sp} must divide the number of ranks: torchrun started {world_size} "
                                f"(WORLD_SIZE); use --nproc-per-node a multiple of {sp}")
    if sp > 1 and num_heads % ulysses:
        raise ConfigError("sp", f"--sp {sp} --sp-mode {sp_mode}: num_heads {num_heads} is not divisible by the Ulysses "
                                f"degree {ulysses} (each rank attends over num_heads / {ulysses} heads); use "
                                f"--sp-mode ring, which splits any number of heads, or a degree that divides "
                                f"{num_heads}")
    if sp > 1:
        from dit_fast.parallel.sequence import check_shardable

        try:
            check_shardable(grid, sp)
        except ValueError as e:
            raise ConfigError("sp", f"--sp {sp}: {e}") from None
    return ulysses, ring


def check_launch(sp: int, fsdp: bool, command: str = "train") -> None:
    """ConfigError if --sp > 1 or --fsdp is asked for outside torchrun (no WORLD_SIZE, no process group)."""
    parallel = (isinstance(sp, int) and sp > 1) or fsdp is True
    if parallel and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        flag = "sp" if isinstance(sp, int) and sp > 1 else "fsdp"
        ranks = sp if flag == "sp" else 2
        how = f" (any multiple of {sp} ranks)" if flag == "sp" and command == "train" else ""
        raise ConfigError(flag, f"--{flag} runs on several processes started by torchrun (WORLD_SIZE is not set): "
                                f"torchrun --standalone --nproc-per-node {ranks} -m dit_fast.cli {command} ...{how}")


def launched_world_size() -> int:
    """Ranks of this run: the initialized process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare_out_dir(path: str) -> None:
    """Creates the run directory (and its parents) and writes and removes a probe file in it, so that a
    directory a run could not save into fails before any model is built: ConfigError naming out_dir.
    Safe on every rank at once (exist_ok, a unique probe name); leaves the directory in place."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".dit_fast_write_check.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError("out_dir", f"cannot create or write the run directory {path!r} "
                                     f"({type(e).__name__}: {e.strerror or e})") from None


def _check_out_dir(path: str) -> None:
    """The run directory must be a directory or creatable: no file in its place or above it."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError("out_dir", f"{probe!r} is a file, expected {path!r} to be (or to be creatable as) a "
                                     "directory")
