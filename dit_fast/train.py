"""Training loop for text-to-video DiTs on the synthetic shapes dataset (``dit-fast train``).

    from dit_fast.train import TrainConfig, Trainer
    Trainer(TrainConfig(out_dir="runs/tiny", steps=200)).train()

What it does, per optimizer step: every rank draws its share of the global batch from
``ShapesVideoDataset`` (sample ``i`` of step ``s`` is dataset index ``s * global_batch + i``), splits
it into ``grad_accum`` micro-batches, and for each computes the rectified-flow velocity loss under
optional bf16 autocast; then AdamW or ``dit_fast.optim.GaLoreAdamW`` steps, and the EMA follows.

Exact resume: everything random is a function of (seed, step, sample index): the clip, its noise,
its timestep and its caption dropout are drawn from per-sample generators, and the global RNG is
re-seeded from (seed, step, the micro-batch's first sample index) before each forward for anything
inside the model; nothing depends on the rank or the number of ranks. The learning rate is a function
of the step. So a run stopped after step k and resumed from its checkpoint on the same ranks computes
bitwise the same losses as one that never stopped (tests/test_train.py), and splitting a batch into
micro-batches or over another number of ranks changes the gradient only by float summation order: a
sharded run saved on 2 ranks and resumed on 1 continues the 2-rank losses to 1e-5
(tests/test_cli_distributed.py).

Checkpoints (every ``checkpoint_every`` steps and at the end) go to ``out_dir``:
    ckpt_<step>.safetensors   model and EMA weights ("model.<name>", "ema.<name>"), config in metadata
    state_<step>.pt           optimizer state, step, losses: loads with torch.load(weights_only=True)
    latest                    the step of the newest complete pair, written last
each through a temporary file in the same directory and ``os.replace``, so a crash leaves either
the old checkpoint or the new one, never half of one.

With ``fsdp`` they are sharded instead: ``out_dir/dcp/step_<step>/`` (torch.distributed.checkpoint,
every rank its own shards, resumable on any number of ranks; dit_fast/train_parallel.py).

Multi-GPU: ``torchrun --nproc_per_node N -m dit_fast.cli train ...`` (or ``dit-fast train``):
WORLD_SIZE > 1 in the environment makes the trainer join a process group (nccl on CUDA, gloo on
CPU) and wrap the model in DistributedDataParallel; the global batch is split across ranks.
``sp > 1`` (sequence parallelism: ranks that share each clip's tokens) and ``fsdp`` (FSDP2) build a
device mesh instead, in dit_fast/train_parallel.py. The configuration and its checks live in
dit_fast/train_config.py (re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dit_fast.models.checkpoint import (CheckpointError, CheckpointNotFoundError, check_state_dict, read_safetensors,
                                        read_torch_file)
from dit_fast.train_common import (  # noqa: F401  (re-exported: dit_fast.generate imports them from here)
    DistInfo, atomic_save_safetensors, atomic_torch_save, atomic_write_text)
from dit_fast.train_config import (  # noqa: F401  (re-exported: dit_fast.cli and the tests import them from here)
    TrainConfig, OPTIMIZERS, SP_MODES, PREDICTIONS, TIMESTEP_SAMPLING, BACKEND_CHOICES, TEXT_HEADS,
    ARCHITECTURE_FIELDS, ConfigError, _check_choice, sequence_parallel_degrees, check_launch,
    launched_world_size)

# --------------------------------------------------------------------------------------------
# Small pieces: seeds, learning rate, EMA, distributed setup (atomic files, DistInfo: train_common.py)
# --------------------------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings: independent streams for (seed, step, index...)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine to ``lr * min_lr_ratio`` (step counts from 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: Dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params (fp32 copies, keyed by parameter name)."""
    for name, p in model.named_parameters():
        ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    Single process (no WORLD_SIZE or WORLD_SIZE=1): nothing to do. nccl on CUDA, gloo on CPU.
    """
    world = launched_world_size()
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    rank = int(os.environ["RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, True)


def resolve_device(name: str, dist_info: Optional[DistInfo] = None) -> torch.device:
    """The torch.device for "auto", "cpu", "cuda" or "cuda:<index>"; ConfigError("device") if it cannot run here.

    "auto" and an index-less "cuda" mean this process's GPU: LOCAL_RANK's under torchrun, else 0.
    """
    local = dist_info.local_rank if dist_info is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"expected auto, cpu, cuda or cuda:<index>, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError("device", f"{name!r} asked for, but CUDA is not available ({why}); use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local)
        if device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{name!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                                        f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def check_backend(backend: str, device: torch.device) -> None:
    """ConfigError("backend") if ops cannot run on ``backend`` on ``device`` ("auto" always can)."""
    from dit_fast._backend import unavailable_reason

    _check_choice("backend", backend, BACKEND_CHOICES)
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise ConfigError("backend", f"{backend!r} cannot run on {device}: {reason}")


# --------------------------------------------------------------------------------------------
# The model: text encoder + DiTVideo, one module so that one state dict, one EMA and one DDP cover both
# --------------------------------------------------------------------------------------------


class TextToVideo(torch.nn.Module):
    """``dit_fast.models.text.TextEncoder`` over the dataset's vocabulary feeding a ``DiTVideo``.

    forward(x, t, ids, mask, force_drop_ids=None) -> velocity (B, 3, T, H, W); ``forward_with_cfg``
    has DiTVideo's batched-guidance signature so that the samplers in ``dit_fast.diffusion`` drive it
    with ``model_kwargs={"ids": ids, "mask": mask}``.
    """

    def __init__(self, cfg: TrainConfig, vocabulary=None):
        super().__init__()
        from dit_fast.data import VOCABULARY
        from dit_fast.models.dit_video import DiTVideo
        from dit_fast.models.text import TextEncoder, Tokenizer

        self.vocabulary = list(vocabulary if vocabulary is not None else VOCABULARY)
        self.tokenizer = Tokenizer(self.vocabulary)
        self.text_encoder = TextEncoder(len(self.tokenizer), text_dim=cfg.text_dim, num_layers=2, num_heads=4,
                                        max_length=self.tokenizer.max_length)
        self.dit = DiTVideo(input_size=(cfg.num_frames, cfg.size, cfg.size), patch_size=tuple(cfg.patch),
                            in_channels=3, hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                            mlp_ratio=cfg.mlp_ratio, class_dropout_prob=cfg.text_dropout, num_classes=0,
                            text_dim=cfg.text_dim, learn_sigma=False, backend=cfg.backend,
                            gradient_checkpointing=cfg.gradient_checkpointing,
                            **({"attention": "block_sparse", "sparse": cfg.sparse_attention()} if cfg.sparse else {}))
        self.prediction, self.t_min = cfg.prediction, cfg.t_min
        self.num_timesteps = 1000  # RectifiedFlow's scale of t (make_flow)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids, mask)  # (B, L, text_dim)

    def to_velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The DiT's output as a velocity: itself, or (x_t - x0_hat) / max(t, t_min) for x0-prediction."""
        if self.prediction == "velocity":
            return out
        if t.dim() != 1:
            raise ValueError(f"x0-prediction takes one timestep per sample (B,), got {tuple(t.shape)}")
        tt = (t.float() / self.num_timesteps).clamp(min=self.t_min).reshape(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        return ((x.float() - out.float()) / tt).to(out.dtype)  # (B, 3, T, H, W)

    def forward(self, x, t, ids, mask, force_drop_ids=None):
        text = self.encode_text(ids, mask)
        out = self.dit(x, t, text=text, text_mask=mask, force_drop_ids=force_drop_ids)
        return self.to_velocity(out, x, t)

    @property
    def patch_size(self):
        return self.dit.patch_size

    def forward_with_cfg(self, x, t, ids, mask, cfg_scale=1.0):
        """Guidance is linear, so guiding x0_hat and then converting equals guiding the velocity."""
        text = self.encode_text(ids, mask)
        out = self.dit.forward_with_cfg(x, t, cfg_scale=cfg_scale, text=text, text_mask=mask)
        return self.to_velocity(out, x, t)


def build_model(cfg: TrainConfig, vocabulary=None) -> TextToVideo:
    return TextToVideo(cfg, vocabulary)


def make_flow(cfg: TrainConfig):
    from dit_fast.diffusion.rectified_flow import RectifiedFlow
    return RectifiedFlow(shift=cfg.shift, sample_t=cfg.timestep_sampling, num_timesteps=1000)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    if cfg.optimizer == "galore":
        from dit_fast.optim import GaLoreAdamW, galore_param_groups

        # attention and MLP matrices wider than the rank get low-rank moments; the rest plain AdamW
        groups = galore_param_groups(model, rank=cfg.galore_rank, update_proj_gap=cfg.galore_update_proj_gap,
                                     weight_decay=cfg.weight_decay)
        # FSDP2 row shards: the randomized refresh works on the shards (the SVD would need whole matrices)
        return GaLoreAdamW(groups, lr=cfg.lr, backend=cfg.backend, seed=cfg.seed,
                           **({"refresh": "randomized"} if cfg.fsdp else {}))
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


class Trainer:
    """Runs ``TrainConfig``: ``Trainer(cfg).train()`` returns the loss of every step it ran.

    resume: "auto" continues from ``out_dir``'s latest checkpoint when there is one; a path to a
    checkpoint directory or its ``latest`` file (a sharded run: its directory, ``dcp`` root or a
    ``step_*`` directory), or None to start fresh.

    Under torchrun: plain data parallelism (DDP) by default; ``sp > 1`` or ``fsdp`` builds the
    (dp, ring, ulysses) mesh instead (dit_fast/train_parallel.py).
    """

    def __init__(self, cfg: TrainConfig, resume: Optional[str] = "auto", progress_bar: bool = True):
        self.cfg = cfg
        check_launch(cfg.sp, cfg.fsdp)
        cfg.validate(launched_world_size())
        self.device = resolve_device(cfg.device)
        check_backend(cfg.backend, self.device)
        field = "resume"
        if resume == "auto":
            resume = cfg.out_dir if find_run(cfg.out_dir) else None
            field = "out_dir"
        if resume:  # before building anything: a run with other shapes (or checkpoint format) cannot continue
            check_resume_config(cfg, resume, field)
        self.resumed_from = resume
        self.parallel = None
        if cfg.sp > 1 or cfg.fsdp:
            from dit_fast.train_parallel import setup_parallel

            self.parallel = setup_parallel(cfg, self.device)
            self.dist = self.parallel.dist
            self.dp_rank, self.dp_size = self.parallel.dp_rank, self.parallel.dp_size
        else:
            self.dist = setup_distributed(self.device)
            self.dp_rank, self.dp_size = self.dist.rank, self.dist.world_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # an indexed device: resolve_device gave it LOCAL_RANK's GPU
        from dit_fast.data import ShapesVideoDataset

        self.dataset = ShapesVideoDataset(num_frames=cfg.num_frames, size=cfg.size, split="train",
                                          seed=cfg.data_seed, two_object_prob=cfg.two_object_prob)
        torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical initial weights on every rank
        self.model = build_model(cfg).to(self.device)
        if cfg.init_from and not resume:  # a resumed run's checkpoint holds the weights already
            load_initial_weights(self.model, cfg.init_from)
        if self.parallel is not None:  # weights in place first, then split the tokens, then shard
            from dit_fast.train_parallel import parallelize

            parallelize(self.model, cfg, self.parallel)
        self.ema = {n: p.detach().float().clone() for n, p in self.model.named_parameters()}  # FSDP: shards
        self.optimizer = _make_optimizer(cfg, self.model)
        self.flow = make_flow(cfg)
        self.step = 0
        self.losses: List[float] = []
        self.progress_bar = progress_bar and self.dist.is_main
        if resume:
            self.load_checkpoint(resume)
        self.ddp = None
        if self.dist.world_size > 1 and self.parallel is None:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- data and randomness, all functions of (seed, step, sample index) ----

    def _micro_batches(self, step: int):
        """This rank's share of step ``step``'s global batch, as ``grad_accum`` micro-batches: the ranks of
        one sequence-parallel group (same data-parallel rank) take the same samples."""
        cfg = self.cfg
        per_rank = cfg.batch_size // self.dp_size
        micro = per_rank // cfg.grad_accum
        for m in range(cfg.grad_accum):
            # sample i of the global batch is dataset index step * batch_size + i; ranks take contiguous slices
            first = step * cfg.batch_size + self.dp_rank * per_rank + m * micro
            yield m, list(range(first, first + micro))

    def _batch(self, indices: List[int]):
        cfg = self.cfg
        items = [self.dataset[i] for i in indices]
        x0 = torch.stack([it["video"] for it in items]).to(self.device)  # (b, 3, T, H, W)
        ids, mask = self.model.tokenizer([it["caption"] for it in items], device=self.device)
        noise, t, drop = [], [], []
        for i in indices:
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "sample", i))
            t.append(self.flow.sample_timesteps((1,), generator=g))
            noise.append(torch.randn(x0.shape[1:], generator=g))
            drop.append(torch.rand((1,), generator=g) < cfg.text_dropout)
        from dit_fast.diffusion.rectified_flow import shift_timesteps

        t = shift_timesteps(torch.cat(t), self.flow.shift_for(x0.shape)).to(self.device)
        noise = torch.stack(noise).to(self.device)
        drop = torch.cat(drop).to(self.device)
        return x0, {"ids": ids, "mask": mask, "force_drop_ids": drop}, t, noise

    # ---- one step ----

    def train_step(self) -> float:
        cfg, par = self.cfg, self.parallel
        module = self.ddp if self.ddp is not None else self.model
        module.train()
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        fsdp = par is not None and par.fsdp_mesh is not None
        scale = par.loss_scale if par is not None else 1
        for m, indices in self._micro_batches(self.step):
            x0, kwargs, t, noise = self._batch(indices)
            # model-internal randomness: by the micro-batch's first sample, so never by rank or rank count
            torch.manual_seed(derive_seed(cfg.seed, "step", self.step, indices[0]))
            last = m == cfg.grad_accum - 1
            ctx = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            if fsdp:
                self.model.set_requires_gradient_sync(last)  # one reduce-scatter per step
            # FSDP's bf16 policy casts parameters and inputs itself; otherwise bf16 autocast
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and not fsdp)
            with ctx, autocast:
                loss = self.flow.training_losses(module, x0, kwargs, t=t, noise=noise)["loss"].mean()
                (loss * scale / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
        if par is not None:
            from dit_fast.train_parallel import sync_gradients

            sync_gradients(self.model, par)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        ema_update(self.ema, self.model, cfg.ema_decay if self.step > 0 else 0.0)
        if self.dist.world_size > 1:  # the ranks of a sequence-parallel group hold the same loss
            dist.all_reduce(total)
            total /= self.dist.world_size
        self.step += 1
        value = float(total)
        self.losses.append(value)
        return value

    def train(self, steps: Optional[int] = None) -> List[float]:
        """Run until ``steps`` (default ``cfg.steps``) optimizer steps are done; returns this call's losses."""
        from tqdm.auto import tqdm

        target = self.cfg.steps if steps is None else steps
        ran: List[float] = []
        bar = tqdm(total=target, initial=self.step, desc="train", disable=not self.progress_bar, dynamic_ncols=True,
                   mininterval=5.0)
        log_path = os.path.join(self.cfg.out_dir, "log.jsonl")
        start = time.time()
        while self.step < target:
            loss = self.train_step()
            ran.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.dist.is_main and (self.step % self.cfg.log_every == 0 or self.step == target):
                os.makedirs(self.cfg.out_dir, exist_ok=True)
                recent = self.losses[-self.cfg.log_every:]
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": self.step, "loss": sum(recent) / len(recent),
                                        "lr": learning_rate(self.cfg, self.step - 1),
                                        "elapsed_s": round(time.time() - start, 2)}) + "\n")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == target:
                self.save_checkpoint()
        bar.close()
        return ran

    # ---- checkpoints ----

    def save_checkpoint(self) -> Optional[str]:
        """Writes ckpt_<step>.safetensors and state_<step>.pt atomically, then ``latest`` (rank 0 only);
        with fsdp, ``dcp/step_<step>`` (every rank its shards: dit_fast.train_parallel.save_sharded)."""
        if self.cfg.fsdp:
            from dit_fast.train_parallel import save_sharded

            return save_sharded(self)
        if self.dist.world_size > 1:
            dist.barrier()
        if not self.dist.is_main:
            return None
        out = self.cfg.out_dir
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        meta = {"step": str(self.step), "config": self.cfg.to_json(),
                "vocabulary": json.dumps(self.model.vocabulary)}
        weights = os.path.join(out, f"ckpt_{self.step:07d}.safetensors")
        atomic_save_safetensors(tensors, weights, metadata=meta)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "losses": list(self.losses),
                 "config": dataclasses.asdict(self.cfg), "world_size": self.dist.world_size}
        atomic_torch_save(state, os.path.join(out, f"state_{self.step:07d}.pt"))
        atomic_write_text(f"{self.step}\n", os.path.join(out, "latest"))
        self._prune(out)
        return weights

    def _prune(self, out: str) -> None:
        """Keep the newest ``keep_checkpoints``; checkpoints of later steps than this one are a replaced
        run's (--no-resume into its directory) and go too, so that ``latest`` is never pruned."""
        steps = sorted(int(f[5:12]) for f in os.listdir(out) if f.startswith("ckpt_") and f.endswith(".safetensors"))
        stale = [s for s in steps if s > self.step]
        steps = [s for s in steps if s <= self.step]
        for s in stale + steps[: max(len(steps) - self.cfg.keep_checkpoints, 0)]:
            for name in (f"ckpt_{s:07d}.safetensors", f"state_{s:07d}.pt"):
                path = os.path.join(out, name)
                if os.path.exists(path):
                    os.remove(path)

    def load_checkpoint(self, path: str) -> None:
        """Restore model, EMA, optimizer, step and loss history from a run directory (its ``latest``)."""
        if self.cfg.fsdp:
            from dit_fast.train_parallel import load_sharded

            return load_sharded(self, path)
        weights, state_path = checkpoint_paths(path)
        tensors, _ = read_safetensors(weights, device=str(self.device))
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        check_state_dict(self.model, model_sd, weights)
        self.model.load_state_dict(model_sd, strict=True)
        check_state_dict(self.model, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, weights,
                         optional=[k for k, _ in self.model.named_buffers()])  # EMA: every parameter
        for k in self.ema:
            self.ema[k] = tensors[f"ema.{k}"].float().clone()
        state = read_torch_file(state_path, map_location=self.device)
        if not isinstance(state, dict) or not {"step", "optimizer", "losses"} <= state.keys():
            raise CheckpointError(f"checkpoint {state_path!r} is not a training state: expected a dict with "
                                  f"'step', 'optimizer' and 'losses'")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])


def find_run(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a run to continue: a single-file one (``latest``) or a sharded one (``dcp/``)."""
    from dit_fast.train_parallel import sharded_root

    return os.path.exists(os.path.join(out_dir, "latest")) or sharded_root(out_dir) is not None


def resolve_run(path: str) -> str:
    """The checkpoint a --resume path names: a sharded run's step directory, or a single-file run's weights
    file; CheckpointError (not found, unreadable ``latest``) otherwise."""
    from dit_fast.train_parallel import sharded_checkpoint, sharded_root

    if sharded_root(path) is not None:
        return sharded_checkpoint(path)
    return checkpoint_paths(path)[0]


def _saved_config(resume: str) -> Tuple[dict, int, bool]:
    """(config dict, step, sharded) of the checkpoint a run resumes from."""
    from dit_fast.train_parallel import checkpoint_step, read_run_info, sharded_checkpoint, sharded_root

    if sharded_root(resume) is not None:
        ckpt = sharded_checkpoint(resume)
        return read_run_info(ckpt)["config"], checkpoint_step(ckpt), True
    weights, _ = checkpoint_paths(resume)
    return json.loads(read_safetensors(weights)[1].get("config", "{}")), _latest_step(weights), False


def check_resume_config(cfg: TrainConfig, resume: str, field: str = "resume") -> None:
    """ConfigError(``field``) if the run at ``resume`` has other ``ARCHITECTURE_FIELDS`` than ``cfg``:
    names each flag with the run's value and this config's, and says how to start fresh instead. Also
    if its checkpoint format is not this run's: sharded (--fsdp) runs continue with --fsdp only."""
    saved, step, sharded = _saved_config(resume)
    fresh = ("start fresh with --no-resume (replaces its checkpoints) or another --out-dir"
             if field == "out_dir" else "drop --resume to start fresh")
    if sharded and not cfg.fsdp:
        raise ConfigError(field, f"{resume!r} (step {step}) is a sharded run, trained with --fsdp: continue it with "
                                 "--fsdp under torchrun (on any number of ranks), or write its weights to one file "
                                 f"(dit-fast export {resume} model.safetensors) and start from them with --init-from; "
                                 f"or {fresh}")
    if cfg.fsdp and not sharded:
        raise ConfigError(field, f"{resume!r} (step {step}) is a single-file run, trained without --fsdp: continue it "
                                 f"without --fsdp (--sp works with it), or start a sharded run from its weights with "
                                 f"--init-from {resume} and another --out-dir; or {fresh}")
    here = dataclasses.asdict(cfg)
    diffs = []
    for name in ARCHITECTURE_FIELDS:
        old, new = saved.get(name, here[name]), here[name]
        if (list(old) if isinstance(old, (list, tuple)) else old) != (list(new) if isinstance(new, tuple) else new):
            fmt = (lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
            diffs.append(f"--{name.replace('_', '-')} {fmt(old)} there, {fmt(new)} here")
    if diffs:
        raise ConfigError(field, f"cannot resume {resume!r} (step {step}): it was trained with "
                                 f"other settings ({'; '.join(diffs)}); pass the run's values to continue it, or "
                                 f"{fresh}")


def _latest_step(weights: str) -> int:
    return int(os.path.basename(weights)[5:12])


def read_weights(path: str, ema: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state dict, safetensors metadata) of a model: a training directory or ``ckpt_<step>.safetensors``
    (its EMA weights, or the live ones with ema=False), or an exported model file."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path) or os.path.basename(path).startswith("ckpt_"):
        weights, _ = checkpoint_paths(path)
        prefix = "ema." if ema else "model."
    else:
        weights, prefix = path, ""
    tensors, meta = read_safetensors(weights)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta


def load_initial_weights(model: "TextToVideo", path: str) -> None:
    """Initialise ``model`` from another run's weights (``read_weights``). Every weight must be there
    with its shape, except that the temporal patch may differ (pt -> 1 or 1 -> pt, through
    ``dit_fast.models.checkpoint.convert_temporal_patch``); positional tables are the model's own."""
    from dit_fast.models.checkpoint import convert_temporal_patch

    state, _ = read_weights(path)
    state = convert_temporal_patch(state, model.dit.patch_size, prefix="dit.")
    buffers = {k for k, _ in model.named_buffers()}
    state = {k: v for k, v in state.items() if k not in buffers}
    check_state_dict(model, state, path, optional=buffers)
    model.load_state_dict(state, strict=False)


def checkpoint_paths(path: str) -> Tuple[str, str]:
    """(weights, state) of a run directory's latest checkpoint, or of ``ckpt_<step>.safetensors`` itself."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        latest = os.path.join(path, "latest")
        from dit_fast.train_parallel import sharded_root

        if not os.path.exists(latest) and sharded_root(path) is not None:
            raise CheckpointError(f"{path!r} is a sharded run (trained with --fsdp): write its weights to one file with "
                                  f"dit-fast export {path} model.safetensors and use that file (or continue training "
                                  "it with dit-fast train --fsdp under torchrun)")
        if not os.path.exists(latest):
            raise CheckpointNotFoundError(f"{path} has no 'latest' file: not a dit_fast training directory")
        with open(latest) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{latest!r} holds {text[:20]!r}, expected the step of the latest checkpoint")
        step = int(text)
        directory = path
    elif path.endswith(".safetensors") and os.path.basename(path).startswith("ckpt_"):
        directory, step = os.path.dirname(path), int(os.path.basename(path)[5:12])
    else:
        raise CheckpointError(f"expected a training directory or a ckpt_<step>.safetensors file, got {path!r}")
    weights = os.path.join(directory, f"ckpt_{step:07d}.safetensors")
    state = os.path.join(directory, f"state_{step:07d}.pt")
    for p in (weights, state):
        if not os.path.exists(p):
            raise CheckpointNotFoundError(f"checkpoint file {p} is missing")
    return weights, state


def cleanup_distributed(info: DistInfo, ok: bool = True) -> None:
    """Leaves the process group this process started. ok=False (an error on this rank): no barrier, which
    would wait for peers that are still inside a collective; torchrun stops them when this rank exits."""
    if info.initialized_here and dist.is_initialized():
        if ok:
            dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
