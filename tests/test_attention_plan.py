"""backend="auto" for attention (dit_fast/ops/attention_planner.py), tested on CPU with injected facts.

On a GPU "auto" times our kernel against torch's own best for the call (SDPA, grouped SDPA, Flex) once
per call class and runs the winner. Here the `on_a_gpu` fixture injects only what a CPU cannot supply:
the device facts (dit_fast._backend.StatedFacts: "a GPU with Triton runnable") and the timings (a
FakeTimer that still runs every candidate). Everything between is the code a GPU runs: the backend
resolution that sends "auto" to the planner, the candidates, the cache per call class, precedence,
failures, logging, compile, the diffusers backend and dit_fast.patch reaching the planner, and the
torch candidates themselves against attention_reference, forward and backward, with NaN/inf behind
masks. Our kernel runs in Triton's interpreter. GPU timings: benchmarks/bench_auto.py.
"""

import logging

import pytest
import torch
import torch._dynamo.testing
from torch.utils._python_dispatch import TorchDispatchMode

import dit_fast
from dit_fast import _backend, ops
from tests.launches import count_launches

import dit_fast.ops.attention_planner as P  # noqa: E402
import dit_fast.ops.flash_attention as A  # noqa: E402


class FakeTimer:
    """Injected timer: runs each candidate once (so it must work; run=False: not) and reports times[impl]."""

    def __init__(self, run=True, **times):
        self.run = run
        self.times = times
        self.calls = []

    def __call__(self, impl, fn, device):
        assert not torch.compiler.is_compiling(), "timed while tracing"
        if self.run:
            fn()
        self.calls.append(impl)
        if isinstance(self.times.get(impl), Exception):
            raise self.times[impl]
        return self.times.get(impl, 1.0)


@pytest.fixture
def on_a_gpu(monkeypatch):
    """States the device facts of a GPU with Triton runnable (and no CUDA extension); the tensors stay on
    CPU. Returns a function installing a FakeTimer. Restores this machine's facts and the timer after."""
    monkeypatch.delenv("DIT_FAST_BACKEND", raising=False)
    previous = _backend.set_device_facts(_backend.StatedFacts(gpu=True, runnable=("triton",)))

    def install(run=True, **times):
        timer = FakeTimer(run, **times)
        P.set_timer(timer)
        return timer

    yield install
    _backend.set_device_facts(previous)
    P.set_timer(None)
    torch._dynamo.reset()


class OpLog(TorchDispatchMode):
    """Names of the dit_fast custom ops that ran (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "dit_fast" in name:
            self.names.append(name.split(".")[-1])
        return func(*args, **(kwargs or {}))


def qkv(B=2, S=12, heads=2, D=16, Sk=None, grad=False):
    q = torch.randn(B, S, heads, D)
    k, v = torch.randn(B, Sk or S, heads, D), torch.randn(B, Sk or S, heads, D)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def test_auto_on_cpu_is_the_reference_and_says_so():
    q, k, v = qkv()
    plan = ops.attention_plan(q, k, v)
    assert plan.impl == "reference" and "auto on cpu" in plan.reason and plan.times_ms is None
    assert P.cached_plans() == {}


def test_the_measured_winner_runs(on_a_gpu):
    q, k, v = qkv()
    timer = on_a_gpu(triton=2.0, sdpa=1.0)
    plan = ops.attention_plan(q, k, v)
    assert (plan.impl, plan.times_ms) == ("sdpa", {"triton": 2.0, "sdpa": 1.0})
    assert "measured fwd: sdpa 1 ms, triton 2 ms" in plan.reason
    with OpLog() as log:
        out = ops.attention(q, k, v)
    assert log.names == []  # SDPA ran, not our kernel
    torch.testing.assert_close(out, A.attention_reference(q, k, v))
    assert timer.calls == ["triton", "sdpa"]  # measured once, by attention_plan; the call used the cache

    timer = on_a_gpu(triton=1.0, sdpa=2.0)  # set_timer clears the cache
    with OpLog() as log:
        out = ops.attention(q, k, v)
    assert log.names == ["attention_fwd"] and timer.calls == ["triton", "sdpa"]
    torch.testing.assert_close(out, A.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert ops.attention_plan(q, k, v).impl == "triton"


def test_measured_once_per_call_class(on_a_gpu):
    timer = on_a_gpu(triton=2.0, sdpa=1.0)
    ops.attention(*qkv(S=12))
    ops.attention(*qkv(S=13))  # Sq and Sk in the same power-of-two class (9..16)
    ops.attention(*qkv(B=1, heads=4, S=16))  # B * heads = 4 in both
    assert timer.calls == ["triton", "sdpa"]
    ops.attention(*qkv(S=17))  # next class
    ops.attention(*qkv(S=12, D=24))  # another head dim
    ops.attention(*[t.double().float().half() for t in qkv(S=12)])  # another dtype
    assert timer.calls == ["triton", "sdpa"] * 4
    ops.attention(*qkv(S=12, grad=True))  # gradients needed: forward + backward timed, its own class
    assert timer.calls[-2:] == ["triton", "sdpa"] and len(P.cached_plans()) == 5
    reasons = sorted(p.reason.split(":")[0] for p in P.cached_plans().values())
    assert reasons == ["measured fwd"] * 4 + ["measured fwd+bwd"]


def test_candidates_for_each_kind_of_call(on_a_gpu):
    on_a_gpu(run=False, triton=3.0, sdpa=1.0, sdpa_grouped=1.0, flex=1.0)  # the candidates' runs: below
    q, k, v = qkv(S=48)
    mask = torch.ones(2, 48, dtype=torch.bool)
    grid = (3, 4, 4)
    cases = {
        "sdpa": [dict(), dict(key_padding_mask=mask), dict(key_padding_mask=mask[:, None].expand(2, 2, 48)),
                 dict(grid=grid), dict(grid=grid, rope="3d")],
        "sdpa_grouped": [dict(grid=grid, mode="spatial"), dict(grid=grid, mode="temporal")],
        "flex": [dict(grid=grid, window=(2, 2, 3)), dict(grid=grid, window=(2, 4, 4), window_tile=(1, 4, 4)),
                 dict(grid=grid, window=(2, 2, 3), return_lse=True)],  # Flex gives an LSE
    }
    for impl, kwargs_list in cases.items():
        for kwargs in kwargs_list:
            grid_arg = kwargs.pop("grid", None)
            plan = ops.attention_plan(q, k, v, grid_arg, **kwargs)
            assert plan.impl == impl and set(plan.times_ms) == {"triton", impl}, (kwargs, plan)


@pytest.mark.parametrize("winner", ["triton", "sdpa"])
def test_per_head_mask_is_its_own_call_class(on_a_gpu, winner):
    """A per-head key padding mask (B, heads, Sk) is measured apart from a (B, Sk) one; either winner
    returns the reference's result."""
    timer = on_a_gpu(**{winner: 1.0, ("sdpa" if winner == "triton" else "triton"): 2.0})
    q, k, v = qkv(S=9, Sk=13, heads=3)
    head_mask = torch.rand(2, 3, 13) > 0.5
    head_mask[..., 0] = True
    out = ops.attention(q, k, v, key_padding_mask=head_mask)
    ops.attention(q, k, v, key_padding_mask=head_mask[:, 0])
    assert timer.calls == ["triton", "sdpa"] * 2 and len(P.cached_plans()) == 2
    torch.testing.assert_close(out, A.attention_reference(q, k, v, mask=head_mask[:, :, None, :]), rtol=1e-5,
                               atol=1e-5)


def test_calls_only_our_kernel_can_serve_are_not_timed(on_a_gpu):
    timer = on_a_gpu(triton=3.0, sdpa=1.0, sdpa_grouped=1.0)
    q, k, v = qkv(S=12)
    plan = ops.attention_plan(q, k, v, return_lse=True)
    assert plan.impl == "triton" and "return_lse" in plan.reason and plan.times_ms is None
    plan = ops.attention_plan(q, k, v, (3, 2, 2), mode="spatial", return_lse=True)
    assert plan.impl == "triton" and "return_lse" in plan.reason
    plan = ops.attention_plan(q, k, v, (3, 2, 2), rope="3d", rope_in_kernel=True)
    assert plan.impl == "triton" and "rope_in_kernel" in plan.reason
    with OpLog() as log:
        out, lse = ops.attention(q, k, v, return_lse=True)
    assert log.names == ["attention_fwd"] and timer.calls == []
    want, want_lse = A.attention_reference(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_kernel_options_ask_for_our_kernel(on_a_gpu):
    """deterministic= / tma= are options of our kernel: given (not None), "auto" runs it untimed."""
    timer = on_a_gpu(triton=2.0, sdpa=1.0, sdpa_grouped=1.0)
    q, k, v = qkv()
    with OpLog() as log:
        ops.attention(q, k, v, deterministic=True)
        ops.spacetime_attention(q, k, v, (3, 2, 2), mode="spatial", deterministic=True)
    assert log.names == ["attention_fwd"] * 2 and timer.calls == []
    assert P.candidates(P.Call(0.1, kernel_options=True), torch.device("cuda")) == (
        ("triton",), "deterministic= or tma= given: options of our kernel")
    ops.attention(q, k, v)  # without options: measured
    assert timer.calls == ["triton", "sdpa"]


def test_precedence_explicit_backends_are_never_timed(on_a_gpu, monkeypatch):
    timer = on_a_gpu(triton=2.0, sdpa=1.0)
    q, k, v = qkv()
    with OpLog() as log:
        ops.attention(q, k, v, backend="triton")  # the call's argument
        with dit_fast.use_backend("triton"):  # the block
            ops.attention(q, k, v)
            assert ops.attention_plan(q, k, v).impl == "triton"
            assert "requested" in ops.attention_plan(q, k, v).reason
        monkeypatch.setenv("DIT_FAST_BACKEND", "triton")  # the environment
        ops.attention(q, k, v)
        with dit_fast.use_backend("torch"):  # the block beats the environment
            ops.attention(q, k, v)
            assert ops.attention_plan(q, k, v).impl == "reference"
        ops.attention(q, k, v, backend="torch")  # the call beats the environment
    assert log.names == ["attention_fwd"] * 3 and timer.calls == []
    monkeypatch.delenv("DIT_FAST_BACKEND")
    assert ops.attention_plan(q, k, v, backend="triton").impl == "triton" and timer.calls == []
    assert ops.attention_plan(q, k, v).impl == "sdpa" and timer.calls == ["triton", "sdpa"]


def test_float64_under_auto_runs_the_reference(on_a_gpu):
    timer = on_a_gpu()
    q, k, v = (t.double() for t in qkv())
    plan = ops.attention_plan(q, k, v)
    assert plan.impl == "reference" and "float64" in plan.reason
    torch.testing.assert_close(ops.attention(q, k, v), A.attention_reference(q, k, v))
    assert timer.calls == []


def test_a_torch_candidate_that_cannot_run_is_left_out_and_logged(on_a_gpu, caplog):
    """A real failure, not an injected one: FlexAttention has no backward on CPU, so timing the window
    call's forward + backward fails in torch. Flex is left out (WARNING, once per call class, named in
    the plan's reason) and our kernel runs, forward and backward, matching the reference."""
    timer = on_a_gpu(triton=2.0, flex=1.0)
    grid, window = (2, 3, 3), (1, 3, 2)
    q, k, v = qkv(B=1, S=18, grad=True)
    with caplog.at_level(logging.WARNING, logger="dit_fast"):
        with count_launches() as launches:
            out = ops.spacetime_attention(q, k, v, grid, window=window)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        ops.spacetime_attention(q, k, v, grid, window=window)  # the same class: cached, not logged again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "left out" in r.getMessage()]
    assert len(warnings) == 1 and "flex: NotImplementedError" in warnings[0].getMessage()
    assert "spacetime_attention(grid=(2, 3, 3), mode='full', window=(1, 3, 2))" in warnings[0].getMessage()
    (plan,) = P.cached_plans().values()
    assert plan.impl == "triton" and set(plan.times_ms) == {"triton"}
    assert "left out: flex (NotImplementedError: FlexAttention does not support backward on CPU" in plan.reason
    assert timer.calls == ["triton"] and launches["_attn_fwd_kernel"] >= 1  # flex raised inside its run
    want = A.spacetime_attention_reference(q, k, v, grid, window=window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), torch.ones_like(want))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_failing_timing_of_a_torch_candidate_is_left_out(on_a_gpu):
    """The timer itself failing on torch's candidate (an injected error) counts as that candidate failing."""
    on_a_gpu(triton=2.0, sdpa=RuntimeError("no kernel for this shape"))
    plan = ops.attention_plan(*qkv())
    assert plan.impl == "triton" and "left out: sdpa (RuntimeError: no kernel for this shape)" in plan.reason


def test_our_kernel_failing_inside_the_planner_raises(on_a_gpu, monkeypatch):
    """A broken kernel must not quietly lose to SDPA: its failure raises from the planner, naming the call
    class, with the kernel's error as the cause; nothing is cached, so the next call raises again."""
    from dit_fast.triton_kernels import attention as launchers

    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access (injected)")

    monkeypatch.setattr(launchers, "attention_forward", broken)  # the kernel breaks, not the decision
    timer = on_a_gpu(triton=2.0, sdpa=1.0)
    q, k, v = qkv(S=13)
    expected = (r"our kernel failed on the call class attention\(\) float32 on cpu, D = 16, B \* heads <= 4, "
                r"Sq <= 16, Sk <= 16, fwd: RuntimeError: illegal memory access")
    with pytest.raises(P.OwnKernelError, match=expected) as info:
        ops.attention(q, k, v)
    assert isinstance(info.value.__cause__, RuntimeError) and P.cached_plans() == {}
    with pytest.raises(P.OwnKernelError, match="fwd\\+bwd"):
        ops.attention_plan(*qkv(S=13, grad=True))
    assert timer.calls == []  # the kernel raised inside fn(), before the timer recorded anything


def test_first_choice_is_logged_at_debug(on_a_gpu, caplog):
    on_a_gpu(triton=2.0, sdpa=1.0)
    with caplog.at_level(logging.DEBUG, logger="dit_fast"):
        ops.attention(*qkv())
        ops.attention(*qkv())
    lines = [r.getMessage() for r in caplog.records if "attention auto" in r.getMessage()]
    assert len(lines) == 1 and "sdpa (measured fwd" in lines[0]


def test_gpu_candidates_add_forced_sdpa_backends_in_half_precision():
    cuda = torch.device("cuda")
    assert P.candidates(P.Call(0.1), cuda)[0] == ("triton", "sdpa", "sdpa:cudnn", "sdpa:flash")
    assert P.candidates(P.Call(0.1), cuda, torch.bfloat16)[0] == ("triton", "sdpa", "sdpa:cudnn", "sdpa:flash")
    assert P.candidates(P.Call(0.1), cuda, torch.float32)[0] == ("triton", "sdpa")  # neither takes fp32
    spatial = P.Call(0.1, grid=(2, 2, 2), mode="spatial")
    assert P.candidates(spatial, cuda, torch.float16)[0] == ("triton", "sdpa_grouped", "sdpa_grouped:cudnn",
                                                            "sdpa_grouped:flash")
    assert P.candidates(spatial, torch.device("cpu"))[0] == ("triton", "sdpa_grouped")
    window = P.Call(0.1, grid=(2, 2, 2), window=(1, 2, 2))
    assert P.candidates(window, cuda)[0] == ("triton", "flex")


def test_a_forced_sdpa_backend_runs_forward_and_backward():
    """run_torch("sdpa:math") forces SDPA's math backend (on a GPU: ":cudnn"); the same function is
    what a compiled graph holds, traced with fullgraph."""
    q, k, v = qkv(S=12, grad=True)
    call = P.Call(0.25, grid=(3, 2, 2), mode="temporal")
    dout = torch.randn(2, 12, 2, 16)
    got = P.run_torch("sdpa_grouped:math", q, k, v, None, call)
    want = A.spacetime_attention_reference(q, k, v, (3, 2, 2), mode="temporal", scale=0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: P.run_torch("sdpa:math", q, k, v, None, P.Call(0.25)),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), A.attention_reference(q, k, v, scale=0.25), rtol=1e-5,
                               atol=1e-5)
    torch._dynamo.reset()


def test_nothing_is_timed_or_cached_during_cuda_graph_capture(on_a_gpu, monkeypatch):
    timer = on_a_gpu(triton=2.0, sdpa=1.0)
    monkeypatch.setattr(P, "_capturing", lambda device: True)
    plan = ops.attention_plan(*qkv())
    assert plan.impl == "triton" and "capture" in plan.reason
    assert timer.calls == [] and P.cached_plans() == {}


# ---- forward and backward run by the same implementation -----------------------------------------


@pytest.mark.parametrize("winner", ["triton", "sdpa"])
def test_backward_follows_the_forward_that_ran(on_a_gpu, winner):
    on_a_gpu(**{winner: 1.0, ("sdpa" if winner == "triton" else "triton"): 2.0})
    q, k, v = qkv(S=11, Sk=13, D=24, grad=True)
    mask = torch.tensor([[True] * 13, [True] * 6 + [False] * 7])
    with OpLog() as log:
        out = ops.attention(q, k, v, key_padding_mask=mask)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert log.names == ([] if winner == "sdpa" else ["attention_fwd", "attention_bwd"])
    want = A.attention_reference(q, k, v, mask=mask[:, None, None, :])
    want_grads = torch.autograd.grad(want, (q, k, v), torch.randn_like(out).copy_(torch.zeros(())) + 0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    gen_dout = torch.Generator().manual_seed(3)
    dout = torch.randn(out.shape, generator=gen_dout)
    got_grads = torch.autograd.grad(ops.attention(q, k, v, key_padding_mask=mask), (q, k, v), dout)
    want_grads = torch.autograd.grad(A.attention_reference(q, k, v, mask=mask[:, None, None, :]), (q, k, v), dout)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert all(g is not None for g in grads)


def test_gradient_checkpointing_measures_outside_its_hooks(on_a_gpu):
    """The first call of a class times forward + backward inside the user's forward: under activation
    checkpointing that must not meet the checkpoint's saved-tensor hooks (it broke both before)."""
    from dit_fast.models import DiT_models
    from tests import reference_dit as R

    timer = on_a_gpu(triton=2.0, sdpa_grouped=1.0)
    model = R.randomize_(DiT_models["DiT-tiny"](input_size=(2, 4, 4), num_classes=5, learn_sigma=False,
                                                class_dropout_prob=0.0, gradient_checkpointing=True,
                                                attention="spatial_temporal")).train()
    x, t, y = torch.randn(2, 4, 2, 4, 4), torch.rand(2) * 1000, torch.randint(0, 5, (2,))
    model(x, t, y).square().mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    assert timer.calls == ["triton", "sdpa_grouped"] * 2  # spatial and temporal, fwd+bwd each
    model.zero_grad()
    with dit_fast.use_backend("torch"):
        model(x, t, y).square().mean().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


# ---- torch's candidates against the reference, with garbage behind the masks ----------------------


def _poison(t, index, value):
    t = t.detach().clone()
    t[index] = value
    return t


@pytest.mark.parametrize("mode", ["spatial", "temporal", "full"])
def test_grouped_and_dense_sdpa_match_the_reference(mode):
    grid = (3, 2, 5)
    q, k, v = qkv(S=30, D=24, grad=True)
    call = P.Call(0.3, grid=grid, mode=mode)
    impl = P.sdpa if mode == "full" else P.sdpa_grouped
    dout = torch.randn(2, 30, 2, 24)
    out = impl(q, k, v, None, call)
    want = A.spacetime_attention_reference(q, k, v, grid, mode=mode, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_sdpa_key_padding_hides_nan_and_inf_forward_and_backward():
    q, k, v = qkv(S=7, Sk=11, grad=True)
    mask = torch.tensor([[True] * 11, [True] * 4 + [False] * 7])
    k_bad = _poison(k, (1, 5), float("nan")).requires_grad_(True)
    v_bad = _poison(_poison(v, (1, 6), float("inf")), (1, 9, 0, 3), float("-inf")).requires_grad_(True)
    dout = torch.randn(2, 7, 2, 16)
    out = P.sdpa(q, k_bad, v_bad, mask, P.Call(0.25))
    assert torch.isfinite(out).all()
    want = A.attention_reference(q, k, v, scale=0.25, mask=mask[:, None, None, :])  # clean inputs
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out, (q, k_bad, v_bad), dout)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[1][1, 4:].abs().max() == 0 and grads[2][1, 4:].abs().max() == 0  # masked keys get nothing
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    none_visible = torch.tensor([[False] * 11, [True] * 11])
    out = P.sdpa(q, k_bad, v_bad, none_visible, P.Call(0.25))
    assert out[0].abs().max() == 0  # a batch without any visible key: zeros


def test_sdpa_per_head_key_padding_hides_nan_and_inf_forward_and_backward():
    """A per-head mask: each head's masked copies of a key are hidden, the copies other heads see are not."""
    q, k, v = qkv(S=7, Sk=11, heads=3, grad=True)
    mask = torch.rand(2, 3, 11) > 0.4
    mask[..., 0] = True
    mask[1, 2] = False  # sample 1, head 2: no visible key: zeros
    hidden = ~mask.transpose(1, 2)  # (B, Sk, heads)
    k_bad = torch.where(hidden[..., None], float("nan"), k.detach()).requires_grad_(True)
    v_bad = torch.where(hidden[..., None], float("inf"), v.detach()).requires_grad_(True)
    dout = torch.randn(2, 7, 3, 16)
    out = P.sdpa(q, k_bad, v_bad, mask, P.Call(0.25))
    want = A.attention_reference(q, k, v, scale=0.25, mask=mask[:, :, None, :])  # clean inputs
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert out[1, :, 2].abs().max() == 0
    grads = torch.autograd.grad(out, (q, k_bad, v_bad), dout)
    assert (grads[1][hidden] == 0).all() and (grads[2][hidden] == 0).all()
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grid, window, window_tile", [
    ((3, 4, 5), (2, 3, 3), None),  # token window, shifted at the borders
    ((3, 4, 4), (2, 4, 4), (1, 4, 4)),  # tile window
    ((3, 5, 4), (2, 4, 4), (1, 4, 4)),  # tile window with partial edge tiles
])
def test_flex_matches_the_reference_and_hides_masked_garbage(grid, window, window_tile):
    S = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(S=S, D=16)
    call = P.Call(0.25, return_lse=True, grid=grid, window=window, window_tile=window_tile)
    mask = A.spacetime_mask(grid, "full", window, window_tile=window_tile)  # (S, S)
    out, lse = P.flex(q, k, v, None, call)
    want, want_lse = A.spacetime_attention_reference(q, k, v, grid, window=window, window_tile=window_tile,
                                                     scale=0.25, return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    # garbage in the last token's key and value: queries that cannot see it are unchanged; those that can
    # see it return NaN (attention_reference's rule, and our kernels')
    k_bad, v_bad = _poison(k, (0, S - 1), float("inf")), _poison(v, (0, S - 1), float("nan"))
    out_bad, lse_bad = P.flex(q, k_bad, v_bad, None, call)
    sees = mask[:, S - 1]  # (S,) queries whose window holds the last token
    assert 0 < sees.sum() < S
    torch.testing.assert_close(out_bad[0, ~sees], out[0, ~sees])
    torch.testing.assert_close(out_bad[1], out[1])
    assert out_bad[0, sees].isnan().all() and lse_bad[0, :, sees].isnan().all()
    assert not lse_bad[0, :, ~sees].isnan().any()


def test_flex_block_mask_is_built_once_per_layout():
    P._flex_layouts.clear()
    call = P.Call(0.25, grid=(1, 4, 4), window=(1, 2, 2))
    P.flex(*qkv(S=16), None, call)
    P.flex(*qkv(S=16, B=1), None, call)
    assert len(P._flex_layouts) == 1
    P.flex(*qkv(S=16), None, call._replace(window=(1, 4, 4), window_tile=(1, 4, 4)))
    assert len(P._flex_layouts) == 2


# ---- torch.compile: never timed while tracing; the measured winner is compiled in ------------------


@pytest.mark.parametrize("kind", ["key_padding", "temporal", "window_tile"])
def test_compiled_calls_use_the_measured_winner_or_our_kernel(on_a_gpu, kind):
    q, k, v = qkv(S=32)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 20:] = False
    grid = (2, 4, 4)
    fn = {"key_padding": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=mask),
          "temporal": lambda q, k, v: ops.spacetime_attention(q, k, v, grid, mode="temporal"),
          "window_tile": lambda q, k, v: ops.spacetime_attention(q, k, v, grid, window=(2, 4, 4),
                                                                 window_tile=(1, 4, 4))}[kind]
    timer = on_a_gpu(run=False, triton=2.0, sdpa=1.0, sdpa_grouped=1.0, flex=1.0)
    want = A.spacetime_attention_reference(q, k, v, grid, mode="temporal") if kind == "temporal" else None
    for phase in ("before measuring", "after measuring"):
        torch._dynamo.reset()
        recorder = torch._dynamo.testing.EagerAndRecordGraphs()
        compiled = torch.compile(fn, fullgraph=True, backend=recorder)
        with torch.no_grad():
            got = compiled(q, k, v)
        assert len(recorder.graphs) == 1
        # before any measurement the graph holds our kernel (the FakeTimer asserts it never runs while
        # tracing); after an eager call measured the class, the graph holds torch's winner instead
        has_ours = "dit_fast.attention_fwd" in recorder.graphs[0].code
        assert has_ours == (phase == "before measuring"), phase
        eager = fn(q, k, v)  # measures on the first eager call
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert timer.calls == ["triton", {"key_padding": "sdpa", "temporal": "sdpa_grouped", "window_tile": "flex"}[kind]]


def test_compiled_with_dynamic_shapes_keys_on_size_classes(on_a_gpu):
    """dynamic=True: the call class is computed from symbolic sizes (by guards), and a batch of
    another size class is another graph, with its own measured winner."""
    on_a_gpu(run=False, triton=2.0, sdpa_grouped=1.0)

    def fn(q, k, v):
        return ops.spacetime_attention(q, k, v, (2, 4, 4), mode="spatial")

    for B in (2, 3, 5):  # B * heads = 4, 6, 10: classes 4, 8, 16
        with torch.no_grad():
            fn(*qkv(B=B, S=32))  # eager: measured
    torch._dynamo.reset()
    recorder = torch._dynamo.testing.EagerAndRecordGraphs()
    compiled = torch.compile(fn, fullgraph=True, backend=recorder, dynamic=True)
    with torch.no_grad():
        for B in (2, 3, 5):
            q, k, v = qkv(B=B, S=32)
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)
    assert len(recorder.graphs) == 3 and not any("dit_fast.attention_fwd" in g.code for g in recorder.graphs)


def test_bench_auto_cpu_smoke_runs():
    """benchmarks/bench_auto.py --cpu-smoke: the GPU benchmark's code path on tiny CPU shapes, so it
    cannot rot (every provider checked against the reference, auto's plan the argmin of its timings).
    Nothing monkeypatched: the smoke states the device facts of a GPU and restores this machine's."""
    from benchmarks import bench_auto

    summaries = bench_auto.smoke()
    assert [(s["case"], s["variant"]) for s in summaries] == [
        ("dense", "fwd"), ("dense", "fwd+bwd"), ("spatial", "fwd"), ("temporal", "fwd"), ("window", "fwd"),
        ("window_tile", "fwd")]
    assert P._timer[0] is P._default_timer and type(_backend.device_facts()) is _backend.DeviceFacts


# ---- where users meet "auto": the diffusers backend, dit_fast.patch, ring-attention blocks ----------


@pytest.mark.parametrize("winner", ["triton", "sdpa"])
def test_diffusers_backend_reaches_the_planner(on_a_gpu, winner):
    """diffusers' "dit_fast" attention backend calls dit_fast.ops.attention with "auto": on a GPU it is
    planned (one plan cached) and the winner runs (our kernel's launches, or none)."""
    pytest.importorskip("diffusers")
    from dit_fast.integrations.diffusers.backend import dit_fast_attention

    timer = on_a_gpu(**{winner: 1.0, ("sdpa" if winner == "triton" else "triton"): 2.0})
    q, k, v = qkv(B=1, S=11, Sk=7, heads=3, D=24)
    with count_launches() as launches:
        out = dit_fast_attention(q, k, v)
    assert timer.calls == ["triton", "sdpa"] and len(P.cached_plans()) == 1
    assert next(iter(P.cached_plans().values())).impl == winner
    with count_launches() as again:
        dit_fast_attention(q, k, v)  # the plan is reused: our kernel once per call, or never
    assert again["_attn_fwd_kernel"] == (1 if winner == "triton" else 0)
    assert launches["_attn_fwd_kernel"] >= 1  # the timing ran our kernel either way
    torch.testing.assert_close(out, A.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_patched_dit_reaches_the_planner(on_a_gpu):
    """facebookresearch/DiT patched by dit_fast.patch, default backend: each block's attention goes through
    the planner (both blocks are one call class: one plan, timed once); adaLN, with one runnable kernel
    backend and no rival to time, runs its Triton kernel directly."""
    from tests import reference_dit as R

    timer = on_a_gpu(triton=1.0, sdpa=2.0)
    model = R.randomize_(R.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                               num_classes=10)).eval()  # eval: no random label dropout
    x, t, y = torch.randn(2, 4, 4, 4), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    with torch.no_grad():
        want = model(x, t, y)
        dit_fast.patch(model)
        with count_launches() as launches:
            got = model(x, t, y)
    assert timer.calls == ["triton", "sdpa"] and len(P.cached_plans()) == 1
    assert launches["_attn_fwd_kernel"] >= 2 and launches.total("_adaln") >= 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ring_attention_blocks_run_our_kernel_under_auto(on_a_gpu):
    """The log-sum-exp blocks of ring attention (dit_fast/parallel/attention_parts.py) have no torch rival:
    "auto" on a GPU runs our kernel there, untimed (handing "auto" on to the launcher would fail)."""
    from dit_fast.parallel.attention_parts import attention_block_forward

    timer = on_a_gpu(triton=2.0, sdpa=1.0)
    q, k, v = qkv(S=9, Sk=5)
    with count_launches() as launches:
        out, lse = attention_block_forward(q, k, v)
    assert launches["_attn_fwd_kernel"] == 1 and timer.calls == [] and P.cached_plans() == {}
    want, want_lse = A.attention_reference(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Block-sparse calls: the plan reports the kept fraction (issue 18); nothing is timed
# ---------------------------------------------------------------------------------------------


def _sparse_case(heads=3):
    from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout, with_extra_dense

    layout = TileLayout((3, 5, 4), (2, 4, 4), extra=6)  # partial edge tiles, text tokens
    g = torch.Generator().manual_seed(3)
    tiles = torch.rand(2, heads, layout.n_tiles, layout.n_tiles, generator=g) < 0.4
    blocks = SparseBlocks.from_tile_mask(layout, with_extra_dense(layout, tiles))
    q, k, v = qkv(B=2, S=layout.tokens, heads=heads)
    return blocks, q, k, v


def test_block_sparse_plan_reports_the_kept_fraction_of_the_call():
    blocks, q, k, v = _sparse_case()
    plan = ops.attention_plan(q, k, v, blocks=blocks)
    # the fraction counted independently, token by token, from the reference's own mask
    kept = blocks.token_mask().expand(2, 3, -1, -1).double().mean().item()
    assert plan.impl == "reference" and "block-sparse on cpu" in plan.reason
    assert plan.kept_fraction == pytest.approx(kept, rel=1e-12)
    assert f"kept {kept:.1%} of the token pairs" in plan.reason and plan.times_ms is None


def test_block_sparse_plan_on_a_gpu_is_our_kernel_untimed(on_a_gpu):
    timer = on_a_gpu()
    blocks, q, k, v = _sparse_case()
    plan = ops.attention_plan(q, k, v, blocks=blocks)
    assert plan.impl == "triton" and "untimed" in plan.reason and timer.calls == [] and P.cached_plans() == {}
    assert plan.kept_fraction == pytest.approx(blocks.kept_fraction())
    assert ops.attention_plan(q, k, v, blocks=blocks, backend="torch").impl == "reference"


def test_block_sparse_plan_rejects_what_the_call_would():
    blocks, q, k, v = _sparse_case()
    with pytest.raises(ValueError, match="grid is a spacetime_attention argument"):
        ops.attention_plan(q, k, v, (3, 5, 4), blocks=blocks)
    with pytest.raises(ValueError, match=r"cannot serve q \(2, 65, 3, 16\)"):
        ops.attention_plan(q[:, :65], k[:, :65], v[:, :65], blocks=blocks)
    with pytest.raises(ValueError, match=r"blocks for \(B, heads\) = \(2, 3\)"):
        ops.attention_plan(q[:, :, :2], k[:, :, :2], v[:, :, :2], blocks=blocks)
    with pytest.raises(TypeError, match="blocks must be a dit_fast.ops.sparse_layout.SparseBlocks, got Tensor"):
        ops.attention_plan(q, k, v, blocks=torch.ones(3))
