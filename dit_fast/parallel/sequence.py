"""Sequence parallelism for DiTVideo: each rank embeds, transforms and decodes only its share of the tokens.

    model = sequence_parallel(model, mesh, mode="ulysses" | "ring" | "usp", gather_output=True)
    out = model(x, t, y)             # every rank: the same full inputs, the same full output
    loss.backward()                  # ends with the parameter gradients summed over the ranks (as DDP)

How the tokens are split (TokenShard): the N = ulysses x ring ranks each hold one contiguous chunk of
the raster-order sequence. When N divides the frames, a chunk is whole frames: attention that stays
inside a frame (mode "spatial", or a window one frame deep) then runs locally with no communication,
so in a spatial/temporal model only the temporal blocks exchange. Otherwise the sequence is cut into
ceil(S / N)-token chunks, the last one padded; padded keys are masked everywhere and padded rows
dropped at the end. The patch embedding, every block and the final layer run on the local chunk;
text keys (cross-attention) are replicated, not split; positions (sin-cos table, 3D RoPE) are the
tokens' global ones.

Attention, per layer (SequenceParallelAttention swapped in for each SpacetimeAttention):
    ulysses  all-to-all q, k, v from (tokens / N, all heads) to (all tokens, heads / N); the usual
             dit_fast.ops.spacetime_attention over the whole grid (every mode, window and RoPE, in the
             kernels); all-to-all back. Needs N | heads.
    ring     dit_fast/parallel/ring.py: K/V blocks passed around the ring, merged by log-sum-exp.
    usp      Ulysses inside each row of a 2-D mesh (dims "ring" x "ulysses"), then ring attention
             across rows over the longer chunks.

Gradients: every rank back-propagates the same loss through the gathered output (its backward
keeps this rank's slice, no communication), so each rank's parameter gradients hold its tokens'
share until they are summed over the sequence-parallel ranks (dit_fast/parallel/grad_sync.py).
grad_sync="auto" (the default) sums them at the end of every backward, as DDP does; "manual" leaves
it to reduce_gradients(model) (once after several backwards, say), and an optimizer step on gradients
not yet summed raises. reduce_gradients never sums twice: after "auto" it does nothing. With FSDP2
(dit_fast.parallel.apply_fsdp) over every rank, sequence-parallel ones included (the least memory:
benchmarks/parallel_plan.py's setup), FSDP's reduce-scatter sums the shares but divides by the world
size: multiply the loss by the sequence-parallel degree. Over the mesh's "dp" dimension only, the
local shards of the DTensor gradients are summed over the sequence-parallel ranks after FSDP's own
reduction (automatically or by reduce_gradients). Random draws inside the model (classifier-free-guidance
dropout) and the training inputs must be the same on every rank of a sequence-parallel group: seed by
data-parallel rank.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_fast.nn.attention import SpacetimeAttention
from dit_fast.ops.flash_attention import spacetime_attention
from dit_fast.parallel import comm
from dit_fast.parallel.grad_sync import GRAD_SYNC, GradSync
from dit_fast.parallel.mesh import SP_MODES, mesh_dim_group
from dit_fast.parallel.ring import DenseBlocks, MaskedBlocks, pair_mask, ring_attention, rope_on_tokens


# ---------------------------------------------------------------------------------------------
# Which tokens a rank holds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenShard:
    """Chunk ``index`` of a (T, H, W) raster-order token grid cut into ``degree`` chunks of ``chunk``
    tokens (padding included): global tokens [lo, hi) are real, the rest up to ``chunk`` is padding."""

    grid: Tuple[int, int, int]
    degree: int
    index: int

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def frame_tokens(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def by_frames(self) -> bool:
        """Whole frames per rank (the degree divides the frames; no padding)."""
        return self.grid[0] % self.degree == 0

    @property
    def chunk(self) -> int:
        return self.num_tokens // self.degree if self.by_frames else -(-self.num_tokens // self.degree)

    @property
    def lo(self) -> int:
        return min(self.index * self.chunk, self.num_tokens)

    @property
    def hi(self) -> int:
        return min(self.lo + self.chunk, self.num_tokens)

    @property
    def real(self) -> int:
        return self.hi - self.lo

    def indices(self, device=None) -> Tensor:
        """(chunk,) global raster indices of this chunk's rows (>= num_tokens: padding)."""
        return torch.arange(self.index * self.chunk, (self.index + 1) * self.chunk, device=device)

    def pad(self, x: Tensor, dim: int = 1) -> Tensor:
        """x with ``real`` rows along dim -> ``chunk`` rows, zeros appended."""
        missing = self.chunk - x.shape[dim]
        if missing == 0:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x, x.new_zeros(shape)], dim=dim)


def check_shardable(grid: Sequence[int], degree: int) -> TokenShard:
    """The last chunk must hold at least one real token: a clear error for grids too small to split."""
    last = TokenShard(tuple(grid), degree, degree - 1)
    if last.real <= 0:
        raise ValueError(f"the token grid {tuple(grid)} ({last.num_tokens} tokens) cannot be split over {degree} "
                         f"sequence-parallel ranks: chunks of {last.chunk} tokens leave the last rank only padding; "
                         "use fewer ranks or a larger input")
    return last


# ---------------------------------------------------------------------------------------------
# The plan: process groups, the model's hooks, attention
# ---------------------------------------------------------------------------------------------


class SequenceParallel:
    """How one model splits its tokens over a mesh: the groups, this rank's chunk, the exchanges.

    DiTVideo calls embed_patches / shard_tokens / shard_groups / gather_tokens (its hooks), and
    SequenceParallelAttention calls attention(). Holds no parameters."""

    def __init__(self, mesh, mode: str, gather_output: bool, grad_sync: str = "auto"):
        if mode not in SP_MODES:
            raise ValueError(f"mode must be one of {SP_MODES}, got {mode!r}")
        if not isinstance(gather_output, bool):
            raise TypeError(f"gather_output must be True or False, got {gather_output!r}")
        if grad_sync not in GRAD_SYNC:
            raise ValueError(f"grad_sync must be one of {GRAD_SYNC}, got {grad_sync!r}")
        self.mode, self.gather_output = mode, gather_output
        self.ulysses_group = mesh_dim_group(mesh, "ulysses", f"mode={mode!r}") if mode != "ring" else None
        self.ring_group = mesh_dim_group(mesh, "ring", f"mode={mode!r}") if mode != "ulysses" else None
        if mode == "usp" and (mesh.mesh_dim_names is None or not {"ring", "ulysses"} <= set(mesh.mesh_dim_names)):
            raise ValueError(f"mode='usp' needs a mesh with dims named 'ring' and 'ulysses' (ParallelDims.build_mesh), "
                             f"got dims {mesh.mesh_dim_names}")
        self.ulysses_size = comm.group_size(self.ulysses_group) if self.ulysses_group is not None else 1
        self.ring_size = comm.group_size(self.ring_group) if self.ring_group is not None else 1
        ulysses_rank = comm.group_rank(self.ulysses_group) if self.ulysses_group is not None else 0
        self.ring_rank = comm.group_rank(self.ring_group) if self.ring_group is not None else 0
        self.degree = self.ulysses_size * self.ring_size
        self.index = self.ring_rank * self.ulysses_size + ulysses_rank  # the chunk this rank holds
        self.grad_sync = GradSync([self.ulysses_group, self.ring_group], grad_sync)

    def describe(self) -> str:
        return f"{self.mode}: ulysses {self.ulysses_size} x ring {self.ring_size}, grad_sync={self.grad_sync.mode!r}"

    def shard(self, grid: Sequence[int]) -> TokenShard:
        check_shardable(grid, self.degree)
        return TokenShard(tuple(int(n) for n in grid), self.degree, self.index)

    # -- DiTVideo's hooks ----------------------------------------------------------------------

    def embed_patches(self, x_embedder: nn.Module, x: Tensor, grid) -> Tensor:
        """Patch embedding of this rank's tokens only: (B, C, T, H, W) -> (B, chunk, D)."""
        shard = self.shard(grid)
        pt, hw = x_embedder.patch_size[0], shard.frame_tokens
        f0, f1 = shard.lo // hw, -(-shard.hi // hw)  # the frames that hold tokens [lo, hi)
        tokens = x_embedder(x[:, :, f0 * pt:f1 * pt])  # (B, (f1 - f0) * H * W, D)
        return shard.pad(tokens[:, shard.lo - f0 * hw:shard.hi - f0 * hw])

    def shard_tokens(self, table: Tensor, grid) -> Tensor:
        """A per-token table (B or 1, N, D) -> this rank's rows (B or 1, chunk, D)."""
        shard = self.shard(grid)
        return shard.pad(table[:, shard.lo:shard.hi])

    def shard_groups(self, c: Tensor, grid) -> Tensor:
        """Conditioning (B, D) unchanged; per frame (B, T, D) -> this rank's frames (B, chunk / (H W), D)
        when it holds whole frames, else one row per token (B, chunk, D)."""
        if c.dim() == 2:
            return c
        shard = self.shard(grid)
        if shard.chunk % shard.frame_tokens == 0:
            first = shard.index * shard.chunk // shard.frame_tokens
            rows = torch.arange(first, first + shard.chunk // shard.frame_tokens, device=c.device)
        else:
            rows = shard.indices(c.device) // shard.frame_tokens
        return c.index_select(1, rows.clamp(max=c.shape[1] - 1))  # padding rows repeat the last frame

    def gather_tokens(self, x: Tensor, grid) -> Tensor:
        """(B, chunk, P) -> (B, N, P) on every rank (gather_output=True), or this rank's real tokens."""
        shard = self.shard(grid)
        if not self.gather_output:
            return x[:, :shard.real]
        if self.ulysses_group is not None:
            x = comm.gather_tokens(x, 1, self.ulysses_group)  # chunks index ... index + ulysses - 1
        if self.ring_group is not None:
            x = comm.gather_tokens(x, 1, self.ring_group)
        return x[:, :shard.num_tokens]

    # -- attention -----------------------------------------------------------------------------

    def attention(self, q: Tensor, k: Tensor, v: Tensor, grid, *, mode: str, window, window_tile, rope,
                  backend: str, sparse=None) -> Tensor:
        """Self-attention of this rank's tokens q, k, v (B, chunk, heads, D) over the whole grid. sparse: a
        block-sparse layer (DiTVideo(attention="block_sparse")), Ulysses only (sequence_parallel checks)."""
        shard = self.shard(grid)
        if sparse is not None:
            return self._ulysses(q, k, v, shard, mode, window, window_tile, rope, backend, sparse)
        if (mode == "spatial" or (window is not None and window[0] == 1)) and shard.by_frames:
            return self._frame_local(q, k, v, shard, mode, window, window_tile, rope, backend)
        if self.mode == "ulysses":
            return self._ulysses(q, k, v, shard, mode, window, window_tile, rope, backend)
        if rope is not None:  # before any exchange, by the tokens' global positions
            idx = shard.indices(q.device)
            q, k = rope_on_tokens(q, shard.grid, idx, rope), rope_on_tokens(k, shard.grid, idx, rope)
        if self.mode == "ring":
            return self._ring(q, k, v, shard, shard.chunk, mode, window, window_tile, backend)
        # usp: Ulysses inside the row (chunk -> the row's ulysses * chunk tokens, heads / ulysses), ring across rows
        q, k, v = all_to_all_heads(torch.stack([q, k, v]), self.ulysses_group).unbind(0)
        out = self._ring(q, k, v, shard, shard.chunk * self.ulysses_size, mode, window, window_tile, backend)
        return comm.all_to_all(out, scatter_dim=1, gather_dim=2, group=self.ulysses_group)

    def _frame_local(self, q, k, v, shard, mode, window, window_tile, rope, backend):
        """Attention within frames, on whole local frames: no communication."""
        if rope is not None:
            idx = shard.indices(q.device)
            q, k = rope_on_tokens(q, shard.grid, idx, rope), rope_on_tokens(k, shard.grid, idx, rope)
        local_grid = (shard.chunk // shard.frame_tokens, shard.grid[1], shard.grid[2])
        return spacetime_attention(q, k, v, local_grid, mode=mode, window=window, window_tile=window_tile,
                                   backend=backend)

    def _ulysses(self, q, k, v, shard, mode, window, window_tile, rope, backend, sparse=None):
        qkv = all_to_all_heads(torch.stack([q, k, v]), self.ulysses_group)  # (3, B, N * chunk, heads / N, D)
        q, k, v = qkv[:, :, :shard.num_tokens].unbind(0)  # the whole grid, padding dropped
        if sparse is not None:  # this rank's heads of the per-head blocks
            first = comm.group_rank(self.ulysses_group) * q.shape[2]
            out = sparse(q, k, v, shard.grid, rope=rope, backend=backend, group=self.ulysses_group,
                         heads=(first, q.shape[2] * self.ulysses_size))
        else:
            out = spacetime_attention(q, k, v, shard.grid, mode=mode, window=window, window_tile=window_tile,
                                      rope=rope, backend=backend)  # (B, S, heads / N, D)
        out = F.pad(out, (0, 0, 0, 0, 0, shard.chunk * shard.degree - shard.num_tokens))
        return comm.all_to_all(out, scatter_dim=1, gather_dim=2, group=self.ulysses_group)  # (B, chunk, heads, D)

    def _ring(self, q, k, v, shard, length, mode, window, window_tile, backend):
        """Ring attention over the ring group; this rank's q, k, v (B, length, h, D) are ring chunk ring_rank."""
        S, hw, group = shard.num_tokens, shard.frame_tokens, self.ring_group
        B, L, heads, D = q.shape

        def chunk_indices(src):
            return torch.arange(src * length, (src + 1) * length, device=q.device)

        if mode == "full" and window is None:
            def key_mask(src):  # None unless chunk src holds padding
                return None if (src + 1) * length <= S else (chunk_indices(src) < S).expand(B, L)
            return ring_attention(q, k, v, DenseBlocks(key_mask, backend), group)
        if mode == "temporal" and window is None and length % hw == 0:
            frames = length // hw  # whole frames per ring chunk: attend along each (h, w) column

            def columns(t):  # (B, frames * hw, h, D) -> (B * hw, frames, h, D)
                return t.reshape(B, frames, hw, heads, D).transpose(1, 2).reshape(B * hw, frames, heads, D)

            def frame_mask(src):
                first = src * frames
                return None if first + frames <= shard.grid[0] else (
                    torch.arange(first, first + frames, device=q.device) < shard.grid[0]).expand(B * hw, frames)
            out = ring_attention(columns(q), columns(k), columns(v), DenseBlocks(frame_mask, backend), group)
            return out.reshape(B, hw, frames, heads, D).transpose(1, 2).reshape(B, L, heads, D)
        q_idx = chunk_indices(self.ring_rank)
        blocks = MaskedBlocks(lambda src: pair_mask(shard.grid, q_idx, chunk_indices(src), mode, window, window_tile),
                              backend, q, f"mode={mode!r} window={window} window_tile={window_tile}")
        return ring_attention(q, k, v, blocks, group)


def all_to_all_heads(x: Tensor, group) -> Tensor:
    """(..., tokens, heads, D) chunk -> (..., N * tokens, heads / N, D): Ulysses' forward exchange."""
    return comm.all_to_all(x, scatter_dim=x.dim() - 2, gather_dim=x.dim() - 3, group=group)


# ---------------------------------------------------------------------------------------------
# The attention module swapped into the model, and the entry points
# ---------------------------------------------------------------------------------------------


class SequenceParallelAttention(nn.Module):
    """SpacetimeAttention on this rank's tokens: the same parameters under the same names (qkv,
    q_norm, k_norm, proj), the attention exchanged across the mesh by the plan."""

    def __init__(self, attn: SpacetimeAttention, plan: SequenceParallel):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = attn.dim, attn.num_heads, attn.head_dim
        self.mode, self.window, self.window_tile = attn.mode, attn.window, attn.window_tile
        self.rope, self.backend, self.sparse = attn.rope, attn.backend, attn.sparse
        self.qkv, self.q_norm, self.k_norm, self.proj = attn.qkv, attn.q_norm, attn.k_norm, attn.proj
        self.plan = plan

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        B, L, C = x.shape  # L = this rank's chunk
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).unbind(2)  # (B, L, heads, D)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.plan.attention(q, k, v, grid, mode=self.mode, window=self.window, window_tile=self.window_tile,
                                rope=self.rope, backend=self.backend, sparse=self.sparse)  # (B, L, heads, D)
        return self.proj(x.reshape(B, L, C))

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, window={self.window}, "
                f"window_tile={self.window_tile}, rope={self.rope!r}, {self.plan.describe()}")


def sequence_parallel(model: nn.Module, mesh, mode: str = "ulysses", gather_output: bool = True,
                      grad_sync: str = "auto") -> nn.Module:
    """Splits a DiTVideo's tokens over ``mesh`` (in place; returns the model). See the module docstring.

    mesh: a DeviceMesh. mode "ulysses" uses its dim "ulysses" (or its only dim), "ring" its dim "ring"
    (or its only dim), "usp" both. gather_output=False: forward returns this rank's output tokens
    (B, n, pt * ph * pw * C), its chunk of the raster order without padding; the chunks of the ranks in
    order, concatenated, are model.unpatchify's input. grad_sync "auto": every backward ends with the
    parameter gradients summed over the sequence-parallel ranks; "manual": reduce_gradients(model) does
    it, and an optimizer step before it raises. Every check runs before any communication, so a bad
    configuration raises the same error on every rank.
    """
    from dit_fast.models.dit_video import DiTVideo

    if not isinstance(model, DiTVideo):
        raise TypeError(f"sequence_parallel splits a dit_fast DiTVideo, got {type(model).__name__}")
    if model.sequence_parallel_plan is not None:
        raise ValueError(f"this model is already sequence parallel ({model.sequence_parallel_plan.describe()})")
    plan = SequenceParallel(mesh, mode, gather_output, grad_sync)
    if model.num_heads % plan.ulysses_size:
        raise ValueError(f"num_heads = {model.num_heads} is not divisible by the Ulysses degree {plan.ulysses_size} "
                         f"(mode={mode!r}): Ulysses gives each rank num_heads / degree heads; use a degree that "
                         "divides the heads, or mode='ring'")
    for i, block in enumerate(model.blocks):
        if type(block.attn) is not SpacetimeAttention:
            raise ValueError(f"blocks[{i}].attn is a {type(block.attn).__name__}: sequence_parallel splits only "
                             "dit_fast.nn.SpacetimeAttention layers (full, spatial, temporal, windows, RoPE)")
    if model.sparse is not None and plan.mode != "ulysses":
        raise ValueError(f"DiTVideo(attention='block_sparse') runs sequence parallel with mode='ulysses' only (each "
                         f"rank whole heads over every token); mode={mode!r} would need the kept blocks of every "
                         "(query chunk, key chunk) pair")
    for block in model.blocks:
        block.attn = SequenceParallelAttention(block.attn, plan)
    model.sequence_parallel_plan = plan
    plan.grad_sync.track(model)
    model.register_forward_pre_hook(_track_parameters)  # parameters FSDP2 (re)placed since
    return model


def _track_parameters(model: nn.Module, args) -> None:
    model.sequence_parallel_plan.grad_sync.track(model)


def _plan_of(model: nn.Module, caller: str) -> SequenceParallel:
    plan = getattr(model, "sequence_parallel_plan", None)
    if plan is None:
        raise ValueError(f"{caller}: the model is not sequence parallel (call sequence_parallel first)")
    return plan


def reduce_gradients(model: nn.Module) -> None:
    """Sums the parameter gradients of a sequence-parallel model over its sequence-parallel ranks: the
    shares added since the last sum only (a no-op after grad_sync="auto", or when called twice)."""
    _plan_of(model, "reduce_gradients").grad_sync.reduce()


def gradients_summed_elsewhere(model: nn.Module) -> None:
    """Tells a grad_sync="manual" model that the caller has summed its gradients over (at least) its
    sequence-parallel ranks itself, e.g. one all-reduce over every rank (dit-fast train does): what the
    optimizer guard waits for, without another sum."""
    _plan_of(model, "gradients_summed_elsewhere").grad_sync.settle()


__all__ = ["sequence_parallel", "reduce_gradients", "gradients_summed_elsewhere", "SequenceParallel", "SequenceParallelAttention", "TokenShard",
           "check_shardable"]
