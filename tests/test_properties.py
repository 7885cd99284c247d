"""Property-based tests (hypothesis) over each public op's argument space, and over the constructors.

For every op: valid input matches a float64 reference written out here (independently of the
library's own references), on backend="torch" and, for a few tiny cases, on the Triton kernels
(the interpreter on CPU); invalid input raises ValueError or TypeError whose message names the
argument; nothing else escapes (no RuntimeError, IndexError, ZeroDivisionError, NaN output).

Derandomized: each test draws the same examples on every run (no seed, no example database), so CI
cannot flake and a failure reproduces. Sizes are tiny and example counts bounded: the module runs in
about a minute on one core.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_fast import ops
from dit_fast._backend import unavailable_reason
from dit_fast.diffusion import GaussianDiffusion, RectifiedFlow
from dit_fast.models import DiTVideo
from dit_fast.nn import CrossAttention, ModulatedLayerNorm, SpacetimeAttention
from dit_fast.ops import RoPE3D
from tests.utils import ATOL_FLOOR, describe_mismatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernels(*names):
    """Kernel backends as parameters, each skipped with its reason where it cannot run (CUDA: GPU only)."""
    return [pytest.param(n, marks=pytest.mark.skipif(unavailable_reason(n, torch.device(DEVICE)) is not None,
                                                     reason=str(unavailable_reason(n, torch.device(DEVICE)))))
            for n in names]


# the interpreter's numpy warns on log2(0) for a query with no visible key; the kernel handles it
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def examples(n):
    return settings(PROPERTY, max_examples=n)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# values that are not what any numeric argument wants: each must give ValueError/TypeError, never a crash
JUNK = [None, "x", "1", True, float("nan"), float("inf"), -float("inf"), -1, 0, 1e-300, 1e300, (), [1.5]]


def randn(shape, dtype, seed, magnitude=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype).to(device)


def assert_matches(name, got, ref, dtype, factor=4.0):
    """|got - ref| <= factor * floor(dtype) * max(1, max|ref|): the op's rounding, not a wrong result."""
    assert isinstance(got, torch.Tensor) and got.shape == ref.shape, \
        f"{name}: shape {tuple(got.shape) if isinstance(got, torch.Tensor) else got} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    scale = ref.abs().max().item() if ref.numel() else 1.0
    atol = factor * ATOL_FLOOR[dtype] * max(1.0, scale)
    err = (got.detach().double().cpu() - ref.cpu()).abs()
    assert not got.isnan().any() and bool((err <= atol).all()), f"{name}:\n" + describe_mismatch(got, ref, atol)


def assert_rejected(call, *names):
    """call() raises ValueError or TypeError naming one of ``names``; any other exception fails the test."""
    try:
        call()
    except (ValueError, TypeError) as e:
        assert any(n in str(e) for n in names), f"error does not name {names}: {type(e).__name__}: {e}"
    else:
        raise AssertionError(f"no error for a bad {names}")


# ---------------------------------------------------------------------------------------------
# float64 references, written out here
# ---------------------------------------------------------------------------------------------


def expand64(mod, N):
    """(B, C) or (B, G, C) -> (B, N, C) float64, each group's row over its N / G tokens."""
    mod = mod.double().cpu()
    return mod[:, None, :].expand(-1, N, -1) if mod.dim() == 2 else mod.repeat_interleave(N // mod.shape[1], dim=1)


def layernorm_modulate64(x, shift, scale, weight=None, bias=None, eps=1e-6):
    x = x.double().cpu()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double().cpu()
    if bias is not None:
        y = y + bias.double().cpu()
    return y * (1 + expand64(scale, x.shape[1])) + expand64(shift, x.shape[1])


def gated_residual64(x, gate, y):
    return x.double().cpu() + expand64(gate, x.shape[1]) * y.double().cpu()


def attention64(q, k, v, scale=None, mask=None):
    """softmax(scale q k^T) v per head; mask (.., Sq, Sk) True = attend; a row with no key gives 0, lse -inf."""
    qd, kd, vd = (t.double().cpu().transpose(1, 2) for t in (q, k, v))  # (B, heads, S, D)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask.cpu(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(nan=0.0)  # exp(-inf - (-inf)) on an empty row
    return (p @ vd).transpose(1, 2), lse


def positions(grid):
    T, H, W = grid
    return [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]


def rope64(x, grid, theta=10000.0, split=None):
    """Interleaved pairs of each axis' part of the head dim rotated by pos * theta ** (-2i / d)."""
    D = x.shape[-1]
    if split is None:
        d_hw = 2 * (D // 6)
        split = (D - 2 * d_hw, d_hw, d_hw)
    x = x.double().cpu()
    out = x.clone()
    pos = torch.tensor(positions(grid), dtype=torch.float64)  # (S, 3)
    col = 0
    for axis, d in enumerate(split):
        for i in range(d // 2):
            angle = pos[:, axis] * float(theta) ** (-2 * i / d)  # (S,)
            c, s = angle.cos()[None, :, None], angle.sin()[None, :, None]
            even, odd = x[..., col + 2 * i], x[..., col + 2 * i + 1]
            out[..., col + 2 * i], out[..., col + 2 * i + 1] = even * c - odd * s, even * s + odd * c
        col += d
    return out


def spacetime_mask64(grid, mode="full", window=None, window_tile=None):
    """(S, S) True where query a may see key b: same frame (spatial) or column (temporal), and inside the
    window centred on the query and shifted to fit the grid (or, with window_tile, the same rule on tiles)."""
    pos = positions(grid)
    S = len(pos)
    mask = torch.zeros(S, S, dtype=torch.bool)
    for a, pa in enumerate(pos):
        for b, pb in enumerate(pos):
            ok = mode == "full" or (mode == "spatial" and pa[0] == pb[0]) or (mode == "temporal" and pa[1:] == pb[1:])
            if window is not None:
                if window_tile is not None:
                    ca = [p // t for p, t in zip(pa, window_tile)]
                    cb = [p // t for p, t in zip(pb, window_tile)]
                    sizes = [w // t for w, t in zip(window, window_tile)]
                    lengths = [-(-n // t) for n, t in zip(grid, window_tile)]
                else:
                    ca, cb, sizes, lengths = pa, pb, window, grid
                for axis in range(3):
                    start = min(max(ca[axis] - (sizes[axis] - 1) // 2, 0), lengths[axis] - sizes[axis])
                    ok = ok and start <= cb[axis] < start + sizes[axis]
            mask[a, b] = ok
    return mask


def identity_kernel(C, patch):
    """(K, C, pt, ph, pw) 0/1 weight: output channel k copies input element k of the patch in (c, t, h, w) order."""
    K = C * patch[0] * patch[1] * patch[2]
    return torch.eye(K, dtype=torch.float64).reshape(K, C, *patch)


def patchify64(video, patch, order):
    """As a strided Conv3d with an identity kernel (exact in float64), features reordered for "thwc"."""
    B, C = video.shape[:2]
    tokens = F.conv3d(video.double().cpu(), identity_kernel(C, patch), stride=patch)  # (B, K, T', H', W')
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, S, K), K in (c, t, h, w) order
    if order == "thwc":
        B, S, K = tokens.shape
        tokens = tokens.reshape(B, S, C, K // C).transpose(2, 3).reshape(B, S, K)
    return tokens


def unpatchify64(tokens, patch, grid, order):
    """As the transposed Conv3d of patchify64's identity kernel."""
    B, S, K = tokens.shape
    C = K // (patch[0] * patch[1] * patch[2])
    t = tokens.double().cpu()
    if order == "thwc":
        t = t.reshape(B, S, K // C, C).transpose(2, 3).reshape(B, S, K)
    t = t.transpose(1, 2).reshape(B, K, *grid)
    return F.conv_transpose3d(t, identity_kernel(C, patch), stride=patch)


# ---------------------------------------------------------------------------------------------
# adaLN: layernorm_modulate, gated_residual, residual_layernorm_modulate
# ---------------------------------------------------------------------------------------------


@st.composite
def adaln_cases(draw, dtypes=DTYPES, max_c=48):
    dtype = draw(st.sampled_from(dtypes))
    B, N, C = draw(st.integers(0, 3)), draw(st.integers(0, 12)), draw(st.integers(1, max_c))  # empty B, N: valid
    G = draw(st.sampled_from([None] + [g for g in range(1, N + 1) if N % g == 0]))
    magnitude = draw(st.sampled_from([1e-2, 1.0, 20.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    mod_shape = (B, C) if G is None else (B, G, C)
    case = dict(x=randn((B, N, C), dtype, seed, magnitude), y=randn((B, N, C), dtype, seed + 1),
                shift=randn(mod_shape, dtype, seed + 2), scale=randn(mod_shape, dtype, seed + 3),
                gate=randn(mod_shape, dtype, seed + 4), eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.1, 2.0])))
    if draw(st.booleans()):
        case["weight"] = randn((C,), dtype, seed + 5)
        case["bias"] = randn((C,), dtype, seed + 6) if draw(st.booleans()) else None
    return case


def run_adaln(op, case, backend):
    x, y, shift, scale, gate, eps = (case[k] for k in ("x", "y", "shift", "scale", "gate", "eps"))
    if op == "layernorm_modulate":
        out = ops.layernorm_modulate(x, shift, scale, weight=case.get("weight"), bias=case.get("bias"), eps=eps,
                                     backend=backend)
        assert_matches(op, out, layernorm_modulate64(x, shift, scale, case.get("weight"), case.get("bias"), eps),
                       x.dtype)
    elif op == "gated_residual":
        assert_matches(op, ops.gated_residual(x, gate, y, backend=backend), gated_residual64(x, gate, y), x.dtype)
    else:
        h, out = ops.residual_layernorm_modulate(x, gate, y, shift, scale, eps=eps, backend=backend)
        assert_matches(op + " h", h, gated_residual64(x, gate, y), x.dtype)
        # out is LN of h rounded to x.dtype: check it from the h the op returned
        assert_matches(op + " out", out, layernorm_modulate64(h, shift, scale, eps=eps), x.dtype)


ADALN_OPS = ["layernorm_modulate", "gated_residual", "residual_layernorm_modulate"]


@pytest.mark.parametrize("op", ADALN_OPS)
@examples(120)
@given(case=adaln_cases())
def test_adaln_valid_matches_reference(op, case):
    run_adaln(op, case, "torch")


@pytest.mark.parametrize("backend", kernels("triton", "cuda"))
@pytest.mark.parametrize("op", ADALN_OPS)
@examples(6)
@given(case=adaln_cases(dtypes=[torch.float32, torch.bfloat16], max_c=24))
def test_adaln_kernels_match_reference(backend, op, case):
    run_adaln(op, case, backend)


def adaln_corruptions(case):
    """(argument name, bad value) pairs for the adaLN ops, built around a valid case."""
    x, mod = case["x"], case["shift"]
    B, N, C = x.shape
    bad_tensors = [x.tolist(), x.to(torch.int32), x.double(), x.flatten(0, 1), x[..., None], x[..., :0]]
    bad_mods = [mod.tolist(), mod.to(torch.int64), mod.double(), mod[..., :-1] if C > 1 else mod.new_zeros(B, C + 1),
                torch.zeros(B + 1, C, dtype=x.dtype), torch.zeros(B, N + 1, C, dtype=x.dtype),
                torch.zeros(B, 0, C, dtype=x.dtype), mod[..., None, None], mod.half() if x.dtype != torch.float16 else mod.float()]
    bad_affine = [torch.ones(C + 1, dtype=x.dtype), torch.ones(1, C, dtype=x.dtype), torch.ones(C, dtype=torch.int32),
                  [1.0] * C]
    bad_eps = [0, 0.0, -1e-6, 1e-300, 1e-39, 1e39, 1e300, float("nan"), float("inf"), "1e-6", None, True]
    return {"x": bad_tensors, "y": bad_tensors[:4] + [torch.zeros(B, N + 1, C, dtype=x.dtype)], "shift": bad_mods,
            "scale": bad_mods, "gate": bad_mods, "weight": bad_affine, "bias": bad_affine, "eps": bad_eps,
            "backend": ["fast", None, 3, "TRITON"]}


OP_ARGS = {
    "layernorm_modulate": ("x", "shift", "scale", "weight", "bias", "eps", "backend"),
    "gated_residual": ("x", "gate", "y", "backend"),
    "residual_layernorm_modulate": ("x", "gate", "y", "shift", "scale", "eps", "backend"),
}


def call_adaln(op, args):
    fn = getattr(ops, op)
    if op == "layernorm_modulate":
        return fn(args["x"], args["shift"], args["scale"], weight=args.get("weight"), bias=args.get("bias"),
                  eps=args["eps"], backend=args["backend"])
    if op == "gated_residual":
        return fn(args["x"], args["gate"], args["y"], backend=args["backend"])
    return fn(args["x"], args["gate"], args["y"], args["shift"], args["scale"], eps=args["eps"],
              backend=args["backend"])


@pytest.mark.parametrize("op", ADALN_OPS)
@examples(120)
@given(case=adaln_cases(), data=st.data())
def test_adaln_invalid_raises_naming_the_argument(op, case, data):
    case = {**case, "backend": "torch"}
    table = adaln_corruptions(case)
    name = data.draw(st.sampled_from(OP_ARGS[op]), label="argument")
    bad = data.draw(st.sampled_from(table[name]), label="bad value")
    # a mismatched group count between modulations names them all; x's errors name what it mismatches
    names = {"x": ("x",), "y": ("y",), "weight": ("weight",), "bias": ("bias",)}.get(name, (name, "modulations"))
    if name == "x":
        names = ("x", "shift", "scale", "gate", "y")
    assert_rejected(lambda: call_adaln(op, {**case, name: bad}), *names)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw, dtypes=DTYPES, head_dims=(16, 24, 40, 72), max_s=9):
    dtype = draw(st.sampled_from(dtypes))
    B, heads = draw(st.integers(0, 2)), draw(st.integers(0, 2))  # empty batch or heads: valid
    Sq, Sk = draw(st.integers(1, max_s)), draw(st.integers(1, max_s))
    D = draw(st.sampled_from(head_dims))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([0.1, 1.0, 3.0]))
    case = dict(q=randn((B, Sq, heads, D), dtype, seed, magnitude), k=randn((B, Sk, heads, D), dtype, seed + 1, magnitude),
                v=randn((B, Sk, heads, D), dtype, seed + 2), scale=draw(st.sampled_from([None, 0.05, 0.3, 1.0, 4.0])),
                mask=None)
    if draw(st.booleans()):
        g = torch.Generator().manual_seed(seed + 3)
        case["mask"] = (torch.rand(B, Sk, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.9]))).logical_not().to(DEVICE)
    return case


def run_attention(case, backend):
    q, k, v, mask, scale = (case[n] for n in ("q", "k", "v", "mask", "scale"))
    out, lse = ops.attention(q, k, v, scale=scale, key_padding_mask=mask, return_lse=True, backend=backend)
    ref, ref_lse = attention64(q, k, v, scale, None if mask is None else mask[:, None, None, :])
    assert_matches("attention out", out, ref, q.dtype)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "lse: -inf exactly on the rows without a visible key"
    torch.testing.assert_close(lse.cpu().double()[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)


@examples(150)
@given(case=attention_cases())
def test_attention_valid_matches_reference(case):
    run_attention(case, "torch")


@pytest.mark.parametrize("backend", kernels("triton"))
@examples(8)
@given(case=attention_cases(dtypes=[torch.float32, torch.bfloat16], head_dims=(16, 24), max_s=6))
def test_attention_kernels_match_reference(backend, case):
    run_attention(case, backend)


@examples(200)
@given(case=attention_cases(), data=st.data())
def test_attention_invalid_raises_naming_the_argument(case, data):
    q, k, mask = case["q"], case["k"], case["mask"]
    B, Sq, heads, D = q.shape
    Sk = k.shape[1]
    bad_qkv = [q.tolist(), q.to(torch.int32), q.flatten(0, 1), q[..., :8] if D > 8 else q[..., :4],
               torch.zeros(B, Sq, heads, 12, dtype=q.dtype), torch.zeros(B, Sq, heads, 264, dtype=q.dtype),
               torch.zeros(B, 0, heads, D, dtype=q.dtype), torch.zeros(B + 1, Sq, heads, D, dtype=q.dtype),
               torch.zeros(B, Sq, heads + 1, D, dtype=q.dtype)]
    table = {
        "q": bad_qkv, "k": bad_qkv, "v": bad_qkv + [torch.zeros(B, Sk + 1, heads, D, dtype=q.dtype)],
        "key_padding_mask": [torch.ones(B, Sk), torch.ones(B, Sk + 1, dtype=torch.bool), torch.ones(Sk, dtype=torch.bool),
                             [[True] * Sk] * B],
        "scale": [0, 0.0, -1.0, 3e38, 1e5, 1e-300, 1e-39, float("nan"), float("inf"), "0.1", True],
        "backend": ["fast", None, 3],
    }
    name = data.draw(st.sampled_from(sorted(table)), label="argument")
    bad = data.draw(st.sampled_from(table[name]), label="bad value")
    args = dict(q=q, k=k, v=case["v"], key_padding_mask=mask, scale=case["scale"], backend="torch")
    args[name] = bad
    if name in ("q", "k", "v") and isinstance(bad, torch.Tensor) and bad.dtype == q.dtype and name != "v":
        # a q or k of another shape mismatches the other operands: the message may name either
        names = ("q", "k", "v", "head dim")
    else:
        names = (name, "head dim") if name in ("q", "k", "v") else (name,)
    assert_rejected(lambda: ops.attention(args["q"], args["k"], args["v"], key_padding_mask=args["key_padding_mask"],
                                          scale=args["scale"], backend=args["backend"]), *names)


# ---------------------------------------------------------------------------------------------
# spacetime_attention
# ---------------------------------------------------------------------------------------------

TILES = [(1, 4, 4), (2, 2, 4), (1, 2, 8), (4, 2, 2), (2, 4, 2)]


@st.composite
def spacetime_cases(draw, dtypes=DTYPES, head_dims=(16, 24, 48), max_side=3):
    dtype = draw(st.sampled_from(dtypes))
    grid = tuple(draw(st.integers(1, max_side)) for _ in range(3))
    S = grid[0] * grid[1] * grid[2]
    B, heads, D = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from(head_dims))
    seed = draw(st.integers(0, 2**31 - 1))
    mode = draw(st.sampled_from(["full", "spatial", "temporal"]))
    window = window_tile = None
    if mode == "full" and draw(st.booleans()):
        if draw(st.booleans()):
            window_tile = draw(st.sampled_from(TILES))
            tiles = [-(-n // t) for n, t in zip(grid, window_tile)]
            window = tuple(t * draw(st.integers(1, n)) for t, n in zip(window_tile, tiles))
        else:
            window = tuple(draw(st.integers(1, n)) for n in grid)
    rope = draw(st.sampled_from([None, "3d", "custom"]))
    if rope == "custom":
        d_t = 2 * draw(st.integers(0, D // 2))
        d_h = 2 * draw(st.integers(0, (D - d_t) // 2))
        rope = RoPE3D(theta=draw(st.sampled_from([1.0, 100.0, 10000.0, 1e6])), split=(d_t, d_h, D - d_t - d_h))
    return dict(q=randn((B, S, heads, D), dtype, seed), k=randn((B, S, heads, D), dtype, seed + 1),
                v=randn((B, S, heads, D), dtype, seed + 2), grid=grid, mode=mode, window=window,
                window_tile=window_tile, rope=rope, scale=draw(st.sampled_from([None, 0.5, 2.0])),
                rope_in_kernel=draw(st.booleans()))


def run_spacetime(case, backend):
    q, k, v, grid, rope = (case[n] for n in ("q", "k", "v", "grid", "rope"))
    out, lse = ops.spacetime_attention(q, k, v, grid, mode=case["mode"], window=case["window"],
                                       window_tile=case["window_tile"], rope=rope, scale=case["scale"],
                                       rope_in_kernel=case["rope_in_kernel"], return_lse=True, backend=backend)
    if rope is not None:
        theta, split = (10000.0, None) if rope == "3d" else (rope.theta, rope.split)
        # the reference rotates the rounded inputs in float64; the op rotates in fp32 and rounds to
        # q.dtype (standalone pass) or keeps fp32 (in kernel): compare with the rotated values rounded
        q, k = (rope64(t, grid, theta, split).to(t.dtype) for t in (q, k))
    mask = spacetime_mask64(grid, case["mode"], case["window"], case["window_tile"])
    ref, ref_lse = attention64(q, k, v, case["scale"], mask)
    assert_matches("spacetime_attention out", out, ref, v.dtype, factor=6.0)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=2e-2 if v.dtype != torch.float32 else 1e-4,
                               atol=2e-2 if v.dtype != torch.float32 else 1e-4)


@examples(120)
@given(case=spacetime_cases())
def test_spacetime_attention_valid_matches_reference(case):
    run_spacetime(case, "torch")


@pytest.mark.parametrize("backend", kernels("triton"))
@examples(8)
@given(case=spacetime_cases(dtypes=[torch.float32], head_dims=(16,), max_side=3))
def test_spacetime_attention_kernels_match_reference(backend, case):
    run_spacetime(case, backend)


@examples(150)
@given(case=spacetime_cases(), data=st.data())
def test_spacetime_attention_invalid_raises_naming_the_argument(case, data):
    grid = case["grid"]
    table = {
        "grid": [(grid[0] + 1, grid[1], grid[2]), (0, 1, 1), (-1, grid[1], grid[2]), grid[:2], (1.0 * grid[0], *grid[1:]),
                 (True, grid[1], grid[2]), "abc", None],
        "mode": ["local", None, 3, "FULL"],
        "window": [(0, 1, 1), (grid[0] + 1, 1, 1), (1, 1), (1.5, 1, 1), "111", (True, 1, 1)],
        "window_tile": [(1, 4), (0, 4, 4), (1, 2, 2), (1.0, 4, 4)],
        "rope": ["2d", 3, (10000.0, None)],
        "scale": [0.0, -2.0, float("nan"), 3e38, 1e-300, "1"],
        "rope_in_kernel": ["yes", None, 1],
        "backend": ["fast", None],
    }
    name = data.draw(st.sampled_from(sorted(table)), label="argument")
    bad = data.draw(st.sampled_from(table[name]), label="bad value")
    args = {**case, "backend": "torch", name: bad}
    if name == "window_tile" and args["window"] is None:
        args["window"] = tuple(grid)  # so that the tile's own checks are the ones that fail
    names = {"window_tile": ("window_tile", "window"), "window": ("window",), "mode": ("mode",),
             "grid": ("grid",)}.get(name, (name,))
    assert_rejected(lambda: ops.spacetime_attention(
        args["q"], args["k"], args["v"], args["grid"], mode=args["mode"], window=args["window"],
        window_tile=args["window_tile"], rope=args["rope"], scale=args["scale"], rope_in_kernel=args["rope_in_kernel"],
        backend=args["backend"]), *names)


# ---------------------------------------------------------------------------------------------
# apply_rope_3d
# ---------------------------------------------------------------------------------------------


@st.composite
def rope_cases(draw, dtypes=DTYPES, max_d=64):
    dtype = draw(st.sampled_from(dtypes))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    S = grid[0] * grid[1] * grid[2]
    B, heads, D = draw(st.integers(0, 2)), draw(st.integers(0, 3)), 2 * draw(st.integers(1, max_d // 2))
    split = None
    if draw(st.booleans()):
        d_t = 2 * draw(st.integers(0, D // 2))
        d_h = 2 * draw(st.integers(0, (D - d_t) // 2))
        split = (d_t, d_h, D - d_t - d_h)
    x = randn((B, heads, S, D), dtype, draw(st.integers(0, 2**31 - 1))).transpose(1, 2)  # strided view
    if draw(st.booleans()):
        x = x.contiguous()
    theta = draw(st.one_of(st.sampled_from([1.0, 10000.0, 1e300]), st.floats(1.0, 1e6)))
    return dict(x=x, grid=grid, theta=theta, split=split)


def run_rope(case, backend):
    x = case["x"]
    out = ops.apply_rope_3d(x, case["grid"], theta=case["theta"], split=case["split"], backend=backend)
    assert_matches("apply_rope_3d", out, rope64(x, case["grid"], case["theta"], case["split"]), x.dtype)


@examples(150)
@given(case=rope_cases())
def test_apply_rope_3d_valid_matches_reference(case):
    run_rope(case, "torch")


@pytest.mark.parametrize("backend", kernels("triton", "cuda"))
@examples(8)
@given(case=rope_cases(dtypes=[torch.float32, torch.float16], max_d=24))
def test_apply_rope_3d_kernels_match_reference(backend, case):
    run_rope(case, backend)


@examples(150)
@given(case=rope_cases(), data=st.data())
def test_apply_rope_3d_invalid_raises_naming_the_argument(case, data):
    x, grid = case["x"], case["grid"]
    D = x.shape[-1]
    table = {
        "x": [x.tolist(), x.to(torch.int16), x.flatten(0, 1), torch.zeros(*x.shape[:3], D + 1, dtype=x.dtype)],
        "grid": [(grid[0] + 1, grid[1], grid[2]), (0, grid[1], grid[2]), (-grid[0], grid[1], -grid[2]), grid[:2],
                 (float(grid[0]), grid[1], grid[2]), (True, grid[1], grid[2]), "abc", None, 5],
        "theta": [0, 0.0, -1.0, 0.5, 1e-300, float("nan"), float("inf"), "1e4", None, True],
        "split": [(D, 2, 0), (1, 1, D - 2), (D / 3,) * 3, ("a", 8, 8), (D,), (-2, 2, D), "abc", 5],
        "backend": ["fast", None],
    }
    name = data.draw(st.sampled_from(sorted(table)), label="argument")
    bad = data.draw(st.sampled_from(table[name]), label="bad value")
    args = {**case, "backend": "torch", name: bad}
    names = {"x": ("x", "head dim", "grid"), "split": ("split",)}.get(name, (name,))
    assert_rejected(lambda: ops.apply_rope_3d(args["x"], args["grid"], theta=args["theta"], split=args["split"],
                                              backend=args["backend"]), *names)


# ---------------------------------------------------------------------------------------------
# patchify_3d / unpatchify_3d
# ---------------------------------------------------------------------------------------------


@st.composite
def patch_cases(draw, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    patch = tuple(draw(st.integers(1, 3)) for _ in range(3))
    grid = tuple(draw(st.integers(1, 3)) for _ in range(3))
    B, C = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    video = randn((B, C, *(g * p for g, p in zip(grid, patch))), dtype, draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        video = video.transpose(3, 4).contiguous().transpose(3, 4)  # strided: W not innermost
    return dict(video=video, patch=patch, grid=grid, order=draw(st.sampled_from(["cthw", "thwc", None])))


def run_patch(case, backend):
    video, patch, grid, order = (case[n] for n in ("video", "patch", "grid", "order"))
    kwargs = {} if order is None else {"order": order}
    tokens = ops.patchify_3d(video, patch, backend=backend, **kwargs)
    expected = patchify64(video, patch, order or "cthw")
    assert tokens.dtype == video.dtype and torch.equal(tokens.double().cpu(), expected), "patchify_3d"
    back = ops.unpatchify_3d(tokens, patch, grid, backend=backend, **kwargs)  # defaults are each other's inverse
    assert torch.equal(back, video), "unpatchify_3d(patchify_3d(v)) != v"
    fresh = randn(tokens.shape, video.dtype, 7)
    out = ops.unpatchify_3d(fresh, patch, video_shape=video.shape, backend=backend, **kwargs)
    assert torch.equal(out.double().cpu(), unpatchify64(fresh, patch, grid, order or "cthw")), "unpatchify_3d"


@examples(150)
@given(case=patch_cases())
def test_patchify_valid_matches_reference(case):
    run_patch(case, "torch")


@pytest.mark.parametrize("backend", kernels("triton", "cuda"))
@examples(8)
@given(case=patch_cases(dtypes=[torch.float32, torch.bfloat16]))
def test_patchify_kernels_match_reference(backend, case):
    run_patch(case, backend)


@examples(200)
@given(case=patch_cases(), data=st.data())
def test_patchify_invalid_raises_naming_the_argument(case, data):
    video, patch, grid = case["video"], case["patch"], case["grid"]
    tokens = ops.patchify_3d(video, patch, backend="torch")
    B, S, K = tokens.shape
    bad_patch = [0, -2, 2.5, (1, 2), (1, 0, 2), (1.0, 2, 2), (True, 1, 1), "2", None]
    patchify_table = {
        "video": [video.tolist(), video.to(torch.int32), video.flatten(0, 1), video[..., None]],
        "patch": bad_patch + [tuple(2 * d + 1 for d in video.shape[2:])],
        "order": ["chw", None, 3],
        "backend": ["fast", None],
    }
    unpatchify_table = {
        "tokens": [tokens.tolist(), tokens.to(torch.int64), tokens.flatten(0, 1), tokens[:, :-1] if S > 1 else tokens[:, :0]],
        "patch": bad_patch,
        "grid": [(grid[0] + 1, grid[1], grid[2]), (0, 1, 1), grid[:2], (1.5, 1, 1), "abc"],
        "video_shape": [(1, 1), (B + 1, K, *video.shape[2:]), (video.shape[2] + 1, *video.shape[3:])],
        "order": ["chw", 3],
        "backend": ["fast", None],
    }
    if data.draw(st.booleans(), label="unpatchify"):
        name = data.draw(st.sampled_from(sorted(unpatchify_table)), label="argument")
        bad = data.draw(st.sampled_from(unpatchify_table[name]), label="bad value")
        args = dict(tokens=tokens, patch=patch, grid=grid, video_shape=None, order="cthw", backend="torch")
        if name == "video_shape":
            args["grid"] = None
        args[name] = bad
        names = {"tokens": ("tokens", "grid", "K ="), "patch": ("patch", "K ="), "video_shape": ("video_shape",),
                 "grid": ("grid",)}.get(name, (name,))
        assert_rejected(lambda: ops.unpatchify_3d(args["tokens"], args["patch"], args["grid"],
                                                  video_shape=args["video_shape"], order=args["order"],
                                                  backend=args["backend"]), *names)
    else:
        name = data.draw(st.sampled_from(sorted(patchify_table)), label="argument")
        bad = data.draw(st.sampled_from(patchify_table[name]), label="bad value")
        args = dict(video=video, patch=patch, order="cthw", backend="torch")
        args[name] = bad
        names = {"video": ("video",), "patch": ("patch", "video")}.get(name, (name,))
        assert_rejected(lambda: ops.patchify_3d(args["video"], args["patch"], order=args["order"],
                                                backend=args["backend"]), *names)


# ---------------------------------------------------------------------------------------------
# Constructors: each either builds something that works, or raises ValueError/TypeError naming its
# argument; never ZeroDivisionError, IndexError, a silent truncation or a model that fails later.
# ---------------------------------------------------------------------------------------------


def outcome(build):
    """build() or the ValueError/TypeError it raised; anything else propagates and fails the test."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        return e


def any_int(low=-2, high=300):
    return st.one_of(st.integers(low, high), st.sampled_from(JUNK))


@examples(120)
@given(dim=st.one_of(st.sampled_from([16, 32, 48, 64, 72, 96, 128, 144]), any_int()),
       num_heads=st.one_of(st.integers(1, 4), any_int(-1, 8)),
       mode=st.sampled_from(["full", "spatial", "temporal", "local", None]),
       window=st.sampled_from([None, (1, 2, 2), (1, 1, 1), (0, 1, 1), (1.5, 2, 2), "abc"]),
       rope=st.sampled_from([None, "3d", RoPE3D(theta=100.0), "2d"]))
def test_spacetime_attention_module(dim, num_heads, mode, window, rope):
    isint = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    valid = (isint(dim) and isint(num_heads) and dim > 0 and num_heads > 0 and dim % num_heads == 0
             and 1 <= dim // num_heads <= 256 and mode in ("full", "spatial", "temporal")
             and window in (None, (1, 2, 2), (1, 1, 1)) and rope != "2d"
             and (rope is None or (dim // num_heads) % 2 == 0))  # RoPE rotates pairs: an even head dim
    module = outcome(lambda: SpacetimeAttention(dim, num_heads, mode=mode, window=window, rope=rope, backend="torch"))
    if not valid:
        assert isinstance(module, (ValueError, TypeError)), f"accepted {dim}, {num_heads}, {mode}, {window}, {rope}"
        return
    assert isinstance(module, SpacetimeAttention), module
    if window is not None and mode != "full":
        return  # the op refuses a window outside mode="full" when it runs (tested above)
    out = module(randn((1, 4, dim), torch.float32, 0, device="cpu"), (1, 2, 2))
    assert out.shape == (1, 4, dim) and torch.isfinite(out).all()


@examples(60)
@given(dim=st.one_of(st.sampled_from([32, 64, 72]), any_int()), context_dim=any_int(-1, 40),
       num_heads=st.one_of(st.integers(1, 4), any_int(-1, 4)))
def test_cross_attention_module(dim, context_dim, num_heads):
    isint = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    valid = (isint(dim) and isint(num_heads) and isint(context_dim) and dim > 0 and num_heads > 0 and context_dim > 0
             and dim % num_heads == 0 and 1 <= dim // num_heads <= 256)
    module = outcome(lambda: CrossAttention(dim, context_dim, num_heads, backend="torch"))
    if not valid:
        assert isinstance(module, (ValueError, TypeError)), f"accepted {dim}, {context_dim}, {num_heads}"
        return
    out = module(randn((2, 3, dim), torch.float32, 0, device="cpu"),
                 randn((2, 5, context_dim), torch.float32, 1, device="cpu"), torch.tensor([[True] * 5, [False] * 5]))
    assert out.shape == (2, 3, dim) and torch.isfinite(out).all()


@examples(80)
@given(hidden=st.one_of(st.integers(1, 40), any_int()), eps=st.one_of(st.floats(1e-12, 1.0), st.sampled_from(JUNK)),
       affine=st.sampled_from([True, False, 1, "yes"]))
def test_modulated_layernorm_module(hidden, eps, affine):
    module = outcome(lambda: ModulatedLayerNorm(hidden, eps=eps, elementwise_affine=affine, backend="torch"))
    valid = (isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0 and isinstance(affine, bool)
             and isinstance(eps, float) and 1.2e-38 <= eps <= 3.4e38)
    if not valid:
        assert isinstance(module, (ValueError, TypeError)), f"accepted {hidden}, {eps}, {affine}"
        return
    out = module(*(randn(shape, torch.float32, i, device="cpu") for i, shape in
                   enumerate([(2, 3, hidden), (2, hidden), (2, hidden)])))
    assert torch.isfinite(out).all()


DIT_BASE = dict(input_size=(2, 4, 4), patch_size=(1, 2, 2), in_channels=3, hidden_size=32, depth=1, num_heads=2,
                num_classes=4, backend="torch")
DIT_VALUES = {
    "input_size": [(2, 4, 4), (1, 4, 4), 4, (2, 8, 4), 0, (2, 0, 4), (2, 4.0, 4), (2, 4), "abc"],
    "patch_size": [(1, 2, 2), (2, 2, 2), 2, (1, 4, 4), 0, -2, 2.5, (1, 2.5, 2), (1, 3, 3), (1, 2)],
    "in_channels": [1, 3, 0, -1, 2.0],
    "hidden_size": [32, 48, 64, 0, 30, 36, 16.0],
    "depth": [1, 2, 0, -1, 1.5],
    "num_heads": [1, 2, 3, 0, -2, 2.0],
    "mlp_ratio": [1.0, 4.0, 0.5, 0, -1.0, float("nan"), float("inf"), 1e-4],
    "num_classes": [0, 1, 4, -1, 2.5],
    "class_dropout_prob": [0.0, 0.1, 0.5, 1.0, -0.1, float("nan")],
    "text_dim": [None, 8, 16, 0, -3, 8.5],
    "attention": ["full", "spatial_temporal", "local"],
    "pos": ["sincos", "rope", "both", "none"],
    "per_frame_timesteps": [False, True, "yes"],
    "adaln_single": [False, True, 0],
    "learn_sigma": [True, False, None],
    "qk_norm": [False, True],
    "cfg_channels": [None, 1, 3, 0, 7],
}


@examples(150)
@given(data=st.data())
def test_dit_video_constructor(data):
    """Any mix of DiTVideo arguments: a ValueError/TypeError naming one, or a model whose forward works."""
    changed = data.draw(st.lists(st.sampled_from(sorted(DIT_VALUES)), min_size=1, max_size=4, unique=True),
                        label="arguments")
    kwargs = dict(DIT_BASE)
    for name in changed:
        kwargs[name] = data.draw(st.sampled_from(DIT_VALUES[name]), label=name)
    model = outcome(lambda: DiTVideo(**kwargs))
    if isinstance(model, Exception):
        assert any(name in str(model) for name in changed), f"error names none of {changed}: {model}"
        return
    T, H, W = model.input_size
    B = 2
    x = randn((B, model.in_channels, T, H, W), torch.float32, 0, device="cpu")
    t = torch.rand(B, T // model.patch_size[0]) if model.per_frame_timesteps else torch.rand(B)
    y = torch.arange(B) % model.num_classes if model.num_classes else None
    text = randn((B, 3, model.text_dim), torch.float32, 1, device="cpu") if model.text_dim else None
    with torch.no_grad():
        out = model.eval()(x, t * 999, y, text=text)
    assert out.shape == (B, model.out_channels, T, H, W) and torch.isfinite(out).all()


RESPACINGS = ["", "10", "250", "ddim5", "ddim50", "5,5", "10,0", "0", "1", "abc", "ddim", "ddimx", "ddim0", "10,",
              "2000", " 7", "-5", "ddim-2", "1e3", "100,100,100"]


@examples(120)
@given(num_timesteps=st.one_of(st.integers(-2, 1200), st.sampled_from([1000, 21, 20, 2.5, "1000", None, True])),
       respacing=st.sampled_from(RESPACINGS), learn_sigma=st.sampled_from([True, False, "no"]))
def test_gaussian_diffusion_constructor(num_timesteps, respacing, learn_sigma):
    diffusion = outcome(lambda: GaussianDiffusion(timestep_respacing=respacing, num_timesteps=num_timesteps,
                                                  learn_sigma=learn_sigma))
    if isinstance(diffusion, Exception):
        assert any(n in str(diffusion) for n in ("num_timesteps", "timestep_respacing", "learn_sigma")), diffusion
        return
    steps = diffusion.timestep_map.tolist()
    assert len(steps) == diffusion.num_timesteps >= 2 and steps == sorted(set(steps))
    assert 0 <= steps[0] and steps[-1] < num_timesteps
    assert ((diffusion.betas > 0) & (diffusion.betas < 1)).all()
    for name in ("alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert torch.isfinite(torch.as_tensor(getattr(diffusion, name))).all(), name
    x = torch.randn(2, 3, 1, 2, 2)
    t = torch.tensor([0, diffusion.num_timesteps - 1])
    out = torch.randn(2, 6 if learn_sigma else 3, 1, 2, 2).clamp(-1, 1)
    result = diffusion.p_mean_variance(None, x, t, model_out=out)
    assert all(torch.isfinite(v).all() for v in result.values())


@examples(120)
@given(shift=st.one_of(st.sampled_from(["auto", 1.0, 3.0, 1e-3, 1e6]), st.sampled_from(JUNK)),
       num_timesteps=st.one_of(st.sampled_from([1000, 1, 0.5]), st.sampled_from(JUNK)),
       sample_t=st.sampled_from(["logit_normal", "uniform", "beta", None]),
       base_resolution=st.sampled_from([1024, 1, 0, -4, 2.5]),
       steps=st.sampled_from([1, 2, 30, 0, -1, 2.0, True]))
def test_rectified_flow_constructor_and_timesteps(shift, num_timesteps, sample_t, base_resolution, steps):
    flow = outcome(lambda: RectifiedFlow(shift=shift, num_timesteps=num_timesteps, sample_t=sample_t,
                                         base_resolution=base_resolution))
    if isinstance(flow, Exception):
        assert any(n in str(flow) for n in ("shift", "num_timesteps", "sample_t", "base_resolution")), flow
        return
    times = outcome(lambda: flow.timesteps(steps, (1, 3, 4, 8, 8)))
    if isinstance(times, Exception):
        assert "steps" in str(times)
        return
    assert times[0] == 1 and times[-1] == 0 and bool((times[1:] <= times[:-1]).all()) and torch.isfinite(times).all()
    t = flow.sample_timesteps((64,), generator=torch.Generator().manual_seed(0))
    assert bool(((t >= 0) & (t <= 1)).all())
