"""Bad input to loaders, constructors and ops: one clear error naming the argument, never a deep crash.

Each test is one failure class from issue 11 ("Loading and state"): unreadable or ill-fitting
checkpoints (CheckpointError), constructors that divided by zero or truncated, values that vanish or
overflow in fp32, patchify defaults that were not each other's inverse, and lazy subpackages.
"""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from dit_fast.models import CheckpointError, DiTVideo, check_state_dict, load_dit_checkpoint, read_state_dict
from dit_fast.models.checkpoint import read_safetensors, read_torch_file

# ---------------------------------------------------------------------------------------------
# Checkpoints: every unreadable or ill-fitting file is a CheckpointError naming file, key, expectation.
# ---------------------------------------------------------------------------------------------


def tiny_model(**kwargs):
    defaults = dict(input_size=(1, 4, 4), patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                    num_classes=5, backend="torch")
    return DiTVideo(**{**defaults, **kwargs})


class _RunsCode:
    def __reduce__(self):  # unpickling calls os.getcwd(): harmless, but code all the same
        return (os.getcwd, ())


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad_checkpoints")
    sd = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    save_file(sd, root / "ok.safetensors")
    torch.save(sd, root / "ok.pt")
    files = {}
    for ext in ("safetensors", "pt"):
        data = (root / f"ok.{ext}").read_bytes()
        for kind, content in (("truncated", data[: len(data) // 2]), ("truncated_tail", data[:-4]),
                              ("empty", b""), ("random", os.urandom(4096))):
            path = root / f"{kind}.{ext}"
            path.write_bytes(content)
            files[f"{kind}.{ext}"] = path
        directory = root / f"dir.{ext}"
        directory.mkdir()
        files[f"dir.{ext}"] = directory
    torch.save({"x_embedder.proj.weight": _RunsCode()}, root / "code.pt")
    files["code.pt"] = root / "code.pt"
    (root / "plain_pickle.pt").write_bytes(pickle.dumps({"a": _RunsCode()}))
    files["plain_pickle.pt"] = root / "plain_pickle.pt"
    torch.save([torch.zeros(2)], root / "list.pt")
    files["list.pt"] = root / "list.pt"
    return files


@pytest.mark.parametrize("name", ["truncated.safetensors", "truncated_tail.safetensors", "empty.safetensors",
                                  "random.safetensors", "dir.safetensors", "truncated.pt", "truncated_tail.pt",
                                  "empty.pt", "random.pt", "dir.pt", "list.pt"])
def test_unreadable_checkpoint_files(bad_files, name):
    path = str(bad_files[name])
    for load in (read_state_dict, load_dit_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert path in str(info.value)
        assert "Traceback" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_is_refused_without_suggesting_weights_only_false(bad_files):
    for name in ("code.pt", "plain_pickle.pt"):
        with pytest.raises(CheckpointError, match="refused") as info:
            load_dit_checkpoint(str(bad_files[name]))
        assert "weights_only" not in str(info.value) and str(bad_files[name]) in str(info.value)


def test_missing_checkpoint_is_also_file_not_found(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    for load in (read_state_dict, read_safetensors, read_torch_file, load_dit_checkpoint):
        with pytest.raises(CheckpointError, match="does not exist") as info:
            load(path)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(TypeError, match="checkpoint"):
        load_dit_checkpoint(3)


def _dit_state():
    return {k: v.clone() for k, v in tiny_model().state_dict().items()}


def test_state_dict_that_does_not_fit():
    model = tiny_model()
    cases = []
    sd = _dit_state()
    sd.pop("final_layer.linear.bias")
    cases.append((sd, "final_layer.linear.bias", "missing"))
    sd = _dit_state()
    sd["blocks.0.extra"] = torch.zeros(2)
    cases.append((sd, "blocks.0.extra", "does not have"))
    sd = _dit_state()
    sd["blocks.0.mlp.fc2.weight"] = torch.zeros(32, 127)
    cases.append((sd, "blocks.0.mlp.fc2.weight", r"\(32, 128\)"))
    sd = _dit_state()
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"].to(torch.int64)  # loaded silently before
    cases.append((sd, "blocks.0.attn.proj.weight", "floating-point"))
    sd = _dit_state()
    sd["blocks.0.attn.proj.bias"] = [0.0] * 32
    cases.append((sd, "blocks.0.attn.proj.bias", "expected a tensor"))
    for state, key, expected in cases:
        with pytest.raises(CheckpointError, match=expected) as info:
            check_state_dict(model, state, "ckpt.safetensors")
        assert key in str(info.value) and "ckpt.safetensors" in str(info.value)
    # a lower precision of a floating-point weight is fine: load_state_dict casts it
    sd = _dit_state()
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"].bfloat16()
    check_state_dict(model, sd, "ckpt.safetensors")


def test_dit_checkpoint_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    sd = _dit_state()
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].to(torch.int32)
    path = tmp_path / "int.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight.*floating-point"):
        load_dit_checkpoint(str(path), num_heads=2)
    sd = _dit_state()
    sd["final_layer.linear.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="final_layer.linear.weight"):
        load_dit_checkpoint(sd, num_heads=2)
    sd = _dit_state()
    del sd["blocks.0.mlp.fc1.weight"]
    with pytest.raises(CheckpointError, match="blocks.0.mlp.fc1.weight"):
        load_dit_checkpoint(sd, num_heads=2)
    sd = _dit_state()
    sd["y_embedder.embedding_table.weight"] = torch.zeros(5, 32)  # one row short of DiT's 5 classes + null
    sd["blocks.0.unknown"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="blocks.0.unknown"):
        load_dit_checkpoint(sd, num_heads=2)
    with pytest.raises(CheckpointError, match="expected a tensor"):
        load_dit_checkpoint({**_dit_state(), "pos_embed": "abc"}, num_heads=2)


# ---------------------------------------------------------------------------------------------
# Constructors: a ValueError / TypeError naming the argument, never ZeroDivisionError or truncation.
# ---------------------------------------------------------------------------------------------

from dit_fast import ops  # noqa: E402
from dit_fast.diffusion import GaussianDiffusion, RectifiedFlow, space_timesteps  # noqa: E402
from dit_fast.models import TextEncoder, Tokenizer  # noqa: E402
from dit_fast.models.embeddings import (CaptionEmbedder, LabelEmbedder, PatchEmbed3D, TimestepEmbedder,  # noqa: E402
                                        get_3d_sincos_pos_embed)
from dit_fast.nn import CrossAttention, GatedResidual, ModulatedLayerNorm, SpacetimeAttention  # noqa: E402
from dit_fast.ops import RoPE3D  # noqa: E402

SMALL = dict(input_size=(1, 4, 4), hidden_size=32, depth=1, num_heads=2, num_classes=5, backend="torch")

BAD_CONSTRUCTORS = [
    # nn
    ("SpacetimeAttention(64, 0)", lambda: SpacetimeAttention(64, 0), ValueError, "num_heads must be an int >= 1"),
    ("SpacetimeAttention(64, -2)", lambda: SpacetimeAttention(64, -2), ValueError, "num_heads"),
    ("SpacetimeAttention(0, 2)", lambda: SpacetimeAttention(0, 2), ValueError, "dim must be"),
    ("SpacetimeAttention(64.0, 2)", lambda: SpacetimeAttention(64.0, 2), TypeError, "dim must be an int"),
    ("SpacetimeAttention(600, 2)", lambda: SpacetimeAttention(600, 2), ValueError, "head dim"),
    ("SpacetimeAttention mode", lambda: SpacetimeAttention(64, 2, mode="local"), ValueError, "mode must be one of"),
    ("SpacetimeAttention window", lambda: SpacetimeAttention(64, 2, window=(3, 0, 3)), ValueError, "window"),
    ("SpacetimeAttention window_tile", lambda: SpacetimeAttention(64, 2, window_tile=(1.5, 2, 2)), TypeError,
     "window_tile"),
    ("SpacetimeAttention rope", lambda: SpacetimeAttention(64, 2, rope="2d"), ValueError, "rope must be"),
    ("SpacetimeAttention rope split", lambda: SpacetimeAttention(64, 2, rope=RoPE3D(split=(8, 8, 8))), ValueError,
     "rope split"),
    ("SpacetimeAttention backend", lambda: SpacetimeAttention(64, 2, backend="fast"), ValueError, "backend"),
    ("CrossAttention(64, 32, 0)", lambda: CrossAttention(64, 32, 0), ValueError, "num_heads"),
    ("CrossAttention context_dim", lambda: CrossAttention(64, 0, 2), ValueError, "context_dim"),
    ("ModulatedLayerNorm eps=0", lambda: ModulatedLayerNorm(16, eps=0), ValueError, "eps must be a positive"),
    ("ModulatedLayerNorm eps=1e-300", lambda: ModulatedLayerNorm(16, eps=1e-300), ValueError, "float32"),
    ("ModulatedLayerNorm hidden", lambda: ModulatedLayerNorm(-1), ValueError, "hidden_size"),
    ("ModulatedLayerNorm affine", lambda: ModulatedLayerNorm(8, elementwise_affine="yes"), TypeError,
     "elementwise_affine"),
    ("GatedResidual backend", lambda: GatedResidual(backend=None), ValueError, "backend"),
    # models
    ("DiTVideo num_heads=0", lambda: DiTVideo(**{**SMALL, "num_heads": 0}), ValueError, "num_heads"),
    ("DiTVideo patch_size=0", lambda: DiTVideo(**{**SMALL, "patch_size": 0}), ValueError, "patch_size"),
    ("DiTVideo patch_size=-2", lambda: DiTVideo(**{**SMALL, "patch_size": -2}), ValueError, "patch_size"),
    ("DiTVideo patch_size=2.5", lambda: DiTVideo(**{**SMALL, "patch_size": 2.5}), TypeError, "patch_size"),
    ("DiTVideo patch_size float triple", lambda: DiTVideo(**{**SMALL, "patch_size": (1, 2.5, 2)}), TypeError,
     "patch_size"),
    ("DiTVideo input_size=0", lambda: DiTVideo(**{**SMALL, "input_size": 0}), ValueError, "input_size"),
    ("DiTVideo input_size float", lambda: DiTVideo(**{**SMALL, "input_size": (1, 4.0, 4)}), TypeError, "input_size"),
    ("DiTVideo depth=0", lambda: DiTVideo(**{**SMALL, "depth": 0}), ValueError, "depth"),
    ("DiTVideo hidden_size=0", lambda: DiTVideo(**{**SMALL, "hidden_size": 0}), ValueError, "hidden_size"),
    ("DiTVideo hidden_size % 4", lambda: DiTVideo(**{**SMALL, "hidden_size": 34}), ValueError, "hidden_size"),
    ("DiTVideo mlp_ratio=0", lambda: DiTVideo(**{**SMALL, "mlp_ratio": 0}), ValueError, "mlp_ratio"),
    ("DiTVideo in_channels=0", lambda: DiTVideo(**{**SMALL, "in_channels": 0}), ValueError, "in_channels"),
    ("DiTVideo num_classes=-1", lambda: DiTVideo(**{**SMALL, "num_classes": -1}), ValueError, "num_classes"),
    ("DiTVideo class_dropout_prob=2", lambda: DiTVideo(**{**SMALL, "class_dropout_prob": 2}), ValueError,
     "class_dropout_prob"),
    ("DiTVideo text_dim=0", lambda: DiTVideo(**{**SMALL, "text_dim": 0}), ValueError, "text_dim"),
    ("DiTVideo learn_sigma", lambda: DiTVideo(**{**SMALL, "learn_sigma": "no"}), TypeError, "learn_sigma"),
    ("DiTVideo cfg_channels", lambda: DiTVideo(**{**SMALL, "cfg_channels": 9}), ValueError, "cfg_channels"),
    ("DiTVideo backend", lambda: DiTVideo(**{**SMALL, "backend": "bogus"}), ValueError, "backend"),
    ("DiTVideo attention", lambda: DiTVideo(**{**SMALL, "attention": "local"}), ValueError, "attention"),
    ("PatchEmbed3D patch", lambda: PatchEmbed3D((1, 0, 2), 3, 8), ValueError, "patch_size"),
    ("TimestepEmbedder", lambda: TimestepEmbedder(0), ValueError, "hidden_size"),
    ("LabelEmbedder dropout", lambda: LabelEmbedder(5, 8, -0.1), ValueError, "dropout_prob"),
    ("CaptionEmbedder", lambda: CaptionEmbedder(0, 8), ValueError, "text_dim"),
    ("get_3d_sincos_pos_embed grid", lambda: get_3d_sincos_pos_embed(8, (1, 0, 2)), ValueError, "grid"),
    ("get_3d_sincos_pos_embed dim", lambda: get_3d_sincos_pos_embed(6, (1, 2, 2)), ValueError, "multiple of 4"),
    ("Tokenizer max_length", lambda: Tokenizer(["a"], max_length=0), ValueError, "max_length"),
    ("Tokenizer vocabulary", lambda: Tokenizer("abc"), TypeError, "vocabulary"),
    ("TextEncoder heads", lambda: TextEncoder(5, text_dim=10, num_heads=4), ValueError, "num_heads"),
    ("TextEncoder vocab", lambda: TextEncoder(0), ValueError, "vocab_size"),
    # diffusion
    ("RectifiedFlow num_timesteps=0", lambda: RectifiedFlow(num_timesteps=0), ValueError, "num_timesteps"),
    ("RectifiedFlow num_timesteps=nan", lambda: RectifiedFlow(num_timesteps=float("nan")), ValueError,
     "num_timesteps"),
    ("RectifiedFlow shift=inf", lambda: RectifiedFlow(shift=float("inf")), ValueError, "shift"),
    ("RectifiedFlow shift='x'", lambda: RectifiedFlow(shift="x"), ValueError, "shift"),
    ("RectifiedFlow base_resolution", lambda: RectifiedFlow(base_resolution=0), ValueError, "base_resolution"),
    ("RectifiedFlow shift_scale", lambda: RectifiedFlow(shift_scale=-1), ValueError, "shift_scale"),
    ("GaussianDiffusion 'abc'", lambda: GaussianDiffusion(timestep_respacing="abc"), ValueError,
     "timestep_respacing"),
    ("GaussianDiffusion '0'", lambda: GaussianDiffusion(timestep_respacing="0"), ValueError, "timestep_respacing"),
    ("GaussianDiffusion '1'", lambda: GaussianDiffusion(timestep_respacing="1"), ValueError, "at least 2"),
    ("GaussianDiffusion '10,'", lambda: GaussianDiffusion(timestep_respacing="10,"), ValueError,
     "timestep_respacing"),
    ("GaussianDiffusion 'ddimx'", lambda: GaussianDiffusion(timestep_respacing="ddimx"), ValueError,
     "timestep_respacing"),
    ("GaussianDiffusion '2000'", lambda: GaussianDiffusion(timestep_respacing="2000"), ValueError,
     "timestep_respacing"),
    ("GaussianDiffusion num_timesteps=0", lambda: GaussianDiffusion(num_timesteps=0), ValueError, "num_timesteps"),
    ("GaussianDiffusion num_timesteps=10", lambda: GaussianDiffusion(num_timesteps=10), ValueError,
     "num_timesteps"),
    ("GaussianDiffusion num_timesteps=1.5", lambda: GaussianDiffusion(num_timesteps=1.5), TypeError,
     "num_timesteps"),
    ("space_timesteps [0]", lambda: space_timesteps(100, [0]), ValueError, "timestep_respacing"),
    # RoPE3D and apply_rope_3d
    ("RoPE3D theta=0", lambda: RoPE3D(theta=0), ValueError, "theta"),
    ("RoPE3D theta=1e-300", lambda: RoPE3D(theta=1e-300), ValueError, "theta"),
    ("RoPE3D split", lambda: RoPE3D(split=(4.2, 6.4, 6.3)), ValueError, "split"),
    ("apply_rope_3d split 'a'", lambda: ops.apply_rope_3d(torch.randn(1, 4, 2, 24), (1, 2, 2), split=("a", 8, 8),
                                                          backend="torch"), ValueError, "split"),
    ("apply_rope_3d split floats", lambda: ops.apply_rope_3d(torch.randn(1, 4, 2, 24), (1, 2, 2),
                                                             split=(4.2, 6.4, 6.3), backend="torch"), ValueError,
     "split"),
    ("apply_rope_3d theta=1e-300", lambda: ops.apply_rope_3d(torch.randn(1, 4, 2, 24), (1, 2, 2), theta=1e-300,
                                                             backend="torch"), ValueError, "theta"),
    ("apply_rope_3d theta=0", lambda: ops.apply_rope_3d(torch.randn(1, 4, 2, 24), (1, 2, 2), theta=0,
                                                        backend="torch"), ValueError, "theta"),
    ("apply_rope_3d theta=inf", lambda: ops.apply_rope_3d(torch.randn(1, 4, 2, 24), (1, 2, 2), theta=float("inf"),
                                                          backend="torch"), ValueError, "theta"),
]


@pytest.mark.parametrize("what, build, error, match", BAD_CONSTRUCTORS, ids=[c[0] for c in BAD_CONSTRUCTORS])
def test_bad_constructor_arguments(what, build, error, match):
    with pytest.raises(error, match=match) as info:
        build()
    assert type(info.value) in (ValueError, TypeError), f"{what}: {type(info.value).__name__}: {info.value}"


def test_good_constructor_arguments_still_build():
    SpacetimeAttention(72, 1, window=[3, 3, 3], rope="3d")
    DiTVideo(**{**SMALL, "patch_size": 2, "text_dim": 16, "cfg_channels": 4})
    GaussianDiffusion(timestep_respacing="ddim10"), GaussianDiffusion(timestep_respacing="5,5", num_timesteps=100)
    RectifiedFlow(shift=3, num_timesteps=1.0)
    assert RoPE3D(split=(8, 8, 8)).split == (8, 8, 8)


# ---------------------------------------------------------------------------------------------
# Forward arguments: labels and token ids out of range are a ValueError, not an IndexError.
# ---------------------------------------------------------------------------------------------


def test_class_labels_out_of_range():
    model = DiTVideo(**SMALL).eval()
    x, t = torch.randn(2, 4, 1, 4, 4), torch.rand(2)
    for labels in ([0, 7], [0, -1], [6, 1]):
        with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 5\)"):
            model(x, t, torch.tensor(labels))
    with pytest.raises(TypeError, match="y must hold int64"):
        model(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, [0, 1])
    with torch.no_grad():
        model(x, t, torch.tensor([4, 5]))  # 5 = num_classes: DiT's null class, which DiT's sampler passes


def test_class_labels_out_of_range_under_compile():
    """Under torch.compile the check is an in-graph assert: fullgraph traces it, a bad label still fails."""
    import torch._dynamo

    model = DiTVideo(**SMALL).eval()
    x, t = torch.randn(2, 4, 1, 4, 4), torch.rand(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, torch.tensor([1, 4])), model(x, t, torch.tensor([1, 4])))
        with pytest.raises(RuntimeError, match="class labels outside"):
            compiled(x, t, torch.tensor([1, 9]))


def test_token_ids_out_of_range():
    encoder = TextEncoder(5, text_dim=8, num_heads=2)
    with pytest.raises(ValueError, match=r"ids must be token ids in \[0, vocab_size=5\)"):
        encoder(torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match="mask must be a bool"):
        encoder(torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Finite values that vanish or overflow in fp32: rejected instead of a NaN output.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-300, 1e-40, 0.0, -1e-6, 1e300, float("inf"), float("nan"), True])
def test_eps_outside_fp32_is_rejected(eps):
    x = torch.randn(1, 3, 8)
    x[0, 0] = 1.0  # a constant row: LN divides by sqrt(var + eps) = sqrt(eps)
    shift, scale = torch.randn(1, 8), torch.randn(1, 8)
    with pytest.raises(ValueError, match="eps must be a positive number within float32"):
        ops.layernorm_modulate(x, shift, scale, eps=eps, backend="torch")
    with pytest.raises(ValueError, match="eps"):
        ops.residual_layernorm_modulate(x, shift, x, shift, scale, eps=eps, backend="torch")


def test_eps_at_fp32_edges_gives_finite_output():
    x = torch.ones(1, 3, 8)
    shift, scale = torch.randn(1, 8), torch.randn(1, 8)
    for eps in (torch.finfo(torch.float32).tiny, 1e-6, 1e30):
        assert torch.isfinite(ops.layernorm_modulate(x, shift, scale, eps=eps, backend="torch")).all()


@pytest.mark.parametrize("scale", [3e38, 1e30, 1e5, 1e-300, 1e-39, 0.0, float("inf")])
def test_attention_scale_outside_fp32_is_rejected(scale):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="scale must be a positive finite number in"):
        ops.attention(q, q, q, scale=scale, backend="torch")


def test_attention_scale_at_the_edges_gives_finite_output():
    q = torch.randn(1, 4, 2, 16)
    for scale in (1.2e-38, 1e4):
        assert torch.isfinite(ops.attention(q, q, q, scale=scale, backend="torch")).all()


def test_theta_at_the_edges_gives_finite_output():
    x = torch.randn(1, 4 * 5 * 6, 2, 24)
    for theta in (1.0, 1e300):
        assert torch.isfinite(ops.apply_rope_3d(x, (4, 5, 6), theta=theta, backend="torch")).all()


# ---------------------------------------------------------------------------------------------
# Subpackages: reachable as attributes (the README writes dit_fast.optim.GaLoreAdamW), loaded lazily.
# ---------------------------------------------------------------------------------------------


def test_import_is_lazy_and_subpackages_are_attributes():
    """In a fresh process: `import dit_fast` loads neither the models, the optimizer, the samplers nor diffusers;
    each subpackage then loads on first attribute access."""
    code = """
import sys, dit_fast
heavy = [m for m in sys.modules if m == "diffusers" or m.startswith(("diffusers.", "dit_fast.models", "dit_fast.optim",
         "dit_fast.diffusion", "dit_fast.integrations", "dit_fast.parallel", "dit_fast.train", "galore_torch"))]
assert not heavy, heavy
assert dit_fast.optim.GaLoreAdamW.__name__ == "GaLoreAdamW"
assert dit_fast.models.DiTVideo.__name__ == "DiTVideo" and dit_fast.patch is dit_fast.models.patch
assert dit_fast.diffusion.RectifiedFlow and dit_fast.parallel and dit_fast.integrations
assert "diffusers" not in sys.modules
from dit_fast import optim, models  # noqa: F401
for name in ("optim", "models", "diffusion", "patch"):
    assert name in dir(dit_fast), name
try:
    dit_fast.no_such_thing
except AttributeError as e:
    assert "no_such_thing" in str(e)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adaln_with_no_features_is_rejected(backend):
    """C = 0 crashed the Triton kernels (a row of width 0); a LayerNorm over no features is undefined."""
    x, mod = torch.randn(2, 3, 0), torch.randn(2, 0)
    with pytest.raises(ValueError, match=r"x must have C >= 1 features, got shape \(2, 3, 0\)"):
        ops.layernorm_modulate(x, mod, mod, backend=backend)
    with pytest.raises(ValueError, match="C >= 1"):
        ops.gated_residual(x, mod, x, backend=backend)
    assert ops.layernorm_modulate(torch.randn(0, 3, 4), torch.randn(0, 4), torch.randn(0, 4), backend=backend).shape == (0, 3, 4)


def test_force_drop_ids_shape():
    model = DiTVideo(**SMALL).eval()
    x, t, y = torch.randn(2, 4, 1, 4, 4), torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"force_drop_ids must be a \(B,\) = \(2,\)"):
        model(x, t, y, force_drop_ids=torch.tensor([True, False, True]))


# ---------------------------------------------------------------------------------------------
# dit-fast's own checkpoints (generate --checkpoint, train --init-from, resume): the same CheckpointError
# ---------------------------------------------------------------------------------------------


def _t2v_config(out_dir, **kw):
    from dit_fast.train import TrainConfig

    base = dict(out_dir=str(out_dir), num_frames=4, size=16, patch=(2, 8, 8), hidden_size=32, depth=1, num_heads=2,
                text_dim=16, batch_size=4, steps=2, checkpoint_every=2, warmup=1, backend="torch", device="cpu")
    return TrainConfig(**{**base, **kw})


def _model_file(tmp_path, mutate=None, name="model.safetensors"):
    """An exported text-to-video model file (weights + config and vocabulary metadata), optionally altered."""
    import json

    from safetensors.torch import save_file

    from dit_fast.train import build_model

    cfg = _t2v_config(tmp_path / "unused")
    model = build_model(cfg)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if mutate is not None:
        mutate(sd)
    path = tmp_path / name
    save_file(sd, path, metadata={"config": cfg.to_json(), "vocabulary": json.dumps(model.vocabulary)})
    return str(path)


def test_generate_checkpoint_that_cannot_be_read(tmp_path):
    from dit_fast.generate import load_model

    good = _model_file(tmp_path)
    load_model(good)
    data = open(good, "rb").read()
    cases = {"random.safetensors": os.urandom(2048), "truncated.safetensors": data[: len(data) // 2],
             "empty.safetensors": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad_latest").mkdir()
    (tmp_path / "bad_latest" / "latest").write_text("twelve\n")
    for name in [*cases, "empty_dir", "bad_latest", "missing.safetensors"]:
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        assert path in str(info.value), info.value


def test_generate_checkpoint_that_does_not_fit(tmp_path):
    from dit_fast.generate import load_model

    key = "dit.blocks.0.attn.qkv.weight"

    def to_int(sd):
        sd[key] = sd[key].to(torch.int32)

    def extra(sd):
        sd["dit.blocks.7.attn.qkv.weight"] = sd[key].clone()

    def missing(sd):
        del sd[key]

    def reshape(sd):
        sd[key] = sd[key][:-1].clone()

    for mutate, expected in ((to_int, "floating-point"), (extra, "does not have"), (missing, "missing"),
                             (reshape, "has shape")):
        path = _model_file(tmp_path, mutate, name=f"{mutate.__name__}.safetensors")
        with pytest.raises(CheckpointError, match=expected) as info:
            load_model(path)
        assert path in str(info.value)


def test_init_from_and_resume_with_bad_files(tmp_path):
    from dit_fast.train import Trainer

    bad = _model_file(tmp_path, lambda sd: sd.update({"dit.final_layer.linear.bias": torch.zeros(3, dtype=torch.int64)}))
    with pytest.raises(CheckpointError, match="dit.final_layer.linear.bias"):
        Trainer(_t2v_config(tmp_path / "a", init_from=bad), resume=None, progress_bar=False)
    run = tmp_path / "run"
    Trainer(_t2v_config(run), resume=None, progress_bar=False).train()
    state = next(p for p in run.iterdir() if p.name.startswith("state_"))
    state.write_bytes(os.urandom(512))  # a corrupt optimizer state: refused, not unpickled
    with pytest.raises(CheckpointError, match=str(state)):
        Trainer(_t2v_config(run, steps=4), resume=str(run), progress_bar=False)
    torch.save({"step": 2}, state)  # a plain dict without the optimizer's state
    with pytest.raises(CheckpointError, match="not a training state"):
        Trainer(_t2v_config(run, steps=4), resume=str(run), progress_bar=False)


def test_unpatchify_video_shape_whose_tokens_do_not_match():
    tokens = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match=r"video_shape \(3, 2, 2\) cut into patches \(1, 1, 1\) has 12 tokens"):
        ops.unpatchify_3d(tokens, 1, video_shape=(3, 2, 2), backend="torch")


def test_sampler_guidance_scale_must_be_finite():
    model = DiTVideo(**SMALL).eval()
    y = torch.tensor([0, 1])
    for cfg_scale in (float("nan"), float("inf"), "4"):
        with pytest.raises((ValueError, TypeError), match="cfg_scale"):
            RectifiedFlow().sample(model, (2, 4, 1, 4, 4), steps=1, cfg_scale=cfg_scale, model_kwargs={"y": y},
                                   progress_bar=False)
    with pytest.raises(ValueError, match="eta"):
        GaussianDiffusion(timestep_respacing="ddim5").ddim_sample_loop(model, (2, 4, 1, 4, 4), eta=-1.0,
                                                                      model_kwargs={"y": y}, progress_bar=False)


import dit_fast.nn as _nn  # noqa: E402

BAD_CALLS = [  # (what, call, error, message): each one error naming the argument and the shapes
    ("self-attention input width", lambda: _nn.SpacetimeAttention(64, 4, backend="torch")(
        torch.randn(2, 12, 48), (1, 3, 4)), ValueError, r"x must be \(B, S, dim\) = \(B, S, 64\), got \(2, 12, 48\)"),
    ("self-attention 2-D input", lambda: _nn.SpacetimeAttention(64, 4, backend="torch")(
        torch.randn(12, 64), (1, 3, 4)), ValueError, r"x must be \(B, S, dim\) = \(B, S, 64\), got \(12, 64\)"),
    ("cross-attention input width", lambda: _nn.CrossAttention(64, 32, 4, backend="torch")(
        torch.randn(2, 5, 48), torch.randn(2, 3, 32)), ValueError, r"x must be \(B, S, dim\) = \(B, S, 64\), got \(2, 5, 48\)"),
    ("cross-attention context width", lambda: _nn.CrossAttention(64, 32, 4, backend="torch")(
        torch.randn(2, 5, 64), torch.randn(2, 3, 16)), ValueError,
     r"context must be \(B, L, context_dim\) = \(B, L, 32\), got \(2, 3, 16\)"),
    ("cross-attention context batch", lambda: _nn.CrossAttention(64, 32, 4, backend="torch")(
        torch.randn(2, 5, 64), torch.randn(3, 3, 32)), ValueError, r"context \(3, 3, 32\) must have x's batch size 2"),
    ("cross-attention context_mask", lambda: _nn.CrossAttention(64, 32, 4, backend="torch")(
        torch.randn(2, 5, 64), torch.randn(2, 3, 32), torch.ones(2, 4, dtype=torch.bool)), ValueError,
     r"context_mask must be \(B, L\) = \(2, 3\)"),
    ("rectified flow t batch", lambda: RectifiedFlow().add_noise(
        torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4), torch.rand(3)), ValueError,
     r"t must hold one timestep per sample, \(B,\) = \(2,\) or per frame \(B, T\) = \(2, 3\), for x \(2, 4, 3, 4, 4\), "
     r"got \(3,\)"),
    ("rectified flow t broadcast", lambda: RectifiedFlow().add_noise(
        torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4), torch.rand(1)), ValueError, r"got \(1,\)"),
    ("rectified flow noise shape", lambda: RectifiedFlow().add_noise(
        torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 5), torch.rand(2)), ValueError,
     r"noise must have x0's shape \(2, 4, 3, 4, 4\), got \(2, 4, 3, 4, 5\)"),
    ("DDPM t batch", lambda: GaussianDiffusion().q_sample(
        torch.randn(2, 4, 3, 4, 4), torch.tensor([1, 2, 3]), torch.randn(2, 4, 3, 4, 4)), ValueError,
     r"t must hold one timestep per sample, shape \(B,\) = \(2,\) for x_start \(2, 4, 3, 4, 4\), got \(3,\)"),
    ("DDPM t out of range", lambda: GaussianDiffusion().q_sample(
        torch.randn(2, 4), torch.tensor([1, 1000]), torch.randn(2, 4)), ValueError, r"t must be in \[0, 1000\)"),
    ("DDPM float t", lambda: GaussianDiffusion().q_sample(
        torch.randn(2, 4), torch.rand(2), torch.randn(2, 4)), TypeError, r"t must hold integer timesteps"),
]


@pytest.mark.parametrize("what, call, error, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_arguments(what, call, error, match):
    with pytest.raises(error, match=match):
        call()
