"""adaLN modulation ops: reference, torch.library registration, autograd, public functions.

    layernorm_modulate(x, shift, scale)                 LN(x) * (1 + scale) + shift
    gated_residual(x, gate, y)                          x + gate * y
    residual_layernorm_modulate(x, gate, y, shift, scale)
        -> (h, LN(h) * (1 + scale) + shift) with h = x + gate * y, in one pass

x and y are (B, N, C). shift, scale and gate are (B, C) for one modulation per sample, or (B, G, C)
for one per group of N / G consecutive tokens (for example one per frame).

Call flow: public function (validation, backend choice) -> "torch": the reference below, differentiated
by PyTorch; otherwise torch.ops.dit_fast.adaln_fwd / adaln_bwd (custom ops with fake kernels and
registered autograd, opaque to torch.compile) -> the Triton launchers in
dit_fast/triton_kernels/adaln.py or the CUDA launchers in dit_fast/cuda/adaln.py.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dit_fast import _backend

OP = "adaln"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_C = 16384  # widest row the kernels hold in registers (see triton_kernels/adaln.py)
FP32_TINY, FP32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch). The CPU path, the oracle of the tests, and backend="torch".
# ---------------------------------------------------------------------------------------------


def expand_modulation(mod: Tensor, num_tokens: int) -> Tensor:
    """(B, C) or (B, G, C) -> (B, N, C): each group's row repeated for its N / G tokens."""
    if mod.dim() == 2:
        return mod.unsqueeze(1)  # (B, 1, C), broadcasts over tokens
    B, G, C = mod.shape
    return mod.unsqueeze(2).expand(B, G, num_tokens // G, C).reshape(B, num_tokens, C)


def _upcast(t: Optional[Tensor]) -> Optional[Tensor]:
    """fp16/bf16 -> fp32 (fp64 stays fp64, so the tests can evaluate the reference in float64)."""
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))


def layernorm_modulate_reference(x, shift, scale, weight=None, bias=None, eps=1e-6):
    """LN(x) * (1 + scale) + shift with statistics and modulation in fp32, result in x.dtype."""
    N = x.shape[1]
    normed = F.layer_norm(_upcast(x), (x.shape[-1],), _upcast(weight), _upcast(bias), eps)
    out = normed * (1 + _upcast(expand_modulation(scale, N))) + _upcast(expand_modulation(shift, N))
    return out.to(x.dtype)


def gated_residual_reference(x, gate, y):
    """x + gate * y, computed in fp32, result in x.dtype."""
    return (_upcast(x) + _upcast(expand_modulation(gate, x.shape[1])) * _upcast(y)).to(x.dtype)


def residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps=1e-6):
    """(h, LN(h) * (1 + scale) + shift) with h = x + gate * y rounded to x.dtype."""
    h = gated_residual_reference(x, gate, y)
    return h, layernorm_modulate_reference(h, shift, scale, eps=eps)


# ---------------------------------------------------------------------------------------------
# Input checks: clear ValueError / TypeError naming the argument and the shapes.
# ---------------------------------------------------------------------------------------------


def _check_tensor(name, t, x):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_x(name, x):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be (B, N, C), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:  # a LayerNorm over no features is undefined (and a kernel row of width 0)
        raise ValueError(f"{name} must have C >= 1 features, got shape {tuple(x.shape)}")


def _check_modulation(name, mod, x):
    _check_tensor(name, mod, x)
    B, N, C = x.shape
    if mod.dim() not in (2, 3) or mod.shape[0] != B or mod.shape[-1] != C:
        raise ValueError(f"{name} must be (B, C) = ({B}, {C}) or (B, G, C) = ({B}, G, {C}) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(mod.shape)}")
    if mod.dim() == 3 and (mod.shape[1] == 0 or N % mod.shape[1] != 0):
        raise ValueError(f"{name} has G = {mod.shape[1]} groups, which does not divide the N = {N} tokens "
                         f"of x {tuple(x.shape)}")


def _check_same_groups(mods):
    groups = {name: (m.shape[1] if m.dim() == 3 else 1) for name, m in mods}
    if len(set(groups.values())) > 1:
        raise ValueError(f"modulations must share one group count, got {groups}")
    return next(iter(groups.values()))


def _check_affine(name, p, x):
    if p is None:
        return
    _check_tensor(name, p, x)
    if p.shape != (x.shape[-1],):
        raise ValueError(f"{name} must be (C,) = ({x.shape[-1]},), got {tuple(p.shape)}")


def _check_eps(eps):
    # fp32 statistics: an eps outside float32's normal range is 0 (a constant row then gives NaN) or inf
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not FP32_TINY <= eps <= FP32_MAX:
        raise ValueError(f"eps must be a positive number within float32's normal range [{FP32_TINY:.3g}, "
                         f"{FP32_MAX:.3g}] (the statistics are float32), got {eps!r}")


def _cpu_path(x) -> bool:
    """backend "torch" on CPU, eagerly: dit_fast/ops/adaln_cpu.py (the references' math in fewer passes than
    eager); under torch.compile the references themselves, which the compiler fuses."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _resolve(backend, x):
    name = _backend.resolve_backend(backend, x.device, OP)
    if name != "torch" and x.shape[-1] > MAX_C:
        raise ValueError(f"x has C = {x.shape[-1]} features; the {name} kernels support C <= {MAX_C} "
                         "(use backend='torch' for wider rows)")
    return name


# ---------------------------------------------------------------------------------------------
# Kernel dispatch and torch.library registration.
# ---------------------------------------------------------------------------------------------


def _launchers(backend: str):
    if backend == "triton":
        from dit_fast.triton_kernels import adaln
    elif backend == "cuda":
        from dit_fast.cuda import adaln
    else:
        raise ValueError(f"no adaLN kernels for backend {backend!r}")
    return adaln


def _pick(backend: str, x: Tensor, run) -> str:
    """Concrete kernel backend; for "auto", the faster one measured for this shape class."""
    if backend != "auto":
        return backend
    names = _backend.runnable_kernel_backends(x.device)
    key = (x.dtype, _backend.shape_class(x.shape[0] * x.shape[1]), x.shape[-1])
    return _backend.pick_fastest(OP + str(run.__name__), key, {n: (lambda n=n: run(n)) for n in names})


def _none_if_empty(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t


@torch.library.custom_op("dit_fast::adaln_fwd", mutates_args=())
def _adaln_fwd(x: Tensor, gate: Optional[Tensor], branch: Optional[Tensor], shift: Optional[Tensor],
               scale: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (h, out, mean, rstd); an output that does not apply is an empty tensor."""

    def forward(name):
        return _launchers(name).adaln_forward(x, gate, branch, shift, scale, weight, bias, eps,
                                              has_norm=shift is not None)

    h, out, mean, rstd = forward(_pick(backend, x, forward))
    # custom ops may not return one tensor twice: each absent output gets its own empty tensor
    return tuple(t if t is not None else x.new_empty(0) for t in (h, out, mean, rstd))


@_adaln_fwd.register_fake
def _adaln_fwd_fake(x, gate, branch, shift, scale, weight, bias, eps, backend):
    rows = x.shape[0] * x.shape[1]
    has_norm = shift is not None
    h = torch.empty_like(x) if gate is not None else x.new_empty(0)
    out = torch.empty_like(x) if has_norm else x.new_empty(0)
    stats = [x.new_empty(rows if has_norm else 0, dtype=torch.float32) for _ in range(2)]
    return h, out, *stats


@torch.library.custom_op("dit_fast::adaln_bwd", mutates_args=())
def _adaln_bwd(dout: Optional[Tensor], dh: Optional[Tensor], x_normed: Optional[Tensor],
               gate: Optional[Tensor], branch: Optional[Tensor], scale: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
               rstd: Optional[Tensor], num_groups: int,
               backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dbranch, dgate, dshift, dscale, dweight, dbias); absent grads are empty tensors."""
    like = dout if dout is not None else dh

    def backward(name):
        return _launchers(name).adaln_backward(dout, dh, x_normed, gate, branch, scale, weight, bias,
                                               mean, rstd, num_groups)

    grads = backward(_pick(backend, like, backward))
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


@_adaln_bwd.register_fake
def _adaln_bwd_fake(dout, dh, x_normed, gate, branch, scale, weight, bias, mean, rstd, num_groups, backend):
    like = dout if dout is not None else dh
    B, N, C = like.shape
    has_norm, has_residual = dout is not None, gate is not None
    return (
        torch.empty_like(like),
        torch.empty_like(like) if has_residual else like.new_empty(0),
        like.new_empty(B, num_groups, C) if has_residual else like.new_empty(0),
        like.new_empty(B, num_groups, C) if has_norm else like.new_empty(0),
        like.new_empty(B, num_groups, C) if has_norm else like.new_empty(0),
        torch.empty_like(weight) if weight is not None else like.new_empty(0),
        torch.empty_like(bias) if bias is not None else like.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, gate, branch, shift, scale, weight, bias, eps, backend = inputs
    h, out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.has_residual = gate is not None
    ctx.has_norm = shift is not None
    ctx.backend = backend
    ctx.num_groups = (shift if ctx.has_norm else gate).shape[1]
    x_normed = h if ctx.has_residual else x
    ctx.save_for_backward(x_normed if ctx.has_norm else None, gate, branch, scale, weight, bias,
                          mean if ctx.has_norm else None, rstd if ctx.has_norm else None)


def _backward(ctx, dh, dout, _dmean, _drstd):
    x_normed, gate, branch, scale, weight, bias, mean, rstd = ctx.saved_tensors
    if ctx.has_norm and dout is None:
        dout = torch.zeros_like(x_normed)
    if ctx.has_residual and dh is None:
        dh = torch.zeros_like(branch)
    dx, dbranch, dgate, dshift, dscale, dweight, dbias = torch.ops.dit_fast.adaln_bwd(
        dout if ctx.has_norm else None, dh if ctx.has_residual else None, x_normed, gate, branch, scale,
        weight, bias, mean, rstd, ctx.num_groups, ctx.backend)
    return (dx, _none_if_empty(dgate), _none_if_empty(dbranch), _none_if_empty(dshift),
            _none_if_empty(dscale), _none_if_empty(dweight), _none_if_empty(dbias), None, None)


_adaln_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions (re-exported by dit_fast.ops).
# ---------------------------------------------------------------------------------------------


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, *, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """``LN(x) * (1 + scale) + shift``, DiT's ``modulate(norm(x), shift, scale)`` in one kernel.

    x: (B, N, C); shift, scale: (B, C) or (B, G, C) with G dividing N; weight, bias: optional (C,)
    LayerNorm affine parameters. Statistics are computed in fp32.
    """
    _check_x("x", x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)
    _check_same_groups([("shift", shift), ("scale", scale)])
    _check_affine("weight", weight, x)
    _check_affine("bias", bias, x)
    _check_eps(eps)
    name = _resolve(backend, x)
    if name == "torch":
        if _cpu_path(x):
            from dit_fast.ops.adaln_cpu import layernorm_modulate_cpu
            return layernorm_modulate_cpu(x, shift, scale, weight, bias, eps)
        return layernorm_modulate_reference(x, shift, scale, weight, bias, eps)
    return torch.ops.dit_fast.adaln_fwd(x, None, None, _to_groups(shift), _to_groups(scale), weight, bias,
                                        float(eps), name)[1]


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, *, backend: str = "auto") -> Tensor:
    """``x + gate * y``: DiT's gated residual. x, y: (B, N, C); gate: (B, C) or (B, G, C)."""
    _check_x("x", x)
    _check_tensor("y", y, x)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    _check_modulation("gate", gate, x)
    name = _resolve(backend, x)
    if name == "torch":
        if _cpu_path(x):
            from dit_fast.ops.adaln_cpu import gated_residual_cpu
            return gated_residual_cpu(x, gate, y)
        return gated_residual_reference(x, gate, y)
    return torch.ops.dit_fast.adaln_fwd(x, _to_groups(gate), y, None, None, None, None, 1e-6, name)[0]


def residual_layernorm_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, *,
                                eps: float = 1e-6, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``h = x + gate * y`` and ``LN(h) * (1 + scale) + shift`` in one pass; returns (h, out).

    This is the fusion across a DiT block boundary: the residual of one branch and the adaLN of the
    next read the stream once. gate belongs to the branch that produced y; shift and scale to the
    next branch. Modulations are (B, C) or (B, G, C), all with the same G.
    """
    _check_x("x", x)
    _check_tensor("y", y, x)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    for name_, mod in (("gate", gate), ("shift", shift), ("scale", scale)):
        _check_modulation(name_, mod, x)
    _check_same_groups([("gate", gate), ("shift", shift), ("scale", scale)])
    _check_eps(eps)
    name = _resolve(backend, x)
    if name == "torch":
        if _cpu_path(x):
            from dit_fast.ops.adaln_cpu import residual_layernorm_modulate_cpu
            return residual_layernorm_modulate_cpu(x, gate, y, shift, scale, eps)
        return residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps)
    h, out, _, _ = torch.ops.dit_fast.adaln_fwd(x, _to_groups(gate), y, _to_groups(shift), _to_groups(scale),
                                                None, None, float(eps), name)
    return h, out


def _to_groups(mod: Tensor) -> Tensor:
    """(B, C) -> (B, 1, C) view; (B, G, C) unchanged. Autograd reshapes the gradient back."""
    return mod.unsqueeze(1) if mod.dim() == 2 else mod
