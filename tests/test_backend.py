"""Backend resolution (dit_fast/_backend.py): precedence call > use_backend > $DIT_FAST_BACKEND > auto,
nesting and unwinding of use_backend blocks (also across threads), bad names, what "auto" resolves to
on a GPU (stated through the device facts, so the real decision runs on this CPU), and the GPU branch
of "auto" traced by torch.compile. Compiled models and ops: tests/test_compile.py."""

import threading

import pytest
import torch
import torch._dynamo.testing

import dit_fast
from dit_fast import _backend
from dit_fast._backend import BackendUnavailableError, requested_backend, resolve_backend, use_backend


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("DIT_FAST_BACKEND", raising=False)
    yield
    assert _backend._scope_stack == [] and _backend._scoped is None, "a test left a use_backend block open"
    assert type(_backend.device_facts()) is _backend.DeviceFacts, "a test left stated device facts in place"


@pytest.fixture
def stated():
    """stated(gpu, runnable): the device facts of another machine, for the rest of the test."""
    previous = []

    def state(gpu=True, runnable=("triton",)):
        previous.append(_backend.set_device_facts(_backend.StatedFacts(gpu, runnable)))

    yield state
    if previous:
        _backend.set_device_facts(previous[0])


def test_precedence_call_block_environment_auto(monkeypatch):
    assert requested_backend("auto") == "auto"
    monkeypatch.setenv("DIT_FAST_BACKEND", "cuda")
    assert requested_backend("auto") == "cuda"  # the environment beats auto
    with use_backend("triton"):
        assert requested_backend("auto") == "triton"  # the block beats the environment
        assert requested_backend("torch") == "torch"  # the call beats the block
        with use_backend("auto"):  # an inner "auto" block hands the choice back to the environment
            assert requested_backend("auto") == "cuda"
    assert requested_backend("auto") == "cuda"
    monkeypatch.setenv("DIT_FAST_BACKEND", "  torch ")  # read on every eager call, stripped
    assert requested_backend("auto") == "torch"


def test_blocks_nest_and_unwind():
    with use_backend("torch"):
        with use_backend("triton"):
            with use_backend("cuda"):
                assert requested_backend() == "cuda"
            assert requested_backend() == "triton"
        assert requested_backend() == "torch"
    assert requested_backend() == "auto"


def test_blocks_unwind_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with use_backend("torch"):
            raise RuntimeError("boom")
    assert requested_backend() == "auto"


def test_blocks_leaving_out_of_order_unwind_to_the_right_state():
    """Two overlapping blocks that leave in the order they entered (two threads, two generators): each
    removes itself, so the state after both is the state before both."""
    a, b = use_backend("torch"), use_backend("triton")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert requested_backend() == "triton"  # b is still open
    b.__exit__(None, None, None)
    assert requested_backend() == "auto"


def test_blocks_in_threads_leave_a_clean_state():
    errors = []

    def worker(name):
        try:
            for _ in range(200):
                with use_backend(name):
                    assert requested_backend() in ("torch", "triton")  # process-wide: some open block's name
        except Exception as exc:  # reported below, with the thread's name
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("torch", "triton", "torch")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert requested_backend() == "auto"


def test_bad_names_say_where_they_came_from(monkeypatch):
    with pytest.raises(ValueError, match="use_backend: unknown backend 'fastest'"):
        use_backend("fastest")
    with pytest.raises(ValueError, match="backend: unknown backend 'gpu'"):
        requested_backend("gpu")
    monkeypatch.setenv("DIT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DIT_FAST_BACKEND: unknown backend 'bogus'"):
        requested_backend("auto")
    assert requested_backend("torch") == "torch"  # an explicit call never reads the environment


def test_auto_resolves_to_the_reference_on_cpu_and_explicit_unavailable_raises():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "op") == "torch"
    with pytest.raises(BackendUnavailableError, match="op: backend 'cuda' cannot run: .*CUDA device"):
        resolve_backend("cuda", cpu, "op")
    with pytest.raises(BackendUnavailableError, match="op: no 'cuda' implementation"):
        resolve_backend("cuda", cpu, "op", implemented=("triton",))
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="CUDA device"):
        resolve_backend("auto", cpu, "op")


def test_auto_on_a_gpu_plans_attention_even_with_one_kernel_backend(stated):
    """Issue 17: attention has one kernel backend (Triton) but a rival to time (torch's SDPA / Flex), so on
    a GPU its "auto" goes to the planner; an op without a planner runs its one runnable kernel backend
    (nothing to time), and "auto" between several. The facts are stated, the decision is the real one."""
    cpu = torch.device("cpu")
    attention = dict(implemented=("triton",), planned=True)
    stated(gpu=True, runnable=("triton",))
    assert resolve_backend("auto", cpu, "attention", **attention) == "auto"
    assert resolve_backend("auto", cpu, "adaln") == "triton"  # adaLN / RoPE / patchify: triton and cuda
    assert resolve_backend("auto", cpu, "adaln", implemented=("triton",)) == "triton"
    assert resolve_backend("triton", cpu, "attention", **attention) == "triton"  # explicit: never planned
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run: 'cuda' is not runnable on the stated"):
        resolve_backend("cuda", cpu, "adaln")
    stated(gpu=True, runnable=("triton", "cuda"))
    assert resolve_backend("auto", cpu, "adaln") == "auto"  # two kernel backends: timed (pick_fastest)
    assert resolve_backend("auto", cpu, "attention", **attention) == "auto"
    stated(gpu=True, runnable=())
    assert resolve_backend("auto", cpu, "attention", **attention) == "torch"  # no kernel: the reference
    assert resolve_backend("auto", cpu, "adaln") == "torch"
    stated(gpu=False, runnable=("triton",))
    assert resolve_backend("auto", cpu, "attention", **attention) == "torch"  # not a GPU: the reference
    assert resolve_backend("triton", cpu, "attention", **attention) == "triton"


def test_this_machines_facts_and_bad_facts(stated):
    facts = _backend.device_facts()
    assert type(facts) is _backend.DeviceFacts
    assert facts.is_gpu(torch.device("cuda")) and not facts.is_gpu(torch.device("cpu"))
    assert "CUDA device" in facts.unavailable_reason("cuda", torch.device("cpu"))
    with pytest.raises(TypeError, match="facts must be a DeviceFacts"):
        _backend.set_device_facts("gpu")
    with pytest.raises(ValueError, match="StatedFacts: unknown backend 'gpu'"):
        _backend.StatedFacts(True, ("gpu",))
    with pytest.raises(TypeError, match="runnable must be a tuple of backend names"):
        _backend.StatedFacts(True, "triton")  # not the characters of "triton"
    with pytest.raises(TypeError, match="gpu must be True or False"):
        _backend.StatedFacts("cuda")
    stated(gpu=True)
    assert _backend.set_device_facts(None) is not facts  # returns the stated ones; None restores this machine's
    assert type(_backend.device_facts()) is _backend.DeviceFacts


def _as_number(name):
    return float(("torch", "triton", "cuda", "auto").index(name))


@pytest.mark.parametrize("device, facts", [("cpu", None), ("cuda", None), ("cpu", "gpu with triton")])
def test_resolution_traces_with_fullgraph(device, facts, stated):
    """The whole resolution, including the GPU branch of "auto" (the device facts, availability checks,
    the extension's state, the environment), traces without a graph break and gives the eager answer.
    Only the device object is "cuda", or the facts are stated: no GPU is needed to trace the branch."""
    dev = torch.device(device)
    if facts:
        stated(gpu=True, runnable=("triton",))

    def f(x):
        return (x + _as_number(resolve_backend("auto", dev, "op"))
                + 10 * _as_number(resolve_backend("auto", dev, "attention", ("triton",), planned=True)))

    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    x = torch.zeros(2)
    assert compiled(x).tolist() == f(x).tolist()
    assert counter.frame_count == 1


def test_use_backend_in_a_compiled_function_and_between_calls():
    """Entering a block inside the traced code works, and a block around a compiled call is seen:
    Dynamo guards on the innermost block's name, so the graph compiled for one name is not reused for
    another, and leaving the block reuses the first graph."""

    def f(x):
        with use_backend("triton"):
            inner = requested_backend()
        return x + _as_number(inner) * 10 + _as_number(requested_backend())

    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    x = torch.zeros(1)
    assert compiled(x).item() == 10 + 3  # inside: triton; after the inner block: auto
    with use_backend("torch"):
        assert compiled(x).item() == 10 + 0
    assert compiled(x).item() == 10 + 3
    assert counter.frame_count == 2  # one graph per outer block name, the first reused
    assert _backend._scope_stack == []


def test_use_backend_is_exported():
    assert dit_fast.use_backend is use_backend


def test_size_classes_are_plain_ints_also_for_symbolic_sizes():
    """shape_class and exact_int turn a size into an int by comparisons only, so a dynamic-shape trace
    gets ints it can key a cache on (Dynamo specialises by guards) instead of failing."""
    assert [_backend.shape_class(n) for n in (0, 1, 2, 3, 9, 16, 17)] == [1, 1, 2, 4, 16, 16, 32]
    assert all(_backend.exact_int(n) == n for n in range(0, 600))

    @torch.compiler.assume_constant_result  # accepts only constants: fails on a symbolic size
    def as_float(key):
        return float(sum(key))

    def f(x):
        return x + as_float((_backend.shape_class(x.shape[0]), _backend.exact_int(x.shape[1])))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager", dynamic=True)
    for shape in ((5, 72), (6, 72), (5, 40)):
        x = torch.zeros(shape)
        assert compiled(x).tolist() == f(x).tolist()
    torch._dynamo.reset()


def test_env_reader_is_marked_as_assume_constant_result_does():
    """_backend marks _getenv by hand (importing torch._dynamo at `import dit_fast` costs ~1.4 s):
    the mark must be the one torch.compiler.assume_constant_result sets."""
    from dit_fast import _backend

    marked = torch.compiler.assume_constant_result(lambda: 0)
    attrs = {k for k in vars(marked) if k.startswith("_dynamo")}
    assert attrs == {"_dynamo_marked_constant"}
    assert _backend._getenv._dynamo_marked_constant is True
    assert _backend.assume_constant_result(lambda: 0)._dynamo_marked_constant is True


def test_import_does_not_load_dynamo():
    import subprocess
    import sys

    code = "import sys, dit_fast; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "import dit_fast imported torch._dynamo"
