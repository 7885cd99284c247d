"""DiTVideo: equality with facebookresearch/DiT (checkpoints, dit_fast.patch), fused vs torch backend,
gradient checkpointing, bf16 autocast, torch.compile, conditioning and input checks.

Triton runs in the CPU interpreter here, so the Triton cases use tiny models and few tokens.
"""

import argparse

import pytest
import torch

import dit_fast
from dit_fast.models import DiT_models, DiTVideo, TextEncoder, Tokenizer, get_3d_sincos_pos_embed, load_dit_checkpoint
from dit_fast.models.checkpoint import infer_dit_config
from tests import reference_dit as R

# a tiny DiT: 4x4 latents with 2x2 patches -> 4 tokens, 2 blocks of width 64, 2 heads, 10 classes
TINY_DIT = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)
# a tiny video model with every feature: text, alternating attention, sin-cos + RoPE, per-frame timesteps
TINY_VIDEO = dict(input_size=(2, 4, 4), text_dim=16, attention="spatial_temporal", pos="both",
                  per_frame_timesteps=True, num_classes=5, learn_sigma=False, class_dropout_prob=0.0)


def random_dit(learn_sigma=True, **overrides):
    """A reference DiT with every parameter random (adaLN-Zero would make the output zero)."""
    model = R.DiT(**{**TINY_DIT, **overrides}, learn_sigma=learn_sigma)
    return R.randomize_(model).eval()


def dit_inputs(batch=2, size=4, num_classes=10):
    x = torch.randn(batch, 4, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, num_classes, (batch,))
    return x, t, y


def tiny_video(backend="torch", **overrides):
    return DiT_models["DiT-tiny"](backend=backend, **{**TINY_VIDEO, **overrides})


def device_for(backend):
    """Where a backend's kernels run: Triton on the GPU when there is one, else in the CPU interpreter."""
    return "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def video_inputs(batch=2, frames=2, size=4, text_len=5):
    x = torch.randn(batch, 4, frames, size, size)
    t = torch.rand(batch, frames) * 1000
    y = torch.randint(0, 5, (batch,))
    text = torch.randn(batch, text_len, 16)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, 3:] = False  # ragged captions
    return x, t, y, text, mask


def assert_close(actual, expected, rtol=1e-5, atol=1e-5, name="output"):
    err = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# facebookresearch/DiT checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpoint_matches_reference_dit(backend):
    ref = random_dit()
    dev = device_for(backend)
    model = load_dit_checkpoint(ref.state_dict(), num_heads=2, backend=backend).to(dev)
    assert model.patch_size == (1, 2, 2) and model.input_size == (1, 4, 4) and model.num_classes == 10
    x, t, y = dit_inputs()
    with torch.no_grad():
        expected = ref(x, t, y)
        out = model(*to(dev, x[:, :, None], t, y))[:, :, 0]
        assert_close(out.cpu(), expected)
        # DiT's sample.py convention: the batch is [x, x] with labels [y, null]
        y_cfg = torch.cat([y[:1], torch.tensor([10])])
        x_cfg = torch.cat([x[:1], x[:1]])
        expected_cfg = ref.forward_with_cfg(x_cfg, t, y_cfg, 4.0)
        out_cfg = model.forward_with_cfg(*to(dev, x_cfg[:, :, None], t, y_cfg), cfg_scale=4.0)[:, :, 0]
        assert_close(out_cfg.cpu(), expected_cfg)


def test_checkpoint_infers_config_and_formats(tmp_path):
    ref = random_dit(learn_sigma=False, input_size=8, num_classes=7, patch_size=4, hidden_size=32)
    sd = ref.state_dict()
    config = infer_dit_config(sd)
    assert config["learn_sigma"] is False and config["num_classes"] == 7
    assert config["input_size"] == (1, 8, 8) and config["patch_size"] == (1, 4, 4) and config["depth"] == 2
    x, t, y = dit_inputs(size=8, num_classes=7)
    with torch.no_grad():
        expected = ref(x, t, y)
    # a DiT training checkpoint: {"model", "ema", "opt", "args"} with the EMA weights preferred
    ema = {k: v.clone() for k, v in sd.items()}
    model_weights = {k: torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "0001000.pt"
    torch.save({"model": model_weights, "ema": ema, "args": argparse.Namespace(model="DiT-S/4")}, path)
    from safetensors.torch import save_file
    st_path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, st_path)
    for source in (path, str(st_path), {"ema": ema}):
        model = load_dit_checkpoint(source, num_heads=2, backend="torch")
        with torch.no_grad():
            assert_close(model(x[:, :, None], t, y)[:, :, 0], expected)


def test_checkpoint_of_a_dit_size_needs_no_heads():
    """DiT-S/8 at 16x16 (4 tokens): heads come from DiT's size table, or from the name."""
    ref = R.randomize_(R.DiT(input_size=16, patch_size=8, depth=12, hidden_size=384, num_heads=6), std=0.02).eval()
    x, t, y = dit_inputs(size=16, num_classes=1000)
    with torch.no_grad():
        expected = ref(x, t, y)
        for name in (None, "DiT-S/8"):
            model = load_dit_checkpoint(ref.state_dict(), name=name, backend="torch")
            assert model.num_heads == 6 and len(model.blocks) == 12 and model.learn_sigma
            assert_close(model(x[:, :, None], t, y)[:, :, 0], expected)


def test_checkpoint_errors():
    sd = random_dit().state_dict()
    with pytest.raises(ValueError, match="num_heads"):
        load_dit_checkpoint({k: v for k, v in sd.items()})  # width 64 is none of DiT's sizes
    with pytest.raises(ValueError, match="but DiT-S/2 has"):
        load_dit_checkpoint(sd, name="DiT-S/2")
    with pytest.raises(ValueError, match="image models"):
        load_dit_checkpoint(sd, name="DiT-S/1x2x2-video")
    with pytest.raises(ValueError, match="x_embedder"):
        load_dit_checkpoint({"weight": torch.randn(2)})
    with pytest.raises(FileNotFoundError):
        load_dit_checkpoint("/nonexistent/dit.pt")


def test_registry_matches_dit_sizes():
    """Every DiT name builds a model whose state dict has DiT's keys and shapes (on the meta device)."""
    for name, (depth, hidden, heads) in {"DiT-XL/2": (28, 1152, 16), "DiT-L/4": (24, 1024, 16),
                                          "DiT-B/8": (12, 768, 12), "DiT-S/2": (12, 384, 6)}.items():
        p = int(name[-1])
        with torch.device("meta"):
            ref = R.DiT(depth=depth, hidden_size=hidden, patch_size=p, num_heads=heads)
            model = DiT_models[name]()
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        theirs["x_embedder.proj.weight"] = (hidden, 4, 1, p, p)
        assert ours == theirs, name
        assert model.num_heads == heads
    assert {"DiT-S/1x2x2-video", "DiT-XL/1x2x2-video", "DiT-tiny"} <= set(DiT_models)


def test_sincos_matches_dit_for_one_frame():
    for grid in [(1, 4, 4), (1, 3, 5)]:
        ours = get_3d_sincos_pos_embed(64, grid)
        if grid[1] == grid[2]:
            theirs = torch.from_numpy(R.get_2d_sincos_pos_embed(64, grid[1])).float()
            assert torch.equal(ours, theirs)
        # DiT's 2D formula for a non-square grid, first half on w, second half on h
        h, w = torch.meshgrid(torch.arange(grid[1]), torch.arange(grid[2]), indexing="ij")
        emb_w = R.get_1d_sincos_pos_embed_from_grid(32, w.numpy().astype("float32"))
        emb_h = R.get_1d_sincos_pos_embed_from_grid(32, h.numpy().astype("float32"))
        theirs = torch.cat([torch.from_numpy(emb_w), torch.from_numpy(emb_h)], dim=1).float()
        assert torch.allclose(ours, theirs, atol=1e-6)
    video = get_3d_sincos_pos_embed(64, (3, 2, 2)).reshape(3, 4, 64)
    assert torch.equal(video[0], get_3d_sincos_pos_embed(64, (1, 2, 2)))
    assert not torch.allclose(video[1], video[0])  # frames are told apart


# ---------------------------------------------------------------------------------------------
# dit_fast.patch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_keeps_outputs(backend):
    ref = random_dit()
    patched = random_dit()
    patched.load_state_dict(ref.state_dict())
    keys = set(patched.state_dict())
    assert dit_fast.patch(patched, backend=backend) is patched
    assert set(patched.state_dict()) == keys
    assert patched._dit_fast_patched == {"blocks": 2, "final_layers": 1, "attention": 2}
    patched.to(device_for(backend))
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert_close(patched(*to(device_for(backend), x, t, y)).cpu(), ref(x, t, y))
    # gradients flow through the patched ops
    patched.train()
    patched(*to(device_for(backend), x, t, y)).square().mean().backward()
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_patch_rejects_other_models():
    with pytest.raises(ValueError, match="no DiT block"):
        dit_fast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        dit_fast.patch("DiT")


def test_patch_refuses_before_changing_anything():
    """A model with timm attention modules but no DiT block, and a DiT with a misspelled backend: a ValueError,
    and the model is left as it was (no forward replaced)."""
    vit = torch.nn.Sequential(R.Attention(16, num_heads=2))  # timm's Attention
    with pytest.raises(ValueError, match="no DiT block"):
        dit_fast.patch(vit)
    assert "forward" not in vars(vit[0]) and not hasattr(vit, "_dit_fast_patched")
    dit = random_dit()
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        dit_fast.patch(dit, backend="trition")
    assert not any("forward" in vars(m) for m in dit.modules()) and not hasattr(dit, "_dit_fast_patched")


# ---------------------------------------------------------------------------------------------
# Fused (Triton) vs torch backend
# ---------------------------------------------------------------------------------------------


def test_triton_model_matches_torch_forward_and_grads():
    ref = R.randomize_(tiny_video("torch")).train()
    fused = tiny_video("triton").train()
    fused.load_state_dict(ref.state_dict())
    fused.to(device_for("triton"))
    x, t, y, text, mask = video_inputs()
    outputs, grads = [], []
    for model in (ref, fused):
        dev = next(model.parameters()).device
        xi = x.clone().to(dev).requires_grad_()
        out = model(xi, *to(dev, t, y, text, mask))
        (out * torch.linspace(-1, 1, out.numel(), device=dev).reshape(out.shape)).sum().backward()
        outputs.append(out.detach().cpu())
        grads.append({"x": xi.grad.cpu(),
                      **{n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}})
    assert_close(outputs[1], outputs[0], name="forward")
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 30
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, name=f"grad {name}")


def test_gradient_checkpointing_same_grads():
    base = R.randomize_(tiny_video("torch")).train()
    ckpt = tiny_video("torch", gradient_checkpointing=True).train()
    ckpt.load_state_dict(base.state_dict())
    x, t, y, text, mask = video_inputs()
    for model in (base, ckpt):
        model(x, t, y, text, mask).square().mean().backward()
    for (name, p), (_, q) in zip(base.named_parameters(), ckpt.named_parameters()):
        if p.grad is not None:
            assert_close(q.grad, p.grad, name=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_autocast(backend):
    dev = device_for(backend)
    model = R.randomize_(tiny_video(backend), std=0.05).eval().to(dev)
    x, t, y, text, mask = to(dev, *video_inputs(batch=1))
    with torch.no_grad():
        ref = model(x, t, y, text, mask)
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = model(x, t, y, text, mask)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    """No graph breaks through the whole model (text, alternating attention, RoPE, per-frame t), train and eval."""
    torch._dynamo.reset()
    model = R.randomize_(tiny_video(backend)).to(device_for(backend))
    x, t, y, text, mask = to(device_for(backend), *video_inputs(batch=1))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x, t, y, text, mask), model(x, t, y, text, mask))
    model.train()
    compiled(x, t, y, text, mask).square().mean().backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Conditioning, shapes and checks
# ---------------------------------------------------------------------------------------------


def test_output_shapes_and_layouts():
    for overrides in [dict(), dict(attention="full", pos="sincos"), dict(pos="rope"), dict(adaln_single=True),
                      dict(learn_sigma=True), dict(per_frame_timesteps=False)]:
        model = R.randomize_(tiny_video("torch", **overrides)).eval()
        x, t, y, text, mask = video_inputs()
        if not model.per_frame_timesteps:
            t = t[:, 0]
        out = model(x, t, y, text, mask)
        assert out.shape == (2, model.out_channels, 2, 4, 4), overrides
        assert out.isfinite().all()


def test_temporal_patches_and_other_grid():
    model = R.randomize_(tiny_video("torch", patch_size=(2, 2, 2), input_size=(4, 4, 4))).eval()
    x = torch.randn(1, 4, 4, 4, 4)
    out = model(x, torch.rand(1, 2) * 1000, torch.tensor([1]), torch.randn(1, 3, 16))
    assert out.shape == (1, 4, 4, 4, 4)
    # a grid other than the training one gets its own sin-cos table
    out = model(torch.randn(1, 4, 6, 4, 8), torch.rand(1, 3) * 1000, torch.tensor([1]), torch.randn(1, 3, 16))
    assert out.shape == (1, 4, 6, 4, 8)


def test_per_frame_timesteps_equal_frames_match_scalar():
    model = R.randomize_(tiny_video("torch")).eval()
    x, t, y, text, mask = video_inputs()
    scalar = t[:, 0]
    with torch.no_grad():
        assert_close(model(x, scalar[:, None].expand(-1, 2).contiguous(), y, text, mask), model(x, scalar, y, text, mask))
        other = t.clone()
        other[:, 1] += 300
        assert not torch.allclose(model(x, other, y, text, mask), model(x, t, y, text, mask))


def test_text_padding_is_ignored():
    model = R.randomize_(tiny_video("torch")).eval()
    x, t, y, text, mask = video_inputs()
    garbage = text.clone()
    garbage[0, 3:] = 100 * torch.randn(2, 16)
    with torch.no_grad():
        assert_close(model(x, t, y, garbage, mask), model(x, t, y, text, mask))
        assert not torch.allclose(model(x, t, y, garbage, None), model(x, t, y, text, None))


def test_forward_with_cfg_guides_with_dropped_conditioning():
    model = R.randomize_(tiny_video("torch", learn_sigma=True, class_dropout_prob=0.1)).eval()
    x, t, y, text, mask = video_inputs()
    with pytest.raises(ValueError, match="no null class"):
        tiny_video("torch").forward_with_cfg(x, t, y, cfg_scale=2.0, text=text)
    x = torch.cat([x[:1], x[:1]])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=3.0, text=text, text_mask=mask)
        cond = model(x[:1], t[:1], y[:1], text[:1], mask[:1])
        uncond = model(x[1:], t[1:], y[1:], text[1:], mask[1:], force_drop_ids=torch.tensor([True]))
    guided = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    assert_close(out[0, :4], guided[0], name="guided channels")
    assert_close(out[0, 4:], cond[0, 4:], name="sigma channels")
    assert_close(out[1, 4:], uncond[0, 4:], name="unconditional sigma")


def test_class_dropout_in_training():
    model = R.randomize_(tiny_video("torch", class_dropout_prob=0.5, text_dim=None)).train()
    x = torch.randn(64, 4, 2, 4, 4)
    t = torch.full((64, 2), 500.0)
    y = torch.zeros(64, dtype=torch.long)
    x = x[:1].expand(64, -1, -1, -1, -1)
    with torch.no_grad():
        out = model(x, t, y)
        kept = model(x[:1], t[:1], y[:1], force_drop_ids=torch.tensor([False]))
        dropped = model(x[:1], t[:1], y[:1], force_drop_ids=torch.tensor([True]))
    is_kept = (out - kept).flatten(1).abs().max(1).values < 1e-5
    is_dropped = (out - dropped).flatten(1).abs().max(1).values < 1e-5
    assert (is_kept ^ is_dropped).all() and 10 < int(is_dropped.sum()) < 54


def test_input_checks():
    model = tiny_video("torch")
    x, t, y, text, mask = video_inputs()
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :3], t, y, text)
    with pytest.raises(ValueError, match="divisible"):
        model(x[..., :3], t, y, text)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, t[:1], y, text)
    with pytest.raises(TypeError, match="t must be"):
        model(x, 5, y, text)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, None, text)
    with pytest.raises(ValueError, match="text must be"):
        model(x, t, y, text[..., :8])
    with pytest.raises(ValueError, match="text_mask"):
        model(x, t, y, text, mask[:, :2])
    with pytest.raises(ValueError, match="attention"):
        DiTVideo(attention="axial")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiTVideo(input_size=(3, 32, 32), patch_size=(2, 2, 2), depth=1, hidden_size=64, num_heads=2)


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------


def test_tokenizer_and_text_encoder():
    tok = Tokenizer(["a", "red", "blue", "circle", "moving", "right"])
    ids, mask = tok(["a red circle moving right", "a blue circle"])
    assert ids.shape == (2, 5) and mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert tok.decode(ids[1].tolist()) == "a blue circle"
    with pytest.raises(ValueError, match="vocabulary is: a red blue circle moving right"):
        tok("a green circle")
    encoder = TextEncoder(len(tok), text_dim=16, num_heads=2).eval()
    out = encoder(ids, mask)
    assert out.shape == (2, 5, 16) and (out[1, 3:] == 0).all()
    # padding does not change the real tokens' encoding
    alone = encoder(*tok("a blue circle"))
    assert_close(alone[0], out[1, :3])
