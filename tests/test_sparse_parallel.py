"""Sparse attention under context parallelism, 2 gloo processes (one group runs every case).

DiTVideo(attention="block_sparse") with dit_fast.parallel.sequence_parallel: Ulysses gives each rank whole
heads over every token, so each rank runs its heads' blocks: output and every gradient equal one process;
a calibration across ranks (each measures its own heads, the choices are gathered) equals one process's;
ring and USP are refused before any exchange. A patched diffusers Wan with sparse= under
enable_parallelism: Ulysses equals one process, ring is a clear ValueError.
"""

import logging
import warnings

import pytest
import torch
import torch.distributed as dist

from dit_fast.sparse import SparseAttention
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

WORLD = 2


def _dit(sparse):
    from dit_fast.models.dit_video import DiT_tiny

    torch.manual_seed(0)
    model = DiT_tiny(backend="torch", input_size=(3, 4, 6), pos="rope", attention="block_sparse", sparse=sparse)
    for name, p in model.named_parameters():  # DiT zero-inits its output layers: random weights everywhere
        p.data.normal_(std=0.15 if "qkv" in name else 0.05)
    return model.train()


def _dit_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([100.0, 600.0]), torch.tensor([1, 7])


def _dit_forward_backward(model):
    x, t, y = _dit_inputs()
    x = x.requires_grad_(True)
    out = model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.bool))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


SPARSE = dict(pattern="sliding_tile", density=0.4, tile=(1, 2, 2))  # 3 x 2 x 3 tiles of the 3 x 2 x 3 grid
# per-head choices that differ between the heads (measured with one process)
CALIBRATED = dict(pattern=("sliding_tile", "radial"), density=0.2, tolerance=0.2, tile=(1, 2, 2))


def _wan(sparse):
    import dit_fast
    from diffusers import WanTransformer3DModel
    from tests.test_diffusers import perturb_

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=40, num_layers=2,
                                  rope_max_seq_len=32)
    model = perturb_(model, seed=3)
    dit_fast.patch(model, sparse=sparse)
    g = torch.Generator().manual_seed(11)
    kwargs = dict(hidden_states=torch.randn(2, 4, 4, 6, 10, generator=g), timestep=torch.tensor([10.0, 700.0]),
                  encoder_hidden_states=torch.randn(2, 8, 16, generator=g))  # a 4 x 3 x 5 grid, 60 tokens
    return model, kwargs


def _worker(rank, world):
    import dit_fast
    from dit_fast.parallel import ParallelDims, sequence_parallel

    results = {}
    mesh = ParallelDims(world_size=world, ulysses=world).build_mesh("cpu")
    model = sequence_parallel(_dit(SparseAttention(**SPARSE)), mesh, mode="ulysses")
    out, dx, grads = _dit_forward_backward(model)
    dist.all_reduce(dx)  # each rank holds its frames' share of the input gradient
    results["ulysses"] = {"out": out, "dx": dx, "grads": grads, "kept": model.sparse.kept_fractions()}

    sparse = SparseAttention(**CALIBRATED)
    model = sequence_parallel(_dit(sparse), mesh, mode="ulysses")
    with torch.no_grad():
        model.eval()(*_dit_inputs())  # calibrates
        out = model(*_dit_inputs())  # runs the choices: each rank its heads'
    results["calibrated"] = {"out": out, "all": [[str(c) for c in sparse.choices_for((3, 2, 3), i)] for i in range(2)]}

    try:
        ring_mesh = ParallelDims(world_size=world, ring=world).build_mesh("cpu")
        sequence_parallel(_dit(SparseAttention(**SPARSE)), ring_mesh, mode="ring")
        results["ring"] = "no error"
    except ValueError as exc:
        results["ring"] = str(exc)

    # diffusers' context parallelism on a patched Wan
    torch.accelerator.device_count = lambda: 1  # diffusers places rank r on accelerator r % count: 0 here
    if not hasattr(logging.Logger, "warning_once"):  # transformers adds it; not a dependency
        logging.Logger.warning_once = logging.Logger.warning
    from diffusers import ContextParallelConfig

    model, kwargs = _wan(SparseAttention(**SPARSE))
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with torch.no_grad(), dit_fast.use_backend("torch"):
        results["wan_ulysses"] = {"out": model(**kwargs, return_dict=False)[0],
                                  "kept": model._dit_fast_sparse.kept_fractions()}
    # a mask that is no key padding mask (additive biases on this rank's keys): dense on the exchanged tokens, with
    # the whole mask, on this rank's heads, then back
    processor = model.blocks[0].attn1.processor
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 60, 2, 24, generator=g) for _ in range(3))
    bias = -3 * torch.rand(2, 1, 1, 60, generator=g)
    rows = slice(rank * 60 // world, (rank + 1) * 60 // world)
    with torch.no_grad(), dit_fast.use_backend("torch"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = processor.sparse.attend(processor, q[:, rows], k[:, rows], v[:, rows], bias[..., rows], parallel=True)
    results["wan_bias"] = {"out": out, "warned": [str(w.message) for w in caught]}

    sparse = SparseAttention(**CALIBRATED)  # per-head choices: each rank calibrates and runs its own head's
    model, kwargs = _wan(sparse)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with torch.no_grad(), dit_fast.use_backend("torch"):
        model(**kwargs, return_dict=False)  # calibrates
        results["wan_calibrated"] = {"out": model(**kwargs, return_dict=False)[0],
                                     "choices": [[str(c) for c in sparse.choices_for((4, 3, 5), i)] for i in range(2)]}
    model, kwargs = _wan(SparseAttention(**SPARSE))
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    try:
        with torch.no_grad(), dit_fast.use_backend("torch"):
            model(**kwargs, return_dict=False)
        results["wan_ring"] = "no error"
    except ValueError as exc:
        results["wan_ring"] = str(exc)
    return results


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")
    return run_distributed(_worker, WORLD, tmp_path_factory.mktemp("sparse_cp"), timeout_s=120)


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.timeout(600)
def test_dit_video_ulysses_equals_one_process(parallel_results):
    out, dx, grads = _dit_forward_backward(_dit(SparseAttention(**SPARSE)))
    for rank in range(WORLD):
        got = parallel_results[rank]["ulysses"]
        assert rel_err(got["out"], out) <= 1e-5
        assert rel_err(got["dx"], dx) <= 1e-5
        assert got["grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert rel_err(got["grads"][name], g) <= 1e-5, name
        assert got["kept"].keys() == {0, 1} and max(got["kept"].values()) < 1  # sparse on every rank


def test_calibration_across_ranks_equals_one_process(parallel_results):
    sparse = SparseAttention(**CALIBRATED)
    model = _dit(sparse)
    with torch.no_grad():
        model.eval()(*_dit_inputs())
        out = model(*_dit_inputs())
    expected = [[str(c) for c in sparse.choices_for((3, 2, 3), i)] for i in range(2)]
    assert all(len(layer) == 2 and layer[0] != layer[1] for layer in expected), expected  # per-head choices
    for rank in range(WORLD):
        assert parallel_results[rank]["calibrated"]["all"] == expected
        assert rel_err(parallel_results[rank]["calibrated"]["out"], out) <= 1e-5


def test_ring_refused_with_a_clear_error(parallel_results):
    for rank in range(WORLD):
        assert "mode='ulysses' only" in parallel_results[rank]["ring"]
        assert "does not run under ring context parallelism" in parallel_results[rank]["wan_ring"]


def test_diffusers_wan_ulysses_calibration_equals_one_process(parallel_results):
    """Per-head calibrated choices under diffusers' Ulysses: each rank runs the choices of the heads it holds."""
    import dit_fast

    sparse = SparseAttention(**CALIBRATED)
    model, kwargs = _wan(sparse)
    with torch.no_grad(), dit_fast.use_backend("torch"):
        model(**kwargs, return_dict=False)
        expected = model(**kwargs, return_dict=False)[0]
    choices = [[str(c) for c in sparse.choices_for((4, 3, 5), i)] for i in range(2)]
    assert any(layer[0] != layer[1] for layer in choices), choices  # the heads' choices differ somewhere
    for rank in range(WORLD):
        got = parallel_results[rank]["wan_calibrated"]
        assert got["choices"] == choices
        assert rel_err(got["out"], expected) <= 1e-5


def test_diffusers_ulysses_mask_that_is_no_key_padding_mask(parallel_results):
    """Additive biases as the self-attention mask under Ulysses: warned, then dense attention with the whole mask
    (each rank's query rows of SDPA on every token), not the unmasked attention."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 60, 2, 24, generator=g) for _ in range(3))
    bias = -3 * torch.rand(2, 1, 1, 60, generator=g)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=bias).transpose(1, 2)
    for rank in range(WORLD):
        got = parallel_results[rank]["wan_bias"]
        assert any("runs dense (a float mask" in w for w in got["warned"]), got["warned"]
        assert rel_err(got["out"], expected[:, rank * 30:(rank + 1) * 30]) <= 1e-5


def test_diffusers_wan_ulysses_equals_one_process(parallel_results):
    import dit_fast

    model, kwargs = _wan(SparseAttention(**SPARSE))
    with torch.no_grad(), dit_fast.use_backend("torch"):
        expected = model(**kwargs, return_dict=False)[0]
    assert max(model._dit_fast_sparse.kept_fractions().values()) < 1
    for rank in range(WORLD):
        got = parallel_results[rank]["wan_ulysses"]
        assert rel_err(got["out"], expected) <= 1e-5
        assert got["kept"] == model._dit_fast_sparse.kept_fractions()
