"""The "dit_fast" diffusers backend under torch.compile(fullgraph=True), masks included (issue 17).

Eager, the backend reads a mask's checks on the host (one sync) and picks our kernels or diffusers'
native attention. While tracing it may not: the path is decided from the mask's shape and dtype, the
value checks become one device bool, and torch.cond runs one of the two (backend.py,
``_device_checked``). fullgraph=True fails on any graph break, so compiling is the test of "no
break"; the compiled output must equal the eager one. Graphs run with backend="eager" / "aot_eager"
(tracing is what is tested; no code generation), the Triton kernels in the interpreter on CPU, their
launches counted (tests/launches.py): the kernel branch is proven to run, the native branch to run
without them.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
import dit_fast.integrations.diffusers as dd  # noqa: E402
from tests.launches import count_launches  # noqa: E402
from tests.test_diffusers_backend import FALLBACKS, MASKS, _padding, _qkv, _sdpa  # noqa: E402
from tests.test_diffusers import (KERNEL_DEVICE, _grads,  # noqa: E402,F401
                                  _restore_active_backend, assert_launched, build, grad_err, patched_copy, rel_err,
                                  run)


class Graphs:
    """A torch.compile backend that runs each captured graph as it is and counts the graphs and the
    torch.cond calls (the masked attentions checked on the device) in them."""

    def __init__(self):
        self.graphs = self.conds = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.conds += sum(node.target is torch.ops.higher_order.cond for node in gm.graph.nodes)
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces anew: no cached graph, no recompile limit carried from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Models: every patched family and a set_attention_backend("dit_fast") model, with their masks
# ---------------------------------------------------------------------------------------------

# the masked attention calls of one forward (layers=1): LTX's text cross-attention; HunyuanVideo's
# joint attention in its double and its single block; Mochi's joint attention. Wan and CogVideoX
# attend without masks.
MASKED_CALLS = {"wan": 0, "hunyuan_video": 2, "ltx": 1, "cogvideox": 0, "mochi": 1}


def _compiled_equals_eager(model, kwargs, expected_conds):
    graphs = Graphs()
    with torch.no_grad(), dit_fast.use_backend("torch"):
        eager = run(model, kwargs)
        compiled = run(torch.compile(model, fullgraph=True, backend=graphs), kwargs)
    assert graphs.graphs == 1 and graphs.conds == expected_conds, vars(graphs)
    assert rel_err(compiled, eager) <= 1e-6


@pytest.mark.parametrize("name", list(MASKED_CALLS))
def test_patched_model_compiles_with_its_mask(name):
    model, inputs = build(name, layers=1)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every attention on dit_fast's path, eager and compiled
        _compiled_equals_eager(patched_copy(model), kwargs, MASKED_CALLS[name])


def test_set_attention_backend_model_compiles_with_masks():
    """HunyuanVideo on set_attention_backend("dit_fast"), diffusers' own processors: the joint attention
    of its double and its single block, with the text padding, device-checked (its token refiner calls
    SDPA itself)."""
    model, inputs = build("hunyuan_video", layers=1)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(2))
    ours = copy.deepcopy(model)
    ours.set_attention_backend("dit_fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _compiled_equals_eager(ours, kwargs, expected_conds=2)


def test_patched_model_backward_compiles_with_its_mask():
    """LTX's masked cross-attention through torch.cond, differentiated (aot_eager: the joint graph)."""
    model, inputs = build("ltx", layers=1)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(3))
    patched = patched_copy(model)
    with dit_fast.use_backend("torch"):
        out, dx, grads = _grads(patched, kwargs)
        compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
        out_c, dx_c, grads_c = _grads(compiled, kwargs)
    grads_c = {key.removeprefix("_orig_mod."): grad for key, grad in grads_c.items()}
    assert rel_err(out_c, out) <= 1e-6 and rel_err(dx_c, dx) <= 1e-6
    assert grads_c.keys() == grads.keys()
    for key in grads:
        assert grad_err(grads_c, grads, key) <= 1e-6, key
    assert grads["transformer_blocks.0.attn2.to_k.weight"].abs().max() > 0  # the masked attention has a gradient


# ---------------------------------------------------------------------------------------------
# The backend function on the Triton kernels: which branch runs, counted in kernel launches
# ---------------------------------------------------------------------------------------------

# masks the kernels take: the device check holds, our kernel runs
KERNEL_MASKS = ["bool (B, Sk)", "LTX additive (B, heads, 1, Sk)", "bool broadcast over batch (1, 1, Sq, Sk)",
                "bool per head (B, heads, 1, Sk)"]
# masks whose values rule the kernels out: the device check fails, diffusers' native attention runs
VALUE_FALLBACKS = ["additive biases", "per-query mask", "every key masked in one head"]


def _compiled_backend(q, k, v, **kwargs):
    graphs = Graphs()
    fn = torch.compile(dd.dit_fast_attention, fullgraph=True, backend=graphs)
    with dit_fast.use_backend("triton"), count_launches() as launches:
        out = fn(q, k, v, **kwargs)
    assert graphs.graphs == 1, vars(graphs)
    return out, launches, graphs


@pytest.mark.parametrize("mask", KERNEL_MASKS)
def test_compiled_backend_runs_key_padding_masks_on_kernels(mask):
    q, k, v = (t.to(KERNEL_DEVICE) for t in _qkv())
    m = MASKS[mask]().to(q.device)
    with dit_fast.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        eager = dd.dit_fast_attention(q, k, v, attn_mask=m)
        out, launches, graphs = _compiled_backend(q, k, v, attn_mask=m)
    assert graphs.conds == 1
    assert_launched(launches, "_attn_fwd_kernel", 1)
    assert rel_err(out, eager) <= 1e-6
    assert rel_err(out, _sdpa(q, k, v, m[:, None, None, :] if m.dim() == 2 else m)) <= 1e-5


@pytest.mark.parametrize("case", VALUE_FALLBACKS)
def test_compiled_backend_value_fallbacks_run_native_attention(case):
    """A mask the kernels cannot take, known only from its values: the compiled call runs diffusers'
    native attention, bit for bit the eager fallback, and never our kernels."""
    q, k, v = (t.to(KERNEL_DEVICE) for t in _qkv())
    kwargs = FALLBACKS[case][1](q, k, v)
    kwargs["attn_mask"] = kwargs["attn_mask"].to(q.device)
    out, launches, graphs = _compiled_backend(q, k, v, **kwargs)
    assert graphs.conds == 1
    assert launches.total("_attn") == 0, dict(launches)
    torch.testing.assert_close(out, _sdpa(q, k, v, kwargs["attn_mask"]), equal_nan=True, rtol=0, atol=0)


def test_compiled_backend_static_fallbacks_warn_while_tracing(monkeypatch):
    """Reasons known from shapes and dtypes: warned once each while tracing, with their numbers."""
    monkeypatch.setattr(dd.backend, "_warned", set())
    q, k, v = _qkv(d=264)
    mask = MASKS["bool (B, Sk)"]()
    with pytest.warns(RuntimeWarning, match="head dim 264"):
        out, launches, graphs = _compiled_backend(q, k, v, attn_mask=mask)
    assert graphs.conds == 0 and launches.total("_attn") == 0
    torch.testing.assert_close(out, _sdpa(q, k, v, mask[:, None, None, :]), rtol=0, atol=0)
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="dtypes torch.float64"):
        out, launches, graphs = _compiled_backend(q, k, v, attn_mask=mask)
    assert graphs.conds == 0 and launches.total("_attn") == 0
    torch.testing.assert_close(out, _sdpa(q, k, v, mask[:, None, None, :]), rtol=0, atol=0)


def test_compiled_backend_takes_views_of_one_projection():
    """q, k, v chunks of one fused projection (views of one base): torch.cond gets copies, no aliasing error."""
    qkv = torch.randn(2, 19, 3, 3, 24, generator=torch.Generator().manual_seed(8))
    q, k, v = qkv.unbind(2)
    mask = MASKS["bool (B, Sk)"]()
    with dit_fast.use_backend("torch"):
        out = torch.compile(dd.dit_fast_attention, fullgraph=True, backend="eager")(q, k, v, attn_mask=mask)
    assert rel_err(out, _sdpa(q, k, v, mask[:, None, None, :])) <= 1e-6


def test_compiled_backend_return_lse_with_a_mask_is_a_clear_error():
    q, k, v = _qkv()
    fn = torch.compile(dd.dit_fast_attention, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="return_lse with a mask under torch.compile"):
        fn(q, k, v, attn_mask=MASKS["bool (B, Sk)"](), return_lse=True)


# masks no path can run (SDPA, diffusers' native attention, refuses them too), with fp32 q (B 2, Sq 37, heads 3,
# Sk 19): one error naming the mask, eagerly and compiled, whatever its values (before, a 1-D or fp64 key padding
# mask ran our kernel eagerly but failed to trace torch.cond's native branch, and additive ones failed in SDPA)
BAD_MASKS = {
    "1-D (Sk,)": (ValueError, "shape \\(19,\\)", lambda: _padding()[0]),
    "(B, 1, Sk)": (ValueError, "shape \\(2, 1, 19\\)", lambda: _padding()[:, None, :]),
    "float64": (TypeError, "float32 or the query's dtype", lambda: ((1 - _padding().double()) * -10000.0)),
    "int32": (TypeError, "bool .* or float", lambda: _padding().int()),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_backend_refuses_a_mask_no_path_takes_eagerly_and_compiled(case):
    error, match, make = BAD_MASKS[case]
    q, k, v = _qkv()
    with dit_fast.use_backend("torch"):
        with pytest.raises(error, match=match):
            dd.dit_fast_attention(q, k, v, attn_mask=make())
        with pytest.raises(Exception, match=match):  # Dynamo's error quotes ours
            torch.compile(dd.dit_fast_attention, fullgraph=True, backend="eager")(q, k, v, attn_mask=make())


def test_backend_fp32_mask_with_bf16_queries_eagerly_and_compiled():
    """A float32 mask with bf16 q, k, v (SDPA takes it): the same result eagerly and compiled, for a padding mask
    (our kernel) and for additive biases (native attention)."""
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    padding = (1 - _padding().float()) * -10000.0
    biases = torch.randn(2, 1, 37, 19, generator=torch.Generator().manual_seed(5))
    with dit_fast.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the biases' fallback
        for mask in (padding, biases):
            eager = dd.dit_fast_attention(q, k, v, attn_mask=mask)
            torch._dynamo.reset()
            compiled = torch.compile(dd.dit_fast_attention, fullgraph=True, backend="eager")(q, k, v, attn_mask=mask)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compiled_backend_under_inductor():
    """One Inductor case (the slowest compile here, ~10 s of CPU): one graph, its torch.cond lowered with
    our custom op in one branch, serves two masks of one shape and dtype: LTX's -10000 text padding runs
    the kernel, additive biases run native attention."""
    q, k, v = (t.to(KERNEL_DEVICE) for t in _qkv())
    padding = MASKS["LTX additive (B, heads, 1, Sk)"]().to(q.device)
    biases = torch.randn(padding.shape, generator=torch.Generator().manual_seed(9)).to(q.device)
    fn = torch.compile(dd.dit_fast_attention, fullgraph=True, backend="inductor")
    with dit_fast.use_backend("triton"):
        with count_launches() as on_padding:
            out = fn(q, k, v, attn_mask=padding)
        with count_launches() as on_biases, torch.compiler.set_stance("fail_on_recompile"):
            out_biases = fn(q, k, v, attn_mask=biases)
    assert_launched(on_padding, "_attn_fwd_kernel", 1)
    assert on_biases.total("_attn") == 0, dict(on_biases)
    assert rel_err(out, _sdpa(q, k, v, padding)) <= 1e-5
    assert rel_err(out_biases, _sdpa(q, k, v, biases)) <= 1e-5


def test_patched_mochi_packs_a_text_mask_with_holes_as_mochi_does():
    """Mochi runs each prompt's valid tokens packed first; the patched processor packs them on the device
    (no host read), so a mask with holes equals diffusers' output eagerly and compiled. Two layers: the
    packed text stream of the first is what the second attends to."""
    model, inputs = build("mochi", layers=2)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(1))
    holes = torch.ones_like(kwargs["encoder_attention_mask"])
    holes[0, 2] = 0
    holes[1, [1, 4, 5]] = 0
    kwargs = dict(kwargs, encoder_attention_mask=holes)
    with torch.no_grad():
        expected = run(model, kwargs)
    patched = patched_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad(), dit_fast.use_backend("torch"):
            assert rel_err(run(patched, kwargs), expected) <= 1e-5
        _compiled_equals_eager(patched, kwargs, 2 * MASKED_CALLS["mochi"])


def test_compiled_backend_runs_a_flex_block_mask(monkeypatch):
    """Kandinsky 5's NABLA BlockMask under torch.compile(fullgraph=True): diffusers' flex attention, warned while
    tracing (a warnings.warn in the traced code was a graph break, so fullgraph failed), flex's own result."""
    from diffusers.models import attention_dispatch
    from torch.nn.attention.flex_attention import create_block_mask

    monkeypatch.setattr(dd.backend, "_warned", set())
    q, k, v = (torch.randn(1, 40, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    block_mask = create_block_mask(lambda b, h, qi, ki: (qi // 8) >= (ki // 8), None, None, 40, 40, device="cpu")
    with pytest.warns(RuntimeWarning, match="BlockMask as attn_mask .* run diffusers' flex attention"):
        out = torch.compile(dd.dit_fast_attention, fullgraph=True, backend="eager")(q, k, v, attn_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        expected = attention_dispatch._native_flex_attention(q, k, v, attn_mask=block_mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
