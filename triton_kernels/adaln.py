"""Triton kernels for adaLN modulation: LayerNorm + (1 + scale) / shift, and the gated residual.

One kernel pair serves three ops through compile-time flags:
  layernorm_modulate           HAS_RESIDUAL=False, HAS_NORM=True
  gated_residual               HAS_RESIDUAL=True,  HAS_NORM=False
  residual_layernorm_modulate  HAS_RESIDUAL=True,  HAS_NORM=True

Layout: x is viewed as R = B * N rows of C features. Modulation tensors (shift, scale, gate)
are (B * G, C): one row per sample (G = 1) or per group of N / G consecutive tokens (for example
one per frame, for per-frame timesteps). Row r uses modulation row (r // N) * G + (r % N) // (N / G).

The readable PyTorch reference for every op here is in dit_fast/ops/adaln.py.
"""

import torch
import triton
import triton.language as tl

from dit_fast import _adaln_partials as adaln_partials

MAX_C = 16384  # one row lives in registers; beyond this the backward's accumulators spill badly


@triton.jit
def _adaln_forward_kernel(
    X_ptr,  # input rows, (R, C); with HAS_RESIDUAL: the residual stream x
    GATE_ptr,  # gate, (B * G, C)  [HAS_RESIDUAL]
    BRANCH_ptr,  # branch output y, (R, C)  [HAS_RESIDUAL]
    H_ptr,  # out: h = x + gate * y, (R, C)  [HAS_RESIDUAL]
    SHIFT_ptr,  # shift, (B * G, C)  [HAS_NORM]
    SCALE_ptr,  # scale, (B * G, C)  [HAS_NORM]
    W_ptr,  # LayerNorm weight, (C,)  [HAS_WEIGHT]
    B_ptr,  # LayerNorm bias, (C,)  [HAS_BIAS]
    OUT_ptr,  # out: LN(h) * (1 + scale) + shift, (R, C)  [HAS_NORM]
    MEAN_ptr,  # out: per-row mean, (R,) fp32  [HAS_NORM]
    RSTD_ptr,  # out: per-row 1 / sqrt(var + eps), (R,) fp32  [HAS_NORM]
    N,  # tokens per sample
    TOKENS_PER_GROUP,  # N // G
    G,  # modulation groups per sample
    C,  # features
    eps,
    BLOCK_C: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """LayerNorm: https://arxiv.org/abs/1607.06450; adaLN modulation: DiT, https://arxiv.org/abs/2212.09748"""
    row = tl.program_id(0).to(tl.int64)  # int64: R * C can pass 2^31 at video sizes
    mod_row = (row // N) * G + (row % N) // TOKENS_PER_GROUP
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X_ptr + row * C + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        gate = tl.load(GATE_ptr + mod_row * C + cols, mask=mask, other=0.0).to(tl.float32)
        branch = tl.load(BRANCH_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x.to(tl.float32) + gate * branch).to(x.dtype)
        tl.store(H_ptr + row * C + cols, h, mask=mask)
        # normalise the stored (rounded) h, so that the backward, which reloads h, sees the same values
        x = h
    if HAS_NORM:
        # statistics in fp32 for numerical stability
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / C
        xc = tl.where(mask, xf - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN_ptr + row, mean)
        tl.store(RSTD_ptr + row, rstd)
        ln = xc * rstd
        if HAS_WEIGHT:
            ln = ln * tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            ln = ln + tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT_ptr + mod_row * C + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE_ptr + mod_row * C + cols, mask=mask, other=0.0).to(tl.float32)
        out = ln * (1.0 + scale) + shift
        tl.store(OUT_ptr + row * C + cols, out.to(OUT_ptr.dtype.element_ty), mask=mask)


# Backward. With xhat = (h - mean) * rstd, ln = xhat * w + b and out = ln * (1 + scale) + shift:
#   dshift = sum_rows(dout)                    dscale = sum_rows(dout * ln)      (rows of one group)
#   dln    = dout * (1 + scale)                dw = sum_rows(dln * xhat), db = sum_rows(dln)
#   dxhat  = dln * w
#   dh     = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))  (+ dH from h's own consumers)
# and through h = x + gate * y:
#   dx = dh          dy = dh * gate          dgate = sum_rows(dh * y)
# Each program owns a chunk of the rows of one modulation group and writes its partial sums of the
# per-group (dshift, dscale, dgate) and per-column (dw, db) gradients in fp32; the launcher adds
# the partials (Liger's per-program partial sums, then one sum over programs).


@triton.jit
def _adaln_backward_kernel(
    DOUT_ptr,  # grad of out, (R, C)  [HAS_NORM]
    DH_ptr,  # grad of h from its other consumers, (R, C)  [HAS_RESIDUAL]
    X_ptr,  # the normalised input: h with HAS_RESIDUAL, else x, (R, C)  [HAS_NORM]
    GATE_ptr,  # (B * G, C)  [HAS_RESIDUAL]
    BRANCH_ptr,  # branch output y, (R, C)  [HAS_RESIDUAL]
    SCALE_ptr,  # (B * G, C)  [HAS_NORM]
    W_ptr,  # (C,)  [HAS_WEIGHT]
    B_ptr,  # (C,)  [HAS_BIAS]
    MEAN_ptr,  # (R,) fp32  [HAS_NORM]
    RSTD_ptr,  # (R,) fp32  [HAS_NORM]
    DX_ptr,  # out: grad of x, (R, C)
    DBRANCH_ptr,  # out: grad of y, (R, C)  [HAS_RESIDUAL]
    DSHIFT_part_ptr,  # out: partial sums, (B * G, CHUNKS, C) fp32  [HAS_NORM]
    DSCALE_part_ptr,  # out: partial sums, (B * G, CHUNKS, C) fp32  [HAS_NORM]
    DGATE_part_ptr,  # out: partial sums, (B * G, CHUNKS, C) fp32  [HAS_RESIDUAL]
    DW_part_ptr,  # out: partial sums, (B * G * CHUNKS, C) fp32  [HAS_WEIGHT]
    DB_part_ptr,  # out: partial sums, (B * G * CHUNKS, C) fp32  [HAS_BIAS]
    N,
    TOKENS_PER_GROUP,
    G,
    C,
    ROWS_PER_CHUNK,
    BLOCK_C: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    mod_row = tl.program_id(0).to(tl.int64)  # = b * G + g
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    first_token = (mod_row % G) * TOKENS_PER_GROUP + chunk * ROWS_PER_CHUNK
    last_token = tl.minimum(first_token + ROWS_PER_CHUNK, (mod_row % G + 1) * TOKENS_PER_GROUP)
    row_base = (mod_row // G) * N

    dshift_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dscale_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dgate_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_NORM:
        scale = tl.load(SCALE_ptr + mod_row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE_ptr + mod_row * C + cols, mask=mask, other=0.0).to(tl.float32)

    for token in range(first_token, last_token):
        row = row_base + token
        dh = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_NORM:
            x = tl.load(X_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            dout = tl.load(DOUT_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN_ptr + row)
            rstd = tl.load(RSTD_ptr + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            ln = xhat
            if HAS_WEIGHT:
                ln = ln * w
            if HAS_BIAS:
                ln = ln + b
            dshift_acc += dout
            dscale_acc += dout * ln
            dln = dout * (1.0 + scale)
            dxhat = dln
            if HAS_WEIGHT:
                dw_acc += dln * xhat
                dxhat = dxhat * w
            if HAS_BIAS:
                db_acc += dln
            c1 = tl.sum(dxhat * xhat, axis=0) / C
            c2 = tl.sum(dxhat, axis=0) / C
            dh = tl.where(mask, rstd * (dxhat - c2 - xhat * c1), 0.0)
        if HAS_RESIDUAL:
            dh += tl.load(DH_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            branch = tl.load(BRANCH_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            dgate_acc += dh * branch
            tl.store(DBRANCH_ptr + row * C + cols, (dh * gate).to(DBRANCH_ptr.dtype.element_ty), mask=mask)
        tl.store(DX_ptr + row * C + cols, dh.to(DX_ptr.dtype.element_ty), mask=mask)

    part = (mod_row * chunks + chunk) * C + cols
    if HAS_NORM:
        tl.store(DSHIFT_part_ptr + part, dshift_acc, mask=mask)
        tl.store(DSCALE_part_ptr + part, dscale_acc, mask=mask)
    if HAS_RESIDUAL:
        tl.store(DGATE_part_ptr + part, dgate_acc, mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_part_ptr + part, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_part_ptr + part, db_acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers. Arguments are already validated by dit_fast.ops.adaln: x and y are (B, N, C),
# modulations (B, G, C), all of one dtype and device. They return plain tensors; autograd lives
# in dit_fast/ops/adaln.py.
# ---------------------------------------------------------------------------------------------


def num_warps_for(block_c: int) -> int:
    if block_c >= 8192:
        return 16
    if block_c >= 2048:
        return 8
    return 4


def _backward_chunks(num_groups: int, tokens_per_group: int, device: torch.device, programs_per_sm: int = 4) -> int:
    """Enough programs to fill the GPU about four times over, never more than one per token."""
    if device.type == "cuda":
        target = programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter runs programs one by one: fewer partial rows, same coverage
    return max(1, min(tokens_per_group, triton.cdiv(target, num_groups)))


def _dummy(x):
    return x.new_empty(0)


def adaln_forward(x, gate, branch, shift, scale, weight, bias, eps, has_norm=True, num_warps=None):
    """Returns (h, out, mean, rstd); h is None without a residual, out/mean/rstd None without norm.
    num_warps: None picks num_warps_for(BLOCK_C); benchmarks/tune_adaln.py sweeps it."""
    x = x.contiguous()
    B, N, C = x.shape
    has_residual = gate is not None
    modulation = shift if has_norm else gate
    G = modulation.shape[1]
    R = B * N
    h = torch.empty_like(x) if has_residual else None
    out = torch.empty_like(x) if has_norm else None
    mean = torch.empty(R, device=x.device, dtype=torch.float32) if has_norm else None
    rstd = torch.empty(R, device=x.device, dtype=torch.float32) if has_norm else None
    d = _dummy(x)
    block_c = triton.next_power_of_2(C)
    _adaln_forward_kernel[(R,)](
        x,
        gate.contiguous() if has_residual else d,
        branch.contiguous() if has_residual else d,
        h if has_residual else d,
        shift.contiguous() if has_norm else d,
        scale.contiguous() if has_norm else d,
        weight.contiguous() if weight is not None else d,
        bias.contiguous() if bias is not None else d,
        out if has_norm else d,
        mean if has_norm else d,
        rstd if has_norm else d,
        N, N // G, G, C, eps,
        BLOCK_C=block_c,
        HAS_RESIDUAL=has_residual,
        HAS_NORM=has_norm,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        num_warps=num_warps or num_warps_for(block_c),
    )
    return h, out, mean, rstd


def adaln_backward(dout, dh, x_normed, gate, branch, scale, weight, bias, mean, rstd, num_groups,
                   num_warps=None, programs_per_sm=4):
    """Gradients of adaln_forward. num_warps / programs_per_sm: launch shape (tune_adaln.py sweeps them).

    ``x_normed`` is the tensor that was normalised (h with a residual, else x). Returns
    (dx, dbranch, dgate, dshift, dscale, dweight, dbias); entries that do not apply are None.
    Per-group sums come back as (B, G, C) in the input dtype, dweight/dbias as (C,).
    """
    has_norm = dout is not None
    has_residual = gate is not None
    like = dout if has_norm else dh
    B, N, C = like.shape
    G = num_groups
    tokens_per_group = N // G
    chunks = _backward_chunks(B * G, tokens_per_group, like.device, programs_per_sm)
    rows_per_chunk = triton.cdiv(tokens_per_group, chunks)
    chunks = triton.cdiv(tokens_per_group, rows_per_chunk)
    dtype = like.dtype
    dx = torch.empty((B, N, C), device=like.device, dtype=dtype)
    dbranch = torch.empty_like(dx) if has_residual else None

    partials = adaln_partials.allocate(B * G, chunks, C, like.device, has_norm, has_residual,
                                       weight is not None, bias is not None)
    d = _dummy(dx)
    block_c = triton.next_power_of_2(C)
    _adaln_backward_kernel[(B * G, chunks)](
        dout.contiguous() if has_norm else d,
        dh.contiguous() if has_residual else d,
        x_normed.contiguous() if has_norm else d,
        gate.contiguous() if has_residual else d,
        branch.contiguous() if has_residual else d,
        scale.contiguous() if has_norm else d,
        weight.contiguous() if weight is not None else d,
        bias.contiguous() if bias is not None else d,
        mean if has_norm else d,
        rstd if has_norm else d,
        dx,
        dbranch if has_residual else d,
        *(p if p is not None else d for p in partials),
        N, tokens_per_group, G, C, rows_per_chunk,
        BLOCK_C=block_c,
        HAS_RESIDUAL=has_residual,
        HAS_NORM=has_norm,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        num_warps=num_warps or num_warps_for(block_c),
    )

    return (dx, dbranch, *adaln_partials.reduce(partials, B, G, C, dtype, weight, bias))
