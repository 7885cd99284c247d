"""CUDA launchers for GaLoreAdamW over dit_fast._C (csrc/galore.cu).

``adam_step`` and ``project_back_update`` have the signatures of their Triton twins in
dit_fast/triton_kernels/galore.py. The Adam step (fp32/bf16 or 8-bit blockwise moments) runs in the
compiled extension; the project-back runs in cuBLAS through ``addmm_``, whose epilogue
(beta * W + alpha * L @ R) applies the update without writing the full-rank update separately.
The "fused" down-projection kernel exists only in Triton.
"""

import torch

from dit_fast import _extension

QBLOCK = 256  # csrc/galore.h kGaloreQBlock
_STATE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _ext():
    if _extension.cuda_ext is None:
        raise RuntimeError(f"the CUDA extension dit_fast._C is not available: {_extension.load_error}")
    return _extension.cuda_ext


def adam_step(grad, exp_avg, exp_avg_sq, m_absmax, v_absmax, beta1, beta2, eps, param=None, alpha=0.0,
              pre_decay=1.0, post_decay=1.0):
    """Adam on the moments (in place). Returns N (fp32, grad's shape), or with ``param`` updates it
    in place, W = (W * pre_decay - alpha * N) * post_decay, and returns None."""
    ext = _ext()
    numel = grad.numel()
    if exp_avg.numel() != numel or exp_avg_sq.numel() != numel:
        raise ValueError(f"exp_avg / exp_avg_sq must have {numel} elements, got {exp_avg.numel()} / {exp_avg_sq.numel()}")
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("exp_avg and exp_avg_sq must be contiguous")
    if exp_avg.dtype not in _STATE_CODES:
        raise TypeError(f"exp_avg must be float32, bfloat16 or int8, got {exp_avg.dtype}")
    state = _STATE_CODES[exp_avg.dtype]
    if state == 2:
        blocks = -(-numel // QBLOCK)
        if exp_avg_sq.dtype != torch.uint8:
            raise TypeError(f"8-bit exp_avg_sq must be uint8, got {exp_avg_sq.dtype}")
        for name, t in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
            if t is None or t.dtype != torch.float32 or t.numel() != blocks:
                raise ValueError(f"{name} must be a float32 tensor of {blocks} blocks for 8-bit moments")
    elif exp_avg_sq.dtype != exp_avg.dtype:
        raise TypeError(f"exp_avg_sq dtype {exp_avg_sq.dtype} must match exp_avg dtype {exp_avg.dtype}")
    g = grad.contiguous()
    out = target = None
    if param is None:
        out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    else:
        if param.numel() != numel:
            raise ValueError(f"param has {param.numel()} elements, grad {numel}")
        target = param if param.is_contiguous() else param.contiguous()
    with torch.cuda.device(grad.device):
        ext.galore_adam_step(
            g.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
            m_absmax.data_ptr() if state == 2 else 0, v_absmax.data_ptr() if state == 2 else 0,
            out.data_ptr() if out is not None else 0, target.data_ptr() if target is not None else 0,
            numel, beta1, beta2, eps, alpha, pre_decay, post_decay,
            _extension.dtype_code(g), state, _extension.dtype_code(target) if target is not None else 0,
            _extension.stream_handle(g))
    if target is not None and target is not param:
        param.copy_(target)
    return out


def project_back_update(param, low, basis, side, alpha, pre_decay, post_decay):
    """W = (W * pre_decay - alpha * back(N)) * post_decay via cuBLAS (addmm's beta/alpha epilogue)."""
    if param.dim() != 2:
        raise ValueError(f"param must be 2-D, got shape {tuple(param.shape)}")
    if side == "right":
        lhs, rhs = low, basis
    elif side == "left":
        lhs, rhs = basis, low
    else:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if lhs.shape[1] != rhs.shape[0] or (lhs.shape[0], rhs.shape[1]) != tuple(param.shape):
        raise ValueError(f"side {side!r}: low {tuple(low.shape)} / basis {tuple(basis.shape)} do not fit param "
                         f"{tuple(param.shape)}")
    if param.dtype == torch.float32:
        param.addmm_(lhs.float(), rhs.float(), beta=pre_decay, alpha=-alpha)
        if post_decay != 1.0:
            param.mul_(post_decay)
    else:  # fp32 math, one rounding to the parameter's dtype (as the Triton kernel)
        w = param.float().addmm_(lhs.float(), rhs.float(), beta=pre_decay, alpha=-alpha)
        param.copy_(w.mul_(post_decay) if post_decay != 1.0 else w)
