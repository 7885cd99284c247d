"""``dit-fast train`` and ``generate`` past one GPU: the mesh, sequence parallelism, FSDP2, and sharded runs.

    par = setup_parallel(cfg, device)           # under torchrun: init_from_env(ulysses=U, ring=R)
    model = parallelize(model, cfg, par)         # sequence_parallel(model.dit, ...), then apply_fsdp(...)
    (loss * par.loss_scale).backward()           # FSDP over every rank sums the sequence shares: x sp
    sync_gradients(model, par)                   # sequence parallel without FSDP: sum over ranks, / dp

How the ranks divide the work: ``--sp N`` ranks share each clip's tokens (Ulysses, ring or USP on the
("dp", "ring", "ulysses") mesh of dit_fast.parallel.mesh); the world / N groups of them (the "dp"
dimension) take different samples. Every rank of a sequence-parallel group sees the same batch and
the same random draws (the trainer seeds by sample index, never by rank), so each computes the same
full output and back-propagates its own tokens' share of the gradients. ``--fsdp`` shards every
parameter, gradient and optimizer state over all ranks (FSDP2 ``fully_shard`` per DiTVideo block, then
the root; bf16 parameters in compute with ``--bf16``); its reduce-scatter averages over the world, so
the loss is multiplied by the sequence-parallel degree. Without FSDP the gradients are summed over
every rank and divided by the number of data-parallel groups (DDP is used only without ``--sp``).

Sharded run layout (``--fsdp``): ``<out_dir>/dcp/`` is a dit_fast.parallel.checkpoint root:
``step_<8 digits>/`` (model, optimizer and trainer state: step, EMA weights, loss history, each rank
writing its own shards), ``latest``, and ``run.json`` (config and vocabulary; DCP files hold tensors
only). Such a run resumes on any number of ranks (resharding), and ``dit-fast export`` writes its EMA
weights as one safetensors file that ``dit-fast generate --checkpoint`` reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dit_fast.models.checkpoint import CheckpointError, CheckpointNotFoundError
from dit_fast.train_common import DistInfo, atomic_write_text
from dit_fast.train_config import TrainConfig, launched_world_size

# Imports run one way: dit_fast/train.py imports this module (lazily, for --sp / --fsdp runs), never the
# reverse; what both need lives below them (train_common.py, train_config.py). A "trainer" argument
# here is the run's dit_fast.train.Trainer, used through its attributes (cfg, dist, model, optimizer,
# ema, step, losses).

SHARDED_DIR = "dcp"  # <out_dir>/dcp: the sharded run's checkpoint root
RUN_JSON = "run.json"  # <out_dir>/dcp/run.json: {"config": ..., "vocabulary": [...]}
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


# --------------------------------------------------------------------------------------------
# The process group, the mesh and the model
# --------------------------------------------------------------------------------------------


@dataclass
class Parallel:
    """What one rank of a --sp / --fsdp run needs: who it is, the mesh, its data-parallel slot."""

    dist: DistInfo
    dims: object  # dit_fast.parallel.ParallelDims
    mesh: object  # DeviceMesh ("dp", "ring", "ulysses")
    fsdp_mesh: object  # 1-D DeviceMesh over every rank (--fsdp), else None
    dp_rank: int
    dp_size: int

    @property
    def loss_scale(self) -> int:
        """FSDP's reduce-scatter divides by the world size: x sp makes it the mean over data-parallel groups."""
        return self.dims.sp if self.fsdp_mesh is not None else 1


def join_mesh(ulysses: int, ring: int, device: torch.device):
    """(DistInfo, ParallelDims, mesh): joins torchrun's process group (gloo on CPU, NCCL on GPUs; every
    collective times out) and builds the ("dp", "ring", "ulysses") mesh. Call after every check."""
    from dit_fast.parallel import init_from_env

    # FSDP2 on gloo calls collectives that torch 2.13 deprecates: one warning per rank and call site, not ours
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    initialized_here = not dist.is_initialized()
    dims, mesh = init_from_env(ulysses=ulysses, ring=ring, backend="gloo" if device.type == "cpu" else None)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), initialized_here)
    return info, dims, mesh


def setup_parallel(cfg: TrainConfig, device: torch.device) -> Parallel:
    """The process group, the mesh and this rank's data-parallel slot of a --sp / --fsdp training run."""
    from torch.distributed.device_mesh import init_device_mesh

    ulysses, ring = cfg.check_parallel(launched_world_size())
    info, dims, mesh = join_mesh(ulysses, ring, device)
    fsdp_mesh = init_device_mesh(mesh.device_type, (dims.world_size,)) if cfg.fsdp else None
    return Parallel(info, dims, mesh, fsdp_mesh, mesh["dp"].get_local_rank(), dims.dp)


def split_sequence(dit, mesh, dims) -> None:
    """dit_fast.parallel.sequence_parallel on a DiTVideo, unless the degree is 1."""
    if dims.sp > 1:
        from dit_fast.parallel import sequence_parallel

        # sync_gradients sums every parameter over all ranks once per step (text encoder included)
        sequence_parallel(dit, mesh, mode=dims.sp_mode, grad_sync="manual")


def parallelize(model, cfg: TrainConfig, par: Parallel):
    """Sequence parallelism on ``model.dit`` (weights loaded before, compile after), then FSDP2: one
    ``fully_shard`` per DiTVideo block and one for the root (text encoder, embeddings, final layer).
    Activation checkpointing is DiTVideo's own (``gradient_checkpointing``), inside each block's call."""
    split_sequence(model.dit, par.mesh, par.dims)
    if par.fsdp_mesh is not None:
        from dit_fast.parallel import apply_fsdp

        apply_fsdp(model, par.fsdp_mesh, "bf16" if cfg.bf16 else None, blocks=model.dit.blocks)
    return model


def sync_gradients(model, par: Parallel) -> None:
    """Without FSDP: every rank's gradients hold its tokens' share of its group's samples; the sum over all
    ranks divided by the data-parallel size is the mean over samples (what DDP gives without --sp)."""
    if par.fsdp_mesh is not None or par.dist.world_size == 1:
        return
    from dit_fast.parallel.comm import all_reduce_sum

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    all_reduce_sum(grads, None)
    if par.dp_size > 1 and grads:
        torch._foreach_div_(grads, par.dp_size)  # one call over the list, not one kernel launch per parameter
    if getattr(model.dit, "sequence_parallel_plan", None) is not None:
        from dit_fast.parallel.sequence import gradients_summed_elsewhere

        gradients_summed_elsewhere(model.dit)  # the sum above covered its sequence-parallel ranks


# --------------------------------------------------------------------------------------------
# Sharded runs: where they are, what they hold
# --------------------------------------------------------------------------------------------


def sharded_root(path) -> Optional[str]:
    """The checkpoint root of a sharded (--fsdp) run given as its run directory, its ``dcp`` root or one
    ``step_*`` directory; None when ``path`` is none of these."""
    from dit_fast.parallel.checkpoint import latest_checkpoint

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, ".metadata")) and _STEP_DIR.match(os.path.basename(os.path.abspath(path))):
        return os.path.dirname(os.path.abspath(path))
    for root in (os.path.join(path, SHARDED_DIR), path):
        if latest_checkpoint(root) is not None:
            return root
    return None


def sharded_checkpoint(path) -> str:
    """The step directory to resume or export: ``path`` itself if it is one, else its root's latest."""
    from dit_fast.parallel.checkpoint import latest_checkpoint

    root = sharded_root(path)
    if root is None:
        raise CheckpointNotFoundError(f"{os.fspath(path)!r} holds no sharded checkpoint (no {SHARDED_DIR}/step_* "
                                      "directory with its .metadata)")
    if os.path.isfile(os.path.join(path, ".metadata")):
        return os.fspath(path)
    return os.fspath(latest_checkpoint(root))


def checkpoint_step(ckpt_dir: str) -> int:
    from dit_fast.parallel.checkpoint import step_of  # also .step_N.partial / .old, named during a same-step save

    return step_of(os.path.abspath(ckpt_dir))


def read_run_info(path) -> dict:
    """{"config": dict, "vocabulary": list} of a sharded run (its root's run.json); CheckpointError if missing."""
    root = sharded_root(path)
    info_path = os.path.join(root if root is not None else os.fspath(path), RUN_JSON)
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"sharded run {os.fspath(path)!r}: cannot read its {RUN_JSON} ({type(e).__name__}: "
                              f"{e}); it holds the config the checkpoint was trained with") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict) \
            or not isinstance(info.get("vocabulary"), list):
        raise CheckpointError(f"{info_path!r} is not a dit_fast run description (expected 'config' and 'vocabulary')")
    return info


def save_sharded(trainer) -> str:
    """Saves ``<out_dir>/dcp/step_<step>`` on every rank (a collective); returns its path."""
    from dit_fast.parallel.checkpoint import TrainerState, on_rank0, save_checkpoint

    cfg = trainer.cfg
    root = os.path.join(cfg.out_dir, SHARDED_DIR)

    def describe():  # before the checkpoint it describes is published
        atomic_write_text(json.dumps({"config": json.loads(cfg.to_json()), "vocabulary": trainer.model.vocabulary})
                          + "\n", os.path.join(root, RUN_JSON))

    # rank 0 writes; a failure there reaches every rank as an error (one broadcast), not a peer left waiting
    on_rank0(describe, trainer.dist.is_main, None, f"writing {os.path.join(root, RUN_JSON)!r}")
    state = TrainerState(ema=trainer.ema, extra={"losses": torch.tensor(trainer.losses, dtype=torch.float64)},
                         rng=False)  # nothing reads the global RNG streams: every draw is per (seed, step, sample)
    final = save_checkpoint(root, trainer.step, model=trainer.model, optimizer=trainer.optimizer, trainer=state,
                            keep=cfg.keep_checkpoints)
    if trainer.dist.is_main:  # a replaced run's later steps (--no-resume into its directory): never resumed
        for name in os.listdir(root):
            match = _STEP_DIR.match(name)
            if match and int(match.group(1)) > trainer.step:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return os.fspath(final)


def load_sharded(trainer, path) -> None:
    """Restores model, optimizer, EMA, step and loss history from a sharded run, resharded to these ranks."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dit_fast.parallel.checkpoint import TrainerState, load_checkpoint, read_metadata

    ckpt = sharded_checkpoint(path)
    entry = read_metadata(ckpt).state_dict_metadata.get("trainer.extra.losses")
    n = int(entry.size[0]) if isinstance(entry, TensorStorageMetadata) and len(entry.size) == 1 else 0
    state = TrainerState(ema=trainer.ema, extra={"losses": torch.zeros(n, dtype=torch.float64)}, rng=False)
    load_checkpoint(ckpt, model=trainer.model, optimizer=trainer.optimizer, trainer=state)
    trainer.step = state.step
    trainer.losses = state.extra["losses"].tolist()


def export_sharded(path, dest: str) -> dict:
    """Writes a sharded run's EMA weights to ``dest`` (one safetensors file, in one process, with the config,
    vocabulary and step in its metadata); returns {"config", "vocabulary", "step"}. Buffers (positional
    tables) are not stored: load_model builds them from the config."""
    from dit_fast.parallel.checkpoint import export_safetensors

    ckpt = sharded_checkpoint(path)
    info = read_run_info(ckpt)
    step = checkpoint_step(ckpt)
    meta = {"config": json.dumps(info["config"], sort_keys=True), "vocabulary": json.dumps(info["vocabulary"]),
            "step": str(step)}
    export_safetensors(ckpt, dest, which="ema", metadata=meta)
    return {"config": info["config"], "vocabulary": info["vocabulary"], "step": step}


__all__ = ["Parallel", "join_mesh", "setup_parallel", "parallelize", "split_sequence", "sync_gradients", "sharded_root",
           "sharded_checkpoint", "read_run_info", "save_sharded", "load_sharded", "export_sharded", "SHARDED_DIR",
           "RUN_JSON"]
