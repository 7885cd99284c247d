"""Sparse attention in models: ``dit_fast.patch(transformer, sparse=...)`` on the tiny Wan and HunyuanVideo
of tests/test_diffusers.py (3 x 3 x 5 token grid, HunyuanVideo's 7 padded text tokens as the extra tiles).

The reference for a pattern is diffusers' own model whose self-attention processors get the token mask of
the same blocks as an attention mask (its native attention, masked): an independent path. At density 1
the sparse op keeps every tile and equals the dense patched model; the schedule's dense steps equal it
too; a calibration saved and loaded reproduces the choices and the outputs bitwise.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
from dit_fast.integrations.diffusers.sparse import SELF_ATTENTION  # noqa: E402
from dit_fast.sparse import SparseAttention  # noqa: E402
from dit_fast.sparse.patterns import sliding_tile  # noqa: E402
from tests.launches import count_launches  # noqa: E402
from tests.test_diffusers import assert_close_to_reference, build, rel_err, run  # noqa: E402

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: Triton's interpreter on CPU
FAMILIES = {"wan": "WanTransformer3DModel", "hunyuan_video": "HunyuanVideoTransformer3DModel"}
GRID, TILE = (3, 3, 5), (1, 2, 2)  # 3 x 2 x 3 tiles, partial along h and w


class MaskedReference:
    """diffusers' own processor with a token mask (1, heads | 1, S, S) as its attention mask (and the model's
    key padding mask on top): the reference of a sparse self-attention layer."""

    def __init__(self, original, token_mask):
        self.original, self.token_mask = original, token_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 image_rotary_emb=None):
        mask = self.token_mask if attention_mask is None else attention_mask.bool() & self.token_mask
        return self.original(attn, hidden_states, encoder_hidden_states, mask, rotary_emb or image_rotary_emb)


def masked_reference(model, name, blocks):
    ref = copy.deepcopy(model)
    for module in SELF_ATTENTION[FAMILIES[name]](ref):
        module.set_processor(MaskedReference(module.processor, blocks.token_mask("raster")))
    return ref


def sparse_copy(model, sparse, backend="auto"):
    other = copy.deepcopy(model)
    dit_fast.patch(other, backend=backend, sparse=sparse)
    return other


def _inputs(name, seed=1):
    model, inputs = build(name)
    return model, inputs(torch.float32, torch.Generator().manual_seed(seed))




@pytest.mark.parametrize("name", list(FAMILIES))
def test_sliding_tile_equals_masked_reference(name):
    model, kwargs = _inputs(name)
    sparse = SparseAttention(pattern="sliding_tile", density=0.3, tile=TILE)
    patched = sparse_copy(model, sparse)
    with torch.no_grad(), dit_fast.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no dense fallback
        actual = run(patched, kwargs)
    runtime = patched._dit_fast_sparse
    layers = len(SELF_ATTENTION[FAMILIES[name]](model))
    kept = runtime.kept_fractions()
    assert sorted(kept) == list(range(layers)) and all(f < 1 for f in kept.values()), kept
    window = sparse.choices_for(GRID, 0)[0]["window"]
    extra = 7 if name == "hunyuan_video" else 0
    blocks = sliding_tile(sparse.layout(GRID, extra), window)
    with torch.no_grad():
        expected = run(masked_reference(model, name, blocks), kwargs)
        dense = run(model, kwargs)
    assert rel_err(actual, expected) <= 1e-5
    assert rel_err(actual, dense) > 1e-3  # the pattern changed the result: the sparse path really ran


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("pattern", ["sliding_tile", "radial", "topk"])
def test_density_one_equals_dense(name, pattern):
    model, kwargs = _inputs(name, seed=2)
    patched = sparse_copy(model, SparseAttention(pattern=pattern, density=1.0, tile=TILE))
    with torch.no_grad(), dit_fast.use_backend("torch"):
        actual = run(patched, kwargs)
        expected = run(model, kwargs)
    assert set(patched._dit_fast_sparse.kept_fractions().values()) == {1.0}  # the block-sparse op ran every layer
    assert rel_err(actual, expected) <= 1e-5


def test_schedule_dense_steps_then_sparse_wan():
    """Step 0 (twice, as CFG's two calls) dense, step 1 sparse, a new generation dense again; dense_layers stay
    dense."""
    model, kwargs = _inputs("wan", seed=3)
    sparse = SparseAttention(pattern="sliding_tile", density=0.3, tile=TILE, dense_steps=1, dense_layers=[1])
    patched = sparse_copy(model, sparse)
    dense_patched = sparse_copy(model, None)
    runtime = patched._dit_fast_sparse
    outputs = {}
    with torch.no_grad(), dit_fast.use_backend("torch"):
        for label, t in [("s0", 800.0), ("s0-cfg", 800.0), ("s1", 600.0), ("new", 900.0)]:
            timestep = torch.full((2,), t)
            outputs[label] = run(patched, {**kwargs, "timestep": timestep})
            outputs[label + "-dense"] = run(dense_patched, {**kwargs, "timestep": timestep})
            outputs[label + "-kept"] = runtime.kept_fractions()
    for label in ("s0", "s0-cfg", "new"):
        assert torch.equal(outputs[label], outputs[label + "-dense"]), label
        assert outputs[label + "-kept"] == {0: 1.0, 1: 1.0}
    assert rel_err(outputs["s1"], outputs["s1-dense"]) > 1e-3
    assert outputs["s1-kept"][1] == 1.0 and outputs["s1-kept"][0] < 1.0


def test_schedule_reads_a_positional_timestep():
    """The transformer called positionally (hidden_states, timestep, encoder_hidden_states): the pre-hook reads the
    step from the second argument, so dense_steps=1 runs step 0 dense and step 1 sparse."""
    model, kwargs = _inputs("wan", seed=3)
    patched = sparse_copy(model, SparseAttention(pattern="sliding_tile", density=0.3, tile=TILE, dense_steps=1))
    kept = []
    with torch.no_grad(), dit_fast.use_backend("torch"):
        for t in (800.0, 600.0):
            patched(kwargs["hidden_states"], torch.full((2,), t), kwargs["encoder_hidden_states"], return_dict=False)
            kept.append(patched._dit_fast_sparse.kept_fractions())
    assert kept[0] == {0: 1.0, 1: 1.0} and max(kept[1].values()) < 1, kept


def test_training_has_no_schedule():
    """A model training with gradients has no denoising schedule (dense_steps do not apply: every layer outside
    dense_layers is sparse), both dit_fast's DiTVideo and a patched diffusers Wan; the same model sampling
    (eval, no grad) at the same timesteps runs its dense first step."""
    sparse = SparseAttention(pattern="sliding_tile", density=0.3, tile=(2, 2, 2), dense_steps=5)
    dit = tiny_dit(sparse, backend="torch")
    x, t, y = dit_inputs()
    dit.train()(x, t, y).sum().backward()
    assert max(dit.sparse.kept_fractions().values()) < 1, dit.sparse.kept_fractions()
    with torch.no_grad():
        dit.eval()(x, t, y)
    assert set(dit.sparse.kept_fractions().values()) == {1.0}

    model, kwargs = _inputs("wan", seed=3)
    wan = sparse_copy(model, SparseAttention(pattern="sliding_tile", density=0.3, tile=TILE, dense_steps=5))
    with dit_fast.use_backend("torch"):
        run(wan.train(), kwargs).sum().backward()
        assert max(wan._dit_fast_sparse.kept_fractions().values()) < 1, wan._dit_fast_sparse.kept_fractions()
        with torch.no_grad():
            run(wan.eval(), kwargs)
    assert set(wan._dit_fast_sparse.kept_fractions().values()) == {1.0}


def test_sparse_install_refuses_a_layer_on_another_processor():
    """A self-attention layer whose processor is not dit_fast's would ignore its sparse layer (silently dense):
    install refuses the model, naming the layer, and leaves no runtime on it."""
    from dit_fast.integrations.diffusers.sparse import install

    model, _ = build("wan")
    dit_fast.patch(model)
    attn = model.blocks[1].attn1
    attn.set_processor(attn.processor.original)  # diffusers' own processor back on layer 1
    with pytest.raises(ValueError, match=r"self-attention layers \[1\] of this WanTransformer3DModel do not run"):
        install(model, "WanTransformer3DModel", SparseAttention())
    assert not hasattr(model, "_dit_fast_sparse") and model.blocks[0].attn1.processor.sparse is None


@pytest.mark.parametrize("name", list(FAMILIES))
def test_calibration_reproducible_from_json(name, tmp_path):
    model, kwargs = _inputs(name, seed=4)
    sparse = SparseAttention(pattern=("sliding_tile", "radial"), density=0.2, tolerance=0.3, tile=TILE)
    patched = sparse_copy(model, sparse)
    with torch.no_grad(), dit_fast.use_backend("torch"):
        first = run(patched, kwargs)
    assert patched._dit_fast_sparse.calibration_errors  # it calibrated
    path = sparse.save(tmp_path / f"{name}.json")
    loaded = SparseAttention.load(path)
    assert loaded.model == FAMILIES[name] and loaded.choices == sparse.choices
    again = sparse_copy(model, loaded)
    with torch.no_grad(), dit_fast.use_backend("torch"):
        second = run(again, kwargs)
    assert not again._dit_fast_sparse.calibration_errors  # the file's choices ran, nothing was measured
    assert torch.equal(first, second)


def test_patch_sparse_errors():
    model, _ = build("ltx")
    with pytest.raises(ValueError, match="supports WanTransformer3DModel, HunyuanVideoTransformer3DModel"):
        dit_fast.patch(model, sparse=SparseAttention())
    assert not hasattr(model, "_dit_fast_patched")  # refused before anything was patched
    wan, _ = build("wan")
    with pytest.raises(TypeError, match="sparse must be a dit_fast.SparseAttention"):
        dit_fast.patch(wan, sparse="sliding_tile")
    with pytest.raises(ValueError, match="dense_layers"):
        dit_fast.patch(copy.deepcopy(wan), sparse=SparseAttention(dense_layers=[5]))
    loaded = SparseAttention()
    loaded.record(GRID, 0, [{"pattern": "dense"}])
    loaded.bind("HunyuanVideoTransformer3DModel")
    with pytest.raises(ValueError, match="calibration for HunyuanVideoTransformer3DModel"):
        dit_fast.patch(copy.deepcopy(wan), sparse=loaded)


def test_sparse_wan_on_the_kernels():
    """The patched tiny Wan (one block) on the Triton kernels (interpreter): the block-sparse kernels launch and
    the output is within the tolerance rule of the same blocks in float64."""
    model, inputs = build("wan", layers=1)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(5))
    sparse = SparseAttention(pattern="sliding_tile", density=0.3, tile=TILE)
    patched = sparse_copy(model, sparse, backend="triton")
    with torch.no_grad(), count_launches() as launches:
        actual = run(patched, kwargs, KERNEL_DEVICE).cpu()
    assert launches.total("_sparse_fwd") == 1, launches
    blocks = sliding_tile(sparse.layout(GRID), sparse.choices_for(GRID, 0)[0]["window"])
    reference = masked_reference(model, "wan", blocks)
    kwargs64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        ref64 = run(copy.deepcopy(reference).double(), kwargs64)
        ref32 = run(reference, kwargs)
    assert_close_to_reference("sparse wan", actual, ref64.float(), ref32)


# ---------------------------------------------------------------------------------------------
# DiTVideo(attention="block_sparse", sparse=...): tokens tile-major inside the model, RoPE included
# ---------------------------------------------------------------------------------------------


class MaskedSpacetimeAttention(torch.nn.Module):
    """SpacetimeAttention's math with attention_reference and a fixed token mask: the reference of a sparse layer."""

    def __init__(self, attn, token_mask):
        super().__init__()
        self.attn, self.token_mask = attn, token_mask

    def forward(self, x, grid):
        from dit_fast.ops.flash_attention import attention_reference
        from dit_fast.ops.rope import apply_rope_3d_reference

        a = self.attn
        B, S, C = x.shape
        q, k, v = a.qkv(x).reshape(B, S, 3, a.num_heads, a.head_dim).unbind(2)
        q, k = a.q_norm(q), a.k_norm(k)
        if a.rope is not None:
            q = apply_rope_3d_reference(q, grid, a.rope.theta, a.rope.split)
            k = apply_rope_3d_reference(k, grid, a.rope.theta, a.rope.split)
        return a.proj(attention_reference(q, k, v, mask=self.token_mask).reshape(B, S, C))


def tiny_dit(sparse=None, seed=0, **kwargs):
    from dit_fast.models import DiT_models

    torch.manual_seed(seed)
    extra = dict(attention="block_sparse", sparse=sparse) if sparse is not None else {}
    model = DiT_models["DiT-tiny"](pos="both", qk_norm=True, **extra, **kwargs)  # grid (4, 4, 4): 64 tokens
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero and the zeroed output layer would hide every branch
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return model


def dit_inputs(per_frame=False, seed=7):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([[10.0, 300.0, 500.0, 900.0], [700.0] * 4]) if per_frame else torch.tensor([10.0, 700.0])
    return torch.randn(2, 4, 4, 8, 8, generator=g), t, torch.tensor([1, 2])


def _forward_backward(model, x, t, y):
    model.train()
    model.zero_grad()
    out = model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.bool, device=x.device))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("per_frame", [False, True], ids=["tile-major", "raster"])
def test_dit_video_sparse_equals_masked_reference_forward_and_backward(per_frame):
    """Sliding tiles in DiTVideo (tile-major tokens, RoPE at raster positions; per-frame timesteps keep raster order)
    equal the same weights with every attention masked by the same blocks' token mask, output and every gradient."""
    from dit_fast.models.dit_video import DiTVideo

    sparse = SparseAttention(pattern="sliding_tile", density=0.3, tile=(2, 2, 2))
    model = tiny_dit(sparse, per_frame_timesteps=per_frame, backend="torch")
    x, t, y = dit_inputs(per_frame)
    out, grads = _forward_backward(model, x, t, y)
    assert model.sparse.order == ("raster" if per_frame else "tiles")
    assert set(model.sparse.kept_fractions()) == {0, 1} and max(model.sparse.kept_fractions().values()) < 1
    window = sparse.choices_for((4, 4, 4), 0)[0]["window"]
    mask = sliding_tile(sparse.layout((4, 4, 4)), window).token_mask("raster")
    reference = tiny_dit(None, per_frame_timesteps=per_frame, backend="torch")
    reference.load_state_dict(model.state_dict())
    for block in reference.blocks:
        block.attn = MaskedSpacetimeAttention(block.attn, mask)
    assert isinstance(reference, DiTVideo)
    out_ref, grads_ref = _forward_backward(reference, x, t, y)
    assert rel_err(out, out_ref) <= 1e-5
    names = {n.replace("attn.attn.", "attn.") for n in grads_ref}
    assert {n for n in grads} == names
    for name, g in grads_ref.items():
        assert rel_err(grads[name.replace("attn.attn.", "attn.")], g) <= 1e-5, name


def test_dit_video_density_one_equals_full_attention():
    model = tiny_dit(SparseAttention(pattern="topk", density=1.0, tile=(1, 2, 2)), backend="torch")
    full = tiny_dit(None, backend="torch")
    full.load_state_dict(model.state_dict())
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert rel_err(model.eval()(x, t, y), full.eval()(x, t, y)) <= 1e-5
    assert model.sparse.kept_fractions() == {0: 1.0, 1: 1.0}


def test_sparse_gradient_reaches_kept_keys_only():
    """Through a DiTVideo sparse layer: the loss of one query tile's outputs gives zero gradient to every key
    and value outside its kept tiles, and a non-zero one inside."""
    from dit_fast.sparse.runtime import SelfAttentionLayer, SparseRuntime

    sparse = SparseAttention(pattern="sliding_tile", density=0.2, tile=(2, 2, 2))
    runtime = SparseRuntime(sparse, "Test")
    layer = SelfAttentionLayer(runtime, 0)
    grid = (4, 4, 4)
    q, k, v = (torch.randn(1, 64, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    runtime.observe(0, training=True)
    out = layer(q, k, v, grid, rope="3d", backend="torch")
    layout = sparse.layout(grid)
    tile_of = layout.token_tile()
    out[:, tile_of == 0].sum().backward()  # only query tile 0's outputs
    kept = sliding_tile(layout, sparse.choices_for(grid, 0)[0]["window"]).tile_mask()[0, 0, 0]  # key tiles of tile 0
    visible = kept[tile_of]  # (S,) keys tile 0 sees
    assert 0 < int(visible.sum()) < 64
    for grad in (k.grad, v.grad):
        assert (grad[:, ~visible] == 0).all()
        assert (grad[:, visible].abs().sum((-1, -2)) > 0).all()


def test_dit_video_sparse_errors():
    from dit_fast.models import DiT_models

    with pytest.raises(ValueError, match="attention='block_sparse' takes sparse="):
        DiT_models["DiT-tiny"](attention="block_sparse")
    with pytest.raises(ValueError, match="sparse= needs attention='block_sparse'"):
        DiT_models["DiT-tiny"](sparse=SparseAttention())
    with pytest.raises(TypeError, match="sparse must be a dit_fast.SparseAttention"):
        DiT_models["DiT-tiny"](attention="block_sparse", sparse="sliding_tile")
    with pytest.raises(ValueError, match="dense_layers"):
        DiT_models["DiT-tiny"](attention="block_sparse", sparse=SparseAttention(dense_layers=[2]))
    with pytest.raises(ValueError, match="DiTVideo"):
        dit_fast.patch(torch.nn.Linear(2, 2), sparse=SparseAttention())


def test_dit_video_sparse_on_the_kernels():
    """One DiTVideo block with topk blocks on the Triton kernels (interpreter), forward and backward: the
    block-sparse kernels launch (forward, dK/dV, dQ) and output and gradients equal the torch path's (fp32)."""
    sparse = SparseAttention(pattern="topk", density=0.3, tile=(2, 2, 2))
    model = tiny_dit(sparse, backend="triton", depth=1).to(KERNEL_DEVICE)
    x, t, y = (tensor.to(KERNEL_DEVICE) for tensor in dit_inputs())
    with count_launches() as launches:
        out, grads = _forward_backward(model, x, t, y)
    out, grads, x, t, y = out.cpu(), {n: g.cpu() for n, g in grads.items()}, x.cpu(), t.cpu(), y.cpu()
    assert launches.total("_sparse_fwd") == 1 and launches.total("_sparse") >= 3, launches
    reference = tiny_dit(SparseAttention(pattern="topk", density=0.3, tile=(2, 2, 2)), backend="torch", depth=1)
    reference.load_state_dict({n: p.cpu() for n, p in model.state_dict().items()})
    out_ref, grads_ref = _forward_backward(reference, x, t, y)
    assert rel_err(out, out_ref) <= 1e-4
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "x_embedder.proj.weight"):
        assert rel_err(grads[name], grads_ref[name]) <= 1e-4, name


# ---------------------------------------------------------------------------------------------
# dit-fast train --sparse: saved in the run's config, used by resume and generate
# ---------------------------------------------------------------------------------------------

SPARSE_SPEC = "sliding_tile:density=0.5,tile=1x1x1"
TINY_TRAIN = ["--num-frames", "4", "--size", "16", "--patch", "2", "4", "4", "--hidden-size", "32", "--depth", "2",
              "--num-heads", "2", "--text-dim", "16", "--batch-size", "2", "--checkpoint-every", "2", "--warmup", "1",
              "--device", "cpu", "--backend", "torch", "--quiet"]  # a 2 x 4 x 4 token grid


def test_train_with_sparse_then_resume_and_generate(tmp_path, capsys):
    from dit_fast.cli import main
    from dit_fast.generate import load_model

    run = str(tmp_path / "run")
    assert main(["train", "--out-dir", run, *TINY_TRAIN, "--steps", "2", "--sparse", SPARSE_SPEC]) == 0
    model, cfg = load_model(run, ema=False)
    assert cfg.sparse == SPARSE_SPEC and model.dit.attention == "block_sparse"
    assert model.dit.sparse.config.spec() == SparseAttention.from_spec(SPARSE_SPEC).spec()
    assert main(["train", "--out-dir", run, *TINY_TRAIN, "--steps", "3", "--sparse", SPARSE_SPEC]) == 0  # resumed
    model, cfg = load_model(run, ema=False)
    assert cfg.steps == 3
    out = tmp_path / "x.gif"
    assert main(["generate", "a red circle moving left", "--checkpoint", run, "--steps", "2", "--device", "cpu",
                 "--quiet", "-o", str(out)]) == 0 and out.exists()
    from dit_fast.generate import generate

    generate(model, cfg, ["a red circle moving left"], steps=2, progress_bar=False)  # what generate runs
    kept = model.dit.sparse.kept_fractions()
    assert kept and all(f < 1 for f in kept.values()), kept  # every block ran sparse while sampling


@pytest.mark.parametrize("spec,match", [("magic", "pattern must be one of"), ("sliding_tile:density=2", "density"),
                                        ("sliding_tile:dense_layers=2", "past depth")])
def test_train_sparse_mistakes_are_one_line(tmp_path, capsys, spec, match):
    from dit_fast.cli import main

    assert main(["train", "--out-dir", str(tmp_path / "r"), *TINY_TRAIN, "--steps", "1", "--sparse", spec]) == 2
    err = capsys.readouterr().err
    assert "argument --sparse" in err and match in err and len(err.strip().splitlines()) == 1


def test_train_sparse_under_ring_is_one_line(tmp_path, capsys, monkeypatch):
    """--sparse with --sp-mode ring (rank 0 of a 2-rank torchrun, stated by the environment): refused by the
    argument checks before any process group, one line naming --sparse and the mode."""
    from dit_fast.cli import main

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    argv = ["train", "--out-dir", str(tmp_path / "r"), *TINY_TRAIN, "--steps", "1", "--sp", "2", "--sp-mode", "ring",
            "--sparse", "sliding_tile"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "argument --sparse" in err and "--sp-mode ulysses" in err and len(err.strip().splitlines()) == 1
