"""The CPU path of the adaLN ops: what backend "auto" (and "torch") runs on CPU, eagerly.

On a CPU the ops are memory-bound, so the path is chosen by the passes it makes over (B, N, C) tensors.
Plain eager PyTorch, DiT's ``modulate(norm(x), shift, scale)``, runs LayerNorm, a multiply and an add
(and the residual's multiply and add before it), each writing a new tensor.

layernorm_modulate: one pass of ATen's LayerNorm kernel per modulation group. The modulation folds
into the LayerNorm's affine parameters, one fp32 row per group:

    LN(x) * (1 + scale) + shift  =  xhat * w' + b'     w' = weight * (1 + scale)
                                                        b' = bias * (1 + scale) + shift

(xhat = (x - mean) * rstd). The CPU kernel takes a half-precision x with fp32 parameters and computes in
fp32, rounding once to x.dtype. That is the reference's math up to fp32 rounding order.

Its backward: aten.native_layer_norm_backward with w' gives dx (one pass). The modulations' gradients
are per-group sums in fp32:

    dshift = sum dout
    dscale = sum dout * n,  n = xhat * weight + bias   (= weight * sum dout * xhat + bias * sum dout)

Those sums are not taken from the LayerNorm backward's own affine gradients for fp16 / bf16 inputs.
Its CPU kernel, given a half-precision input with fp32 parameters (torch 2.13), sums them to about 5%
relative error over 4k rows (with bf16 parameters too); in fp32 they are exact. So for half dtypes
xhat is recomputed from x (one LayerNorm pass) and the sums are taken apart, accumulated in fp32.

With many groups (one per frame at a small N, one per token) a call per group costs more than it saves.
Then the path is the eager one written tightly: LayerNorm in x.dtype (fp32 statistics, one rounding of
its output), then shift + n * (1 + scale) in one addcmul, differentiated by autograd.

gated_residual: one addcmul (fp16 / bf16: computed in fp32, rounded once, bitwise the reference);
autograd differentiates it. residual_layernorm_modulate: the two above, composed by autograd.

Under torch.compile the public functions use the references instead (the compiler fuses them).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# A call per (sample, group) while those calls are few, or each large (elements of x). Each call is a parallel
# region of the intra-op threads; many small ones cost more than the pass they save, the more so on a busy
# machine where a descheduled thread stalls every region. Both forms side by side: benchmarks/NOTES.md
# ("CPU path under auto"), bench_adaln's ours-torch-per-group / ours-torch-whole providers.
MAX_SMALL_GROUPS = 4
MIN_GROUP_ELEMENTS = 1 << 20


def per_group_calls(x: Tensor, num_groups: int) -> bool:
    """True: one LayerNorm call per (sample, group). False: the whole-tensor eager form."""
    B, N, C = x.shape
    if x.numel() == 0:
        return False
    return B * num_groups <= MAX_SMALL_GROUPS or (N // num_groups) * C >= MIN_GROUP_ELEMENTS


def _groups(mod: Tensor) -> int:
    return mod.shape[1] if mod.dim() == 3 else 1


def _grouped(t: Tensor, mod: Tensor) -> Tuple[Tensor, Tensor]:
    """(B, N, C) and (B, C) / (B, G, C) -> views (B, G, N / G, C) and (B, G, 1, C)."""
    B, N, C = t.shape
    G = _groups(mod)
    return t.view(B, G, N // G, C) if t.is_contiguous() else t.reshape(B, G, N // G, C), mod.reshape(B, G, 1, C)


def _acc(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


# ---------------------------------------------------------------------------------------------
# layernorm_modulate
# ---------------------------------------------------------------------------------------------


def _folded(scale: Tensor, shift: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
            acc: torch.dtype) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """The LayerNorm parameters of each group, (B G, C) in ``acc``: (w', b', 1 + scale)."""
    C = scale.shape[-1]
    s1 = 1 + scale.reshape(-1, C).to(acc)
    w = s1 if weight is None else s1 * weight.to(acc)
    if shift is None:
        return w, None, s1
    b = shift.reshape(-1, C).to(acc)
    return w, (b if bias is None else torch.addcmul(b, s1, bias.to(acc))), s1


class _LayerNormModulate(torch.autograd.Function):
    """LN(x) * (1 + scale) + shift, one aten.native_layer_norm call per (sample, group)."""

    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, eps):
        B, N, C = x.shape
        G = _groups(shift)
        acc = torch.promote_types(x.dtype, torch.float32)
        w, b, _ = _folded(scale, shift, weight, bias, acc)
        xs = x.reshape(B * G, N // G, C)
        out = torch.empty((B * G, N // G, C), dtype=x.dtype, device=x.device)
        mean, rstd = (torch.empty((B * G, N // G, 1), dtype=acc, device=x.device) for _ in range(2))
        for i in range(B * G):
            torch.ops.aten.native_layer_norm.out(xs[i], [C], w[i], b[i], eps, out0=out[i], out1=mean[i],
                                                 out2=rstd[i])
        ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
        ctx.eps, ctx.shift_shape = eps, shift.shape
        return out.view(B, N, C)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, scale, weight, bias, mean, rstd = ctx.saved_tensors
        B, N, C = x.shape
        G = _groups(scale)
        acc = torch.promote_types(x.dtype, torch.float32)
        w, _, s1 = _folded(scale, None, weight, None, acc)
        exact_affine = x.dtype == acc  # the kernel's own affine sums are exact only when nothing is mixed
        xs, gs = x.reshape(B * G, N // G, C), dout.reshape(B * G, N // G, C)
        dxs, affine = [], []
        for i in range(B * G):
            # the bias argument's values are not read (any (C,) tensor asks for dbeta)
            dx, dg, db = torch.ops.aten.native_layer_norm_backward(gs[i], xs[i], [C], mean[i], rstd[i], w[i], w[i],
                                                                   [True, exact_affine, exact_affine])
            dxs.append(dx)
            affine.append((dg, db))
        if exact_affine:
            dgamma, dbeta = (torch.stack(t) for t in zip(*affine))
        else:
            # whole-tensor passes, not one per group: xhat (the LayerNorm without affine, x.dtype), then the
            # column sums per group in x.dtype, which ATen accumulates in fp32 and rounds once (~5x faster on
            # bf16 than asking for an fp32 result, which converts the whole input first)
            xhat = torch.ops.aten.native_layer_norm(xs, [C], None, None, ctx.eps)[0]
            dgamma = torch.mul(gs, xhat, out=xhat).sum(1).to(acc)  # sum dout * xhat
            dbeta = gs.sum(1).to(acc)  # sum dout
        dx = (dxs[0] if len(dxs) == 1 else torch.stack(dxs)).view(B, N, C)
        dscale = dgamma if weight is None else dgamma * weight.to(acc)
        if bias is not None:
            dscale = dscale + dbeta * bias.to(acc)
        dw = None if weight is None else (s1 * dgamma).sum(0).to(weight.dtype)
        db = None if bias is None else (s1 * dbeta).sum(0).to(bias.dtype)
        return (dx, dbeta.view(ctx.shift_shape).to(scale.dtype), dscale.view(scale.shape).to(scale.dtype), dw, db,
                None)


def _layernorm_modulate_eager(x, shift, scale, weight, bias, eps):
    """LayerNorm in x.dtype (fp32 statistics), then shift + n * (1 + scale) in one addcmul."""
    n = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    ng, shift_ = _grouped(n, shift)
    _, scale_ = _grouped(n, scale)
    return torch.addcmul(shift_, ng, 1 + scale_).view(x.shape)


def layernorm_modulate_cpu(x, shift, scale, weight=None, bias=None, eps=1e-6, per_group: Optional[bool] = None):
    """layernorm_modulate_reference's result with one LayerNorm pass per modulation group (see the module);
    ``per_group`` None: per_group_calls decides (True / False force a form, for the tests)."""
    if per_group_calls(x, _groups(shift)) if per_group is None else (per_group and x.numel() > 0):
        return _LayerNormModulate.apply(x, shift, scale, weight, bias, eps)
    return _layernorm_modulate_eager(x, shift, scale, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# gated_residual, residual_layernorm_modulate
# ---------------------------------------------------------------------------------------------


def gated_residual_cpu(x, gate, y):
    """x + gate * y in one addcmul (fp16 / bf16: fp32 math, one rounding: bitwise the reference)."""
    xg, gate_ = _grouped(x, gate)
    yg, _ = _grouped(y, gate)
    return torch.addcmul(xg, gate_, yg).view(x.shape)


def residual_layernorm_modulate_cpu(x, gate, y, shift, scale, eps=1e-6, per_group: Optional[bool] = None):
    """(h, LN(h) * (1 + scale) + shift) with h = x + gate * y rounded to x.dtype, as the reference."""
    h = gated_residual_cpu(x, gate, y)
    return h, layernorm_modulate_cpu(h, shift, scale, eps=eps, per_group=per_group)


__all__ = ["layernorm_modulate_cpu", "gated_residual_cpu", "residual_layernorm_modulate_cpu", "per_group_calls"]
