"""Triton kernels for GaLoreAdamW: the low-rank Adam step fused with the project-back weight update.

Math and notation: dit_fast/optim/reference.py (the readable PyTorch oracle). Per step, for a
weight W (m, n) with basis P and low-rank gradient R:

  _adam_moments_kernel      m, v <- Adam(m, v, R); N = m / (sqrt(v) + eps)          elementwise
                            fp32/bf16 moments, or 8-bit codes with one absmax per QBLOCK (one
                            program per block: dequantize, update, requantize); with UPDATE_PARAM it
                            also applies W = (W * pre - alpha * N) * post (plain AdamW parameters)
  _project_back_kernel      W = (W * pre - alpha * (L @ Rm)) * post                     matmul + epilogue
                            the (m, n) update L @ Rm is never written to memory
  _down_project_adam_kernel R = A @ B (the down-projection) with the Adam step in the epilogue,
                            writing m, v and the low-rank N

Two pipelines, both writing only low-rank intermediates:
  "hybrid": library matmul for R, _adam_moments_kernel (N), _project_back_kernel
  "fused":  _down_project_adam_kernel (R and N in one kernel), _project_back_kernel
(The Adam step cannot go into the up-projection's prologue: the programs sharing a row block of N
would race on the moments, each needing the old values that another has overwritten.)

side "right": L = N (m, r), Rm = P (r, n);  side "left": L = P (m, r), Rm = N (r, n).
"""

import torch
import triton
import triton.language as tl

from dit_fast.optim.reference import M_LEVELS, QBLOCK, V_LEVELS

# ------------------------------------------------------------------ elementwise / 8-bit moment update


@triton.jit
def _adam_moments_kernel(
    G_ptr,  # gradient (low-rank R or a plain parameter's gradient), numel elements, any float dtype
    M_ptr,  # exp_avg: fp32/bf16, or int8 codes [QUANT]
    V_ptr,  # exp_avg_sq: fp32/bf16, or uint8 codes [QUANT]
    MABS_ptr,  # fp32 absmax per QBLOCK of exp_avg [QUANT]
    VABS_ptr,  # fp32 absmax per QBLOCK of exp_avg_sq [QUANT]
    N_ptr,  # out: N = m / (sqrt(v) + eps), fp32 [not UPDATE_PARAM]
    W_ptr,  # parameter, updated in place [UPDATE_PARAM]
    numel,
    beta1, beta2, eps,
    alpha, pre_decay, post_decay,
    BLOCK: tl.constexpr,  # == QBLOCK when QUANT: one program per quantization block
    QUANT: tl.constexpr,
    UPDATE_PARAM: tl.constexpr,
    M_LEVELS_C: tl.constexpr,
    V_LEVELS_C: tl.constexpr,
):
    """Adam: https://arxiv.org/abs/1412.6980; blockwise 8-bit states: https://arxiv.org/abs/2110.02861"""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        # dequantize: m = sign(q) (q / 127)^2 absmax, v = (q / 255)^4 absmax
        tm = tl.math.div_rn(tl.load(M_ptr + offs, mask=mask, other=0).to(tl.float32), M_LEVELS_C)
        tv = tl.math.div_rn(tl.load(V_ptr + offs, mask=mask, other=0).to(tl.float32), V_LEVELS_C)
        m = tm * tl.abs(tm) * tl.load(MABS_ptr + pid)
        v = (tv * tv) * (tv * tv) * tl.load(VABS_ptr + pid)
    else:
        m = tl.load(M_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + g * (1.0 - beta1)
    v = v * beta2 + g * g * (1.0 - beta2)
    n = tl.math.div_rn(m, tl.sqrt_rn(v) + eps)  # IEEE division and sqrt, as torch and csrc/galore.cu
    if QUANT:
        # requantize with the new absmax of the block; companding keeps resolution for small values
        m_abs = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=0)
        v_abs = tl.max(tl.where(mask, v, 0.0), axis=0)
        m_safe = tl.where(m_abs > 0, m_abs, 1.0)
        v_safe = tl.where(v_abs > 0, v_abs, 1.0)
        qm = tl.floor(M_LEVELS_C * tl.sqrt_rn(tl.math.div_rn(tl.abs(m), m_safe)) + 0.5)
        qm = tl.where(m < 0, -qm, qm)
        qv = tl.floor(V_LEVELS_C * tl.sqrt_rn(tl.sqrt_rn(tl.math.div_rn(v, v_safe))) + 0.5)
        tl.store(M_ptr + offs, qm.to(tl.int8), mask=mask)
        tl.store(V_ptr + offs, qv.to(tl.uint8), mask=mask)
        tl.store(MABS_ptr + pid, m_abs)
        tl.store(VABS_ptr + pid, v_abs)
    else:
        tl.store(M_ptr + offs, m.to(M_ptr.dtype.element_ty), mask=mask)
        tl.store(V_ptr + offs, v.to(V_ptr.dtype.element_ty), mask=mask)
    if UPDATE_PARAM:
        w = tl.load(W_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = (w * pre_decay - alpha * n) * post_decay
        tl.store(W_ptr + offs, w.to(W_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(N_ptr + offs, n, mask=mask)


# ------------------------------------------------------------------ project back + weight update


@triton.jit
def _project_back_kernel(
    W_ptr,  # parameter (M, N), contiguous, updated in place
    L_ptr,  # left operand (M, K), by strides: N (side right) or the basis (side left)
    R_ptr,  # right operand (K, N), by strides: the basis (side right) or N (side left)
    M, N, K,
    stride_lm, stride_lk,
    stride_rk, stride_rn,
    alpha, pre_decay, post_decay,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 products without tf32, as torch's matmul by default
):
    """GaLore: https://arxiv.org/abs/2403.03507 (the update W -= alpha * back(N), fused as a matmul epilogue)"""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        l_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        r_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        l_off = offs_m[:, None] * stride_lm + offs_k[None, :] * stride_lk
        r_off = offs_k[:, None] * stride_rk + offs_n[None, :] * stride_rn
        lhs = tl.load(L_ptr + l_off, mask=l_mask, other=0.0).to(tl.float32)
        rhs = tl.load(R_ptr + r_off, mask=r_mask, other=0.0).to(tl.float32)
        if IEEE:
            acc += tl.dot(lhs, rhs, input_precision="ieee")
        else:  # tf32, where torch's own fp32 matmuls use it (torch.backends.cuda.matmul.allow_tf32)
            acc += tl.dot(lhs, rhs)
    w_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    w_ptrs = W_ptr + offs_m[:, None] * N + offs_n[None, :]
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    w = (w * pre_decay - alpha * acc) * post_decay
    tl.store(w_ptrs, w.to(W_ptr.dtype.element_ty), mask=w_mask)


# ------------------------------------------------------------------ down-projection with the Adam epilogue


@triton.jit
def _down_project_adam_kernel(
    A_ptr,  # left operand (M, K) by strides: the gradient (right side) or the basis transposed (left)
    B_ptr,  # right operand (K, N) by strides: the basis transposed (right side) or the gradient (left)
    MOM_M_ptr,  # exp_avg (M, N), contiguous, fp32/bf16
    MOM_V_ptr,  # exp_avg_sq (M, N)
    OUT_ptr,  # out: N = m / (sqrt(v) + eps), (M, N) fp32
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    beta1, beta2, eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(B_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")  # fp32 operands: no tf32, as torch's matmul
        else:
            acc += tl.dot(a, b)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    off = offs_m[:, None] * N + offs_n[None, :]
    # the reference projects in the parameter dtype: round R to it before the Adam step
    g = acc.to(A_ptr.dtype.element_ty).to(tl.float32)
    m = tl.load(MOM_M_ptr + off, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(MOM_V_ptr + off, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + g * (1.0 - beta1)
    v = v * beta2 + g * g * (1.0 - beta2)
    tl.store(MOM_M_ptr + off, m.to(MOM_M_ptr.dtype.element_ty), mask=mask)
    tl.store(MOM_V_ptr + off, v.to(MOM_V_ptr.dtype.element_ty), mask=mask)
    tl.store(OUT_ptr + off, m / (tl.sqrt_rn(v) + eps), mask=mask)


# ------------------------------------------------------------------ launchers


def _check_moments(exp_avg, exp_avg_sq, m_absmax, v_absmax, numel):
    if exp_avg.numel() != numel or exp_avg_sq.numel() != numel:
        raise ValueError(f"exp_avg / exp_avg_sq must have {numel} elements, got {exp_avg.numel()} / {exp_avg_sq.numel()}")
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("exp_avg and exp_avg_sq must be contiguous")
    quant = exp_avg.dtype == torch.int8
    if quant:
        if exp_avg_sq.dtype != torch.uint8:
            raise TypeError(f"8-bit exp_avg_sq must be uint8, got {exp_avg_sq.dtype}")
        blocks = triton.cdiv(numel, QBLOCK)
        for name, t in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
            if t is None or t.dtype != torch.float32 or t.numel() != blocks:
                raise ValueError(f"{name} must be a float32 tensor of {blocks} blocks for 8-bit moments")
    elif exp_avg.dtype not in (torch.float32, torch.bfloat16) or exp_avg_sq.dtype != exp_avg.dtype:
        raise TypeError(f"exp_avg / exp_avg_sq must both be float32, bfloat16 or int8/uint8, got "
                        f"{exp_avg.dtype} / {exp_avg_sq.dtype}")
    return quant


def adam_step(grad, exp_avg, exp_avg_sq, m_absmax, v_absmax, beta1, beta2, eps, param=None, alpha=0.0,
              pre_decay=1.0, post_decay=1.0):
    """Adam on the moments (in place). Returns N (fp32, grad's shape), or with ``param`` updates it
    in place, W = (W * pre_decay - alpha * N) * post_decay, and returns None."""
    numel = grad.numel()
    quant = _check_moments(exp_avg, exp_avg_sq, m_absmax, v_absmax, numel)
    g = grad.contiguous()
    out = None
    if param is not None:
        if param.numel() != numel:
            raise ValueError(f"param has {param.numel()} elements, grad {numel}")
        target = param if param.is_contiguous() else param.contiguous()
    else:
        out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
        target = out
    block = QBLOCK if quant else 1024
    dummy = exp_avg  # never read when the flag is off
    _adam_moments_kernel[(triton.cdiv(numel, block),)](
        g, exp_avg, exp_avg_sq, m_absmax if quant else dummy, v_absmax if quant else dummy,
        out if out is not None else dummy, target if param is not None else dummy,
        numel, beta1, beta2, eps, alpha, pre_decay, post_decay,
        BLOCK=block, QUANT=quant, UPDATE_PARAM=param is not None, M_LEVELS_C=M_LEVELS, V_LEVELS_C=V_LEVELS,
    )
    if param is not None and target is not param:
        param.copy_(target)
    return out


def _tf32_allowed(device) -> bool:
    """fp32 products in tf32 exactly where torch's own fp32 matmuls would use it."""
    return torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def _blocks_for(M, N, K):
    bk = 16 if K <= 16 else 32
    return 64, 64, bk


def project_back_update(param, low, basis, side, alpha, pre_decay, post_decay):
    """W = (W * pre_decay - alpha * back(N)) * post_decay without writing back(N) to memory.

    side "right": back(N) = N @ basis, N = ``low`` (m, r), basis (r, n); side "left": back(N) =
    basis @ N, basis (m, r), N (r, n). N is fp32 (from adam_step or down_project_adam).
    """
    if param.dim() != 2:
        raise ValueError(f"param must be 2-D, got shape {tuple(param.shape)}")
    M, N = param.shape
    if side == "right":
        K = basis.shape[0]
        fits = tuple(low.shape) == (M, K) and tuple(basis.shape) == (K, N)
    elif side == "left":
        K = basis.shape[1]
        fits = tuple(low.shape) == (K, N) and tuple(basis.shape) == (M, K)
    else:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not fits:
        raise ValueError(f"side {side!r}: low {tuple(low.shape)} / basis {tuple(basis.shape)} do not fit param {(M, N)}")
    lhs, rhs = (low, basis) if side == "right" else (basis, low)
    target = param if param.is_contiguous() else param.contiguous()
    bm, bn, bk = _blocks_for(M, N, K)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _project_back_kernel[grid](
        target, lhs, rhs, M, N, K,
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
        alpha, pre_decay, post_decay,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=not _tf32_allowed(param.device),
    )
    if target is not param:
        param.copy_(target)


def down_project_adam(grad, basis, side, exp_avg, exp_avg_sq, beta1, beta2, eps):
    """R = project(grad) with the Adam step in the matmul epilogue; returns N (fp32), moments in place."""
    if grad.dim() != 2:
        raise ValueError(f"grad must be 2-D, got shape {tuple(grad.shape)}")
    if basis.dtype != grad.dtype:
        raise TypeError(f"basis dtype {basis.dtype} must match grad dtype {grad.dtype}")
    m, n = grad.shape
    if side == "right":  # R = G @ P^T: (m, n) @ (n, r)
        a, b = grad, basis.t()
        M, N, K = m, basis.shape[0], n
    elif side == "left":  # R = P^T @ G: (r, m) @ (m, n)
        a, b = basis.t(), grad
        M, N, K = basis.shape[1], n, m
    else:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"basis {tuple(basis.shape)} does not fit grad {(m, n)} on side {side!r}")
    _check_moments(exp_avg, exp_avg_sq, None, None, M * N)
    out = torch.empty((M, N), dtype=torch.float32, device=grad.device)
    bm, bn = 64, 64
    bk = 32
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _down_project_adam_kernel[grid](
        a, b, exp_avg, exp_avg_sq, out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        beta1, beta2, eps, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        IEEE=grad.dtype == torch.float32 and not _tf32_allowed(grad.device),
    )
    return out
