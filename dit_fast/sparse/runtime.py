"""One model's sparse attention at run time: the denoising step, the calibration, the blocks of each layer.

The schedule reads the step from the timestep the transformer receives (``StepTracker``), never from a
call counter: a step is a new timestep value. Classifier-free guidance batched (one call, the timestep
repeated) or run as two calls per step (the same timestep twice) gives the same step index; the
timestep going up again starts a new generation at step 0. In training (``observe(t, training=True)``)
there is no schedule: every layer outside ``dense_layers`` is sparse.

``SparseRuntime.attend(layer, q, k, v, layout, ...)`` is what an attention layer calls: None when the
layer runs dense at this step (the caller runs its usual dense attention), else the block-sparse
output. A layer with no choice yet for this grid takes ``pattern`` at ``density`` (no tolerance), or
calibrates (tolerance given): under no_grad it computes the dense output once and each candidate of
``SparseAttention.candidates`` (sparsest first), measures per head the relative error
||o_candidate - o_dense|| / ||o_dense|| over that head's (batch, tokens, head dim), and keeps for each
head the first candidate within tolerance (dense when none is). The choice is recorded in the
configuration (save / load), then the layer runs it like any recorded choice: a run from the loaded
JSON computes exactly what the calibrating run computed.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dit_fast.ops.block_sparse import block_sparse_attention
from dit_fast.ops.flash_attention import attention
from dit_fast.ops.rope import apply_rope_3d, as_rope, rope_3d_angles
from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout
from dit_fast.sparse.config import Choice, SparseAttention, grid_key
from dit_fast.sparse.patterns import PATTERNS, blocks_for_heads


class StepTracker:
    """The denoising step index from the timesteps a model receives (module docstring)."""

    def __init__(self):
        self.step: Optional[int] = None  # None: no step seen, or training
        self.last: Optional[float] = None

    def observe(self, timestep, training: bool = False) -> Optional[int]:
        """Updates and returns the step for a call with this timestep (a number or a tensor of any shape:
        its largest value, one host sync)."""
        if training:
            self.step = self.last = None
            return None
        value = float(timestep.detach().max()) if isinstance(timestep, Tensor) else float(timestep)
        if self.last is None or self.step is None or value > self.last:
            self.step = 0  # a new generation: the noise level went up
        elif value < self.last:
            self.step += 1  # a new step; an equal value is the same step (CFG's second call)
        self.last = value
        return self.step


def relative_error_per_head(out: Tensor, ref: Tensor) -> Tensor:
    """(heads,) ||out - ref|| / ||ref|| over (B, S, D) of each head; out, ref (B, S, heads, D)."""
    diff = (out.double() - ref.double()).square().sum((0, 1, 3))
    return (diff / ref.double().square().sum((0, 1, 3)).clamp_min(1e-300)).sqrt()


class SparseRuntime:
    """The sparse attention state of one model: its configuration, step tracker and blocks cache."""

    def __init__(self, config: SparseAttention, model_name: str):
        if not isinstance(config, SparseAttention):
            raise TypeError(f"sparse must be a dit_fast.SparseAttention, got {type(config).__name__}")
        config.bind(model_name)
        self.config = config
        self.tracker = StepTracker()
        self._blocks: Dict[tuple, SparseBlocks] = {}
        self.last_blocks: Dict[int, Optional[SparseBlocks]] = {}  # layer -> blocks of its last call (None: dense)
        self.calibration_errors: Dict[Tuple[str, int], List[float]] = {}  # (grid, layer) -> chosen error per head
        self.order = "raster"  # the token order of the model's current call (DiTVideo: "tiles" where it can)
        # a list to measure into (benchmarks/sparse_quality.py): each sparse call appends {"step", "layer",
        # "error": ||o_sparse - o_dense|| / ||o_dense|| (a dense attention run for it), "kept": kept fraction}
        self.error_log: Optional[List[dict]] = None

    def __getstate__(self):  # a pickled / deep-copied model keeps the configuration, not the caches
        return {**self.__dict__, "_blocks": {}, "last_blocks": {}}

    # ---- the step ----

    def observe(self, timestep, training: bool = False) -> Optional[int]:
        return self.tracker.observe(timestep, training)

    @property
    def step(self) -> Optional[int]:
        return self.tracker.step

    def is_sparse(self, layer: int) -> bool:
        return not self.config.is_dense(layer, self.step)

    # ---- attention ----

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, layout: TileLayout, *,
               key_padding_mask: Optional[Tensor] = None, order: str = "raster", scale: Optional[float] = None,
               backend: str = "auto", heads: Optional[Tuple[int, int]] = None, group=None) -> Optional[Tensor]:
        """The block-sparse attention of ``layer`` on q, k, v (B, S, heads, D) in ``order``, or None when the
        layer is dense now. heads=(first, total): q holds heads [first, first + q.shape[2]) of ``total`` (a
        Ulysses rank); ``group``: the process group whose ranks hold the other heads (a calibration's
        choices are gathered over it, so every rank records every head)."""
        if not self.is_sparse(layer):
            self.last_blocks[layer] = None
            return None
        grid = layout.grid
        choices = self.config.choices_for(grid, layer)
        if choices is None:
            if self.config.tolerance is None:
                choices = [self.config.density_choice(layout)]
            else:
                choices = self.calibrate(layer, q, k, v, layout, key_padding_mask, order, scale, backend, group)
            self.config.record(grid, layer, choices)
        local = _local_heads(choices, heads, q.shape[2])
        if all(c["pattern"] == "dense" for c in local):
            self.last_blocks[layer] = None
            return None
        blocks = self.blocks(local, layout, q, k, order)
        self.last_blocks[layer] = blocks
        out = block_sparse_attention(q, k, v, blocks, order=order, key_padding_mask=key_padding_mask, scale=scale,
                                     backend=backend)
        if self.error_log is not None:
            with torch.no_grad():
                dense = attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale, backend=backend)
                error = float((out.double() - dense.double()).norm() / dense.double().norm().clamp_min(1e-300))
            self.error_log.append({"step": self.step, "layer": layer, "error": error, "kept": blocks.kept_fraction()})
        return out

    def blocks(self, choices: Sequence[Choice], layout: TileLayout, q: Tensor, k: Tensor, order: str) -> SparseBlocks:
        """The SparseBlocks of per-head choices (one choice: shared by every head); static ones cached (the
        op checks a blocks object's lists once)."""
        if any(PATTERNS[c["pattern"]].dynamic for c in choices):
            return blocks_for_heads(choices, layout, q.detach(), k.detach(), order).to(q.device)
        key = (layout, json.dumps(list(choices), sort_keys=True), str(q.device))
        if key not in self._blocks:
            with torch.inference_mode(False):  # a cache: ordinary tensors even if first built under inference_mode
                self._blocks[key] = blocks_for_heads(choices, layout).to(q.device)
        return self._blocks[key]

    @torch.no_grad()
    def calibrate(self, layer: int, q: Tensor, k: Tensor, v: Tensor, layout: TileLayout,
                  key_padding_mask: Optional[Tensor], order: str, scale: Optional[float], backend: str,
                  group=None) -> List[Choice]:
        """Per head, the first candidate (sparsest first) whose output is within tolerance of dense."""
        heads = q.shape[2]
        dense = attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale, backend=backend)
        chosen: List[Optional[Choice]] = [None] * heads
        errors = [0.0] * heads
        for candidate in self.config.candidates(layout)[:-1]:  # the last is dense: the fallback
            blocks = self.blocks([candidate], layout, q, k, order)
            out = block_sparse_attention(q, k, v, blocks, order=order, key_padding_mask=key_padding_mask, scale=scale,
                                         backend=backend)
            err = relative_error_per_head(out, dense).tolist()
            for h in range(heads):
                if chosen[h] is None and err[h] <= self.config.tolerance:
                    chosen[h], errors[h] = candidate, err[h]
            if all(c is not None for c in chosen):
                break
        choices = [c if c is not None else {"pattern": "dense"} for c in chosen]
        if group is not None:  # Ulysses: each rank calibrated its heads; every rank records all of them
            gathered = [None] * torch.distributed.get_world_size(group)
            torch.distributed.all_gather_object(gathered, (choices, errors), group=group)
            choices = [c for part in gathered for c in part[0]]
            errors = [e for part in gathered for e in part[1]]
        self.calibration_errors[grid_key(layout.grid), layer] = errors
        return choices

    # ---- reporting ----

    def kept_fractions(self) -> Dict[int, float]:
        """layer -> kept fraction of all token pairs (text included) in its last call; 1.0 for a dense call."""
        return {layer: 1.0 if blocks is None else blocks.kept_fraction()
                for layer, blocks in sorted(self.last_blocks.items())}


class SelfAttentionLayer:
    """A dit_fast model's sparse self-attention layer (DiTVideo's SpacetimeAttention.sparse): RoPE, then the
    runtime's block-sparse attention, or dense attention when the layer is dense now; tokens in the
    runtime's current order ("tiles": tile-major, RoPE at the tokens' raster positions)."""

    def __init__(self, runtime: SparseRuntime, layer: int):
        self.runtime, self.layer = runtime, layer

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int], rope=None, backend: str = "auto",
                 heads: Optional[Tuple[int, int]] = None, group=None) -> Tensor:
        """q, k, v (B, S, heads, D) of the whole ``grid`` -> (B, S, heads, D). heads / group: a Ulysses rank's
        share of the heads (SparseRuntime.attend)."""
        runtime, order = self.runtime, self.runtime.order
        layout = runtime.config.layout(grid)
        rope = as_rope(rope)
        if rope is not None:
            if order == "tiles" or q.dtype == torch.float64:  # float64: the tests' oracle, PyTorch's math
                q, k = rope_in_order(q, layout, rope, order), rope_in_order(k, layout, rope, order)
            else:
                q = apply_rope_3d(q, grid, theta=rope.theta, split=rope.split, backend=backend)
                k = apply_rope_3d(k, grid, theta=rope.theta, split=rope.split, backend=backend)
        out = runtime.attend(self.layer, q, k, v, layout, order=order, backend=backend, heads=heads, group=group)
        return attention(q, k, v, backend=backend) if out is None else out  # dense: any order


def rope_in_order(x: Tensor, layout: TileLayout, rope, order: str) -> Tensor:
    """apply_rope_3d_reference's rotation of x (B, S, heads, D) whose tokens are in ``order``: in tile order
    each token's angles are those of its raster position (layout.perm). PyTorch ops, differentiable."""
    B, S, heads, D = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = rope_3d_angles(layout.grid, D, rope.theta, rope.split, x.device, dtype=compute)
    if order == "tiles":
        angles = angles[layout.perm(x.device)]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, S, 1, D / 2)
    pairs = x.to(compute).reshape(B, S, heads, D // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(B, S, heads, D).to(x.dtype)


def _local_heads(choices: List[Choice], heads: Optional[Tuple[int, int]], local: int) -> List[Choice]:
    """The choices of the heads this call holds: one shared choice, or the slice [first, first + local)."""
    if len(choices) == 1:
        return choices
    first, total = heads if heads is not None else (0, local)
    if len(choices) != total or first + local > total:
        raise ValueError(f"the calibration holds {len(choices)} heads' choices but this call has heads "
                         f"[{first}, {first + local}) of {total}: calibrate for this model")
    part = choices[first:first + local]
    return part if any(c != part[0] for c in part) else part[:1]


__all__ = ["SelfAttentionLayer", "SparseRuntime", "StepTracker", "relative_error_per_head", "rope_in_order"]
