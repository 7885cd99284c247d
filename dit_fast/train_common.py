"""What dit_fast/train.py and dit_fast/train_parallel.py share, below both: a rank's identity
(``DistInfo``) and atomic file writes. Neither of them imports the other for these: train.py imports
train_parallel.py (lazily, for --sp / --fsdp runs), never the reverse.

Atomic writes go through a temporary file in the destination's directory, fsync and ``os.replace``:
readers (and a resumed run) see the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from dit_fast._files import atomic_write


def _atomic_write(path: str, write_fn) -> None:
    """write_fn(tmp_path) then os.replace onto ``path`` (its directory made first): readers see the old file
    or the new one (dit_fast/_files.py)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write_fn)


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[dict] = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(obj, path: str) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic_write(path, write)


@dataclass
class DistInfo:
    """This process in a run: its rank, the world size, its local rank (its GPU), and whether it joined
    the process group itself (then it also leaves it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0
