"""Readable PyTorch math of the GaLore AdamW step: the oracle of the tests and the CPU path.

Notation. A projected weight W is (m, n); its gradient G likewise. The basis P is orthonormal and
lives on one side (the side is fixed per parameter at its first refresh):

  side "right":  P is (r, n)      R = G @ P^T   (m, r)     back: N @ P
  side "left":   P is (m, r)      R = P^T @ G   (r, n)     back: P @ N
  side "full":   A (m, r), B (r, n)   R = A^T @ G @ B^T (r, r)   back: A @ N @ B

The low-rank Adam step on R (as galore-torch / HF AdamW write it; eps is NOT bias-corrected):

  m  = b1 * m + (1 - b1) * R
  v  = b2 * v + (1 - b2) * R * R
  N  = m / (sqrt(v) + eps)
  alpha = lr * sqrt(1 - b2^t) / (1 - b1^t) * scale          (without correct_bias: lr * scale)
  W  = (W * pre_decay - alpha * back(N)) * post_decay

with pre_decay = 1 - lr * wd, post_decay = 1 ("adamw": decoupled decay of the old weight, as
torch.optim.AdamW), or pre_decay = 1, post_decay = 1 - lr * wd ("galore": galore-torch decays the
already-updated weight). A non-projected parameter is the same with back = identity, scale = 1.

8-bit moments (state_dtype="int8") are stored per block of QBLOCK consecutive elements as one fp32
absmax and QBLOCK codes, with companding so that small values keep resolution:

  m (signed):    q = round(127 * sign(m) * sqrt(|m| / absmax))      m = sign(q) * (q / 127)^2 * absmax
  v (unsigned):  q = round(255 * (v / absmax)^(1/4))                v = (q / 255)^4 * absmax

(round = floor(x + 0.5) on the non-negative magnitude, so every backend rounds alike.) Each step
dequantizes, updates in fp32, computes N from the fp32 moments, then requantizes with the new
per-block absmax.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

QBLOCK = 256  # elements per absmax block of the 8-bit moments
M_LEVELS = 127.0
V_LEVELS = 255.0


# ------------------------------------------------------------------ projection


def project(grad: torch.Tensor, side: str, basis: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The low-rank gradient R of ``grad`` (matmul in the basis dtype, as galore-torch)."""
    if side == "right":
        return torch.matmul(grad, basis[0].t())
    if side == "left":
        return torch.matmul(basis[0].t(), grad)
    if side == "full":
        return torch.matmul(basis[0].t(), grad) @ basis[1].t()
    raise ValueError(f"side: unknown projection side {side!r}")


def project_back(low_rank: torch.Tensor, side: str, basis: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The full-rank (m, n) image of a low-rank matrix."""
    if side == "right":
        return torch.matmul(low_rank, basis[0])
    if side == "left":
        return torch.matmul(basis[0], low_rank)
    if side == "full":
        return torch.matmul(basis[0], low_rank) @ basis[1]
    raise ValueError(f"side: unknown projection side {side!r}")


def rotation(old: Tuple[torch.Tensor, ...], new: Tuple[torch.Tensor, ...], side: str):
    """The (r_old, r_new) change-of-basis matrices C that carry low-rank moments to the new basis.

    right: R_new = G P_new^T = R_old (P_old P_new^T)   -> C = P_old @ P_new^T, moments @ C
    left:  R_new = P_new^T G = (P_new^T P_old) R_old   -> C = P_old^T @ P_new, C^T @ moments
    (both exact for the part of G inside the old subspace).
    """
    if side == "right":
        return (old[0].float() @ new[0].float().t(),)
    if side == "left":
        return (old[0].float().t() @ new[0].float(),)
    return (old[0].float().t() @ new[0].float(), old[1].float() @ new[1].float().t())


def rotate_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, side: str, rot) -> Tuple[torch.Tensor, torch.Tensor]:
    """Moments expressed in the new basis: m exactly (linear), v through the squared rotation.

    v is not a linear function of the basis; (C * C) keeps it non-negative and exact when C is a
    signed permutation (the common case of a slowly moving subspace).
    """
    m, v = exp_avg.float(), exp_avg_sq.float()
    if side == "right":
        return m @ rot[0], v @ (rot[0] * rot[0])
    if side == "left":
        return rot[0].t() @ m, (rot[0] * rot[0]).t() @ v
    a, b = rot
    return a.t() @ m @ b, (a * a).t() @ v @ (b * b)


# ------------------------------------------------------------------ refresh (new basis)


def svd_basis(grad: torch.Tensor, rank: int, side: str, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """galore-torch's exact refresh: torch.linalg.svd of the fp32 gradient, top ``rank`` vectors."""
    U, s, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    if side == "right":
        return (Vh[:rank, :].to(dtype),)
    if side == "left":
        return (U[:, :rank].to(dtype),)
    return (U[:, :rank].to(dtype), Vh[:rank, :].to(dtype))


def randomized_svd(grad: torch.Tensor, rank: int, previous_right: Optional[torch.Tensor] = None,
                   oversample: int = 8, iters: int = 2, generator: Optional[torch.Generator] = None):
    """Top ``rank`` singular triplets of ``grad`` (m, n) by subspace iteration (Halko et al. 2011).

    The start block is the previous right basis (r, n) plus ``oversample`` random columns when given
    (GaLore 2's warm start: the subspace moves slowly, so one or two iterations suffice), else
    Gaussian. Returns U (m, k), S (k,), Vh (k, n) with k = min(rank, m, n).
    """
    g = grad.float()
    m, n = g.shape
    k = min(rank, m, n)
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, device="cpu", dtype=torch.float32).to(g.device)
    if previous_right is not None:
        warm = previous_right.float().t()[:, :width]  # (n, r_prev)
        omega = torch.cat([warm, omega[:, warm.shape[1]:]], dim=1)
    q = torch.linalg.qr(omega).Q  # (n, width)
    for _ in range(iters):
        z = torch.linalg.qr(g @ q).Q  # (m, width)
        q = torch.linalg.qr(g.t() @ z).Q  # (n, width)
    u, s, wh = torch.linalg.svd(g @ q, full_matrices=False)  # g ~= u s (q wh^T)^T
    return u[:, :k], s[:k], (wh @ q.t())[:k]


def randomized_basis(grad: torch.Tensor, rank: int, side: str, dtype: torch.dtype,
                     previous: Optional[Tuple[torch.Tensor, ...]] = None, oversample: int = 8, iters: int = 2,
                     generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, ...]:
    """Randomized refresh with the same output layout as :func:`svd_basis`."""
    if side == "left":
        # left singular vectors of G are the right ones of G^T
        prev = None if previous is None else previous[0].t()
        _, _, vh = randomized_svd(grad.t(), rank, prev, oversample, iters, generator)
        return (vh.t().contiguous().to(dtype),)
    prev = None if previous is None else previous[-1]
    u, _, vh = randomized_svd(grad, rank, prev, oversample, iters, generator)
    if side == "right":
        return (vh.contiguous().to(dtype),)
    return (u.contiguous().to(dtype), vh.contiguous().to(dtype))


def captured_energy(grad: torch.Tensor, side: str, basis: Tuple[torch.Tensor, ...]) -> float:
    """||projection of grad||_F^2 / ||grad||_F^2: the share of the gradient the basis keeps."""
    low = project(grad.float(), side, tuple(b.float() for b in basis))
    return float(low.square().sum() / grad.float().square().sum())


# ------------------------------------------------------------------ Adam on the (low-rank) gradient


def step_scalars(lr: float, beta1: float, beta2: float, step: int, weight_decay: float, scale: float,
                 correct_bias: bool, decay_mode: str) -> Tuple[float, float, float]:
    """(alpha, pre_decay, post_decay) of the update formula above, for step ``step`` (1-based)."""
    step_size = lr
    if correct_bias:
        step_size = lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
    decay = 1.0 - lr * weight_decay
    if decay_mode == "adamw":
        return step_size * scale, decay, 1.0
    return step_size * scale, 1.0, decay


def adam_moments_reference(low_rank_grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                           beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """Updates fp32/bf16 moments in place (computing in fp32) and returns N = m / (sqrt(v) + eps), fp32.

    For fp32 moments this is galore-torch's own sequence of in-place ops, so trajectories match bitwise.
    """
    r = low_rank_grad.float()
    if exp_avg.dtype == torch.float32:
        exp_avg.mul_(beta1).add_(r, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
        return exp_avg / exp_avg_sq.sqrt().add_(eps)
    m = exp_avg.float().mul_(beta1).add_(r, alpha=1.0 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return m / v.sqrt().add_(eps)


def _blocks(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % QBLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, QBLOCK), pad


def quantize_blockwise(x: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 for signed m, uint8 for v) of x's shape and the fp32 absmax per QBLOCK block."""
    blocks, pad = _blocks(x.float())
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    if signed:
        mag = torch.floor(M_LEVELS * torch.sqrt(blocks.abs() / safe) + 0.5)
        codes = (torch.sign(blocks) * mag).to(torch.int8)
    else:
        codes = torch.floor(V_LEVELS * torch.sqrt(torch.sqrt(blocks / safe)) + 0.5).to(torch.uint8)
    codes = codes.reshape(-1)
    if pad:
        codes = codes[:-pad]
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    blocks, pad = _blocks(codes.float())
    if signed:
        t = blocks / M_LEVELS
        values = torch.sign(t) * (t * t) * absmax[:, None]
    else:
        t = blocks / V_LEVELS
        values = (t * t) * (t * t) * absmax[:, None]
    values = values.reshape(-1)
    if pad:
        values = values[:-pad]
    return values.view(codes.shape)


def adam_moments_8bit_reference(low_rank_grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                                v_codes: torch.Tensor, v_absmax: torch.Tensor, beta1: float, beta2: float,
                                eps: float) -> torch.Tensor:
    """The 8-bit step: dequantize, update in fp32, N from the fp32 moments, requantize (all in place)."""
    r = low_rank_grad.float()
    m = dequantize_blockwise(m_codes, m_absmax, signed=True) * beta1 + r * (1.0 - beta1)
    v = dequantize_blockwise(v_codes, v_absmax, signed=False) * beta2 + r * r * (1.0 - beta2)
    n = m / (torch.sqrt(v) + eps)
    qm, am = quantize_blockwise(m, signed=True)
    qv, av = quantize_blockwise(v, signed=False)
    m_codes.copy_(qm)
    m_absmax.copy_(am)
    v_codes.copy_(qv)
    v_absmax.copy_(av)
    return n


def apply_update_reference(param: torch.Tensor, update: torch.Tensor, alpha: float, lr_wd: float,
                           decay_mode: str) -> None:
    """W = (W * pre_decay - alpha * update) * post_decay, in the op order of torch.optim.AdamW ("adamw":
    ``p.mul_(1 - lr * wd)`` first) or of galore-torch ("galore": ``p.add_(p, alpha=-lr * wd)`` last)."""
    if decay_mode == "adamw" and lr_wd != 0.0:
        param.mul_(1.0 - lr_wd)
    param.add_(update.to(param.dtype), alpha=-alpha)
    if decay_mode == "galore" and lr_wd != 0.0:
        param.add_(param, alpha=-lr_wd)
