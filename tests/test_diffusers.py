"""dit_fast in diffusers: the "dit_fast" attention backend and dit_fast.patch on diffusers' video DiTs.

Tiny models from configs (3 heads, head dim 24 or 48, a 3 x 3 x 5 token grid, padded text), every
parameter perturbed so that no zero-initialised gate hides a branch. The patched model (and a model
on set_attention_backend("dit_fast")) must equal diffusers' own output: on dit_fast's torch path to
fp32 rounding (relative error <= 1e-5), on the Triton kernels (CPU interpreter here) within the
tolerance rule of tests/utils.py against a float64 run of diffusers' model. Triton cases are few and
one block deep: the interpreter is slow.
"""

import copy
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
import dit_fast.integrations.diffusers as dd  # noqa: E402
from dit_fast.integrations.diffusers import backend as dd_backend  # noqa: E402
from dit_fast.models import DiT_models  # noqa: E402
from tests.launches import count_launches  # noqa: E402
from tests.utils import REPO_ROOT, assert_close_to_reference  # noqa: E402

import diffusers  # noqa: E402
from diffusers.models import attention_dispatch  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

HAS_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_GPU else "cpu"
B, TEXT = 2, 7
VIDEO = (3, 6, 10)  # (F, H, W) latents; 2 x 2 spatial patches -> a 3 x 3 x 5 grid, 45 tokens (partial tiles)
GRID_TOKENS = 45


# ---------------------------------------------------------------------------------------------
# Tiny models and inputs (also used by tests/test_diffusers_parallel.py)
# ---------------------------------------------------------------------------------------------


def perturb_(model, seed=0, std=0.1):
    """Adds noise to every parameter: zero-initialised gates, tables and norms all become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def text_mask(dtype=torch.bool):
    mask = torch.ones(B, TEXT, dtype=dtype)
    mask[1, 4:] = 0  # the second prompt is padded
    return mask


def build(name, layers=2, seed=0):
    """(model, inputs(dtype, generator) -> forward kwargs) for one tiny model of a supported family."""
    from diffusers import (CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel,
                           MochiTransformer3DModel, WanTransformer3DModel)

    def video(g, dtype):
        return torch.randn(B, 4, *VIDEO, generator=g).to(dtype)

    def text(g, dtype, dim=16, length=TEXT):
        return torch.randn(B, length, dim, generator=g).to(dtype)

    t = torch.tensor([10.0, 700.0])
    if name.startswith("wan"):
        extra = dict(image_dim=12, added_kv_proj_dim=72) if name == "wan_i2v" else {}
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=24,
                                      in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=40,
                                      num_layers=layers, rope_max_seq_len=32, **extra)

        def inputs(dtype, g):
            kw = dict(hidden_states=video(g, dtype), encoder_hidden_states=text(g, dtype), timestep=t)
            if name == "wan_per_token":  # Wan 2.2 TI2V: one timestep per token
                kw["timestep"] = torch.randint(0, 1000, (B, GRID_TOKENS), generator=g).float()
            if name == "wan_i2v":  # 512 text tokens (hard-coded in Wan's processor) after 5 image tokens
                kw["encoder_hidden_states"] = text(g, dtype, length=512)
                kw["encoder_hidden_states_image"] = text(g, dtype, dim=12, length=5)
            return kw
    elif name.startswith("hunyuan_video"):
        extra = dict(image_condition_type="token_replace") if name == "hunyuan_video_i2v" else {}
        model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=3,
                                               attention_head_dim=24, num_layers=layers // 2 or 1,
                                               num_single_layers=layers // 2 or 1, num_refiner_layers=1,
                                               mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
                                               pooled_projection_dim=8, rope_axes_dim=(8, 8, 8), **extra)

        def inputs(dtype, g):
            return dict(hidden_states=video(g, dtype), timestep=t, encoder_hidden_states=text(g, dtype),
                        encoder_attention_mask=text_mask(torch.long),
                        pooled_projections=torch.randn(B, 8, generator=g).to(dtype),
                        guidance=torch.tensor([3000.0, 4500.0]))
    elif name == "ltx":
        model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=3, attention_head_dim=24,
                                           cross_attention_dim=72, num_layers=layers, caption_channels=16)

        def inputs(dtype, g):
            return dict(hidden_states=torch.randn(B, GRID_TOKENS, 4, generator=g).to(dtype),
                        encoder_hidden_states=text(g, dtype), timestep=t, encoder_attention_mask=text_mask(torch.long),
                        num_frames=3, height=3, width=5)
    elif name == "cogvideox":
        model = CogVideoXTransformer3DModel(num_attention_heads=3, attention_head_dim=48, in_channels=4,
                                            out_channels=4, time_embed_dim=16, text_embed_dim=16, num_layers=layers,
                                            sample_width=10, sample_height=6, sample_frames=9, patch_size=2,
                                            max_text_seq_length=TEXT, use_rotary_positional_embeddings=True)
        cos, sin = get_3d_rotary_pos_embed(48, crops_coords=((0, 0), (3, 5)), grid_size=(3, 5), temporal_size=3)

        def inputs(dtype, g):
            return dict(hidden_states=torch.randn(B, 3, 4, 6, 10, generator=g).to(dtype),
                        encoder_hidden_states=text(g, dtype), timestep=t,
                        image_rotary_emb=(cos.to(dtype), sin.to(dtype)))
    elif name == "mochi":
        model = MochiTransformer3DModel(patch_size=2, num_attention_heads=3, attention_head_dim=24, num_layers=layers,
                                        pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=8,
                                        max_sequence_length=TEXT)

        def inputs(dtype, g):
            return dict(hidden_states=video(g, dtype), encoder_hidden_states=text(g, dtype), timestep=t,
                        encoder_attention_mask=text_mask(torch.long))
    else:
        raise ValueError(name)
    return perturb_(model, seed), inputs


MODELS = ("wan", "wan_per_token", "wan_i2v", "hunyuan_video", "hunyuan_video_i2v", "ltx", "cogvideox", "mochi")


def run(model, kwargs, device="cpu"):
    kwargs = {k: v.to(device) if torch.is_tensor(v) else tuple(x.to(device) for x in v) if isinstance(v, tuple) else v
              for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")  # Mochi's RoPE asks CPU autocast for fp32
        return model.to(device)(**kwargs, return_dict=False)[0]


def rel_err(actual, expected):
    return ((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max()
            / expected.detach().double().abs().max().clamp_min(1e-30)).item()


def grad_err(grads, grads_ref, key):
    """rel_err of one parameter's gradient, a bias's measured on its layer's scale: max |a - b| over the larger
    of max |b| and its weight's max |gradient|. A key projection's bias without RoPE after it has a zero
    gradient (softmax ignores a shift common to every key), so its values are rounding noise (~1e-7 beside a
    weight gradient ~1) that no relative error of their own can compare."""
    scale = grads_ref[key].detach().double().abs().max()
    weight = key.removesuffix(".bias") + ".weight"
    if key.endswith(".bias") and weight in grads_ref:
        scale = torch.maximum(scale, grads_ref[weight].detach().double().abs().max())
    return ((grads[key].detach().double() - grads_ref[key].detach().double()).abs().max()
            / scale.clamp_min(1e-30)).item()


def patched_copy(model, backend="auto"):
    other = copy.deepcopy(model)
    assert dit_fast.patch(other, backend=backend) is other
    return other


class Calls:
    """Counts the dit_fast ops the integration reaches (a test that passed through diffusers' own code would
    see none)."""

    def __init__(self, monkeypatch):
        from dit_fast import ops
        self.counts = {}
        for module, name in ((ops, "apply_rope_3d"), (ops, "layernorm_modulate"), (ops, "gated_residual"),
                             (ops, "residual_layernorm_modulate"), (dd_backend, "attention")):
            monkeypatch.setattr(module, name, self._counting(name, getattr(module, name)))

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper


# which fused ops each patched family must reach in a forward
EXPECTED_OPS = {
    "wan": {"apply_rope_3d", "layernorm_modulate", "gated_residual", "residual_layernorm_modulate", "attention"},
    "hunyuan_video": {"apply_rope_3d", "layernorm_modulate", "gated_residual", "residual_layernorm_modulate",
                      "attention"},
    "hunyuan_video_i2v": {"apply_rope_3d", "attention"},
    "ltx": {"gated_residual", "attention"},
    "cogvideox": {"layernorm_modulate", "gated_residual", "attention"},
    "mochi": {"attention"},
}


@pytest.fixture(autouse=True)
def _restore_active_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put it back after each test."""
    registry = attention_dispatch._AttentionBackendRegistry
    active = registry._active_backend
    yield
    registry.set_active_backend(active)


# ---------------------------------------------------------------------------------------------
# dit_fast.patch: equal to diffusers' own model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_patched_model_equals_diffusers_torch_path(name, monkeypatch):
    model, inputs = build(name)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = run(model, kwargs)
        patched = patched_copy(model)
        calls = Calls(monkeypatch)
        with dit_fast.use_backend("torch"), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to diffusers' attention
            actual = run(patched, kwargs)
    assert rel_err(actual, expected) <= 1e-5
    family = name if name in EXPECTED_OPS else name.split("_per_token")[0].split("_i2v")[0]
    assert EXPECTED_OPS[family] <= set(calls.counts), calls.counts
    assert set(patched.state_dict()) == set(model.state_dict())


def _loss_weights(out, seed=5):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)


def _grads(model, kwargs, device="cpu", dtype=torch.float32):
    model = model.to(device).train()
    model.zero_grad()
    x = kwargs["hidden_states"].to(device).requires_grad_(True)
    out = run(model, {**kwargs, "hidden_states": x}, device)
    (out.to(torch.float64) * _loss_weights(out).double()).sum().backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().cpu(), x.grad.detach().cpu(), grads


@pytest.mark.parametrize("name", ["wan", "wan_per_token", "hunyuan_video"])
def test_patched_backward_equals_diffusers_torch_path(name):
    model, inputs = build(name)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(2))
    out_ref, dx_ref, grads_ref = _grads(model, kwargs)
    with dit_fast.use_backend("torch"):
        out, dx, grads = _grads(patched_copy(model), kwargs)
    assert rel_err(out, out_ref) <= 1e-5
    assert rel_err(dx, dx_ref) <= 1e-5
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:
        assert grad_err(grads, grads_ref, key) <= 1e-5, key
    # the perturbed gates let every block's attention receive a gradient
    attn_grads = [k for k in grads if k.endswith("to_q.weight")]
    assert attn_grads and all(grads[k].abs().max() > 0 for k in attn_grads)


@pytest.mark.parametrize("name", ["wan", "wan_per_token", "hunyuan_video", "cogvideox"])
def test_patched_model_in_bf16_within_tolerance(name):
    """bf16 weights and activations: within the tolerance rule of diffusers' own bf16 error (the adaLN ops keep
    statistics, modulation and residual in fp32; Wan's fp32 modulation is rounded to bf16 first)."""
    model, inputs = build(name)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(6))
    model64, kwargs64 = _fp64_reference(model, kwargs)
    as16 = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
            for k, v in kwargs.items()}
    if "image_rotary_emb" in kwargs:
        as16["image_rotary_emb"] = kwargs["image_rotary_emb"]  # fp32 tables, as the pipeline passes them
    model16 = copy.deepcopy(model).bfloat16()
    with torch.no_grad():
        ref64, ref16 = run(model64, kwargs64), run(model16, as16)
        with dit_fast.use_backend("torch"):
            out = run(patched_copy(model16), as16)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(name, out, ref64, ref16)


def _fp64_reference(model, kwargs):
    """diffusers' model in float64 (the oracle) and in float32 (PyTorch's own error)."""
    as64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
            for k, v in kwargs.items()}
    if "image_rotary_emb" in kwargs:
        as64["image_rotary_emb"] = tuple(x.double() for x in kwargs["image_rotary_emb"])
    return copy.deepcopy(model).double(), as64


# attention calls of one forward of each tiny model in test_patched_model_on_triton_kernels (1 layer; HunyuanVideo
# 1 double and 1 single block): Wan and LTX self + cross; HunyuanVideo, CogVideoX and Mochi one joint attention
ATTENTION_CALLS = {"wan": 2, "hunyuan_video": 2, "ltx": 2, "cogvideox": 1, "mochi": 1}
ATTENTION_BACKWARD_KERNELS = ("_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def assert_launched(launches, kernel, times):
    """``kernel`` ran ``times`` times: exactly in the interpreter; at least on a GPU, where a cold autotuner
    launches each configuration it times."""
    assert launches[kernel] == times or (HAS_GPU and launches[kernel] > times), (kernel, times, dict(launches))


def assert_fused_ops_launched(launches, family):
    """The adaLN and RoPE kernels of the ops the family's patch reaches (EXPECTED_OPS) ran."""
    ops = EXPECTED_OPS[family]
    if ops & {"layernorm_modulate", "gated_residual", "residual_layernorm_modulate"}:
        assert launches["_adaln_forward_kernel"] > 0, dict(launches)
    if "apply_rope_3d" in ops:
        assert launches["_rope_3d_kernel"] > 0, dict(launches)


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "ltx", "cogvideox", "mochi"])
def test_patched_model_on_triton_kernels(name):
    """The Triton kernels (interpreter on CPU) within the tolerance rule; the backward too for Wan and
    HunyuanVideo. Every attention call launches the kernels (counted), none falls back to diffusers'
    attention (a fallback's RuntimeWarning is an error)."""
    model, inputs = build(name, layers=1 if name != "hunyuan_video" else 2)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(3))
    model64, kwargs64 = _fp64_reference(model, kwargs)
    backward = name in ("wan", "hunyuan_video")
    if not backward:
        with torch.no_grad():
            ref64, ref32 = run(model64, kwargs64), run(model, kwargs)
            with dit_fast.use_backend("triton"), count_launches() as launches, warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                out = run(patched_copy(model), kwargs, KERNEL_DEVICE).cpu()
        assert_launched(launches, "_attn_fwd_kernel", ATTENTION_CALLS[name])
        assert_fused_ops_launched(launches, name)
        assert_close_to_reference(name, out, ref64, ref32)
        return
    ref64, dx64, grads64 = _grads(model64, kwargs64, dtype=torch.float64)
    ref32, dx32, grads32 = _grads(model, kwargs)
    with dit_fast.use_backend("triton"), count_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, dx, grads = _grads(patched_copy(model), kwargs, KERNEL_DEVICE)
    for kernel in ("_attn_fwd_kernel",) + ATTENTION_BACKWARD_KERNELS:
        assert_launched(launches, kernel, ATTENTION_CALLS[name])
    assert_fused_ops_launched(launches, name)
    assert launches["_adaln_backward_kernel"] > 0, dict(launches)
    assert_close_to_reference(name, out, ref64, ref32)
    assert_close_to_reference(f"{name} d(input)", dx, dx64, dx32)
    for key in grads64:
        assert_close_to_reference(f"{name} d({key})", grads[key], grads64[key], grads32[key])


# ---------------------------------------------------------------------------------------------
# set_attention_backend("dit_fast") / attention_backend("dit_fast")
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "ltx"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_set_attention_backend(name, backend, monkeypatch):
    model, inputs = build(name, layers=2 if backend == "torch" else 1)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = run(model, kwargs)
        if backend == "triton":
            model64, kwargs64 = _fp64_reference(model, kwargs)
            expected64 = run(model64, kwargs64)
        ours = copy.deepcopy(model)
        ours.set_attention_backend("dit_fast")
        calls = Calls(monkeypatch)
        with dit_fast.use_backend(backend), count_launches() as launches, warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # LTX's -10000 text mask runs on our kernels
            actual = run(ours, kwargs, "cpu" if backend == "torch" else KERNEL_DEVICE).cpu()
    assert calls.counts.get("attention", 0) > 0
    if backend == "torch":
        assert rel_err(actual, expected) <= 1e-5
        assert launches.total() == 0
    else:
        assert calls.counts == {"attention": ATTENTION_CALLS[name]}  # 1 layer, as in the patched models' test
        assert_launched(launches, "_attn_fwd_kernel", ATTENTION_CALLS[name])
        assert_close_to_reference(name, actual, expected64, expected)


def test_small_head_dim_model_on_triton_kernels():
    """Head dim 10, as in diffusers' own tiny test configs (HunyuanVideo's: 2 heads of 10, RoPE axes
    (2, 4, 4)): on set_attention_backend("dit_fast") every attention call runs our kernels, forward and
    backward (launches counted, no fallback warning), within the tolerance rule."""
    from diffusers import HunyuanVideoTransformer3DModel

    _, inputs = build("hunyuan_video", layers=1)  # the inputs do not depend on the head dim
    torch.manual_seed(0)
    model = perturb_(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)))
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(3))
    model64, kwargs64 = _fp64_reference(model, kwargs)
    ref64, dx64, grads64 = _grads(model64, kwargs64, dtype=torch.float64)
    ref32, dx32, grads32 = _grads(model, kwargs)
    ours = copy.deepcopy(model)
    ours.set_attention_backend("dit_fast")
    with dit_fast.use_backend("triton"), count_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, dx, grads = _grads(ours, kwargs, KERNEL_DEVICE)
    for kernel in ("_attn_fwd_kernel",) + ATTENTION_BACKWARD_KERNELS:  # the double and the single block
        assert_launched(launches, kernel, 2)
    assert_close_to_reference("head dim 10", out, ref64, ref32)
    assert_close_to_reference("head dim 10 d(input)", dx, dx64, dx32)
    for key in grads64:
        assert_close_to_reference(f"head dim 10 d({key})", grads[key], grads64[key], grads32[key])


def test_attention_backend_context_routes_to_dit_fast(monkeypatch):
    calls = Calls(monkeypatch)
    q, k, v = (torch.randn(2, 9, 3, 16) for _ in range(3))
    with attention_dispatch.attention_backend("dit_fast"):
        out = attention_dispatch.dispatch_attention_fn(q, k, v)
    assert calls.counts == {"attention": 1}
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert rel_err(out, expected.transpose(1, 2)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Registration, versions, bad input
# ---------------------------------------------------------------------------------------------


def test_backend_registration_is_idempotent():
    names = attention_dispatch.AttentionBackendName
    before = len(names)
    member = dd.register_backend()
    assert dd.register_backend() is member and len(names) == before
    assert member is names("dit_fast") is names.DIT_FAST is names["DIT_FAST"]
    assert member in names and "dit_fast" in {m.value for m in names.__members__.values()}
    registry = attention_dispatch._AttentionBackendRegistry
    assert registry._backends[member] is dd.dit_fast_attention
    assert registry._is_context_parallel_available(member)


def test_tested_range_matches_pyproject():
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert text.count(f'"diffusers{dd.TESTED_DIFFUSERS}"') == 2  # the test extra and the diffusers extra
    assert diffusers.__version__ and dd.check_diffusers_version(diffusers.__version__) is None


@pytest.mark.parametrize("version", ["0.41.0", "0.43.0", "0.43.0.dev0", "1.0", "not-a-version"])
def test_diffusers_outside_tested_range_is_a_clear_error(version, monkeypatch):
    monkeypatch.delenv(dd.ALLOW_ENV, raising=False)
    with pytest.raises(ImportError, match=r"diffusers>=0\.42\.1,<0\.43"):
        dd.check_diffusers_version(version)
    monkeypatch.setenv(dd.ALLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match="untested"):
        dd.check_diffusers_version(version)


def _forget_integration(monkeypatch):
    """Makes the next import of dit_fast.integrations.diffusers run its module code again."""
    for name in [n for n in sys.modules if n.startswith("dit_fast.integrations.diffusers")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(sys.modules["dit_fast.integrations"], "diffusers", raising=False)


def test_import_checks_the_installed_version(monkeypatch):
    monkeypatch.delenv(dd.ALLOW_ENV, raising=False)
    monkeypatch.setattr(diffusers, "__version__", "0.40.0")
    _forget_integration(monkeypatch)
    with pytest.raises(ImportError, match="0.40.0 is installed"):
        importlib.import_module("dit_fast.integrations.diffusers")


def test_diffusers_missing_is_a_clear_error(monkeypatch):
    _forget_integration(monkeypatch)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'dit_fast\[diffusers\]'"):
        importlib.import_module("dit_fast.integrations.diffusers")
    fake = type("WanTransformer3DModel", (torch.nn.Module,), {"__module__": "diffusers.models.fake"})()
    with pytest.raises(ImportError, match="needs diffusers"):
        dit_fast.patch(fake)


def test_import_dit_fast_never_imports_diffusers():
    code = ("import sys, torch, dit_fast\n"
            "from tests import reference_dit as R\n"
            "dit_fast.patch(R.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, "
            "num_classes=3))\n"
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_patch_rejects_unknown_models_and_second_patches():
    from diffusers.models.attention_processor import Attention

    with pytest.raises(ValueError, match="WanTransformer3DModel, HunyuanVideoTransformer3DModel"):
        dit_fast.patch(Attention(query_dim=16))  # a diffusers module, not a supported transformer
    with pytest.raises(ValueError, match="no DiT block.*diffusers' WanTransformer3DModel"):
        dit_fast.patch(torch.nn.Linear(2, 2))
    model, _ = build("wan", layers=1)
    dit_fast.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        dit_fast.patch(model)
    with pytest.raises(ValueError, match="DiTVideo is dit_fast's own model"):
        dit_fast.patch(DiT_models["DiT-tiny"](input_size=(2, 4, 4)))
    with pytest.raises(ValueError, match="unknown backend"):
        dit_fast.patch(build("ltx", layers=1)[0], backend="fast")
    pipeline = type("WanPipeline", (), {"transformer": model})()
    with pytest.raises(TypeError, match="patch pipe.transformer"):
        dit_fast.patch(pipeline)
