"""Context parallelism with the "dit_fast" attention backend: gloo, 2 CPU processes, diffusers' enable_parallelism.

Ulysses 2 and ring 2 on a tiny Wan (self-attention sharded, 6 heads of 24) and a tiny LTX (text and
its padding mask sharded too: under ring the second rank's text block is all padding), forward and
backward, equal to one process running diffusers' own model (relative error <= 1e-5 on dit_fast's
torch path). One process group serves every case (spawning is the slow part); rendezvous through
a file in tmp_path, every collective under the group's timeout, both ranks meet at a barrier before
tearing it down.

Two shims for CPU, in the workers only: diffusers places rank r on accelerator r % device_count(),
which is 0 without a GPU; and its context-parallel hook calls ``logger.warning_once``, which
transformers adds to logging.Logger (transformers is not a dependency).
"""

import datetime
import logging
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

from tests.test_diffusers import perturb_  # noqa: E402

WORLD = 2
TIMEOUT = datetime.timedelta(seconds=90)
B, FRAMES, TEXT = 2, 4, 8  # 4 x 3 x 5 = 60 video tokens and 8 text tokens: both split in two
CASES = [  # (name, model, degrees, patched)
    ("wan-ulysses", "wan", dict(ulysses_degree=2), False),
    ("wan-ring", "wan", dict(ring_degree=2), False),
    ("wan-ring-patched", "wan", dict(ring_degree=2), True),
    ("ltx-ulysses", "ltx", dict(ulysses_degree=2), False),
    ("ltx-ring", "ltx", dict(ring_degree=2), False),
]


def build(name):
    """(model, forward kwargs) with a fixed seed: the same on every rank and in the reference."""
    from diffusers import LTXVideoTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)  # the default initialisation draws from the global generator
    g = torch.Generator().manual_seed(11)
    mask = torch.ones(B, TEXT, dtype=torch.long)
    mask[1, 3:] = 0  # the second prompt has 3 tokens: its second half is all padding
    if name == "wan":
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=24,
                                      in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=40,
                                      num_layers=2, rope_max_seq_len=32)
        kwargs = dict(hidden_states=torch.randn(B, 4, FRAMES, 6, 10, generator=g), timestep=torch.tensor([10.0, 700.0]),
                      encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g))
    else:
        model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=6, attention_head_dim=24,
                                           cross_attention_dim=144, num_layers=2, caption_channels=16)
        kwargs = dict(hidden_states=torch.randn(B, FRAMES * 15, 4, generator=g), timestep=torch.tensor([10.0, 700.0]),
                      encoder_hidden_states=torch.randn(B, TEXT, 16, generator=g), encoder_attention_mask=mask,
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


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    _shim_for_cpu()
    warnings.filterwarnings("error", message="dit_fast attention backend")  # no fallback to diffusers' attention
    import dit_fast
    from dit_fast.integrations.diffusers import backend
    from diffusers import ContextParallelConfig

    counts = {}  # which of the backend's paths ran: one-process attention, diffusers' CP templates, gathered keys
    _count_calls(backend, ["attention", "_cp_forward_op", "_cp_backward_op", "_gathered_keys_attention"], counts)

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        for case, name, degrees, patched in CASES:
            model, kwargs = build(name)
            if patched:
                dit_fast.patch(model)
            else:
                model.set_attention_backend("dit_fast")
            model.enable_parallelism(config=ContextParallelConfig(**degrees))
            counts.clear()
            with dit_fast.use_backend("torch"):
                out, dx, grads = forward_backward(model, kwargs)
            # each rank holds the gradient of its sequence shard's loss terms: the sum is the whole gradient
            for g in [dx, *grads.values()]:
                dist.all_reduce(g)
            if rank == 0:
                torch.save({"out": out, "dx": dx, "grads": grads, "calls": dict(counts)},
                           os.path.join(out_dir, f"{case}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return out


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_context_parallel_equals_one_process(parallel_results, case):
    name = next(c[1] for c in CASES if c[0] == case)
    model, kwargs = build(name)  # diffusers' own model, native attention, one process
    out_ref, dx_ref, grads_ref = forward_backward(model, kwargs)
    got = torch.load(parallel_results / f"{case}.pt", weights_only=True)
    assert rel_err(got["out"], out_ref) <= 1e-5
    assert rel_err(got["dx"], dx_ref) <= 1e-5
    assert got["grads"].keys() == grads_ref.keys()
    for key, ref in grads_ref.items():
        assert rel_err(got["grads"][key], ref) <= 1e-5, key
    # the sharded self-attention ran diffusers' CP templates on dit_fast's block ops, forward and backward;
    # LTX's sharded text keys were gathered; Wan's cross-attention is not sharded (diffusers' choice):
    # both reach dit_fast.ops.attention directly
    calls = got["calls"]
    assert calls.get("_cp_forward_op", 0) > 0 and calls.get("_cp_backward_op", 0) > 0, calls
    assert (calls.get("_gathered_keys_attention", 0) > 0) == (name == "ltx"), calls
    assert calls.get("attention", 0) > 0, calls
