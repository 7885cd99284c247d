"""Attention in pieces: one block of keys at a time, merged by log-sum-exp (ring attention's building blocks).

    attention_block_forward(q, k, v)   -> (out, lse)      attention of q over one block of keys
    merge_partials(out_a, lse_a, out_b, lse_b) -> (out, lse)   the attention over both blocks
    attention_block_backward(q, k, v, out, lse, dout) -> (dq, dk, dv)
                                                           gradients through this block, given the
                                                           MERGED out and lse of all blocks

Why this is exact (flash attention's online softmax): with s = scale * q k^T over keys split into
blocks a and b, lse = log sum_j exp(s_j) = logaddexp(lse_a, lse_b), and

    out = sum_j exp(s_j - lse) v_j = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.

The backward of block a needs only the final out and lse (P_a = exp(s_a - lse) is block a's share of
the full softmax): dV_a = P_a^T dO, dS_a = P_a * (dO V_a^T - rowsum(dO * out)), dQ += scale dS_a K_a,
dK_a = scale dS_a^T Q. So ring attention never stores the per-block partials.

Layout as dit_fast.ops.attention: q (B, Sq, heads, D); k, v (B, Sk, heads, D); lse (B, heads, Sq)
fp32, natural log. key_padding_mask: optional bool (B, Sk), or per head (B, heads, Sk), True = attend.
A query with no visible key in a block gets out 0 and lse -inf there, and merges as if the block were
absent. A masked key has no influence, whatever its values (NaN, inf): the references and the kernels
both hide them.

These functions are not differentiable (they run under no_grad): autograd Functions built on them
(dit_fast/parallel/sequence.py's ring attention) call the backward themselves. backend: "torch" runs
dit_fast.ops.attention's references (attention_reference, attention_backward_reference); "triton"
the custom ops torch.ops.dit_fast.attention_fwd / attention_bwd; "auto" the reference on CPU and our
kernel on a GPU (torch has no LSE-returning rival to time).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from dit_fast.ops._attention_checks import _resolve_kernel
from dit_fast.ops.flash_attention import (_check_key_padding_mask, _check_qkv, _check_scale,
                                    attention_backward_reference, attention_reference, reference_mask)


def _check_out_lse(name_out, out, name_lse, lse, q):
    B, Sq, heads, D = q.shape
    if not isinstance(out, Tensor) or tuple(out.shape) != (B, Sq, heads, D):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name_out} must be (B, Sq, heads, D) = {(B, Sq, heads, D)} like q, got {shape}")
    if not isinstance(lse, Tensor) or tuple(lse.shape) != (B, heads, Sq):
        shape = tuple(lse.shape) if isinstance(lse, Tensor) else type(lse).__name__
        raise ValueError(f"{name_lse} must be (B, heads, Sq) = {(B, heads, Sq)} for q {tuple(q.shape)}, got {shape}")
    if lse.dtype != torch.float32:
        raise TypeError(f"{name_lse} must be float32 (the forward's log-sum-exp), got {lse.dtype}")
    if out.device != q.device or lse.device != q.device:
        raise ValueError(f"{name_out} ({out.device}) and {name_lse} ({lse.device}) must be on q's device {q.device}")


@torch.no_grad()
def attention_block_forward(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                            scale: Optional[float] = None, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Attention of q over one block of keys. Returns (out (B, Sq, heads, D), lse (B, heads, Sq) fp32).

    Rows with no visible key give out 0 and lse -inf. Not differentiable (see the module docstring).
    """
    _check_qkv(q, k, v)
    scale = _check_scale(scale, q.shape[-1])
    mask = _check_key_padding_mask(key_padding_mask, q, k)
    name = _resolve_kernel(backend, q)  # our kernel's LSE: never torch's
    if name == "torch":
        return attention_reference(q, k, v, scale=scale, mask=reference_mask(mask), return_lse=True)
    return torch.ops.dit_fast.attention_fwd(q, k, v, mask, [], "full", [], [], 0.0, [], scale, name)


@torch.no_grad()
def attention_block_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                             key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                             backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients through one block of keys, from the merged out and lse of every block.

    q, out, dout: (B, Sq, heads, D); k, v: (B, Sk, heads, D); lse: (B, heads, Sq) fp32. Returns
    (dq, dk, dv) in the dtypes of q, k, v: dk and dv are this block's whole gradients, dq its share
    (summed over the blocks, the full dq). Masked keys get zero gradients.
    """
    _check_qkv(q, k, v)
    _check_out_lse("out", out, "lse", lse, q)
    if not isinstance(dout, Tensor) or dout.shape != out.shape:
        shape = tuple(dout.shape) if isinstance(dout, Tensor) else type(dout).__name__
        raise ValueError(f"dout must have the shape of out {tuple(out.shape)}, got {shape}")
    scale = _check_scale(scale, q.shape[-1])
    mask = _check_key_padding_mask(key_padding_mask, q, k)
    name = _resolve_kernel(backend, q)  # our kernel's LSE: never torch's
    if name == "torch":
        return attention_backward_reference(q, k, v, out, lse, dout, scale=scale, mask=reference_mask(mask))
    out, dout = out.to(q.dtype), dout.to(q.dtype)
    return torch.ops.dit_fast.attention_bwd(dout, q, k, v, out, lse, mask, [], "full", [], [], 0.0, [], scale,
                                            name)


@torch.no_grad()
def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """The attention over the keys of blocks a and b from each block's (out, lse).

    out_*: (B, Sq, heads, D); lse_*: (B, heads, Sq) fp32. A row with lse -inf in one block takes the
    other block's values exactly; -inf in both gives out 0 and lse -inf (never NaN). Computed in fp32
    (fp64 for fp64 outputs); returns out in out_a's dtype and lse in fp32.
    """
    _check_out_lse("out_a", out_a, "lse_a", lse_a, out_a)
    _check_out_lse("out_b", out_b, "lse_b", lse_b, out_a)
    lse = torch.logaddexp(lse_a, lse_b)  # (B, heads, Sq); -inf only where both are -inf
    base = torch.where(lse == float("-inf"), torch.zeros((), device=lse.device), lse)  # no -inf - -inf
    compute = torch.promote_types(out_a.dtype, torch.float32)
    w_a = torch.exp(lse_a - base).transpose(1, 2)[..., None].to(compute)  # (B, Sq, heads, 1), 0 for an empty block
    w_b = torch.exp(lse_b - base).transpose(1, 2)[..., None].to(compute)
    out = w_a * out_a.to(compute) + w_b * out_b.to(compute)  # (B, Sq, heads, D)
    return out.to(out_a.dtype), lse


__all__ = ["attention_block_forward", "attention_block_backward", "merge_partials"]
