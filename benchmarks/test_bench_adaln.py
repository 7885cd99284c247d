"""pytest-benchmark view of the adaLN benchmarks. Not part of CI (CI runs `pytest tests` only).

    python -m pytest benchmarks/test_bench_adaln.py -q [--benchmark-json out.json]

On a GPU: the DiT video shapes of benchmarks/bench_adaln.py, every provider that runs here
(ours-triton, ours-cuda, eager, compile). On CPU: small shapes for the PyTorch providers
(ours-torch, eager), so the file can be exercised anywhere; Triton/CUDA cases skip with the reason.

pytest-benchmark times with the host clock, so each round ends with a device synchronise and
includes launch overhead; the L2 cache is flushed in each round's setup. The CUDA-event
numbers of `python -m benchmarks.run` are the ones the results files and the targets use; this
view is for regression tracking (`--benchmark-compare`). GB/s from bench_adaln.nbytes is put in
each benchmark's extra_info.
"""

import pytest
import torch

from benchmarks import bench_adaln as b
from benchmarks import common

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda", torch.cuda.current_device()) if HAS_GPU else torch.device("cpu")
PROVIDERS = b.GPU_PROVIDERS if HAS_GPU else ("ours-torch", "eager", "ours-triton")
if HAS_GPU:
    SHAPES = [(2, 32760, 1152, 1), (2, 32760, 3072, 1), (2, 32760, 1152, 13)]
else:
    SHAPES = [(2, 256, 1152, 1), (2, 260, 96, 13)]
CASES = [
    ("layernorm_modulate", "fwd"),
    ("layernorm_modulate", "fwd+bwd"),
    ("gated_residual", "fwd"),
    ("residual_layernorm_modulate", "fwd"),
    ("residual_layernorm_modulate", "fwd+bwd"),
]
ROUNDS, WARMUP = (50, 5) if HAS_GPU else (5, 1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-C{}-G{}".format(*s))
@pytest.mark.parametrize("op,variant", CASES, ids=lambda v: v)
def test_adaln(benchmark, op, variant, shape, provider):
    reason = b.provider_unavailable(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    case = b.Case(op, variant, *shape)
    fn, grad_to_none = b.setup(provider, case, DEVICE)
    flush = common._flush_buffer(DEVICE) if HAS_GPU else None

    def before_round():
        for t in grad_to_none:
            t.grad = None
        if flush is not None:
            flush.zero_()
            torch.cuda.synchronize(DEVICE)

    def one_round():
        fn()
        common.sync(DEVICE)

    benchmark.group = f"{op} {variant} B={shape[0]} N={shape[1]} C={shape[2]} G={shape[3]}"
    benchmark.pedantic(one_round, setup=before_round, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=common.device_name(DEVICE),
        bytes=b.nbytes(case),
        gbps=b.nbytes(case) / median_s / 1e9,
        fwd_rel_err_vs_reference=b.rel_error(case, provider, DEVICE),
    )
