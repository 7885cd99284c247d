"""Attention kernels' variants and memory layouts (tests/test_attention.py's helpers and matrix): the TMA
forward and its choice, the head dim as power-of-two chunks (any D from 1 to 256), strided views read in
place, int64 offsets, and the 16-byte ALIGNED hint the launchers promise only for aligned rows."""

import pytest
import torch

from dit_fast import ops
from tests.conftest import HAS_GPU
from tests.launches import count_launches
from tests.test_attention import (BF16, DEVICE, F16, F32, GRID, MODES, _check_against_reference, _count_calls, _qkv,
                                  assert_kernels_ran)
from tests.utils import assert_close_to_reference

# The TMA forward (Triton's interpreter emulates the descriptors): every mode it takes, the tiles loaded
# through descriptors (counted), the warp-specialized loop without a padding mask, the other with one.
TMA_CASES = [("full", 72, BF16), ("spatial", 40, F16), ("temporal", 128, BF16), ("cross", 72, F16),
             ("cross_per_head", 64, BF16), ("full", 8, BF16), ("cross", 24, F16)]


@pytest.mark.skipif(HAS_GPU, reason="counts the interpreter's calls of the TMA load helper; on a GPU "
                    "test_gpu_large_shapes runs the compiled TMA forward")
@pytest.mark.parametrize("mode,D,dtype", TMA_CASES, ids=lambda x: str(x).split(".")[-1])
def test_tma_forward_matches_reference(monkeypatch, mode, D, dtype):
    counters = _count_calls(monkeypatch, ("_load_chunks_tma",))
    if mode.startswith("cross"):
        heads = 3 if mode == "cross_per_head" else 1
        q, k, v = _qkv(2, 20, 29, heads, D, dtype)
        mask = torch.rand((2, heads, 29) if heads > 1 else (2, 29), device=DEVICE) > 0.4  # per head, or (B, Sk)
        mask[..., 0] = True

        def fn(q, k, v, backend, tma):
            return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend, tma=tma)
    else:
        grid, kwargs = MODES[mode]
        S = grid[0] * grid[1] * grid[2]
        q, k, v = _qkv(1, S, S, 2, D, dtype)

        def fn(q, k, v, backend, tma):
            return ops.spacetime_attention(q, k, v, grid, return_lse=True, backend=backend, tma=tma, **kwargs)

    with count_launches() as launches:
        out, lse = fn(q, k, v, "triton", True)
    assert_kernels_ran(launches, backward=False)
    assert counters["_load_chunks_tma"].calls > 0, "the TMA path did not run"
    ref64, lse64 = fn(q.double(), k.double(), v.double(), "torch", None)
    ref, _ = fn(q, k, v, "torch", None)
    assert_close_to_reference("out", out, ref64, ref, dtype=dtype)
    assert_close_to_reference("lse", lse, lse64, lse64.float(), dtype=torch.float32)
    calls = counters["_load_chunks_tma"].calls
    fn(q, k, v, "triton", False)  # and the pointer path when not asked for
    assert counters["_load_chunks_tma"].calls == calls


@pytest.mark.skipif(HAS_GPU, reason="counts the interpreter's calls of the TMA load helper")
@pytest.mark.parametrize("D,dtype", [(12, BF16), (36, F16), (10, F32)], ids=lambda x: str(x).split(".")[-1])
def test_tma_forward_keeps_the_pointer_path_for_unaligned_rows(monkeypatch, D, dtype):
    """TMA descriptors need 16-byte aligned rows: D = 12 or 36 in 16-bit dtypes (24, 72 bytes) and fp32
    (which TMA does not take here) run the pointer forward when tma=True asks for TMA, with its result."""
    counters = _count_calls(monkeypatch, ("_load_chunks_tma",))
    q, k, v = _qkv(1, 30, 30, 2, D, dtype)
    with count_launches() as launches:
        out = ops.spacetime_attention(q, k, v, GRID, mode="spatial", backend="triton", tma=True)
    assert_kernels_ran(launches, backward=False)
    assert counters["_load_chunks_tma"].calls == 0
    ref64 = ops.spacetime_attention(q.double(), k.double(), v.double(), GRID, mode="spatial", backend="torch")
    ref = ops.spacetime_attention(q, k, v, GRID, mode="spatial", backend="torch")
    assert_close_to_reference("out", out, ref64, ref, dtype=dtype)


def test_tma_choice_from_the_environment(monkeypatch):
    from dit_fast.triton_kernels.attention import tma_forward

    monkeypatch.delenv("DIT_FAST_ATTENTION_FWD", raising=False)
    assert tma_forward(None) is False  # opt-in until a GPU run passes
    monkeypatch.setenv("DIT_FAST_ATTENTION_FWD", "tma")
    assert tma_forward(None) is True and tma_forward(False) is False
    monkeypatch.setenv("DIT_FAST_ATTENTION_FWD", "fast")
    with pytest.raises(ValueError, match="DIT_FAST_ATTENTION_FWD must be 'tma' or 'pointer'"):
        tma_forward(None)


def test_head_dim_chunks():
    """The head dim as at most two power-of-two chunks, never wider than padding to one power of two."""
    from dit_fast.triton_kernels.attention import head_chunks

    want = {1: (16, 0), 3: (16, 0), 10: (16, 0), 12: (16, 0), 16: (16, 0), 20: (32, 0), 24: (32, 0), 36: (32, 16),
            100: (128, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16), 96: (64, 32),
            112: (128, 0), 128: (128, 0), 136: (128, 16), 160: (128, 32), 192: (128, 64), 200: (256, 0),
            256: (256, 0)}
    for D, chunks in want.items():
        assert head_chunks(D) == chunks, D
    for D in range(1, 257):  # every head dim the kernels take: 1..16 is one 16-column chunk
        d0, d1 = head_chunks(D)
        assert d0 + d1 >= D and d0 + d1 <= max(16, 1 << (D - 1).bit_length()), D
        assert d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0 and d0 >= 16 and (d1 == 0 or d1 >= 16), D


def test_spatial_and_temporal_read_strided_views_in_place():
    """q, k, v as views into one fused qkv projection output (no contiguous copy) give the same result."""
    S, heads, D = 30, 2, 64
    qkv = torch.randn(1, S, 3, heads, D, device=DEVICE)
    q, k, v = qkv.unbind(2)  # each (B, S, heads, D) with token stride 3 * heads * D
    assert not q.is_contiguous()
    for mode in ("spatial", "temporal"):
        with count_launches() as launches:
            got = ops.spacetime_attention(q, k, v, GRID, mode=mode, backend="triton")
        assert_kernels_ran(launches, backward=False)
        want = ops.spacetime_attention(q.double(), k.double(), v.double(), GRID, mode=mode, backend="torch")
        assert_close_to_reference(mode, got, want, want.float(), dtype=torch.float32)


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_int64_offset_variant(monkeypatch, deterministic):
    """The kernels switch to int64 element offsets when a group's extent passes 2^31: run that variant."""
    from dit_fast.triton_kernels import attention as kernels

    monkeypatch.setattr(kernels, "FORCE_INT64_OFFSETS", True)
    inputs = _qkv(1, 20, 20, 1, 72, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, (5, 2, 2), mode="temporal", rope="3d", rope_in_kernel=True,
                                       return_lse=True, backend=backend, deterministic=deterministic)

    _check_against_reference(fn, inputs, torch.float32, deterministic=deterministic)


def test_int64_offsets_decided_by_the_group_extent():
    """The decision under the forced variant above: int64 offsets exactly when a group's largest element offset
    reaches 2^31, counted with the widest token stride among the tensors (a packed qkv view reads 3x as far).
    Shapes only (meta tensors): 2^31 elements of q are 4 GB in bf16."""
    from dit_fast.triton_kernels.attention import _group_extent

    def extent(S, heads=40, D=128, packed=False):
        q = torch.empty(1, S, heads, D, device="meta")
        if packed:  # q, k, v as views of one (B, S, 3, heads, D) projection
            q = torch.empty(1, S, 3, heads, D, device="meta")[:, :, 0]
        return _group_extent((q, q, q), S, S, 1)

    assert extent(200_000) < 2**31 <= extent(500_000)  # 40 heads x 128: int32 up to ~419k tokens
    assert extent(200_000, packed=True) >= 2**31 > extent(130_000, packed=True)
    assert extent(419_000) < 2**31 <= extent(419_500)


@pytest.mark.skipif(HAS_GPU, reason="reads the interpreter's launch arguments")
@pytest.mark.parametrize("D,dtype,aligned", [(8, BF16, True), (12, BF16, False), (12, F32, True), (10, F32, False)],
                         ids=lambda x: str(x).split(".")[-1])
def test_launchers_promise_alignment_only_for_aligned_rows(monkeypatch, D, dtype, aligned):
    """The ALIGNED flag each kernel is launched with, forward and one-pass backward (its convert kernel
    addresses the bf16 dq and the fp32 dq sums): True exactly when D * itemsize is a multiple of 16 bytes
    (D = 8 bf16, D = 12 fp32), False for D = 12 bf16 (24-byte rows) and D = 10 fp32 (40 bytes). The
    interpreter ignores the hint, so only this test sees a wrong promise; a GPU would load misaligned
    vectors."""
    from triton.runtime import interpreter

    flags = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):  # observes the launch, decides nothing
        flags.setdefault(self.fn.__name__, set()).add(kwargs.get("ALIGNED"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 20, 20, 3, D, dtype))
    out = ops.attention(q, k, v, backend="triton", deterministic=False)
    torch.autograd.grad(out.float().sum(), (q, k, v))
    flags.pop("_attn_bwd_preprocess_kernel")  # reads out and dO without the hint
    assert flags == {name: {aligned} for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                                                  "_attn_bwd_dq_convert_kernel")}, flags


def test_aligned_hint_only_when_every_pointer_and_stride_is_16_byte_aligned():
    """The kernels promise Triton 16-byte alignment (ALIGNED) only when the launcher checked it: a wrong
    promise would make the GPU read misaligned vectors (the interpreter cannot show that)."""
    from dit_fast.triton_kernels._layout import aligned_16 as _aligned_16

    def qkv(D, dtype=torch.bfloat16, offset=0, heads=3):
        flat = torch.randn(2 * 5 * heads * D + offset, dtype=dtype)
        return flat[offset:].view(2, 5, heads, D)

    assert _aligned_16([qkv(72), qkv(72)], 72)  # 144-byte rows, odd head count
    assert _aligned_16([qkv(72, torch.float32)], 72)
    assert not _aligned_16([qkv(72), qkv(72, offset=1)], 72)  # one pointer 2 bytes off
    assert not _aligned_16([qkv(36)], 36)  # 72-byte head stride
    assert _aligned_16([qkv(8)], 8) and _aligned_16([qkv(4, torch.float32)], 4)  # 16-byte rows below 16 columns
    assert not _aligned_16([qkv(10)], 10) and not _aligned_16([qkv(10, torch.float32)], 10)  # 20, 40 bytes
    assert not _aligned_16([qkv(12)], 12) and _aligned_16([qkv(12, torch.float32)], 12)  # 24, 48 bytes
    # the one-pass backward's fp32 dq sums beside bf16 dq: each tensor's rows in its own dtype
    assert _aligned_16([qkv(8), qkv(8, torch.float32)], 8)
    assert not _aligned_16([qkv(12, torch.float32), qkv(12)], 12)
    packed = torch.randn(2, 5, 3, 3, 72, dtype=torch.bfloat16)[:, :, 1]  # a slice of a packed qkv
    assert _aligned_16([packed], 72)
