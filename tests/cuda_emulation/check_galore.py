"""Emulated checks of csrc/galore.cu (see run.py)."""

# ---------------------------------------------------------------------------------------------
# GaLoreAdamW's Adam step (csrc/galore.cu) through dit_fast/cuda/galore.py; the same comparisons as
# tests/test_galore_kernels.py. (project_back_update is cuBLAS through torch.addmm_: no kernel here.)
# ---------------------------------------------------------------------------------------------


def check_galore(check):
    import torch

    from dit_fast.cuda import galore as cuda_galore
    from dit_fast.optim import reference as ref
    from tests.utils import assert_close_to_reference

    def moments(shape, state_dtype, steps_before=2):
        """Moments after a few reference steps on random gradients (so absmax blocks differ)."""
        if state_dtype == "int8":
            blocks = -(-shape[0] * shape[1] // ref.QBLOCK)
            m, v = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.uint8)
            ma, va = torch.zeros(blocks), torch.zeros(blocks)
            for _ in range(steps_before):
                ref.adam_moments_8bit_reference(torch.randn(shape), m, ma, v, va, 0.9, 0.99, 1e-8)
            return [m, v, ma, va]
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
        m, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        for _ in range(steps_before):
            ref.adam_moments_reference(torch.randn(shape), m, v, 0.9, 0.99, 1e-8)
        return [m, v, None, None]

    def reference_step(grad, state, beta1, beta2, eps):
        m, v, ma, va = state
        if m.dtype == torch.int8:
            return ref.adam_moments_8bit_reference(grad, m, ma, v, va, beta1, beta2, eps)
        return ref.adam_moments_reference(grad, m, v, beta1, beta2, eps)

    def adam_step(state_dtype, grad_dtype, shape):
        grad = torch.randn(shape).to(grad_dtype)
        ours = moments(shape, state_dtype)
        theirs = [t.clone() if t is not None else None for t in ours]
        n = cuda_galore.adam_step(grad, *ours, 0.9, 0.99, 1e-8)
        n_ref = reference_step(grad, theirs, 0.9, 0.99, 1e-8)
        if state_dtype == "int8":
            # same formula; a value on a rounding boundary may land one code apart (fma contraction)
            for a, b in zip(ours[:2], theirs[:2]):
                diff = (a.int() - b.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02, f"codes differ: {diff.max()}"
            torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=0)
            torch.testing.assert_close(ours[3], theirs[3], rtol=1e-6, atol=0)
            torch.testing.assert_close(n, n_ref, rtol=1e-5, atol=1e-6)
        else:
            tol = dict(rtol=1e-5, atol=1e-6) if state_dtype == "fp32" else dict(rtol=8e-3, atol=1e-5)
            torch.testing.assert_close(ours[0].float(), theirs[0].float(), **tol)
            torch.testing.assert_close(ours[1].float(), theirs[1].float(), **tol)
            torch.testing.assert_close(n, n_ref, rtol=1e-4, atol=1e-5)

    def updates_param(state_dtype, param_dtype):
        shape = (7, 3, 19)  # a non-2-D parameter, 399 elements: a partial second 8-bit block
        w = torch.randn(shape).to(param_dtype)
        grad = torch.randn(shape).to(param_dtype)
        ours = moments((7, 57), state_dtype)
        ours = [t.view(shape) if t is not None and t.numel() == w.numel() else t for t in ours]
        theirs = [t.clone() if t is not None else None for t in ours]
        w_ours = w.clone()
        out = cuda_galore.adam_step(grad, *ours, 0.9, 0.999, 1e-8, param=w_ours, alpha=0.01, pre_decay=0.999,
                                    post_decay=1.0)
        assert out is None
        n = reference_step(grad, theirs, 0.9, 0.999, 1e-8)
        expected = w.double() * 0.999 - 0.01 * n.double()
        in_dtype = (w.float() * 0.999 - 0.01 * n).to(param_dtype)
        assert_close_to_reference("param", w_ours, expected, in_dtype)

    for state_dtype in ("fp32", "bf16", "int8"):
        for grad_dtype in (torch.float32, torch.bfloat16):
            for shape in ((37, 8), (53, 29)):
                check(f"galore adam_step state={state_dtype} grad={str(grad_dtype)[6:]} shape={shape}",
                      adam_step, state_dtype, grad_dtype, shape)
    for state_dtype in ("fp32", "int8"):
        for param_dtype in (torch.float32, torch.bfloat16):
            check(f"galore adam_step in place state={state_dtype} param={str(param_dtype)[6:]}",
                  updates_param, state_dtype, param_dtype)
