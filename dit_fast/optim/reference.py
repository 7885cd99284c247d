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


def canonical_qr(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR with diag(R) >= 0: unique for a full-rank ``a``, so every way of computing it (one
    Householder QR here, a TSQR over row shards in sharded.py) gives the same Q up to rounding."""
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d, r * d[:, None]


class WholeRows:
    """The rows of a matrix as the randomized refresh sees them when one process holds all of them.

    The refresh below is written against this small interface so that one algorithm serves both a
    whole matrix and a matrix split by rows across ranks (FSDP2's Shard(0); dit_fast/optim/sharded.py
    implements the same four members with collectives):
      start, total   first global row of the local block, global row count
      sum(x)         x summed over the row blocks (an all-reduce of x's size)
      qr_rows(y)     canonical_qr of the row-stacked y, returned as (local rows of Q, R)
    """

    def __init__(self, total: int):
        self.start, self.total = 0, int(total)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def qr_rows(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return canonical_qr(y)


def _start_block(count: int, width: int, previous: Optional[torch.Tensor], generator, device,
                 rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(count, width) Gaussian start block (rows ``rows`` of it, if given), its first columns replaced by
    ``previous`` (count or local rows, r_prev): GaLore 2's warm start from the previous basis."""
    omega = torch.randn(count, width, generator=generator, device="cpu", dtype=torch.float32).to(device)
    if rows is not None:
        omega = omega[rows[0]:rows[1]]
    if previous is not None:
        warm = previous.float()[:, :width]
        omega = torch.cat([warm, omega[:, warm.shape[1]:]], dim=1)
    return omega


def randomized_svd(grad: torch.Tensor, rank: int, previous_right: Optional[torch.Tensor] = None,
                   oversample: int = 8, iters: int = 2, generator: Optional[torch.Generator] = None,
                   rows: Optional[WholeRows] = None):
    """Top ``rank`` singular triplets of ``grad`` (m, n) by subspace iteration (Halko et al. 2011).

    The start block (n, k + oversample) is the previous right basis (r, n) plus random columns when
    given (GaLore 2's warm start: the subspace moves slowly, so one or two iterations suffice), else
    Gaussian. ``grad`` may be the local rows of a row-split matrix (``rows``: see WholeRows): every
    product with ``grad`` is then row-local, and only (n, w) sums and (w, w) R factors cross ranks.
    Returns U (local rows, k), S (k,), Vh (k, n) with k = min(rank, m, n).
    """
    g = grad.float()
    rows = rows if rows is not None else WholeRows(g.shape[0])
    m, n = rows.total, g.shape[1]
    k = min(rank, m, n)
    width = min(k + oversample, m, n)
    q = canonical_qr(_start_block(n, width, None if previous_right is None else previous_right.t(), generator,
                                  g.device))[0]  # (n, w), the same on every rank
    for _ in range(iters):
        z = rows.qr_rows(g @ q)[0]  # (m, w), row-split
        q = canonical_qr(rows.sum(g.t() @ z))[0]  # (n, w)
    qb, rb = rows.qr_rows(g @ q)  # g q = qb rb, qb (m, w) row-split, rb (w, w)
    ur, s, wh = torch.linalg.svd(rb)  # g ~= (qb ur) s (q wh^T)^T
    return (qb @ ur)[:, :k], s[:k], (wh @ q.t())[:k]


def randomized_left(grad: torch.Tensor, rank: int, previous_left: Optional[torch.Tensor] = None,
                    oversample: int = 8, iters: int = 2, generator: Optional[torch.Generator] = None,
                    rows: Optional[WholeRows] = None) -> torch.Tensor:
    """Top ``rank`` left singular vectors (local rows, k) of ``grad`` (m, n): the same iteration started on
    the row side (from the previous left basis, (m, r) or its local rows, plus random columns)."""
    g = grad.float()
    rows = rows if rows is not None else WholeRows(g.shape[0])
    m, n = rows.total, g.shape[1]
    k = min(rank, m, n)
    width = min(k + oversample, m, n)
    local = (rows.start, rows.start + g.shape[0])
    q = rows.qr_rows(_start_block(m, width, previous_left, generator, g.device, local))[0]  # (m, w) row-split
    for _ in range(iters):
        z = canonical_qr(rows.sum(g.t() @ q))[0]  # (n, w)
        q = rows.qr_rows(g @ z)[0]  # (m, w)
    _, _, wh = torch.linalg.svd(rows.sum(g.t() @ q), full_matrices=False)  # g^T q = u s wh: g ~= q wh^T s u^T
    return (q @ wh.t())[:, :k]


def randomized_basis(grad: torch.Tensor, rank: int, side: str, dtype: torch.dtype,
                     previous: Optional[Tuple[torch.Tensor, ...]] = None, oversample: int = 8, iters: int = 2,
                     generator: Optional[torch.Generator] = None,
                     rows: Optional[WholeRows] = None) -> Tuple[torch.Tensor, ...]:
    """Randomized refresh with the same output layout as :func:`svd_basis` (a left basis as the local
    rows of ``grad`` when ``rows`` splits it; a right basis whole)."""
    if side == "left":
        left = randomized_left(grad, rank, None if previous is None else previous[0], oversample, iters, generator,
                               rows)
        return (left.contiguous().to(dtype),)
    prev = None if previous is None else previous[-1]
    u, _, vh = randomized_svd(grad, rank, prev, oversample, iters, generator, rows)
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


def _blocks(x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, int, int]:
    """x flattened into QBLOCK-element rows, the blocks counted from global element 0 when x holds the
    elements [offset, offset + numel) of a larger flattened tensor (a row shard of a moment): zeros pad
    the front (offset % QBLOCK) and the back. Returns (blocks, front pad, back pad)."""
    flat = x.reshape(-1)
    if flat.numel() == 0:  # an empty row shard touches no block
        return flat.view(0, QBLOCK), 0, 0
    front = offset % QBLOCK
    back = (-(front + flat.numel())) % QBLOCK
    if front or back:
        flat = torch.cat([flat.new_zeros(front), flat, flat.new_zeros(back)])
    return flat.view(-1, QBLOCK), front, back


def block_count(numel: int, offset: int = 0) -> int:
    """Blocks that elements [offset, offset + numel) of a flattened moment touch (its absmax length)."""
    if numel == 0:
        return 0
    return (offset + numel - 1) // QBLOCK - offset // QBLOCK + 1


def block_absmax(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """fp32 absmax of x over each block it touches (a partial one for a block shared with a neighbour)."""
    return _blocks(x.float(), offset)[0].abs().amax(dim=1)


def quantize_with_absmax(x: torch.Tensor, absmax: torch.Tensor, signed: bool, offset: int = 0) -> torch.Tensor:
    """Codes (int8 for signed m, uint8 for v) of x's shape against a given absmax per block."""
    blocks, front, back = _blocks(x.float(), offset)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    if signed:
        mag = torch.floor(M_LEVELS * torch.sqrt(blocks.abs() / safe) + 0.5)
        codes = (torch.sign(blocks) * mag).to(torch.int8)
    else:
        codes = torch.floor(V_LEVELS * torch.sqrt(torch.sqrt(blocks / safe)) + 0.5).to(torch.uint8)
    codes = codes.reshape(-1)
    return codes[front:codes.numel() - back].view(x.shape)


def quantize_blockwise(x: torch.Tensor, signed: bool, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 for signed m, uint8 for v) of x's shape and the fp32 absmax per QBLOCK block."""
    absmax = block_absmax(x, offset)
    return quantize_with_absmax(x, absmax, signed, offset), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, offset: int = 0) -> torch.Tensor:
    blocks, front, back = _blocks(codes.float(), offset)
    if signed:
        t = blocks / M_LEVELS
        values = torch.sign(t) * (t * t) * absmax[:, None]
    else:
        t = blocks / V_LEVELS
        values = (t * t) * (t * t) * absmax[:, None]
    values = values.reshape(-1)
    return values[front:values.numel() - back].view(codes.shape)


def store_8bit(m: torch.Tensor, v: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
               v_codes: torch.Tensor, v_absmax: torch.Tensor, offset: int = 0, fix_absmax=None) -> None:
    """Requantizes fp32 m, v into their codes and absmax (in place). ``offset``: the first element's
    position in the whole flattened moment; ``fix_absmax([am, av])``: completes, in place, the absmax of
    blocks shared with another rank (sharded.ShardGroup.fix_absmax)."""
    am, av = block_absmax(m, offset), block_absmax(v, offset)
    if fix_absmax is not None:
        fix_absmax([am, av])
    m_codes.copy_(quantize_with_absmax(m, am, True, offset))
    v_codes.copy_(quantize_with_absmax(v, av, False, offset))
    m_absmax.copy_(am)
    v_absmax.copy_(av)


def adam_moments_8bit_reference(low_rank_grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                                v_codes: torch.Tensor, v_absmax: torch.Tensor, beta1: float, beta2: float,
                                eps: float, offset: int = 0, fix_absmax=None) -> torch.Tensor:
    """The 8-bit step: dequantize, update in fp32, N from the fp32 moments, requantize (all in place)."""
    r = low_rank_grad.float()
    m = dequantize_blockwise(m_codes, m_absmax, signed=True, offset=offset) * beta1 + r * (1.0 - beta1)
    v = dequantize_blockwise(v_codes, v_absmax, signed=False, offset=offset) * beta2 + r * r * (1.0 - beta2)
    n = m / (torch.sqrt(v) + eps)
    store_8bit(m, v, m_codes, m_absmax, v_codes, v_absmax, offset, fix_absmax)
    return n


# ------------------------------------------------------------------ torch.optim.AdamW (groups without rank)


def adamw_moments_reference(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float,
                            beta2: float) -> None:
    """torch.optim.AdamW's moment update, op for op, in place on fp32 moments."""
    g = grad.float()
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def adamw_update_reference(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, lr: float,
                           beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                           correct_bias: bool = True) -> None:
    """torch.optim.AdamW's parameter update, op for op (fp32 param, fp32 moments after the update):

      W = W * (1 - lr * wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    (eps is added after the bias correction of sqrt(v), unlike the projected step above)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    bias_correction1 = 1 - beta1 ** step if correct_bias else 1.0
    bias_correction2 = 1 - beta2 ** step if correct_bias else 1.0
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def adamw_kernel_scalars(lr: float, beta1: float, beta2: float, eps: float, step: int,
                         correct_bias: bool = True) -> Tuple[float, float]:
    """(alpha, eps') with which the kernels' W -= alpha * m / (sqrt(v) + eps') is torch.optim.AdamW's
    update: lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) = (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2))."""
    if not correct_bias:
        return lr, eps
    root = math.sqrt(1 - beta2 ** step)
    # eps' stays a normal fp32 number (GPUs flush denormals to zero, and 0 / 0 would be NaN)
    return lr * root / (1 - beta1 ** step), max(eps * root, torch.finfo(torch.float32).tiny)


def apply_update_reference(param: torch.Tensor, update: torch.Tensor, alpha: float, lr_wd: float,
                           decay_mode: str) -> None:
    """W = (W * pre_decay - alpha * update) * post_decay, in the op order of torch.optim.AdamW ("adamw":
    ``p.mul_(1 - lr * wd)`` first) or of galore-torch ("galore": ``p.add_(p, alpha=-lr * wd)`` last)."""
    if decay_mode == "adamw" and lr_wd != 0.0:
        param.mul_(1.0 - lr_wd)
    param.add_(update.to(param.dtype), alpha=-alpha)
    if decay_mode == "galore" and lr_wd != 0.0:
        param.add_(param, alpha=-lr_wd)
