"""What every model module shares: the processor skeleton, RoPE, the fused adaLN calls, the patch bookkeeping.

A dit_fast processor replaces a diffusers attention processor in place. It keeps the model's own
projections and qk-norm modules (their parameters are untouched), rotates q and k with
``dit_fast.ops.apply_rope_3d`` when the model's RoPE is dit_fast's convention on the current token
grid (else with the model's own cos / sin tables, the same math), and runs the attention through
diffusers' dispatcher on the "dit_fast" backend, so ``enable_parallelism`` (Ulysses, ring) works on
patched models too. A backend the user sets afterwards with ``set_attention_backend`` is honoured.

Blocks get a new ``forward`` that computes the same function with the fused adaLN ops
(``layernorm_modulate``, ``gated_residual``, ``residual_layernorm_modulate``): statistics,
modulation and residual in fp32 with one rounding to the stream's dtype. Where the model keeps its
modulation in fp32 and the stream in bf16 (Wan), the modulation is rounded to the stream's dtype
first (the ops take one dtype): one bf16 rounding more than Wan, within the tests' bf16 tolerance.
"""

import contextlib
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from dit_fast import _backend, ops
from diffusers.models.attention_dispatch import dispatch_attention_fn

from dit_fast.integrations.diffusers.backend import backend_member
from dit_fast.models.patching import patch_method


# ---------------------------------------------------------------------------------------------
# The token grid: a forward pre-hook on the transformer records (T, H, W) after patching.
# ---------------------------------------------------------------------------------------------


class GridState:
    """The post-patch token grid of the transformer's current call, shared by its processors."""

    def __init__(self):
        self.grid: Optional[Tuple[int, int, int]] = None


class GridRecorder:
    """The transformer's forward pre-hook: ``state.grid = video_grid(<the call's video argument>, patch)``.

    An object of a module-level class, not a closure: a patched model pickles, and ``copy.deepcopy``
    copies it with the processors' GridState in one memo, so a copy's hook feeds the copy's processors
    (a closure is shared by the copies and would leave a copy's processors on a stale grid).
    """

    def __init__(self, state: GridState, patch: Sequence[int], name: str = "hidden_states", index: int = 0):
        self.state = state
        self.patch = tuple(patch)
        self.name, self.index = name, index  # the video argument: keyword ``name`` or at position ``index``

    def __call__(self, module, args, kwargs):
        self.state.grid = video_grid(input_of(args, kwargs, self.name, self.index), self.patch)


def record_grid(model: nn.Module, patch: Sequence[int], name: str = "hidden_states", index: int = 0) -> GridState:
    """Registers a GridRecorder on ``model``: every call records the (T, H, W) grid of its (B, C, F, H, W)
    video argument (keyword ``name`` or position ``index``) cut into ``patch``; returns the shared state.

    The hook runs before diffusers' context-parallel split hooks (they wrap ``forward``), so the grid
    is the whole video's; a processor seeing fewer tokens (a sequence shard) uses the model's tables.
    """
    state = GridState()
    model.register_forward_pre_hook(GridRecorder(state, patch, name, index), with_kwargs=True)
    return state


def input_of(args, kwargs, name: str, index: int):
    """The forward argument ``name`` (keyword) or at position ``index``."""
    return kwargs[name] if name in kwargs else args[index]


def video_grid(hidden_states: Tensor, patch: Sequence[int]) -> Tuple[int, int, int]:
    """(T, H, W) tokens of a (B, C, F, H, W) video cut into (pt, ph, pw) patches."""
    F_, H, W = hidden_states.shape[-3:]
    return F_ // patch[0], H // patch[1], W // patch[2]


# ---------------------------------------------------------------------------------------------
# The processor skeleton.
# ---------------------------------------------------------------------------------------------


class DitFastProcessor:
    """Base of the installed processors; subclasses implement ``__call__`` with the model's signature.

    diffusers writes ``_attention_backend`` (set_attention_backend) and ``_parallel_config``
    (enable_parallelism) on processors; both are read in ``attend``.
    """

    _attention_backend = None
    _parallel_config = None
    sparse = None  # a self-attention layer under dit_fast.patch(..., sparse=...): sparse.SparseLayer

    def __init__(self, original, backend: str = "auto", grid: Optional[GridState] = None,
                 rope_theta: float = 10000.0, rope_split: Optional[Sequence[int]] = None):
        self.original = original  # the diffusers processor this one replaced
        self.backend = backend  # dit_fast backend of the ops ("auto": use_backend / $DIT_FAST_BACKEND decide)
        self.grid = grid
        self.rope_theta = rope_theta
        self.rope_split = None if rope_split is None else tuple(rope_split)

    def ops_backend(self):
        """Context in which the dit_fast ops called through diffusers see this processor's backend."""
        if self.backend == "auto":
            return contextlib.nullcontext()
        return _backend.use_backend(self.backend)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
               parallel: bool = True) -> Tensor:
        """(B, Sq, heads, D) attention through diffusers' dispatcher, on "dit_fast" unless another backend was set.
        A sparse layer's block-sparse attention first (None: dense at this step; integrations/diffusers/sparse.py)."""
        if self.sparse is not None:
            out = self.sparse.attend(self, query, key, value, attn_mask, parallel)
            if out is not None:
                return out
        backend = self._attention_backend or backend_member()
        with self.ops_backend():
            return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, backend=backend,
                                         parallel_config=self._parallel_config if parallel else None)

    def rope(self, x: Tensor, model_rope: Callable[[Tensor], Tensor]) -> Tensor:
        """x (B, S, heads, D) rotated by apply_rope_3d on the recorded grid, or by ``model_rope`` (the
        model's tables) when no grid of S tokens is recorded (a context-parallel shard, a direct call)."""
        grid = None if self.grid is None else self.grid.grid
        if grid is not None and math.prod(grid) == x.shape[1]:
            return ops.apply_rope_3d(x, grid, theta=self.rope_theta, split=self.rope_split, backend=self.backend)
        return model_rope(x)


_STREAMS = {"video": ("to_q", "to_k", "to_v", "norm_q", "norm_k", "to_qkv"),
            "text": ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", "to_added_qkv")}


def qkv_heads(attn: nn.Module, x: Tensor, stream: str = "video") -> Tuple[Tensor, Tensor, Tensor]:
    """x (B, S, C) -> q, k, v (B, S, heads, D) through one stream's projections, q and k through the
    model's per-head qk-norm where it has one (HunyuanVideo, CogVideoX, Mochi; Wan's spans all heads).
    stream "text": the text tokens' own projections of a dual-stream block (add_q_proj, norm_added_q, ...).
    After diffusers' ``fuse_projections`` (``attn.fused_projections``) one matmul through the fused
    ``to_qkv`` / ``to_added_qkv``, split as [q; k; v] in the order diffusers concatenates them."""
    to_q, to_k, to_v, norm_q, norm_k, fused = (getattr(attn, name, None) for name in _STREAMS[stream])
    if fused is not None and getattr(attn, "fused_projections", False):
        sizes = [proj.out_features for proj in (to_q, to_k, to_v)]
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in fused(x).split(sizes, dim=-1))
    else:
        q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def prepared_mask(attn: nn.Module, attention_mask: Optional[Tensor], sequence_length: int,
                  batch_size: int) -> Optional[Tensor]:
    """diffusers' attention mask as its processors prepare it for SDPA: (B, heads, 1 or Sq, Sk); None stays None."""
    if attention_mask is None:
        return None
    mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


def joint_outputs(attn: nn.Module, hidden_states: Tensor, n_text: int) -> Tuple[Tensor, Tensor]:
    """(video, text) of a joint [video; text] attention output (B, N + L, C), each through its stream's
    output projection where the module has one (to_out, to_add_out)."""
    hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
    if getattr(attn, "to_out", None) is not None:
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if getattr(attn, "to_add_out", None) is not None:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved-pair rotation with per-pair cos / sin broadcastable to x[..., ::2]; math in fp32.

    Wan's and Mochi's in-processor ``apply_rotary_emb``: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


def set_processors(attention_modules, make: Callable) -> int:
    """Replaces each module's processor with ``make(module)``; returns how many."""
    count = 0
    for module in attention_modules:
        processor = make(module)
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:  # MochiAttention keeps a plain attribute
            module.processor = processor
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Fused adaLN calls on the model's norm modules.
# ---------------------------------------------------------------------------------------------


def norm_params(norm: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor], float]:
    """(weight, bias, eps) of a LayerNorm (nn.LayerNorm, diffusers' FP32LayerNorm), None without affine."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(f"expected a LayerNorm over the last dim, got {type(norm).__name__}")
    return norm.weight, norm.bias, norm.eps


def _like(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if t is None else t.to(x.dtype)


def layernorm_modulate(norm: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, backend: str) -> Tensor:
    """``norm(x) * (1 + scale) + shift`` in one kernel; shift / scale (B, C) or per token (B, N, C)."""
    weight, bias, eps = norm_params(norm)
    return ops.layernorm_modulate(x, _like(shift, x), _like(scale, x), weight=_like(weight, x),
                                  bias=_like(bias, x), eps=eps, backend=backend)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, backend: str) -> Tensor:
    """``x + gate * y`` in fp32, rounded once to x.dtype; gate (B, C), (B, 1, C) or (B, N, C)."""
    return ops.gated_residual(x, _like(gate, x), y.to(x.dtype), backend=backend)


def residual_layernorm_modulate(norm: nn.Module, x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor,
                                backend: str) -> Tuple[Tensor, Tensor]:
    """(h, norm(h) * (1 + scale) + shift) with h = x + gate * y: one pass without a LayerNorm affine."""
    weight, bias, eps = norm_params(norm)
    if weight is not None or bias is not None:
        h = gated_residual(x, gate, y, backend)
        return h, layernorm_modulate(norm, h, shift, scale, backend)
    return ops.residual_layernorm_modulate(x, _like(gate, x), y.to(x.dtype), _like(shift, x), _like(scale, x),
                                           eps=eps, backend=backend)


def per_sample(mod: Tensor) -> Tensor:
    """(B, 1, C) -> (B, C): the adaLN ops read (B, C) as one modulation per sample."""
    return mod.squeeze(1) if mod.dim() == 3 and mod.shape[1] == 1 else mod


# ---------------------------------------------------------------------------------------------
# Patch bookkeeping.
# ---------------------------------------------------------------------------------------------


def replace_forward(module: nn.Module, forward: Callable, backend: str) -> None:
    """``module.forward = forward`` bound to it as a picklable PatchedMethod (``forward`` a module-level
    function; ``del module.forward`` restores the class's forward)."""
    module._dit_fast_backend = backend
    patch_method(module, "forward", forward)


def finish(model: nn.Module, counts: dict) -> nn.Module:
    """Marks ``model`` patched (dit_fast.patch refuses a second patch) and returns it."""
    model._dit_fast_patched = dict(counts, model=type(model).__name__)
    return model
