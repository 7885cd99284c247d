"""A real diffusers pipeline end to end: a tiny WanPipeline, patched and unpatched, gives equal frames.

Every component is random and built from a small config, offline: a WordLevel tokenizer (the
`tokenizers` library) wrapped in transformers' PreTrainedTokenizerFast, UMT5EncoderModel,
AutoencoderKLWan, WanTransformer3DModel (parameters perturbed: no zero-initialised gate hides a
branch) and the pipeline's default FlowMatchEulerDiscreteScheduler. 2 steps, 9 frames of 48 x 80
pixels -> 3 x 6 x 10 latents -> a 3 x 3 x 5 token grid (partial tiles), classifier-free guidance
with a negative prompt, a padded 16-token prompt.

dit_fast's torch path equals diffusers' own frames to fp32 rounding; the Triton kernels (the CPU
interpreter here) within the tolerance rule of tests/utils.py against the same pipeline in float64.
diffusers' hooks compose with the patch: First Block Cache (``enable_cache``) and group offloading
to disk run on both models with equal frames. A second family, LTXPipeline (T5 text encoder, LTX's
VAE, the text mask on dit_fast's attention), patched equals unpatched on the torch path.

Not here: ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``. Without an accelerator
diffusers refuses them ("requires accelerator"), and with ``device="cpu"`` accelerate's hooks would
move each model from the CPU to the CPU: nothing offloaded, nothing proven. Group offloading to disk
is the offload that really moves the weights on a CPU-only machine.
"""

import copy
import math
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="WanPipeline's text encoder: pip install -e '.[test]'")
pytest.importorskip("accelerate", reason="diffusers' group offloading: pip install -e '.[test]'")

import dit_fast  # noqa: E402
from tests.launches import count_launches  # noqa: E402
from tests.test_diffusers import EXPECTED_OPS, Calls, perturb_  # noqa: E402
from tests.utils import assert_close_to_reference  # noqa: E402

from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,  # noqa: E402
                       WanTransformer3DModel)
from diffusers.hooks import FirstBlockCacheConfig, apply_group_offloading  # noqa: E402

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT, NEGATIVE = "a red fox running through snow", "a dog in the garden"
WORDS = sorted(set(f"{PROMPT} {NEGATIVE}".split()))
CALL = dict(height=48, width=80, num_frames=9, num_inference_steps=2, guidance_scale=5.0, max_sequence_length=16)


def tiny_tokenizer():
    """A word-level tokenizer with T5's special tokens (<pad> 0, </s> 1, <unk> 2), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_transformer(layers=2, seed=0):
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=32)
    return perturb_(model, seed)


@pytest.fixture(scope="module")
def parts():
    """Tokenizer, text encoder and VAE shared by every pipeline here (none of them is patched or hooked)."""
    return tiny_wan_parts()


def tiny_wan_parts():
    """A tiny WanPipeline's tokenizer, UMT5 text encoder and VAE, random, from small configs, offline (also
    tests/test_sparse_benchmarks.py's)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                           latents_std=[1.5, 2.0, 0.8, 1.2])
    return dict(tokenizer=tiny_tokenizer(), text_encoder=UMT5EncoderModel(config).eval(), vae=vae.eval())


def pipeline(parts, transformer, **config):
    pipe = WanPipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def float64(parts):
    """Copies of the modules in float64 (``.double()``: diffusers' ``.to(dtype)`` warns about fp32 modules)."""
    return {name: copy.deepcopy(part).double() if isinstance(part, torch.nn.Module) else part
            for name, part in parts.items()}


def generate(pipe, **overrides):
    """(frames (1, F, 3, H, W) in [0, 1], the last step's latents) of one seeded call."""
    latents = []
    frames = pipe(PROMPT, negative_prompt=NEGATIVE, **{**CALL, **overrides}, output_type="pt",
                  generator=torch.Generator().manual_seed(0),
                  callback_on_step_end=lambda p, i, t, kw: latents.append(kw["latents"]) or {}).frames
    assert frames.shape == (1, 9, 3, 48, 80) and torch.isfinite(frames).all()
    return frames, latents[-1]


def patched(model, backend="auto"):
    other = copy.deepcopy(model)
    assert dit_fast.patch(other, backend=backend) is other
    return other


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Patched equals unpatched
# ---------------------------------------------------------------------------------------------


VARIANTS = {  # WanPipeline modes: transformers, pipeline config, call overrides
    "wan2.1": (1, {}, {}),
    "wan2.2 two experts": (2, {"boundary_ratio": 0.9}, {"guidance_scale_2": 3.0}),  # step 1 expert 1, step 2 expert 2
    "wan2.2 ti2v per-token timesteps": (1, {"expand_timesteps": True}, {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pipeline_patched_equals_unpatched_torch_path(parts, variant, monkeypatch):
    experts, config, call = VARIANTS[variant]
    models = {"transformer": tiny_transformer(seed=0)}
    if experts == 2:
        models["transformer_2"] = tiny_transformer(seed=1)
    with torch.no_grad():
        expected, expected_latents = generate(pipeline(parts, **models, **config), **call)
        ours = {name: patched(model) for name, model in models.items()}
        ran = {name: [] for name in ours}
        for name, model in ours.items():
            model.register_forward_pre_hook(lambda *a, _ran=ran[name]: _ran.append(1))
        calls = Calls(monkeypatch)
        with dit_fast.use_backend("torch"), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            frames, latents = generate(pipeline(parts, **ours, **config), **call)
    assert rel_err(latents, expected_latents) <= 1e-5
    assert (frames - expected).abs().max().item() <= 1e-5
    assert EXPECTED_OPS["wan"] <= set(calls.counts), calls.counts
    assert all(ran.values()), ran  # two experts: both patched, both denoised a step


def test_pipeline_on_triton_kernels(parts):
    """The patched pipeline on dit_fast's Triton kernels (the GPU when there is one, else the interpreter)
    within the tolerance rule: the unpatched pipeline in float64 is the oracle, in float32 PyTorch's own
    error. One block, no guidance (the interpreter is slow)."""
    model = tiny_transformer(layers=1)
    call = dict(guidance_scale=1.0)
    with torch.no_grad():
        frames64, latents64 = generate(pipeline(float64(parts), copy.deepcopy(model).double()), **call)
        frames32, latents32 = generate(pipeline(parts, model), **call)
        ours = pipeline(copy.deepcopy(parts), patched(model, backend="triton")).to(KERNEL_DEVICE)
        with count_launches() as launches, warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            frames, latents = (t.cpu() for t in generate(ours, **call))
    steps = CALL["num_inference_steps"]  # one transformer call per step, one self- and one cross-attention
    counted = {"_attn_fwd_kernel": 2 * steps, "_rope_3d_kernel": 2 * steps, "_adaln_forward_kernel": 4 * steps}
    for kernel, n in counted.items():  # on a GPU a cold autotune cache may launch more
        assert launches[kernel] == n if KERNEL_DEVICE == "cpu" else launches[kernel] >= n, (kernel, dict(launches))
    assert_close_to_reference("Wan pipeline latents", latents, latents64, latents32)
    assert_close_to_reference("Wan pipeline frames", frames, frames64, frames32)


# ---------------------------------------------------------------------------------------------
# diffusers' hooks on a patched model
# ---------------------------------------------------------------------------------------------


def test_pipeline_with_first_block_cache(parts):
    """First Block Cache on both models: the second step reuses the cached tail (the last block's FFN runs
    on the first step only, conditional and unconditional), and the patched pipeline equals the unpatched."""
    model = tiny_transformer()
    runs = {}
    with torch.no_grad():
        for name, transformer in (("diffusers", copy.deepcopy(model)), ("dit_fast", patched(model))):
            transformer.enable_cache(FirstBlockCacheConfig(threshold=math.inf))  # every later step hits the cache
            tail = []
            transformer.blocks[-1].ffn.register_forward_hook(lambda *a, _tail=tail: _tail.append(1))
            with dit_fast.use_backend("torch"), warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                runs[name] = generate(pipeline(parts, transformer))
            assert len(tail) == 2, (name, len(tail))  # 4 without the cache
    assert rel_err(runs["dit_fast"][1], runs["diffusers"][1]) <= 1e-5  # latents
    assert (runs["dit_fast"][0] - runs["diffusers"][0]).abs().max().item() <= 1e-5  # frames


def test_pipeline_with_group_offloading_to_disk(parts, tmp_path):
    """diffusers' group offloading (block level, onloaded to the CPU from safetensors files on disk) on both
    models: the weights in memory are overwritten with NaN after offloading, so equal finite frames prove
    each block was loaded back from disk before its (patched) forward ran."""
    model = tiny_transformer()
    runs = {}
    with torch.no_grad():
        for name, transformer in (("diffusers", copy.deepcopy(model)), ("dit_fast", patched(model))):
            apply_group_offloading(transformer, onload_device=torch.device("cpu"), offload_type="block_level",
                                   num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / name))
            for p in transformer.parameters():
                p.fill_(float("nan"))
            with dit_fast.use_backend("torch"), warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                runs[name] = generate(pipeline(parts, transformer))
            assert len(list((tmp_path / name).glob("*.safetensors"))) >= 2
    assert rel_err(runs["dit_fast"][1], runs["diffusers"][1]) <= 1e-5  # latents
    assert (runs["dit_fast"][0] - runs["diffusers"][0]).abs().max().item() <= 1e-5  # frames


# ---------------------------------------------------------------------------------------------
# A second family: LTXPipeline
# ---------------------------------------------------------------------------------------------


def tiny_ltx_pipeline(transformer):
    """LTXPipeline from small configs (T5EncoderModel, AutoencoderKLLTXVideo with 4x spatial and temporal
    compression): 9 frames of 32 x 32 pixels -> 3 x 8 x 8 latents, 192 tokens."""
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    pipe = LTXPipeline(tokenizer=tiny_tokenizer(), text_encoder=T5EncoderModel(config).eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ltx_pipeline_patched_equals_unpatched_torch_path(monkeypatch):
    """LTXPipeline (its text mask becomes a key-padding mask on dit_fast's attention), 2 steps with guidance."""
    from diffusers import LTXVideoTransformer3DModel

    model = perturb_(LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                                num_attention_heads=3, attention_head_dim=24, cross_attention_dim=72,
                                                num_layers=2, caption_channels=16))
    call = dict(height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=16)
    runs = {}
    with torch.no_grad():
        for name, transformer in (("diffusers", model), ("dit_fast", patched(model))):
            latents = []
            calls = Calls(monkeypatch)
            with dit_fast.use_backend("torch"), warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # the -10000 text mask runs on dit_fast's kernels
                frames = tiny_ltx_pipeline(transformer)(
                    PROMPT, negative_prompt=NEGATIVE, **call, output_type="pt",
                    generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=lambda p, i, t, kw, _l=latents: _l.append(kw["latents"]) or {}).frames
            runs[name] = frames, latents[-1], dict(calls.counts)
            monkeypatch.undo()
    assert runs["diffusers"][2] == {} and EXPECTED_OPS["ltx"] <= set(runs["dit_fast"][2]), runs["dit_fast"][2]
    assert runs["dit_fast"][0].shape == (1, 9, 3, 32, 32)
    assert rel_err(runs["dit_fast"][1], runs["diffusers"][1]) <= 1e-5  # latents
    assert (runs["dit_fast"][0] - runs["diffusers"][0]).abs().max().item() <= 1e-5  # frames
