"""Every video transformer class of diffusers 0.42 against the "dit_fast" attention backend.

CLASSES is the table: for each class, its tiny cases (tests/diffusers_zoo.py) and what each of its
attention processors does with ``set_attention_backend`` ("dispatch": diffusers' dispatcher, which the
backend reaches; "sdpa": F.scaled_dot_product_attention called by the processor itself; "pinned": a
dispatcher call with backend=FLEX written in; see dit_fast/integrations/diffusers/reach.py). The
table is checked against diffusers itself (the exported classes, each processor's source), so an
upgrade that adds a class or changes a processor fails here first.

For every class the backend reaches: ``set_attention_backend("dit_fast")`` equals diffusers' native
output on dit_fast's torch path (relative error <= 1e-5) and on the Triton kernels (the interpreter
here) within the tolerance rule of tests/utils.py against a float64 run of diffusers' model, with the
kernel launches counted. Calls the kernels cannot run (a causal mask, grouped-query heads, a
per-query mask) go to diffusers' native attention with one RuntimeWarning naming the reason: the
cases list the reasons they must raise, and any other warning is an error. For the classes it cannot
reach the backend warns that it changes nothing. Wan, HunyuanVideo and LTX's backend runs are in
tests/test_diffusers.py (their cases here only check the table).
"""

import copy
import warnings
from typing import Dict, NamedTuple, Tuple

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
import dit_fast.integrations.diffusers  # noqa: E402,F401  (registers the backend)
from dit_fast.integrations.diffusers import backend as dd_backend  # noqa: E402
from dit_fast.integrations.diffusers import reach  # noqa: E402
from tests import diffusers_zoo as zoo  # noqa: E402
from tests.launches import count_launches  # noqa: E402
from tests.test_diffusers import Calls, _restore_active_backend  # noqa: E402,F401  (autouse fixture)
from tests.utils import assert_close_to_reference  # noqa: E402

import diffusers  # noqa: E402

HAS_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_GPU else "cpu"


class Row(NamedTuple):
    cases: Tuple[str, ...]  # tests/diffusers_zoo.py builders; the first builds the class for the table checks
    processors: Dict[str, str]  # processor class -> reach (dit_fast/integrations/diffusers/reach.py)


CLASSES = {
    # the Wan family
    "WanTransformer3DModel": Row(("wan",), {"WanAttnProcessor": "dispatch"}),
    "WanVACETransformer3DModel": Row(("wan_vace",), {"WanAttnProcessor": "dispatch"}),
    "WanAnimateTransformer3DModel": Row(("wan_animate",), {"WanAttnProcessor": "dispatch",
                                                           "WanAnimateFaceBlockAttnProcessor": "dispatch"}),
    "WanAnimate2Transformer3DModel": Row(("wan_animate_2",), {"WanAnimate2AttnProcessor": "partly pinned",
                                                              "WanAnimate2CrossAttnProcessor": "dispatch"}),
    "SkyReelsV2Transformer3DModel": Row(("skyreels_v2", "skyreels_v2_df"), {"SkyReelsV2AttnProcessor": "dispatch"}),
    "ChronoEditTransformer3DModel": Row(("chronoedit",), {"WanAttnProcessor": "dispatch"}),
    # HunyuanVideo (the token refiner's AttnProcessor2_0 calls SDPA itself)
    "HunyuanVideoTransformer3DModel": Row(("hunyuan_video",), {"AttnProcessor2_0": "sdpa",
                                                               "HunyuanVideoAttnProcessor2_0": "dispatch"}),
    "HunyuanVideo15Transformer3DModel": Row(("hunyuan_video15",), {"AttnProcessor2_0": "sdpa",
                                                                   "HunyuanVideo15AttnProcessor2_0": "dispatch"}),
    "HunyuanVideoFramepackTransformer3DModel": Row(("hunyuan_video_framepack",),
                                                   {"AttnProcessor2_0": "sdpa",
                                                    "HunyuanVideoAttnProcessor2_0": "dispatch"}),
    # LTX, Cosmos
    "LTXVideoTransformer3DModel": Row(("ltx",), {"LTXVideoAttnProcessor": "dispatch"}),
    "LTX2VideoTransformer3DModel": Row(("ltx2", "ltx2_stg"), {"LTX2AudioVideoAttnProcessor": "dispatch"}),
    "CosmosTransformer3DModel": Row(("cosmos",), {"CosmosAttnProcessor2_0": "dispatch"}),
    "Cosmos3OmniTransformer": Row(("cosmos3", "cosmos3_mha"), {"Cosmos3AttnProcessor": "dispatch"}),
    # Kandinsky, Helios, MiniMax, Motif, Sana, AnyFlow
    "Kandinsky5Transformer3DModel": Row(("kandinsky5",), {"Kandinsky5AttnProcessor": "dispatch"}),
    "Kandinsky6Transformer3DModel": Row(("kandinsky6",), {"Kandinsky6AttnProcessor": "dispatch"}),
    "Kandinsky6SRTransformer3DModel": Row(("kandinsky6_sr",), {"Kandinsky6SRAttnProcessor": "pinned"}),
    "HeliosTransformer3DModel": Row(("helios",), {"HeliosAttnProcessor": "dispatch"}),
    "MiniMaxH3Transformer3DModel": Row(("minimax_h3",), {"MiniMaxH3AttnProcessor": "dispatch"}),
    "MotifVideoTransformer3DModel": Row(("motif_video",), {"MotifVideoAttnProcessor2_0": "dispatch"}),
    "SanaVideoTransformer3DModel": Row(("sana_video",), {"SanaLinearAttnProcessor3_0": "none",
                                                         "SanaAttnProcessor2_0": "dispatch"}),
    "SanaWMTransformer3DModel": Row(("sana_wm",), {"SanaWMCrossAttnProcessor": "dispatch"}),
    "SanaWMLTX2RefinerTransformer3DModel": Row(("sana_wm_refiner",),
                                               {"SanaWMLTX2RefinerAttnProcessor": "dispatch",
                                                "SanaWMLTX2AudioVideoAttnProcessor": "dispatch"}),
    "AnyFlowTransformer3DModel": Row(("anyflow",), {"AnyFlowAttnProcessor": "dispatch",
                                                    "AnyFlowCrossAttnProcessor": "dispatch"}),
    "AnyFlowFARTransformer3DModel": Row(("anyflow_far",), {"AnyFlowCausalAttnProcessor": "refuses",
                                                           "AnyFlowCrossAttnProcessor": "dispatch"}),
    # processors that call SDPA themselves: only dit_fast.patch reaches them
    "CogVideoXTransformer3DModel": Row(("cogvideox",), {"CogVideoXAttnProcessor2_0": "sdpa"}),
    "MochiTransformer3DModel": Row(("mochi",), {"MochiAttnProcessor2_0": "sdpa"}),
    "EasyAnimateTransformer3DModel": Row(("easyanimate",), {"EasyAnimateAttnProcessor2_0": "sdpa"}),
    "AllegroTransformer3DModel": Row(("allegro",), {"AllegroAttnProcessor2_0": "sdpa"}),
    "LatteTransformer3DModel": Row(("latte",), {"AttnProcessor2_0": "sdpa"}),
    "ConsisIDTransformer3DModel": Row(("consisid",), {"CogVideoXAttnProcessor2_0": "sdpa"}),
}

# diffusers' 3D transformers that are not video DiTs
NOT_VIDEO = {"JoyImageEditTransformer3DModel": "image editing", "JoyImageEditPlusTransformer3DModel": "image editing"}

# case -> the reasons its native fallbacks name (one RuntimeWarning each); every other call runs on dit_fast
FALLBACKS = {
    "skyreels_v2_df": ("a per-query mask",),  # diffusion forcing's block-causal mask over frames
    "hunyuan_video15": ("a per-query mask",),  # (valid query) x (valid key): padded text queries see nothing
    "cosmos3": ("is_causal=True", "grouped-query attention"),  # understanding: causal; generation: GQA
    "cosmos3_mha": ("is_causal=True",),
}
# case -> why diffusers' model has no float64 oracle (the native fp32 output is the reference, fp32 floor)
NO_FP64 = {"kandinsky5": "Kandinsky5TimeEmbeddings computes in fp32",
           "motif_video": "its timestep embedding computes in fp32"}
# tested with the backend in tests/test_diffusers.py
TESTED_ELSEWHERE = ("wan", "hunyuan_video", "ltx")

CASES = {case: name for name, row in CLASSES.items() for case in row.cases}


def _reached(name):
    return any(r in reach.REACHED for r in CLASSES[name].processors.values()) and \
        "refuses" not in CLASSES[name].processors.values()


BACKEND_CASES = [case for case, name in CASES.items() if _reached(name) and case not in TESTED_ELSEWHERE]
KERNEL_CASES = [case for case in BACKEND_CASES if case not in ("hunyuan_video15", "cosmos3")]  # (every call falls back)
UNREACHED_CASES = [row.cases[0] for name, row in CLASSES.items()
                   if not any(r in reach.REACHED for r in row.processors.values())]


class KernelCalls:
    """Counts the calls that reach dit_fast.ops.attention from the backend (it observes, never decides)."""

    def __init__(self, monkeypatch):
        self.count = 0
        attention = dd_backend.attention

        def counting(*args, **kwargs):
            self.count += 1
            return attention(*args, **kwargs)

        monkeypatch.setattr(dd_backend, "attention", counting)


def _to(x, device):
    """Tensors, in lists, tuples and dicts too, on ``device``."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _run(model, inputs, dtype=torch.float32, device="cpu"):
    kwargs = _to(inputs(dtype, torch.Generator().manual_seed(1)), device)
    with torch.no_grad():
        return [t.cpu() for t in zoo.tensors(model.to(device)(**kwargs, return_dict=False))]


def _rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def _expected_warnings(reasons, caught):
    """The fallback warnings of ``caught`` are exactly the ``reasons`` (each once)."""
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == len(reasons), messages
    for reason in reasons:
        assert any(reason in m for m in messages), (reason, messages)


# ---------------------------------------------------------------------------------------------
# The table against diffusers
# ---------------------------------------------------------------------------------------------


def test_table_lists_every_video_transformer_class():
    exported = {n for n in dir(diffusers) if n.endswith("Transformer3DModel")} | {"Cosmos3OmniTransformer"}
    assert exported - set(NOT_VIDEO) == set(CLASSES), "a diffusers upgrade added or removed a class: update CLASSES"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_table_says_what_each_processor_does(name):
    model, _ = zoo.build(CLASSES[name].cases[0])
    assert type(model).__name__ == name
    assert reach.attention_processors(model) == CLASSES[name].processors


# ---------------------------------------------------------------------------------------------
# set_attention_backend("dit_fast") on every class it reaches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_backend_equals_native_torch_path(case, monkeypatch):
    model, inputs = zoo.build(case)
    expected = _run(model, inputs)
    ours = copy.deepcopy(model)
    ours.set_attention_backend("dit_fast")
    calls = KernelCalls(monkeypatch)
    monkeypatch.setattr(dd_backend, "_warned", set())
    with dit_fast.use_backend("torch"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = _run(ours, inputs)
    _expected_warnings(FALLBACKS.get(case, ()), caught)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert _rel_err(a, e) <= 1e-5
    assert (calls.count > 0) == (case in KERNEL_CASES), calls.count


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_backend_on_triton_kernels(case, monkeypatch):
    model, inputs = zoo.build(case)
    ref32 = _run(model, inputs)
    ref64 = ref32 if case in NO_FP64 else _run(copy.deepcopy(model).double(), inputs, torch.float64)
    ours = copy.deepcopy(model)
    ours.set_attention_backend("dit_fast")
    calls = KernelCalls(monkeypatch)
    monkeypatch.setattr(dd_backend, "_warned", set())
    with dit_fast.use_backend("triton"), count_launches() as launches, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = _run(ours, inputs, device=KERNEL_DEVICE)
    _expected_warnings(FALLBACKS.get(case, ()), caught)
    assert calls.count > 0 and launches["_attn_fwd_kernel"] >= calls.count, (calls.count, dict(launches))
    for i, (a, r64, r32) in enumerate(zip(actual, ref64, ref32)):
        assert_close_to_reference(f"{case} output {i}", a, r64, r32)


# ---------------------------------------------------------------------------------------------
# Classes the backend cannot reach: one warning, nothing changed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", UNREACHED_CASES)
def test_set_attention_backend_warns_when_it_changes_nothing(case, monkeypatch):
    model, inputs = zoo.build(case)
    name = type(model).__name__
    patchable = name in dit_fast.integrations.DIFFUSERS_MODELS
    expected = _run(model, inputs)
    with pytest.warns(UserWarning, match=f"changes nothing on {name}") as caught:
        model.set_attention_backend("dit_fast")
    message = next(str(w.message) for w in caught if "changes nothing" in str(w.message))
    assert ("dit_fast.patch(model) installs" in message) == patchable, message
    calls = KernelCalls(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        assert all(torch.equal(a, e) for a, e in zip(_run(model, inputs), expected))
    assert calls.count == 0


def test_set_attention_backend_warns_once_per_call_and_not_for_other_backends():
    model, _ = zoo.build("latte")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_attention_backend("native")
    with pytest.warns(UserWarning) as caught:
        model.set_attention_backend("dit_fast")
    assert len([w for w in caught if "changes nothing" in str(w.message)]) == 1


def test_anyflow_far_causal_processor_refuses_the_backend():
    """FAR's causal processor accepts only flex (its BlockMask): a warning at set_attention_backend, then
    diffusers' own ValueError in the forward."""
    model, inputs = zoo.build("anyflow_far")
    with pytest.warns(UserWarning, match="AnyFlowCausalAttnProcessor accepts only the flex backend"):
        model.set_attention_backend("dit_fast")
    with pytest.raises(ValueError, match="requires the 'flex' attention backend"):
        _run(model, inputs)


# ---------------------------------------------------------------------------------------------
# dit_fast.patch on the families added to tests/test_diffusers.py's five
# ---------------------------------------------------------------------------------------------

# case -> the fused ops its patched forward must reach (a patch that fell through to diffusers' code reaches none)
ADALN = {"layernorm_modulate", "gated_residual", "residual_layernorm_modulate"}
PATCHED = {
    "wan_vace": ADALN | {"apply_rope_3d", "attention"},
    "wan_animate": ADALN | {"apply_rope_3d", "attention"},
    "skyreels_v2": ADALN | {"apply_rope_3d", "attention"},
    "skyreels_v2_df": ADALN | {"apply_rope_3d", "attention"},
    "chronoedit": ADALN | {"attention"},  # RoPE from the model's tables (see wan.py)
    "hunyuan_video15": ADALN | {"apply_rope_3d", "attention"},
    "ltx2": {"attention"},  # RMSNorm blocks stay diffusers'; RoPE from the model's tables
    "ltx2_stg": {"attention"},
    "cosmos": ADALN | {"attention"},  # RoPE from the model's tables
    # processors that call SDPA themselves (their blocks stay, except ConsisID's: CogVideoX's block)
    "easyanimate": {"attention"},
    "allegro": {"attention"},
    "latte": {"attention"},
    "consisid": {"layernorm_modulate", "gated_residual", "attention"},
}
PATCH_FALLBACKS = {"skyreels_v2_df": ("a per-query mask",)}  # the block-causal mask (HunyuanVideo 1.5's: kernels)
# (kernel launches) the Triton kernels each patched family must launch
KERNELS = {"_attn_fwd_kernel", "_adaln_forward_kernel"}
PATCHED_KERNELS = {"wan_vace": KERNELS | {"_rope_3d_kernel"}, "wan_animate": KERNELS | {"_rope_3d_kernel"},
                   "skyreels_v2": KERNELS | {"_rope_3d_kernel"}, "chronoedit": KERNELS,
                   "hunyuan_video15": KERNELS | {"_rope_3d_kernel"}, "ltx2": {"_attn_fwd_kernel"}, "cosmos": KERNELS,
                   "easyanimate": {"_attn_fwd_kernel"}, "allegro": {"_attn_fwd_kernel"},
                   "latte": {"_attn_fwd_kernel"}, "consisid": KERNELS}
PATCH_BACKWARD = ("wan_vace", "skyreels_v2_df", "hunyuan_video15", "cosmos")


def _patched(model, backend="auto"):
    other = copy.deepcopy(model)
    assert dit_fast.patch(other, backend=backend) is other
    return other


@pytest.mark.parametrize("case", list(PATCHED))
def test_patched_equals_native_torch_path(case, monkeypatch):
    model, inputs = zoo.build(case)
    expected = _run(model, inputs)
    patched = _patched(model)
    calls = Calls(monkeypatch)  # the dit_fast ops the patched model reaches (observes, decides nothing)
    monkeypatch.setattr(dd_backend, "_warned", set())
    with dit_fast.use_backend("torch"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = _run(patched, inputs)
    _expected_warnings(PATCH_FALLBACKS.get(case, ()), caught)
    for a, e in zip(actual, expected):
        assert _rel_err(a, e) <= 1e-5
    assert PATCHED[case] <= set(calls.counts), calls.counts
    assert set(patched.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("case", list(PATCHED_KERNELS))
def test_patched_on_triton_kernels(case):
    model, inputs = zoo.build(case)
    ref32 = _run(model, inputs)
    ref64 = _run(copy.deepcopy(model).double(), inputs, torch.float64)
    patched = _patched(model)
    with dit_fast.use_backend("triton"), count_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to diffusers' attention
        actual = _run(patched, inputs, device=KERNEL_DEVICE)
    assert PATCHED_KERNELS[case] <= {k for k, n in launches.items() if n > 0}, dict(launches)
    for i, (a, r64, r32) in enumerate(zip(actual, ref64, ref32)):
        assert_close_to_reference(f"{case} output {i}", a, r64, r32)


def _grads(model, inputs):
    model.train()
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(2))
    x = kwargs["hidden_states"].requires_grad_(True)
    out = zoo.tensors(model(**kwargs, return_dict=False))[0]
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", PATCH_BACKWARD)
def test_patched_backward_equals_native_torch_path(case):
    model, inputs = zoo.build(case)
    out_ref, dx_ref, grads_ref = _grads(copy.deepcopy(model), inputs)
    with dit_fast.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dit_fast attention backend")  # DF's block-causal mask
        out, dx, grads = _grads(_patched(model), inputs)
    assert _rel_err(out, out_ref) <= 1e-5 and _rel_err(dx, dx_ref) <= 1e-5
    assert grads.keys() == grads_ref.keys()
    # a gradient that is zero by the math (a key bias: softmax ignores it) is fp32 noise: judged against
    # a thousandth of the largest gradient, not against itself
    floor = 1e-3 * max(ref.abs().max().item() for ref in grads_ref.values())
    for key, ref in grads_ref.items():
        assert (grads[key] - ref).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), floor), key


def _what_applies(name):
    """What the one line of dit_fast.patch on a class without a plan must say, from the table: the processors
    set_attention_backend reaches (and one that refuses the backend), or nothing."""
    processors = CLASSES[name].processors
    reached = [p for p, r in processors.items() if r in reach.REACHED]
    refusing = [p for p, r in processors.items() if r == "refuses"]
    if not reached:
        return r"nothing in dit_fast applies to it \(" + ".*".join(processors) + r".*\)"
    line = r"model.set_attention_backend\('dit_fast'\) applies: its processors " + ", ".join(reached)
    if refusing:
        return line + f".*but {refusing[0]} accepts only the flex backend"
    return line + r" call diffusers' dispatcher;"


NO_PLAN = [name for name in CLASSES if name not in dit_fast.integrations.DIFFUSERS_MODELS]


@pytest.mark.parametrize("name", NO_PLAN)
def test_patch_on_a_class_without_a_plan_says_what_applies(name):
    """Every class of the table dit_fast.patch has no plan for: one line, the table's answer, the model untouched."""
    model, _ = zoo.build(CLASSES[name].cases[0])
    processors = {n: type(m.processor) for n, m in model.named_modules() if getattr(m, "processor", None) is not None}
    with pytest.raises(ValueError, match=f"no plan for the diffusers model {name}; {_what_applies(name)}") as info:
        dit_fast.patch(model)
    assert "\n" not in str(info.value)
    assert not hasattr(model, "_dit_fast_patched")
    assert processors == {n: type(m.processor) for n, m in model.named_modules()
                          if getattr(m, "processor", None) is not None}


def test_what_applies_names_an_unknown_processor():
    """A processor whose source cannot be read (reach "unknown") counts as reached (it may call the
    dispatcher): the line names it, not an empty list."""
    from diffusers.models.attention_processor import Attention

    namespace = {}  # defined without a source file: its reach cannot be read, "unknown"
    exec("class MyVideoAttnProcessor:\n    def __call__(self, attn, hidden_states, *args, **kwargs):\n"
         "        return hidden_states\n", namespace)
    MyVideoAttnProcessor = namespace["MyVideoAttnProcessor"]

    model = torch.nn.Sequential(Attention(16, heads=2, dim_head=8, processor=MyVideoAttnProcessor()))
    assert reach.attention_processors(model) == {"MyVideoAttnProcessor": "unknown"}
    assert reach.what_applies(model) == ("model.set_attention_backend('dit_fast') applies: its processors "
                                         "MyVideoAttnProcessor call diffusers' dispatcher")


@pytest.mark.parametrize("case", ["wan_vace", "wan_animate", "skyreels_v2", "chronoedit", "hunyuan_video15", "ltx2",
                                  "cosmos", "easyanimate", "allegro", "latte", "consisid"])
def test_patched_model_survives_torch_save_and_load(case):
    """The new families' processors and forwards are module-level (tests/test_diffusers_modules.py's rule)."""
    import io

    model, inputs = zoo.build(case)
    dit_fast.patch(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._dit_fast_patched == model._dit_fast_patched
    with dit_fast.use_backend("torch"):
        assert all(torch.equal(a, b) for a, b in zip(_run(loaded, inputs), _run(model, inputs)))
