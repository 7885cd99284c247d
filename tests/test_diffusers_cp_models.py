"""Context parallelism on the other classes diffusers has a ``_cp_plan`` for, with the "dit_fast" backend.

ChronoEdit, LTX-2 (audio + video), Helios and MiniMax-H3 (tests/test_diffusers_parallel.py covers Wan
and LTX): Ulysses 2 and ring 2 on 2 gloo CPU processes through diffusers' ``enable_parallelism``, on
dit_fast's torch path, forward and backward (Helios: forward, see FORWARD_ONLY) equal to one process
running diffusers' own model (relative error <= 1e-5); ChronoEdit and LTX-2 also patched by
``dit_fast.patch``, and ChronoEdit's Ulysses on the Triton kernels (the interpreter on CPU), within the
tolerance rule against a float64 one-process run. One process group serves every case; the text is 8
tokens (diffusers' equal split of LTX-2's prompt). Outputs that diffusers gathers count once; LTX-2's
audio stream is not split (its plan shards the video and the prompt): each rank holds all of it and
weighs its loss by 1 / world, so the gradients summed over the ranks are the whole gradient. LTX-2 runs
with isolate_modalities=True (see EXTRA: diffusers' plan does not shard the audio <-> video cross-
attention's RoPE).

The workers shim CPU as tests/test_diffusers_parallel.py does (accelerator count 1, Logger.warning_once).
"""

import copy
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

from tests import diffusers_zoo as zoo  # noqa: E402
from tests.test_diffusers_parallel import _count_calls, _shim_for_cpu  # noqa: E402
from tests.utils import assert_close_to_reference  # noqa: E402

WORLD = 2
TEXT = 8
TIMEOUT = datetime.timedelta(seconds=120)
CASES = [  # (name, zoo case, degrees, patched, ops backend)
    ("chronoedit-ulysses", "chronoedit", dict(ulysses_degree=2), False, "torch"),
    ("chronoedit-ring", "chronoedit", dict(ring_degree=2), False, "torch"),
    ("chronoedit-ring-patched", "chronoedit", dict(ring_degree=2), True, "torch"),
    ("chronoedit-ulysses-triton", "chronoedit", dict(ulysses_degree=2), False, "triton"),
    ("ltx2-ulysses", "ltx2", dict(ulysses_degree=2), False, "torch"),
    ("ltx2-ring", "ltx2", dict(ring_degree=2), False, "torch"),
    ("ltx2-ulysses-patched", "ltx2", dict(ulysses_degree=2), True, "torch"),
    ("helios-ulysses", "helios", dict(ulysses_degree=2), False, "torch"),
    ("helios-ring", "helios", dict(ring_degree=2), False, "torch"),
    ("minimax_h3-ulysses", "minimax_h3", dict(ulysses_degree=2), False, "torch"),
    ("minimax_h3-ring", "minimax_h3", dict(ring_degree=2), False, "torch"),
]
REPLICATED = {"ltx2": (1,)}  # outputs every rank holds whole (not gathered by the plan)
# diffusers 0.42.1's LTX-2 plan shards the video but not the audio <-> video cross-attention's RoPE
# (cross_attn_rope): with the modalities joined its own processor fails on a shard (a RuntimeError in
# apply_interleaved_rotary_emb, whatever the backend). Each modality alone is what its plan supports.
EXTRA = {"ltx2": dict(isolate_modalities=True)}
# Helios's plan splits and gathers around each attention and MLP: the residual stream runs whole on
# every rank, and diffusers' gather backward keeps each rank's slice, so the ranks' parameter gradients
# are not shares of the whole (the residual path is counted once per rank): inference only, forward tested.
FORWARD_ONLY = ("helios",)


def cp_plan(model):
    """The class's _cp_plan, without entries for blocks the tiny model lacks (Helios's names blocks 0-39, the
    released model's 40: enable_parallelism refuses a plan naming a missing module)."""
    blocks = len(getattr(model, "blocks", ()))
    plan = type(model)._cp_plan
    if not blocks or not any(key.startswith(f"blocks.{blocks}.") for key in plan):
        return None  # the class's own
    return {key: value for key, value in plan.items()
            if not (key.startswith("blocks.") and key.split(".")[1].isdigit() and int(key.split(".")[1]) >= blocks)}


def forward_backward(model, inputs, case, world=1, dtype=torch.float32):
    """(outputs, d(video input), {name: d(param)}) of a fixed weighted sum of the outputs."""
    model.train()
    kwargs = dict(inputs(dtype, torch.Generator().manual_seed(1)), **EXTRA.get(case, {}))
    x = kwargs["hidden_states"].requires_grad_(True)
    outs = zoo.tensors(model(**kwargs, return_dict=False))
    loss = 0
    for i, out in enumerate(outs):
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5 + i)).to(out.dtype)
        share = 1.0 / world if i in REPLICATED.get(case, ()) else 1.0
        loss = loss + (out * weights).sum() * share
    loss.backward()
    return ([o.detach() for o in outs], x.grad,
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def _worker(rank, store, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (the parent's conftest set it; a spawned child re-reads)
    torch.set_num_threads(1)
    _shim_for_cpu()
    zoo.TEXT = TEXT
    from tests import triton_interpreter

    triton_interpreter.patch_interpreter()
    warnings.filterwarnings("error", message="dit_fast attention backend")  # no fallback to diffusers' attention
    import dit_fast
    from diffusers import ContextParallelConfig
    from dit_fast.integrations.diffusers import backend

    counts = {}
    _count_calls(backend, ["attention", "_cp_forward_op", "_cp_backward_op", "_gathered_keys_attention"], counts)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        for name, case, degrees, patched, ops_backend in CASES:
            model, inputs = zoo.build(case)
            if patched:
                dit_fast.patch(model)
            else:
                model.set_attention_backend("dit_fast")
            model.enable_parallelism(config=ContextParallelConfig(**degrees), cp_plan=cp_plan(model))
            counts.clear()
            with dit_fast.use_backend(ops_backend):
                outs, dx, grads = forward_backward(model, inputs, case, WORLD)
            for g in [dx, *grads.values()]:  # each rank holds its shard's share: the sum is the whole gradient
                dist.all_reduce(g)
            if rank == 0:
                torch.save({"outs": outs, "dx": dx, "grads": grads, "calls": dict(counts)},
                           os.path.join(out_dir, f"{name}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("cp_models")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(autouse=True)
def _text_of_eight(monkeypatch):
    monkeypatch.setattr(zoo, "TEXT", TEXT)


def _rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _close(name, got, want, want32=None):
    if want32 is None:  # the torch path: fp32 rounding
        assert _rel_err(got, want) <= 1e-5, name
    else:  # the kernels: the tolerance rule against the float64 run
        assert_close_to_reference(name, got, want, want32)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_context_parallel_equals_one_process(parallel_results, name):
    _, case, degrees, patched, ops_backend = next(c for c in CASES if c[0] == name)
    model, inputs = zoo.build(case)
    ref = forward_backward(copy.deepcopy(model), inputs, case)  # diffusers' own model, native attention
    ref32 = None
    if ops_backend == "triton":  # float64 oracle, fp32 as PyTorch's own error
        ref32, ref = ref, forward_backward(copy.deepcopy(model).double(), inputs, case, dtype=torch.float64)
    got = torch.load(parallel_results / f"{name}.pt", weights_only=True)
    assert len(got["outs"]) == len(ref[0])
    for i, (o, r) in enumerate(zip(got["outs"], ref[0])):
        _close(f"{name} output {i}", o, r, None if ref32 is None else ref32[0][i])
    calls = got["calls"]
    assert calls.get("_cp_forward_op", 0) > 0, calls  # the sharded self-attention ran diffusers' CP templates
    if case in FORWARD_ONLY:
        return
    _close(f"{name} d(input)", got["dx"], ref[1], None if ref32 is None else ref32[1])
    assert got["grads"].keys() == ref[2].keys()
    floor = 1e-3 * max(r.abs().max().item() for r in ref[2].values())  # zero-by-the-math gradients: fp32 noise
    for key, r in ref[2].items():
        if ref32 is None:
            assert (got["grads"][key] - r).abs().max().item() <= 1e-5 * max(r.abs().max().item(), floor), key
        else:
            assert_close_to_reference(f"{name} d({key})", got["grads"][key], r, ref32[2][key])
    assert calls.get("_cp_backward_op", 0) > 0, calls  # and its backward on dit_fast's block ops
