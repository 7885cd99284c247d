"""The device mesh: how many ranks do what, checked once, built once, passed down (torchtitan's ParallelDims).

    dims = ParallelDims(world_size=8, ulysses=4, ring=2)     # dp inferred: 8 / (4 * 2) = 1
    mesh = dims.build_mesh("cuda")                            # DeviceMesh, dims ("dp", "ring", "ulysses")
    model = sequence_parallel(model, mesh, mode=dims.sp_mode)

Under torchrun, ``init_from_env(ulysses=..., ring=...)`` starts the process group (NCCL on GPUs,
gloo on CPU, with a timeout on every collective) and returns (dims, mesh).

Mesh layout: ("dp", "ring", "ulysses"), the last dimension varying fastest, so that the ranks of one
Ulysses group are neighbours (one node: the all-to-all is the heaviest exchange), ring groups span
nodes, and data-parallel replicas (or FSDP shards) are outermost. Dimensions of size 1 are kept,
so code can always ask for mesh["ulysses"].
"""

import datetime
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "ring", "ulysses")
SP_MODES = ("ulysses", "ring", "usp")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism; dp * ring * ulysses must equal world_size (dp=None: whatever is left).

    dp: data parallel (replicas or FSDP shards), each with its own samples; ring: sequence parallel by
    ring attention; ulysses: sequence parallel by all-to-all over heads. ring and ulysses together
    are USP (their product is the sequence-parallel degree).
    """

    world_size: int
    ulysses: int = 1
    ring: int = 1
    dp: Optional[int] = None

    def __post_init__(self):
        world = _positive_int("world_size", self.world_size)
        sp = _positive_int("ulysses", self.ulysses) * _positive_int("ring", self.ring)
        if self.dp is None:
            if world % sp:
                raise ValueError(f"world_size = {world} ranks cannot hold ulysses x ring = {self.ulysses} x "
                                 f"{self.ring} = {sp} sequence-parallel ranks: {sp} does not divide {world}")
            object.__setattr__(self, "dp", world // sp)
        elif _positive_int("dp", self.dp) * sp != world:
            raise ValueError(f"dp x ring x ulysses = {self.dp} x {self.ring} x {self.ulysses} = {self.dp * sp} must "
                             f"equal world_size = {world}")

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: the ranks that share one sample's tokens."""
        return self.ring * self.ulysses

    @property
    def sp_mode(self) -> Optional[str]:
        """"ulysses", "ring", "usp" (both), or None without sequence parallelism."""
        if self.sp == 1:
            return None
        return "usp" if self.ring > 1 and self.ulysses > 1 else ("ring" if self.ring > 1 else "ulysses")

    def check_heads(self, num_heads: int) -> None:
        """Ulysses gives each rank num_heads / ulysses heads: the degree must divide the heads."""
        if num_heads % self.ulysses:
            raise ValueError(f"num_heads = {num_heads} is not divisible by the Ulysses degree ulysses = "
                             f"{self.ulysses}; choose a degree that divides the heads, or use ring attention")

    def build_mesh(self, device_type: Optional[str] = None) -> DeviceMesh:
        """The (dp, ring, ulysses) DeviceMesh over the initialized default process group."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build_mesh needs torch.distributed initialized "
                               "(init_process_group, or dit_fast.parallel.init_from_env under torchrun)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims has world_size = {self.world_size} but the process group has "
                             f"{dist.get_world_size()} ranks")
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        return init_device_mesh(device_type, (self.dp, self.ring, self.ulysses), mesh_dim_names=MESH_DIMS)


def init_from_env(*, ulysses: int = 1, ring: int = 1, dp: Optional[int] = None,
                  timeout: datetime.timedelta = datetime.timedelta(minutes=10),
                  backend: Optional[str] = None) -> Tuple[ParallelDims, DeviceMesh]:
    """Starts torch.distributed under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
    builds the mesh. NCCL and the local GPU when there is one, gloo on CPU; every collective raises
    after ``timeout`` instead of hanging. Idempotent: an initialized group is reused.

    Returns (ParallelDims, DeviceMesh with dims ("dp", "ring", "ulysses")).
    """
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"init_from_env runs under torchrun: {', '.join(missing)} not set "
                           "(e.g. torchrun --nproc-per-node 2 -m dit_fast.cli ...)")
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timeout)
    dims = ParallelDims(world_size=dist.get_world_size(), ulysses=ulysses, ring=ring, dp=dp)
    # the group's backend decides the mesh's device: a gloo group on a GPU machine (--device cpu) is a CPU mesh
    device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() != "gloo" else "cpu"
    return dims, dims.build_mesh(device_type)


def mesh_dim_group(mesh: DeviceMesh, name: str, purpose: str):
    """The process group of mesh dimension ``name``; a 1-D mesh's only group answers to any name."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    names = mesh.mesh_dim_names or ()
    if name in names:
        return mesh.get_group(name)
    if mesh.ndim == 1:
        return mesh.get_group(0)
    raise ValueError(f"{purpose} needs a mesh dimension named {name!r} (or a 1-D mesh); this mesh has dims "
                     f"{names} of sizes {tuple(mesh.shape)}")


__all__ = ["ParallelDims", "init_from_env", "mesh_dim_group", "MESH_DIMS", "SP_MODES"]
