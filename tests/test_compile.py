"""torch.compile(fullgraph=True) with the DEFAULT backend ("auto"): every public op, DiTVideo and a
facebookresearch/DiT model patched by dit_fast.patch, under Dynamo + aot_eager and (a few tiny cases)
Inductor, with no graph break and the eager result, forward and gradients. Also: a use_backend block
or $DIT_FAST_BACKEND set around a compiled call takes effect (Dynamo guards on the block's name).

On this CPU machine "auto" resolves to the PyTorch references, so these graphs hold the references;
the kernel path under compile is covered by test_use_backend_switches_the_compiled_op_path (Triton in
the interpreter) and the ops' own compile tests with explicit backends. Inductor compiles C++ here
(seconds per graph), so its cases are one op and one forward of the smallest model.
"""

import pytest
import torch
import torch._dynamo.testing

import dit_fast
from dit_fast import ops
from dit_fast.models import DiT_models
from tests import reference_dit as R


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.delenv("DIT_FAST_BACKEND", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_once(fn, backend):
    """fn compiled with fullgraph=True (any graph break raises) and a counter of compiled frames."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def run_and_grads(fn, inputs):
    """Outputs of fn and the gradients of a random projection of them w.r.t. the float inputs."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs if o.is_floating_point()
               and o.requires_grad)
    grads = torch.autograd.grad(loss, leaves) if leaves else ()
    return [o.detach() for o in outs], list(grads)


def check_compiled_matches_eager(fn, inputs, backend, rtol=1.3e-6, atol=1e-5):
    compiled, counter = compile_once(fn, backend)
    got, got_grads = run_and_grads(compiled, inputs)
    want, want_grads = run_and_grads(fn, inputs)
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled: the function was split"
    for name, a, b in [("out", x, y) for x, y in zip(got, want)] + [("grad", x, y) for x, y in zip(got_grads, want_grads)]:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _r(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


def _qkv(B=1, S=12, heads=2, D=16):
    return [_r(B, S, heads, D) for _ in range(3)]


# name -> () -> (fn, inputs)
OP_CASES = {
    "layernorm_modulate": lambda: (
        lambda x, sh, sc, w, b: ops.layernorm_modulate(x, sh, sc, weight=w, bias=b),
        [_r(2, 6, 24), _r(2, 3, 24), _r(2, 3, 24), _r(24), _r(24)]),  # per-group (G = 3) modulation
    "gated_residual": lambda: (ops.gated_residual, [_r(2, 5, 24), _r(2, 24), _r(2, 5, 24)]),
    "residual_layernorm_modulate": lambda: (
        ops.residual_layernorm_modulate, [_r(2, 5, 24), _r(2, 24), _r(2, 5, 24), _r(2, 24), _r(2, 24)]),
    "attention_cross_key_padding_lse": lambda: (
        lambda q, k, v, m: ops.attention(q, k, v, key_padding_mask=m, return_lse=True),
        [_r(2, 7, 2, 16), _r(2, 11, 2, 16), _r(2, 11, 2, 16),
         torch.tensor([[True] * 11, [True] * 6 + [False] * 5])]),
    "spacetime_spatial_rope": lambda: (
        lambda q, k, v: ops.spacetime_attention(q, k, v, (3, 2, 2), mode="spatial", rope="3d"), _qkv()),
    "spacetime_temporal": lambda: (
        lambda q, k, v: ops.spacetime_attention(q, k, v, (3, 2, 2), mode="temporal"), _qkv()),
    "spacetime_window": lambda: (
        lambda q, k, v: ops.spacetime_attention(q, k, v, (3, 2, 2), window=(2, 1, 2)), _qkv()),
    "spacetime_window_tile_lse": lambda: (
        lambda q, k, v: ops.spacetime_attention(q, k, v, (2, 4, 4), window=(1, 4, 4), window_tile=(1, 4, 4),
                                                return_lse=True), _qkv(S=32)),
    "apply_rope_3d": lambda: (lambda x: ops.apply_rope_3d(x, (3, 2, 2), theta=100.0), [_r(1, 12, 2, 16)]),
    "patchify_unpatchify_3d": lambda: (
        lambda v: ops.unpatchify_3d(ops.patchify_3d(v, (1, 2, 2)) * 2, (1, 2, 2), (2, 2, 3)), [_r(2, 3, 2, 4, 6)]),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_default_backend_compiles_fullgraph_aot_eager(case):
    fn, inputs = OP_CASES[case]()
    check_compiled_matches_eager(fn, inputs, "aot_eager")


def tiny_video():
    """DiT-tiny with every feature: text cross-attention, alternating spatial/temporal attention,
    sin-cos + RoPE positions, per-frame timesteps. Default backend ("auto")."""
    model = DiT_models["DiT-tiny"](input_size=(2, 4, 4), text_dim=16, attention="spatial_temporal", pos="both",
                                   per_frame_timesteps=True, num_classes=5, learn_sigma=False,
                                   class_dropout_prob=0.0)
    R.randomize_(model)  # adaLN-Zero would make the output zero, hiding any error
    x = torch.randn(2, 4, 2, 4, 4)
    t = torch.rand(2, 2) * 1000
    y = torch.randint(0, 5, (2,))
    text = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # ragged captions
    return model, [x, t, y, text, mask]


def patched_reference_dit():
    """facebookresearch/DiT (tests/reference_dit.py) patched by dit_fast.patch, default backend."""
    model = R.randomize_(R.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                               num_classes=10))
    dit_fast.patch(model)
    return model, [torch.randn(2, 4, 4, 4), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))]


@pytest.mark.parametrize("build", [tiny_video, patched_reference_dit], ids=["DiTVideo", "patched_DiT"])
def test_model_default_backend_compiles_fullgraph_aot_eager(build):
    model, inputs = build()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(*args):
        return model(*args)

    compiled, counter = compile_once(step, "aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().mean(), params, allow_unused=True)
    want = model(*inputs)
    want_grads = torch.autograd.grad(want.square().mean(), params, allow_unused=True)
    assert counter.frame_count == 1
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_explain_reports_no_graph_break_for_dit_video():
    """The figure the issue measured (16 graph breaks for DiT-tiny) with the tool it used."""
    model, inputs = tiny_video()
    explanation = torch._dynamo.explain(model.eval())(*inputs)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


# ---- Inductor: few and tiny (it compiles C++ on this CPU) -----------------------------------------


def test_op_default_backend_compiles_fullgraph_inductor():
    fn, inputs = OP_CASES["gated_residual"]()
    compiled, counter = compile_once(fn, "inductor")
    with torch.no_grad():
        got, want = compiled(*inputs), fn(*inputs)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_model_default_backend_compiles_fullgraph_inductor():
    model, inputs = patched_reference_dit()
    compiled, counter = compile_once(model.eval(), "inductor")
    with torch.no_grad():
        got, want = compiled(*inputs), model(*inputs)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- the backend a compiled call runs follows use_backend and the environment ---------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the Triton adaLN launcher (what the custom op runs for backend "triton")."""
    from dit_fast.triton_kernels import adaln as triton_adaln

    calls = []
    real = triton_adaln.adaln_forward
    monkeypatch.setattr(triton_adaln, "adaln_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_use_backend_switches_the_compiled_op_path(kernel_calls):
    x, shift, scale = torch.randn(2, 5, 24), torch.randn(2, 24), torch.randn(2, 24)
    want = ops.layernorm_modulate(x, shift, scale, backend="torch")
    compiled, counter = compile_once(lambda *a: ops.layernorm_modulate(*a), "aot_eager")

    torch.testing.assert_close(compiled(x, shift, scale), want)
    assert kernel_calls == []  # auto on CPU: the reference
    with dit_fast.use_backend("triton"):
        torch.testing.assert_close(compiled(x, shift, scale), want, rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 1 and counter.frame_count == 2  # re-traced for the block
    torch.testing.assert_close(compiled(x, shift, scale), want)
    assert len(kernel_calls) == 1 and counter.frame_count == 2  # left the block: the first graph again
    with dit_fast.use_backend("triton"):
        compiled(x, shift, scale)
        with dit_fast.use_backend("torch"):  # the innermost block wins: a graph for "torch"
            compiled(x, shift, scale)
    assert len(kernel_calls) == 2 and counter.frame_count == 3


def test_environment_is_read_when_tracing(monkeypatch, kernel_calls):
    monkeypatch.setenv("DIT_FAST_BACKEND", "triton")
    x, shift, scale = torch.randn(2, 5, 24), torch.randn(2, 24), torch.randn(2, 24)
    compiled, _ = compile_once(lambda *a: ops.layernorm_modulate(*a), "aot_eager")
    compiled(x, shift, scale)
    assert len(kernel_calls) == 1
    with dit_fast.use_backend("torch"):  # the block beats the environment, compiled too
        compiled(x, shift, scale)
    assert len(kernel_calls) == 1
