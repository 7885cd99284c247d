"""What a dit_fast.parallel.checkpoint root holds on disk, and how it is written and read safely.

    root/step_00000100/      one DCP checkpoint (.metadata, one __<rank>_0.distcp per rank)
    root/latest              the name of the newest complete one (written to a temporary file, fsynced,
                             os.replace-d); for a moment during a same-step save, .step_N.partial or .old
    root/.step_N.partial     a save in progress (or killed); root/.step_N.old the copy a same-step save replaces

Here: the layout (``latest_checkpoint``, ``step_of``), the atomic publish of a finished save and the recovery
of a killed one (``_publish``, ``_recover``; single files through dit_fast/_files.py), and the reading of ``.metadata`` without running pickled code (``read_metadata``,
``SafeFileSystemReader``, ``TensorOnlyLoadPlanner``). dit_fast/parallel/checkpoint.py decides what is saved
and loaded and calls these on rank 0 (writes) or every rank (reads).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from dit_fast._files import fsync_dir as _fsync_dir
from dit_fast.models.checkpoint import CheckpointError, CheckpointNotFoundError

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# what ``latest`` may name: a step directory, or for a moment during a same-step swap its hidden copies
_LATEST_NAME = re.compile(r"^(?:step_(\d{8,})|\.step_(\d{8,})\.(?:partial|old))$")
_METADATA = ".metadata"


# ------------------------------------------------------------------ reading without unpickling code

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                 ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                 ("pathlib", "PurePath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
                 ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals a DCP ``.metadata`` file needs."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == _METADATA_MODULE:  # DCP's metadata dataclasses and enums: plain data
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        raise CheckpointError(f"checkpoint {self.path!r}: its .metadata refers to {module}.{name}, which is not "
                              "part of torch.distributed.checkpoint's metadata; refusing to unpickle it")


def read_metadata(ckpt_dir) -> Metadata:
    """The DCP metadata of a checkpoint directory, read without running pickled code, and checked."""
    path = os.path.join(os.fspath(ckpt_dir), _METADATA)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint {os.fspath(ckpt_dir)!r} has no {_METADATA} (not a complete "
                                      "torch.distributed.checkpoint directory)")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, os.fspath(ckpt_dir)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated, random bytes, a pickle of something else
        raise CheckpointError(f"checkpoint {os.fspath(ckpt_dir)!r}: unreadable {_METADATA} ({type(e).__name__}: "
                              f"{e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"checkpoint {os.fspath(ckpt_dir)!r}: {_METADATA} does not hold DCP metadata")
    for index, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", "..") \
                or getattr(info, "transform_descriptors", None) \
                or not all(isinstance(getattr(info, k, None), int) and getattr(info, k) >= 0
                           for k in ("offset", "length")):
            raise CheckpointError(f"checkpoint {os.fspath(ckpt_dir)!r}: storage entry for "
                                  f"{getattr(index, 'fqn', index)!r} is not a plain file of this directory "
                                  f"({info!r})")
    return md


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader with ``.metadata`` read by ``read_metadata`` (no pickled code)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = read_metadata(self.path)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses pickled (non-tensor) items instead of torch.load-ing them with
    weights_only=False."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} is a pickled object, not a tensor; "
                              "refusing to unpickle it")


# ------------------------------------------------------------------ the layout, atomic publish and recovery


def _write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def _complete_steps(root: Path):
    steps = []
    for child in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(child.name)
        if match and (child / _METADATA).is_file():
            steps.append((int(match.group(1)), child))
    return sorted(steps)


def _latest_name(root: Path) -> Optional[str]:
    pointer = root / "latest"
    try:
        name = pointer.read_text().strip() if pointer.is_file() else None
    except OSError:
        return None
    return name if name is not None and _LATEST_NAME.match(name) else None


def step_of(ckpt_dir) -> int:
    """The step of a checkpoint directory: ``step_N``, or ``.step_N.partial`` / ``.step_N.old`` (what
    ``latest`` names while the same step is being saved again)."""
    match = _LATEST_NAME.match(Path(ckpt_dir).name)
    if match is None:
        raise ValueError(f"{os.fspath(ckpt_dir)!r} is not a checkpoint step directory (step_<8+ digits>)")
    return int(match.group(1) or match.group(2))


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint directory under root (what ``latest`` names), or None."""
    root = Path(root)
    name = _latest_name(root)
    if name is not None and (root / name / _METADATA).is_file():
        return root / name
    steps = _complete_steps(root)  # latest missing or stale (a first save killed between rename and pointer)
    return steps[-1][1] if steps else None


def _publish(root: Path, name: str) -> None:
    """Rank 0: makes the complete ``.<name>.partial`` the checkpoint ``name`` and points ``latest`` at it.

    A new step: one rename, then ``latest``. The same step again (``name`` exists): every state between
    two of these operations has ``latest`` naming a complete directory, the old copy or the new one:

        latest := .name.partial (new)    name -> .name.old    latest := .name.old (old)
        .name.partial -> name            latest := name (new)  remove .name.old
    """
    final, partial, old = root / name, root / f".{name}.partial", root / f".{name}.old"
    if not final.exists():
        os.rename(partial, final)
        _fsync_dir(root)
        _write_latest(root, name)
        return
    if old.exists():  # left by an earlier swap; ``latest`` names ``name`` or another step, never it
        shutil.rmtree(old)
    _write_latest(root, partial.name)
    _finish_swap(root, name)


def _finish_swap(root: Path, name: str) -> None:
    """Continues a same-step swap from the state ``latest`` says it reached (also after a killed save)."""
    final, partial, old = root / name, root / f".{name}.partial", root / f".{name}.old"
    at = _latest_name(root)
    if at == partial.name:
        if final.exists():
            os.rename(final, old)
            _fsync_dir(root)
        if old.exists():
            _write_latest(root, old.name)
            at = old.name
    if at == old.name and partial.exists():
        os.rename(partial, final)
        _fsync_dir(root)
    if final.exists():
        _write_latest(root, name)
    if old.exists() and _latest_name(root) == name:
        shutil.rmtree(old)


def _recover(root: Path) -> None:
    """Rank 0, before a save: finishes a same-step swap that a killed save left halfway, then removes what
    killed or failed saves left behind (``.step_N.partial``, ``.step_N.old``) that ``latest`` does not name."""
    at = _latest_name(root)
    if at is not None and at.startswith("."):
        _finish_swap(root, f"step_{step_of(at):08d}")
    at = _latest_name(root)
    for child in root.iterdir():
        if child.name != at and child.name.startswith(".") and _LATEST_NAME.match(child.name):
            shutil.rmtree(child)


__all__ = ["read_metadata", "SafeFileSystemReader", "TensorOnlyLoadPlanner", "latest_checkpoint", "step_of"]
