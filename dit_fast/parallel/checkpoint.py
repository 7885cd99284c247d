"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save on W ranks, resume on any count.

    trainer = TrainerState(step=step, ema=ema_model)
    save_checkpoint("runs/x/ckpt", step, model=model, optimizer=opt, scheduler=sched, trainer=trainer, keep=3)
    load_checkpoint("runs/x/ckpt", model=model, optimizer=opt, scheduler=sched, trainer=trainer)   # the latest
    export_safetensors("runs/x/ckpt", "model.safetensors")                        # offline, one process

Layout: ``root/step_00000100/`` holds one DCP checkpoint (``.metadata`` and one ``__<rank>_0.distcp``
per rank: every rank writes its own shards, nobody gathers a whole model); ``root/latest`` names the
newest complete one.

* Resharding: model and optimizer go through DCP's get_state_dict / set_state_dict (the optimizer via
  ``OptimizerState``, a Stateful wrapper), so FSDP2 parameters and GaLoreAdamW's row-split state are
  DTensors whose global shapes do not depend on the rank count: a run saved on 4 ranks loads on 2, on
  8, or into one process (``export_safetensors``).
* Atomic: a save writes into ``root/.step_N.partial``, then rank 0 renames it to ``step_N`` and
  replaces ``latest`` (write a temporary file, fsync, os.replace). A save killed at any point leaves the
  previous checkpoint and ``latest`` as they were; the next save clears the partial directory. Saving a
  step that exists already swaps the two copies in an order where ``latest`` always names a complete
  directory, the old copy or the new one (``_publish``; ``latest`` may name ``.step_N.partial`` or
  ``.step_N.old`` for a moment), and the next save finishes a swap that was killed halfway.
* Errors reach every rank: what rank 0 does alone (creating the root, clearing a partial directory,
  publishing, deleting old steps) ends with a broadcast of its outcome, so a failure there raises
  CheckpointSaveError on every rank at once instead of leaving the others in a barrier until the
  process group's timeout.
* Only tensors: every non-tensor value (the optimizer's step counts, lr, betas, ...) is stored as a
  0-d or 1-d tensor and decoded on load from the current optimizer's types; strings and None (settings
  such as proj_type) are not stored: they come from the current optimizer, whose load_state_dict checks
  that the loaded state fits them.
* Nothing unpickled that could run code. What DCP reads from the files (torch 2.13, and the same in
  2.11's filesystem.py): tensor data with ``torch.load(weights_only=True)``; non-tensor items with
  ``torch.load(weights_only=False)`` (DefaultLoadPlanner.load_bytes): refused here, by checking the
  metadata before loading (every requested key must be a tensor of the expected shape and dtype) and
  by a planner whose load_bytes raises; and ``.metadata`` with a plain ``pickle.load``
  (FileSystemReader.read_metadata; DCP has no weights_only option for it: pytorch/pytorch#189308,
  open). ``SafeFileSystemReader`` replaces that read with an unpickler that resolves only DCP's
  metadata dataclasses, ``_StorageInfo``, torch.Size, torch dtypes, torch's layout lookup and pathlib
  paths, and checks that every storage entry names a plain file inside the checkpoint directory with
  no stream transforms. Anything else is a CheckpointError.
* RNG: each rank's torch RNG states are stored under its own rank; a resume on fewer ranks restores
  ranks 0..W'-1 and drops the rest, a resume on more ranks keeps the new ranks' streams (a warning
  says so). Bit-exact resume across rank counts therefore needs randomness derived from (seed, step,
  sample), not from per-rank streams.

The files themselves (layout, atomic publish and recovery, reading .metadata safely):
dit_fast/parallel/checkpoint_files.py.

What a trainer calls (dit-fast train --fsdp): build the mesh, ``apply_fsdp(model, mesh)`` (and the
EMA copy the same way), build the optimizer, ``load_checkpoint`` if ``latest_checkpoint(root)`` is
not None (then ``trainer.step`` is where to continue), and ``save_checkpoint`` every N steps on every
rank (a collective call).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from dit_fast._files import atomic_write as _write_atomically
from dit_fast.models.checkpoint import CheckpointError, CheckpointNotFoundError
from dit_fast.parallel.checkpoint_files import (_METADATA, SafeFileSystemReader, TensorOnlyLoadPlanner, _complete_steps,
                                                _fsync_dir, _publish, _recover, latest_checkpoint, read_metadata,
                                                step_of)  # noqa: F401  (re-exported)



class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (disk full, permissions): the previous checkpoint is untouched."""


def _load_error(ckpt_dir, exc: CheckpointException) -> CheckpointError:
    causes = [pair[0] if isinstance(pair, tuple) else pair for pair in exc.failures.values()]
    for cause in causes:  # one of ours (refused item): keep its message
        if isinstance(cause, CheckpointError):
            return cause
    return CheckpointError(f"checkpoint {os.fspath(ckpt_dir)!r}: reading its shards failed (truncated or corrupt "
                           f"files?) on ranks {sorted(exc.failures)}: {causes[0] if causes else exc}")


# ------------------------------------------------------------------ nested dicts of tensors


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, object]:
    """{"a.b.c": leaf} with DCP's key names (its planner joins nested dict keys with dots)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _prune(tree: dict, drop: set, prefix: str = "") -> None:
    for key in list(tree):
        name = f"{prefix}{key}"
        if isinstance(tree[key], dict):
            _prune(tree[key], drop, name + ".")
        elif name in drop:
            del tree[key]


def _check_tensors(flat: Mapping, what: str) -> None:
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: {key!r} is a {type(value).__name__}; checkpoints hold tensors only")


def _check_against_metadata(flat: Mapping, md: Metadata, ckpt_dir: str) -> None:
    """Every requested key is a tensor in the checkpoint, with the same global shape and dtype."""
    for key, value in flat.items():
        entry = md.state_dict_metadata.get(key)
        if entry is None:
            raise CheckpointError(f"checkpoint {ckpt_dir!r} has no {key!r} (saved by another model, optimizer "
                                  "or trainer configuration?)")
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {ckpt_dir!r}: {key!r} is a pickled object, not a tensor; refusing "
                                  "to unpickle it")
        if tuple(entry.size) != tuple(value.shape) or entry.properties.dtype != value.dtype:
            raise CheckpointError(f"checkpoint {ckpt_dir!r}: {key!r} is {entry.properties.dtype} of shape "
                                  f"{tuple(entry.size)}, expected {value.dtype} of shape {tuple(value.shape)}")


# ------------------------------------------------------------------ what a checkpoint holds (Stateful)


class ModelState:
    """Stateful: the model's (sharded) state dict through DCP's get/set_model_state_dict."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state)


def _encode(value, key: str) -> Optional[torch.Tensor]:
    """A non-tensor optimizer value as a tensor; None for settings that are not stored (str, None)."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, bool):
        return torch.tensor(value)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in value):
        return torch.tensor([float(v) for v in value], dtype=torch.float64)
    raise TypeError(f"optimizer state {key!r}: cannot store a {type(value).__name__} ({value!r}) as a tensor")


def _decode(tensor: torch.Tensor, like):
    if isinstance(like, bool):
        return bool(tensor)
    if isinstance(like, int):
        return int(tensor)
    if isinstance(like, float):
        return float(tensor)
    return type(like)(type(a)(b) for a, b in zip(like, tensor.tolist(), strict=True))


class OptimizerState:
    """Stateful: an optimizer's state through DCP's get/set_optimizer_state_dict (flattened by parameter
    name, so it reshards), with every non-tensor value stored as a tensor (see _encode)."""

    _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self._like: Dict[str, object] = {}

    def state_dict(self) -> dict:
        flat = get_optimizer_state_dict(self.model, self.optimizer, options=self._OPTIONS)
        self._like = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
        out = {}
        for key, value in flat.items():
            encoded = value if isinstance(value, torch.Tensor) else _encode(value, key)
            if encoded is not None:
                out[key] = encoded
        return out

    def load_state_dict(self, state: Mapping) -> None:
        if not self._like:
            self.state_dict()
        flat = {k: v for k, v in state.items() if k not in self._like}
        for key, like in self._like.items():
            flat[key] = _decode(state[key], like) if key in state else like
        set_optimizer_state_dict(self.model, self.optimizer, flat, options=self._OPTIONS)


class SchedulerState:
    """Stateful: an LR scheduler's counters (last_epoch, base and last lrs, its own settings), each number
    stored as a tensor; callables (LambdaLR's lambdas) are not stored: they come from the current one."""

    def __init__(self, scheduler):
        if not hasattr(scheduler, "state_dict") or not hasattr(scheduler, "load_state_dict"):
            raise TypeError(f"scheduler must have state_dict / load_state_dict, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self._like: Dict[str, object] = {}

    def state_dict(self) -> dict:
        self._like = dict(self.scheduler.state_dict())
        out = {}
        for key, value in self._like.items():
            if isinstance(value, (list, tuple)) and all(v is None for v in value):
                continue  # LambdaLR's plain-function lambdas
            encoded = _encode(value, f"scheduler {key}")
            if encoded is not None:
                out[key] = encoded
        return out

    def load_state_dict(self, state: Mapping) -> None:
        if not self._like:
            self.state_dict()
        self.scheduler.load_state_dict({k: _decode(state[k], like) if k in state else like
                                        for k, like in self._like.items()})


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TrainerState:
    """Stateful: the step, each rank's RNG states, the EMA weights (a module, possibly FSDP-sharded, or a
    dict of tensors) and ``extra`` tensors."""

    def __init__(self, step: int = 0, ema=None, extra: Optional[Mapping[str, torch.Tensor]] = None, rng: bool = True):
        self.step, self.ema, self.extra, self.rng = int(step), ema, dict(extra or {}), rng
        self.restored_rng = False

    def state_dict(self) -> dict:
        out = {"step": torch.tensor(self.step, dtype=torch.int64), "world_size": torch.tensor(_world())}
        if self.rng:
            streams = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                streams["cuda"] = torch.cuda.get_rng_state()
            out["rng"] = {f"rank{_rank()}": streams}
        if self.ema is not None:
            out["ema"] = get_model_state_dict(self.ema) if isinstance(self.ema, nn.Module) else dict(self.ema)
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        streams = state.get("rng", {}).get(f"rank{_rank()}", {})
        if "cpu" in streams:
            torch.set_rng_state(streams["cpu"])
        if "cuda" in streams and torch.cuda.is_available():
            torch.cuda.set_rng_state(streams["cuda"])
        self.restored_rng = "cpu" in streams
        if self.ema is not None and "ema" in state:
            if isinstance(self.ema, nn.Module):
                set_model_state_dict(self.ema, state["ema"])
            else:
                for key, value in state["ema"].items():
                    self.ema[key] = value
        for key, value in state.get("extra", {}).items():
            self.extra[key] = value


# ------------------------------------------------------------------ save / load


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier(group) -> None:
    if _distributed():
        dist.barrier(group=group)


_OUTCOME_BYTES = 2048


def on_rank0(fn, rank0: bool, group, what: str) -> None:
    """Runs ``fn`` on rank 0 only, then tells every rank how it went (one broadcast, also a barrier): an
    exception on rank 0 becomes a CheckpointSaveError on every rank, not a peer stuck in a barrier."""
    error = None
    if rank0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised
            error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    if _distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
        box = torch.zeros(_OUTCOME_BYTES, dtype=torch.uint8, device=device)
        if message is not None:  # byte 0: 1 = failed; then the message, utf-8, truncated
            data = message.encode("utf-8", "replace")[:_OUTCOME_BYTES - 1]
            box[0] = 1
            box[1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        source = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(box, src=source, group=group)
        if box[0].item():
            message = bytes(box[1:].cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace")
    if message is not None:
        raise CheckpointSaveError(f"{what}; rank 0 failed: {message}") from error


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save / load that it assumes one process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def _resolve(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if (path / _METADATA).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointNotFoundError(f"checkpoint {os.fspath(path)!r}: no complete checkpoint (neither a DCP "
                                      "directory nor a root with step_* directories)")
    return found


def _parts(model, optimizer, scheduler, trainer) -> dict:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    parts = {"model": ModelState(model)}
    if optimizer is not None:
        parts["optim"] = OptimizerState(model, optimizer)
    if scheduler is not None:
        parts["scheduler"] = SchedulerState(scheduler)
    if trainer is not None:
        if not isinstance(trainer, TrainerState):
            raise TypeError(f"trainer must be a TrainerState, got {type(trainer).__name__}")
        parts["trainer"] = trainer
    return parts


def save_checkpoint(root, step: int, *, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, trainer: Optional[TrainerState] = None, keep: Optional[int] = None,
                    process_group=None) -> Path:
    """Saves root/step_<step> atomically and points root/latest at it; call on every rank.

    keep: how many complete checkpoints to keep (older ones are deleted after the new one is published).
    Returns the checkpoint directory."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be None or an int >= 1, got {keep!r}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str or os.PathLike, got {type(root).__name__}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"root {os.fspath(root)!r} exists and is not a directory")
    if trainer is not None:
        trainer.step = step
    parts = _parts(model, optimizer, scheduler, trainer)
    state = {name: part.state_dict() for name, part in parts.items()}
    _check_tensors(_flatten(state), "save_checkpoint")
    name = f"step_{step:08d}"
    final, partial = root / name, root / f".{name}.partial"
    rank0 = dist.get_rank(process_group) == 0 if _distributed() else True

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        _recover(root)
        if partial.exists():  # left by a save that was killed
            shutil.rmtree(partial)

    on_rank0(prepare, rank0, process_group, f"preparing {os.fspath(final)!r}: the previous checkpoint and "
                                                 f"{os.fspath(root / 'latest')!r} are untouched")
    try:
        with _quiet_single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(partial, sync_files=True),
                     process_group=process_group, no_dist=not _distributed())
    except CheckpointException as e:  # a BaseException in DCP: every rank gets it
        raise CheckpointSaveError(f"saving {os.fspath(final)!r} failed (on ranks {sorted(e.failures)}); the previous "
                                  f"checkpoint and {os.fspath(root / 'latest')!r} are untouched: "
                                  f"{'; '.join(repr(p[0]) for p in e.failures.values())}") from None
    _barrier(process_group)  # every rank's shards and rank 0's .metadata are on disk

    def publish():
        _fsync_dir(partial)
        _publish(root, name)
        if keep is not None:
            for _, old_dir in _complete_steps(root)[:-keep]:
                if old_dir != final:
                    shutil.rmtree(old_dir)

    on_rank0(publish, rank0, process_group, f"publishing {os.fspath(final)!r}: {os.fspath(root / 'latest')!r} "
                                                 "names the previous checkpoint or this one, complete")
    return final


def load_checkpoint(path, *, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, trainer: Optional[TrainerState] = None, process_group=None) -> Path:
    """Loads a checkpoint (a step directory, or a root: its latest) into the given objects, resharding to
    this run's ranks; call on every rank. Returns the directory loaded. Raises CheckpointError (every
    rank alike, before any collective) if the checkpoint does not hold what the objects need."""
    ckpt_dir = _resolve(path)
    md = read_metadata(ckpt_dir)
    parts = _parts(model, optimizer, scheduler, trainer)
    state = {name: part.state_dict() for name, part in parts.items()}
    flat = _flatten(state)
    _check_tensors(flat, "load_checkpoint")
    # this rank's RNG streams are optional: a run saved on fewer ranks has none for it
    absent = {k for k in flat if k.startswith("trainer.rng.") and k not in md.state_dict_metadata}
    if absent:
        _prune(state, absent)
        flat = {k: v for k, v in flat.items() if k not in absent}
    _check_against_metadata(flat, md, os.fspath(ckpt_dir))
    if absent:
        warnings.warn(f"checkpoint {os.fspath(ckpt_dir)!r} has no RNG state for rank {_rank()} (saved on fewer "
                      "ranks, or without RNG): this rank keeps its current random streams", RuntimeWarning,
                      stacklevel=2)
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(ckpt_dir), planner=TensorOnlyLoadPlanner(),
                     process_group=process_group, no_dist=not _distributed())
    except CheckpointException as e:  # a truncated or corrupt shard file, on some rank
        raise _load_error(ckpt_dir, e) from None
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return ckpt_dir


def export_safetensors(ckpt, out_path, which: str = "model", metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Writes the whole model (``which="model"``) or EMA (``"ema"``) weights of a sharded checkpoint (a
    step directory, or a root: its latest) into one safetensors file. Offline: one process, no process
    group; reads only the tensors it writes. The file is written next to out_path, then renamed.
    metadata: extra string entries for the file's metadata (dit-fast export: config, vocabulary, step)."""
    from safetensors.torch import save_file

    prefixes = {"model": "model.", "ema": "trainer.ema."}
    if which not in prefixes:
        raise ValueError(f"which must be one of {tuple(prefixes)}, got {which!r}")
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"out_path must be a str or os.PathLike, got {type(out_path).__name__}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"out_path {os.fspath(out_path)!r} is a directory, expected a .safetensors file path")
    if not out_path.parent.is_dir():
        raise ValueError(f"out_path {os.fspath(out_path)!r}: directory {os.fspath(out_path.parent)!r} does not exist")
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"metadata must map str to str, got {metadata!r:.200}")
    ckpt_dir = _resolve(ckpt)
    md = read_metadata(ckpt_dir)
    prefix = prefixes[which]
    entries = {k[len(prefix):]: v for k, v in md.state_dict_metadata.items() if k.startswith(prefix)}
    if not entries:
        raise CheckpointError(f"checkpoint {os.fspath(ckpt_dir)!r} holds no {which} weights (no {prefix}* keys)")
    template = {}
    for key, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {os.fspath(ckpt_dir)!r}: {prefix}{key!r} is not a tensor")
        template[key] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    nested = {"model": template} if which == "model" else {"trainer": {"ema": template}}
    try:
        with _quiet_single_process():
            dcp.load(nested, storage_reader=SafeFileSystemReader(ckpt_dir), planner=TensorOnlyLoadPlanner(),
                     no_dist=True)
    except CheckpointException as e:
        raise _load_error(ckpt_dir, e) from None
    step = md.state_dict_metadata.get("trainer.step")
    meta = {"format": "pt", "source": os.fspath(ckpt_dir), "weights": which}
    if step is not None:
        meta["checkpoint"] = ckpt_dir.name
    meta.update(metadata or {})
    tensors = {k: v.contiguous() for k, v in template.items()}
    _write_atomically(out_path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return out_path
