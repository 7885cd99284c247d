"""Emulated checks of csrc/adaln.cu (see run.py)."""

# ---------------------------------------------------------------------------------------------
# adaLN (csrc/adaln.cu) through the public ops: forward and every gradient
# ---------------------------------------------------------------------------------------------


def check_adaln(check):
    import torch
    import torch.nn.functional as F

    from dit_fast import ops
    from dit_fast.ops import adaln as A
    from tests.utils import assert_close_to_reference

    def naive_layernorm_modulate(x, shift, scale, weight=None, bias=None, eps=1e-6):
        N = x.shape[1]
        normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return normed * (1 + A.expand_modulation(scale, N)) + A.expand_modulation(shift, N)

    def naive_gated_residual(x, gate, y):
        return x + A.expand_modulation(gate, x.shape[1]) * y

    def naive_residual_layernorm_modulate(x, gate, y, shift, scale, eps=1e-6):
        h = naive_gated_residual(x, gate, y)
        return h, naive_layernorm_modulate(h, shift, scale, eps=eps)

    def compare(fn_cuda, fn_naive, fn_reference, inputs, names, dtype):
        def run(fn, cast):
            leaves = [None if t is None else t.detach().to(cast).requires_grad_(True) for t in inputs]
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            gen = torch.Generator().manual_seed(1)
            grad_outs = [torch.randn(o.shape, generator=gen).to(cast) for o in outs]
            return outs, torch.autograd.grad(outs, [t for t in leaves if t is not None], grad_outs)

        out_c, grad_c = run(fn_cuda, dtype)
        out_n, grad_n = run(fn_naive, dtype)
        out_r, grad_r = run(fn_reference, torch.float64)
        for i, (c, n, r) in enumerate(zip(out_c, out_n, out_r)):
            assert c.dtype == dtype, f"output {i} has dtype {c.dtype}"
            assert_close_to_reference(f"output {i}", c, r, n)
        present = [n for n, t in zip(names, inputs) if t is not None]
        for name, c, n, r in zip(present, grad_c, grad_n, grad_r):
            assert c.dtype == dtype, f"grad of {name} has dtype {c.dtype}"
            assert_close_to_reference(f"grad of {name}", c, r, n)

    def layernorm_modulate(*a):
        return ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4], backend="cuda")

    def gated_residual(*a):
        return ops.gated_residual(*a, backend="cuda")

    def residual_layernorm_modulate(*a):
        return ops.residual_layernorm_modulate(*a, backend="cuda")

    LN = (layernorm_modulate, naive_layernorm_modulate, A.layernorm_modulate_reference)
    GR = (gated_residual, naive_gated_residual, A.gated_residual_reference)
    RLN = (residual_layernorm_modulate, naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference)
    LN_NAMES, GR_NAMES = ["x", "shift", "scale", "weight", "bias"], ["x", "gate", "y"]
    RLN_NAMES = ["x", "gate", "y", "shift", "scale"]

    def rand(*shape, dtype, scale=1.0):
        return (scale * torch.randn(*shape)).to(dtype)

    def mod(B, G, C, dtype, per_group):
        return rand(*((B, G, C) if per_group else (B, C)), dtype=dtype, scale=0.5)

    def misaligned(t):
        """A contiguous copy starting one element into its storage: no 128-bit accesses."""
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)

    # (B, N, G, C): C = 37 and 100 scalar, 64 / 1152 vectorised with <= 256 threads, 5120 the
    # 16-elements-per-thread variant, 8200 (fp32: 16 x 1024 threads) and 4100 (scalar, 16 x 1024)
    cases = [(2, 6, 3, 37), (1, 5, 1, 100), (3, 4, 2, 64), (1, 4, 2, 1152), (1, 2, 1, 5120), (1, 2, 1, 4100)]
    for B, N, G, C in cases:
        dtypes = (torch.float32, torch.float16, torch.bfloat16) if C <= 1152 else (torch.float32, torch.bfloat16)
        for dtype in dtypes:
            for per_group in (False, True):
                shape = f"B={B} N={N} G={G if per_group else '-'} C={C} {str(dtype)[6:]}"
                x, y = rand(B, N, C, dtype=dtype), rand(B, N, C, dtype=dtype)
                gate, shift, scale = (mod(B, G, C, dtype, per_group) for _ in range(3))
                weight, bias = rand(C, dtype=dtype, scale=0.1) + 1, rand(C, dtype=dtype, scale=0.1)
                affine = [(None, None), (weight, None), (weight, bias)] if C <= 1152 else [(weight, bias)]
                for w, b in affine:
                    check(f"layernorm_modulate {shape} weight={w is not None} bias={b is not None}",
                          compare, *LN, [x, shift, scale, w, b], LN_NAMES, dtype)
                check(f"gated_residual {shape}", compare, *GR, [x, gate, y], GR_NAMES, dtype)
                check(f"residual_layernorm_modulate {shape}", compare, *RLN, [x, gate, y, shift, scale], RLN_NAMES,
                      dtype)

    # C > 8192: the 1024-thread variant that reloads rows in the backward (fp32 and bf16)
    for dtype in (torch.float32, torch.bfloat16):
        B, N, G, C = 1, 2, 2, 16384
        x, y = rand(B, N, C, dtype=dtype), rand(B, N, C, dtype=dtype)
        gate, shift, scale = (mod(B, G, C, dtype, True) for _ in range(3))
        check(f"residual_layernorm_modulate B={B} N={N} G={G} C={C} {str(dtype)[6:]}",
              compare, *RLN, [x, gate, y, shift, scale], RLN_NAMES, dtype)

    # misaligned pointers with C a multiple of 8: the scalar fallback
    B, N, G, C = 2, 4, 2, 64
    for dtype in (torch.float32, torch.bfloat16):
        x, y = misaligned(rand(B, N, C, dtype=dtype)), misaligned(rand(B, N, C, dtype=dtype))
        gate, shift, scale = (misaligned(mod(B, G, C, dtype, True)) for _ in range(3))
        weight, bias = misaligned(rand(C, dtype=dtype) + 1), misaligned(rand(C, dtype=dtype))
        assert x.data_ptr() % 16 != 0
        check(f"misaligned residual_layernorm_modulate C={C} {str(dtype)[6:]}",
              compare, *RLN, [x, gate, y, shift, scale], RLN_NAMES, dtype)
        check(f"misaligned layernorm_modulate C={C} {str(dtype)[6:]}",
              compare, *LN, [x, shift, scale, weight, bias], LN_NAMES, dtype)
