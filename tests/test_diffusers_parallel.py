"""Context parallelism with the "dit_fast" attention backend: gloo, 2 CPU processes, diffusers' enable_parallelism.

Ulysses 2 and ring 2, forward and backward, equal to one process running diffusers' own model
(relative error <= 1e-5), on dit_fast's torch path and on its Triton kernels (the interpreter here):

* Wan (self-attention sharded, 6 heads of 24; once patched with dit_fast.patch) and LTX (its text
  and the text's padding mask sharded: under ring the second rank's text block is all padding), on
  the torch path;
* QwenImage's joint text + image attention (diffusers' ``_cp_plan`` shards both streams) with a
  padded prompt, on the Triton kernels: the self-attention key padding mask is split over the ranks
  (the second prompt's padding covers the end of rank 0's text and all of rank 1's). Ulysses runs
  diffusers' template on the backend's block ops (``_cp_forward_op`` / ``_cp_backward_op``, the
  mask all-gathered by the template); ring with a mask gathers the keys (``_gathered_keys_attention``);
  ring without a mask runs diffusers' ring template on the block ops. Each rank counts its kernel
  launches: a rank that fell back to native attention, or to the torch path, fails.

One group of forked processes serves every case (tests/dist_utils.py: FileStore rendezvous, every
collective under a 90 s timeout, barrier before teardown, every failing rank's traceback).

Two shims for CPU, in the ranks only: diffusers places rank r on accelerator r % device_count(),
which is 0 without a GPU; and its context-parallel hook calls ``logger.warning_once``, which
transformers adds to logging.Logger (transformers is not a dependency).
"""

import logging
import warnings

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

from tests.dist_utils import run_distributed  # noqa: E402
from tests.launches import count_launches  # noqa: E402
from tests.test_diffusers import perturb_  # noqa: E402

WORLD = 2
B, FRAMES, TEXT = 2, 4, 8  # Wan / LTX: 4 x 3 x 5 = 60 video tokens and 8 text tokens: both split in two
QWEN_TEXT, QWEN_IMAGE = 6, (1, 3, 4)  # QwenImage: 6 text + 12 image tokens, 3 + 6 per rank
CASES = [  # (name, model, degrees, patched, mask, dit_fast backend)
    ("wan-ulysses", "wan", dict(ulysses_degree=2), False, True, "torch"),
    ("wan-ring", "wan", dict(ring_degree=2), False, True, "torch"),
    ("wan-ring-patched", "wan", dict(ring_degree=2), True, True, "torch"),
    ("ltx-ulysses", "ltx", dict(ulysses_degree=2), False, True, "torch"),
    ("ltx-ring", "ltx", dict(ring_degree=2), False, True, "torch"),
    ("qwen-ulysses-triton", "qwen_image", dict(ulysses_degree=2), False, True, "triton"),
    ("qwen-ring-triton", "qwen_image", dict(ring_degree=2), False, True, "triton"),
    ("qwen-ring-unmasked-triton", "qwen_image", dict(ring_degree=2), False, False, "triton"),
]
# the backend's paths each Triton case must take on every rank, and the attention kernels it launches there
# (one joint attention per forward; ring's template calls the block ops once per ring step)
TRITON_PATHS = {
    "qwen-ulysses-triton": dict(_cp_forward_op=1, _cp_backward_op=1, _gathered_keys_attention=0),
    "qwen-ring-triton": dict(_cp_forward_op=0, _cp_backward_op=0, _gathered_keys_attention=1),
    "qwen-ring-unmasked-triton": dict(_cp_forward_op=WORLD, _cp_backward_op=WORLD, _gathered_keys_attention=0),
}
TRITON_LAUNCHES = {
    "qwen-ulysses-triton": 1, "qwen-ring-triton": 1, "qwen-ring-unmasked-triton": WORLD,
}
ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def build(name, mask=True):
    """(model, forward kwargs) with a fixed seed: the same on every rank and in the reference."""
    from diffusers import LTXVideoTransformer3DModel, QwenImageTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)  # the default initialisation draws from the global generator
    g = torch.Generator().manual_seed(11)
    t = torch.tensor([10.0, 700.0])
    if name == "qwen_image":
        text_mask = torch.ones(B, QWEN_TEXT, dtype=torch.long)
        text_mask[1, 2:] = 0  # the second prompt has 2 tokens: padding on both ranks, all of rank 1's text
        model = QwenImageTransformer2DModel(patch_size=2, in_channels=8, out_channels=2, num_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                                            axes_dims_rope=(4, 6, 6))
        kwargs = dict(hidden_states=torch.randn(B, QWEN_IMAGE[1] * QWEN_IMAGE[2], 8, generator=g),
                      encoder_hidden_states=torch.randn(B, QWEN_TEXT, 12, generator=g),
                      encoder_hidden_states_mask=text_mask if mask else None, timestep=t / 1000,
                      img_shapes=[QWEN_IMAGE] * B)
        return perturb_(model, seed=3), kwargs
    text_mask = torch.ones(B, TEXT, dtype=torch.long)
    text_mask[1, 3:] = 0  # the second prompt has 3 tokens: its second half is all padding
    if name == "wan":
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=24,
                                      in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=40,
                                      num_layers=2, rope_max_seq_len=32)
        kwargs = dict(hidden_states=torch.randn(B, 4, FRAMES, 6, 10, generator=g), timestep=t,
                      encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g))
    else:
        model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=6, attention_head_dim=24,
                                           cross_attention_dim=144, num_layers=2, caption_channels=16)
        kwargs = dict(hidden_states=torch.randn(B, FRAMES * 15, 4, generator=g), timestep=t,
                      encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), encoder_attention_mask=text_mask,
                      num_frames=FRAMES, height=3, width=5)
    return perturb_(model, seed=3), kwargs


def forward_backward(model, kwargs):
    """(output, d(input), {name: d(param)}) of a fixed weighted sum of the output."""
    model.train()
    x = kwargs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**kwargs, "hidden_states": x}, return_dict=False)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _shim_for_cpu():
    torch.accelerator.device_count = lambda: 1
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = logging.Logger.warning


def _count_calls(module, names, counts):
    for name in names:
        def wrapper(*args, _fn=getattr(module, name), _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        setattr(module, name, wrapper)


def _ranks(rank, world):
    """Every case on this rank: {case: {out, dx, grads (summed over the ranks), calls, launches}}."""
    _shim_for_cpu()
    warnings.filterwarnings("error", message="dit_fast attention backend")  # no fallback to diffusers' attention
    import dit_fast
    from dit_fast.integrations.diffusers import backend
    from diffusers import ContextParallelConfig

    counts = {}  # which of the backend's paths ran: one-process attention, diffusers' CP templates, gathered keys
    _count_calls(backend, ["attention", "_cp_forward_op", "_cp_backward_op", "_gathered_keys_attention"], counts)
    results = {}
    for case, name, degrees, patched, mask, kernels in CASES:
        model, kwargs = build(name, mask)
        if patched:
            dit_fast.patch(model)
        else:
            model.set_attention_backend("dit_fast")
        model.enable_parallelism(config=ContextParallelConfig(**degrees))
        counts.clear()
        with dit_fast.use_backend(kernels), count_launches() as launches:
            out, dx, grads = forward_backward(model, kwargs)
        # each rank holds the gradient of its sequence shard's loss terms: the sum is the whole gradient
        for g in [dx, *grads.values()]:
            dist.all_reduce(g)
        results[case] = {"out": out, "dx": dx, "grads": grads, "calls": dict(counts), "launches": dict(launches)}
    return results


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    return run_distributed(_ranks, WORLD, tmp_path_factory.mktemp("cp"), timeout_s=90)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|; 0 for two zero tensors (QwenImage's last text queries have
    no gradient: the text stream's output is dropped)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_context_parallel_equals_one_process(parallel_results, case):
    _, name, _, _, mask, kernels = next(c for c in CASES if c[0] == case)
    model, kwargs = build(name, mask)  # diffusers' own model, native attention, one process
    out_ref, dx_ref, grads_ref = forward_backward(model, kwargs)
    for rank, results in enumerate(parallel_results):
        got = results[case]
        assert rel_err(got["out"], out_ref) <= 1e-5, rank
        assert rel_err(got["dx"], dx_ref) <= 1e-5, rank
        assert got["grads"].keys() == grads_ref.keys()
        for key, ref in grads_ref.items():
            assert rel_err(got["grads"][key], ref) <= 1e-5, (rank, key)
        calls, launches = got["calls"], got["launches"]
        if kernels == "triton":
            assert {path: calls.get(path, 0) for path in TRITON_PATHS[case]} == TRITON_PATHS[case], (rank, calls)
            for kernel in ATTENTION_KERNELS:
                assert launches.get(kernel, 0) == TRITON_LAUNCHES[case], (rank, kernel, launches)
            continue
        assert launches == {}, (rank, launches)  # the torch path launches nothing
        # the sharded self-attention ran diffusers' CP templates on dit_fast's block ops, forward and backward;
        # LTX's sharded text keys were gathered; Wan's cross-attention is not sharded (diffusers' choice):
        # both reach dit_fast.ops.attention directly
        assert calls.get("_cp_forward_op", 0) > 0 and calls.get("_cp_backward_op", 0) > 0, calls
        assert (calls.get("_gathered_keys_attention", 0) > 0) == (name == "ltx"), calls
        assert calls.get("attention", 0) > 0, calls
    if kernels == "triton" and mask:  # the padded text keys matter: without the mask the output differs
        unmasked, _ = build(name, mask=False)
        assert rel_err(forward_backward(unmasked, {**kwargs, "encoder_hidden_states_mask": None})[0], out_ref) > 1e-3
