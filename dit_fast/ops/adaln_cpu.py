"""The CPU path of the adaLN ops: what backend "auto" (and "torch") runs on CPU, eagerly.

Forward: per element what dit_fast/ops/adaln.py's references do (the same fp32 operations in the same
order, one rounding to x.dtype: bitwise the same outputs, tests/test_adaln.py), but one block of rows
(~4 MB of fp32) at a time, written in place. The whole-tensor reference makes fp32 temporaries of the
whole input (twice a bf16 input), and allocations past glibc's 32 MB mmap ceiling come from fresh pages
on every call: that made it 0.13-0.38x of eager bf16 PyTorch on CPU (benchmarks/NOTES.md).

Backward: written out (one torch.autograd.Function per op) instead of autograd over the blocks' graph.
Nothing fp32 is kept from the forward: each block's LayerNorm is recomputed from x (statistics included,
aten.native_layer_norm, as F.layer_norm runs it), and all its gradients are computed in fp32:

    out = n * (1 + scale) + shift,  n = LN(x) * weight + bias
        dshift = sum over rows of dout      dscale = sum over rows of dout * n
        dn = dout * (1 + scale)      ->  dx, dweight, dbias = LayerNorm's backward of dn
    h = x + gate * y
        dx = dh      dy = dh * gate      dgate = sum over rows of dh * y

The modulations' and the affine parameters' gradients add up over the blocks in fp32 and are rounded
once. Under torch.compile the public functions use the references instead (the compiler fuses them).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dit_fast.ops.adaln import _upcast

# fp32 bytes of one block of x: below glibc's 32 MB mmap ceiling, so the allocator reuses the blocks' memory,
# and few blocks, so few parallel regions (each costs a wake-up of the intra-op threads; on a busy machine a
# descheduled thread stalls every one). 1-16 MB measured alike on one thread; 4 MB the best on two.
CPU_BLOCK_BYTES = 4 << 20


def _block_bytes(block_bytes: Optional[int]) -> int:
    return CPU_BLOCK_BYTES if block_bytes is None else block_bytes


# ---------------------------------------------------------------------------------------------
# Blocks of rows
# ---------------------------------------------------------------------------------------------


class _Blocks:
    """A sample's N rows in blocks of about ``block_bytes`` fp32, each k groups of r rows sharing one
    modulation row per group (whole groups when a group fits, else r rows of one group), for all B samples."""

    def __init__(self, x: Tensor, mod: Tensor, block_bytes: int):
        B, N, C = x.shape
        G = mod.shape[1] if mod.dim() == 3 else 1
        group, rows = N // G, max(1, block_bytes // (4 * C))
        if B * N == 0:  # nothing to compute: no blocks
            spans = []
        elif group <= rows:
            k = rows // group
            spans = [(g0 * group, min(k, G - g0), group) for g0 in range(0, G, k)]
        else:
            spans = [(lo, 1, min(rows, (g + 1) * group - lo))
                     for g in range(G) for lo in range(g * group, (g + 1) * group, rows)]
        self.shape, self.G = (B, N, C), G
        self.items = [(k, r, b * G + lo // group) for b in range(B) for lo, k, r in spans]  # (k, r, first mod row)

    def rows(self, t: Tensor) -> List[Tensor]:
        """(B, N, C) -> one (k, r, C) view per block (a copy first if t's rows are not one stride apart)."""
        B, N, C = self.shape
        if not self.items:
            return []
        parts = t.reshape(B * N, C).split([k * r for k, r, _ in self.items])
        return [p.view(k, r, C) for p, (k, r, _) in zip(parts, self.items, strict=True)]

    def mods(self, mod: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """(B, C) or (B, G, C) -> (its fp32 copy (B G, C), one (k, 1, C) view of it per block)."""
        flat = _upcast(mod.reshape(self.shape[0] * self.G, self.shape[2]))
        return flat, [flat[i:i + k].unsqueeze(1) for k, _, i in self.items]

    def add_rows(self, acc: Tensor, part: Tensor, index: int) -> None:
        """acc (B G, C) fp32 += one block's per-group sums part (k, 1, C) at its modulation rows."""
        k, _, i = self.items[index]
        acc[i:i + k] += part.squeeze(1)


def _empty_like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _sum_rows(t: Tensor) -> Tensor:
    return t.sum(dim=1, keepdim=True)  # (k, r, C) -> (k, 1, C)


def _grad(t: Optional[Tensor], like: Optional[Tensor], shape=None) -> Optional[Tensor]:
    """An fp32 gradient accumulator returned in the dtype (and shape) of its input, or None."""
    if t is None or like is None:
        return None
    return t.view(shape if shape is not None else like.shape).to(like.dtype)


# ---------------------------------------------------------------------------------------------
# layernorm_modulate
# ---------------------------------------------------------------------------------------------


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, eps, block_bytes):
        blocks, C = _Blocks(x, shift, block_bytes), x.shape[-1]
        w, b = _upcast(weight), _upcast(bias)
        out = _empty_like(x)
        _, shifts = blocks.mods(shift)
        _, scales = blocks.mods(scale)
        for xb, ob, sh, sc in zip(blocks.rows(x), blocks.rows(out), shifts, scales, strict=True):
            ob.copy_(F.layer_norm(_upcast(xb), (C,), w, b, eps).mul_(1 + sc).add_(sh))
        ctx.save_for_backward(x, shift, scale, weight, bias)
        ctx.eps, ctx.block_bytes = eps, block_bytes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, shift, scale, weight, bias = ctx.saved_tensors
        blocks, C = _Blocks(x, shift, ctx.block_bytes), x.shape[-1]
        w, b = _upcast(weight), _upcast(bias)
        _, scales = blocks.mods(scale)
        dx = _empty_like(x)
        dshift, dscale = (x.new_zeros(blocks.G * x.shape[0], C, dtype=torch.float32) for _ in range(2))
        dw = x.new_zeros(C, dtype=torch.float32) if weight is not None else None
        db = x.new_zeros(C, dtype=torch.float32) if bias is not None else None
        for i, (xb, gb, dxb, sc) in enumerate(zip(blocks.rows(x), blocks.rows(dout), blocks.rows(dx), scales,
                                                  strict=True)):
            x32, g = _upcast(xb), _upcast(gb)
            n, mean, rstd = torch.ops.aten.native_layer_norm(x32, [C], w, b, ctx.eps)
            blocks.add_rows(dshift, _sum_rows(g), i)
            blocks.add_rows(dscale, _sum_rows(g * n), i)
            dxb32, dwb, dbb = torch.ops.aten.native_layer_norm_backward(g * (1 + sc), x32, [C], mean, rstd, w, b,
                                                                        [True, dw is not None, db is not None])
            dxb.copy_(dxb32)
            if dw is not None:
                dw += dwb
            if db is not None:
                db += dbb
        return dx, _grad(dshift, shift), _grad(dscale, scale), _grad(dw, weight), _grad(db, bias), None, None


def layernorm_modulate_cpu(x, shift, scale, weight=None, bias=None, eps=1e-6, block_bytes=None):
    """layernorm_modulate_reference, a block of rows at a time (bitwise the same output)."""
    return _LayerNormModulate.apply(x, shift, scale, weight, bias, eps, _block_bytes(block_bytes))


# ---------------------------------------------------------------------------------------------
# gated_residual
# ---------------------------------------------------------------------------------------------


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, block_bytes):
        # fp16 / bf16: one torch.addcmul in x.dtype, which on CPU computes x + gate * y in fp32 and rounds once
        # (the reference, bitwise); fp32: x + gate * y as written (addcmul would fuse the multiply-add). The G
        # groups by a view, no copy of the gate
        B, N, C = x.shape
        G = gate.shape[1] if gate.dim() == 3 else 1
        ctx.save_for_backward(gate, y)
        ctx.block_bytes = block_bytes
        xg, gg, yg = x.reshape(B, G, N // G, C), gate.reshape(B, G, 1, C), y.reshape(B, G, N // G, C)
        out = xg + gg * yg if x.dtype == torch.float32 else torch.addcmul(xg, gg, yg)
        return out.view(B, N, C)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        blocks = _Blocks(dout, gate, ctx.block_bytes)
        _, gates = blocks.mods(gate)
        dy = _empty_like(y)
        dgate = dout.new_zeros(blocks.G * dout.shape[0], dout.shape[-1], dtype=torch.float32)
        for i, (gb, yb, dyb, ga) in enumerate(zip(blocks.rows(dout), blocks.rows(y), blocks.rows(dy), gates,
                                                  strict=True)):
            g = _upcast(gb)
            blocks.add_rows(dgate, _sum_rows(g * _upcast(yb)), i)
            dyb.copy_(g * ga)
        return dout, _grad(dgate, gate), dy, None


def gated_residual_cpu(x, gate, y, block_bytes=None):
    """gated_residual_reference: x + gate * y in fp32, rounded once (see _GatedResidual.forward)."""
    return _GatedResidual.apply(x, gate, y, _block_bytes(block_bytes))


# ---------------------------------------------------------------------------------------------
# residual_layernorm_modulate
# ---------------------------------------------------------------------------------------------


class _ResidualLayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, shift, scale, eps, block_bytes):
        blocks, C = _Blocks(x, gate, block_bytes), x.shape[-1]
        h, out = _empty_like(x), _empty_like(x)
        (_, gates), (_, shifts), (_, scales) = blocks.mods(gate), blocks.mods(shift), blocks.mods(scale)
        for xb, yb, hb, ob, ga, sh, sc in zip(blocks.rows(x), blocks.rows(y), blocks.rows(h), blocks.rows(out),
                                              gates, shifts, scales, strict=True):
            hb.copy_(_upcast(xb) + ga * _upcast(yb))  # h rounded to x.dtype before its LayerNorm, as the reference
            ob.copy_(F.layer_norm(_upcast(hb), (C,), None, None, eps).mul_(1 + sc).add_(sh))
        ctx.save_for_backward(gate, y, shift, scale, h)
        ctx.eps, ctx.block_bytes = eps, block_bytes
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no LayerNorm backward of zeros
        return h, out

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dout):
        gate, y, shift, scale, h = ctx.saved_tensors
        blocks, C = _Blocks(h, gate, ctx.block_bytes), h.shape[-1]
        (_, gates), (_, scales) = blocks.mods(gate), blocks.mods(scale)
        dx, dy = _empty_like(h), _empty_like(h)
        dgate, dshift, dscale = (h.new_zeros(blocks.G * h.shape[0], C, dtype=torch.float32) for _ in range(3))
        dhs = blocks.rows(dh) if dh is not None else [None] * len(blocks.items)
        douts = blocks.rows(dout) if dout is not None else [None] * len(blocks.items)
        for i, (hb, yb, dhb, gb, dxb, dyb, ga, sc) in enumerate(zip(blocks.rows(h), blocks.rows(y), dhs, douts,
                                                                   blocks.rows(dx), blocks.rows(dy), gates, scales,
                                                                   strict=True)):
            total = _upcast(dhb).clone() if dhb is not None else None  # dL/dh in fp32: h's own use, then its LN's
            if gb is not None:
                h32, g = _upcast(hb), _upcast(gb)
                n, mean, rstd = torch.ops.aten.native_layer_norm(h32, [C], None, None, ctx.eps)
                blocks.add_rows(dshift, _sum_rows(g), i)
                blocks.add_rows(dscale, _sum_rows(g * n), i)
                dln = torch.ops.aten.native_layer_norm_backward(g * (1 + sc), h32, [C], mean, rstd, None, None,
                                                                [True, False, False])[0]
                total = dln if total is None else total.add_(dln)
            if total is None:
                total = torch.zeros(hb.shape, dtype=torch.float32, device=hb.device)
            blocks.add_rows(dgate, _sum_rows(total * _upcast(yb)), i)
            dyb.copy_(total * ga)
            dxb.copy_(total)
        return dx, _grad(dgate, gate), dy, _grad(dshift, shift), _grad(dscale, scale), None, None


def residual_layernorm_modulate_cpu(x, gate, y, shift, scale, eps=1e-6, block_bytes=None):
    """residual_layernorm_modulate_reference, a block of rows at a time (bitwise the same outputs)."""
    return _ResidualLayerNormModulate.apply(x, gate, y, shift, scale, eps, _block_bytes(block_bytes))


__all__ = ["layernorm_modulate_cpu", "gated_residual_cpu", "residual_layernorm_modulate_cpu", "CPU_BLOCK_BYTES"]
