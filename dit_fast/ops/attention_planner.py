"""Which implementation an attention call with backend "auto" runs on a GPU: ours or torch's own best.

"auto" must never be slower than what a user would get from PyTorch alone, so on a GPU it times our
Triton kernel against torch's fastest way to compute the same call, once per call class, and runs the
winner:

    impl            what runs                                                     for
    "triton"        our kernel (torch.ops.dit_fast.attention_fwd)                 every call
    "sdpa"          F.scaled_dot_product_attention (SDPA's own dispatch: cuDNN,   attention(), spacetime mode="full"
                    flash, efficient); key padding as a boolean mask; on a GPU
                    in fp16 / bf16 also "sdpa:cudnn" and "sdpa:flash" (forced)
    "sdpa_grouped"  SDPA over frames (spatial: a view, no copy) or (h, w) columns mode="spatial" / "temporal"
                    (temporal: permute + copy in and out); also ":cudnn", ":flash"
    "flex"          FlexAttention (torch.compile'd on a GPU) on tokens permuted   window= / window_tile=
                    to 3D-tile order, with a block mask built once per
                    (grid, window, window_tile, device)
    "reference"     attention_reference (CPU, float64)

A call class (the cache key) is: device, dtype, head dim, the power-of-two classes of B * heads, Sq and
Sk, the key padding mask (none, (B, Sk) or per head), the grid, mode, window and tile exactly,
return_lse, rope_in_kernel, and whether gradients are needed (then forward + backward is timed, else
the forward).

Consistency: the winner runs as ordinary PyTorch code, so autograd differentiates whichever forward
ran (SDPA's or Flex's backward, or our registered one). With return_lse=True SDPA is not a candidate
(it returns no log-sum-exp; computing one would materialise the (Sq, Sk) scores), Flex is (it
returns one). rope_in_kernel=True, deterministic= or tma= (not None) ask for our kernel: it is the
only candidate. Masked inputs, as in our kernels: a masked key or value never influences anything,
whatever its values (NaN, inf). SDPA with key padding gets the padded rows zeroed first (a visible
non-finite key or value then shows in its queries' outputs as SDPA computes it); Flex, whose partly
masked blocks multiply masked values by 0, gets the non-finite rows zeroed and a NaN score bias on
them (Flex turns a masked score into -inf, so only the queries that may see such a key return NaN).

Failures while timing: our kernel failing on a call is a bug, never a lost race, so it raises (a
RuntimeError naming the call class, from the kernel's error). A torch candidate that cannot run a
call (a forced SDPA backend without support for the head dim, Flex's backward on CPU) is left out:
logged once per call class at WARNING on the "dit_fast" logger and named in the plan's reason.

Imports run one way: dit_fast/ops/flash_attention.py (the public functions) imports this module; this
module imports neither it nor dit_fast.ops. It shares the argument checks through
dit_fast/ops/_attention_checks.py and runs our kernel through its registered custom op,
torch.ops.dit_fast.attention_fwd (registered when flash_attention.py is imported, which every caller
of the planner has done: the public functions and dit_fast.ops).

When nothing is timed: on CPU ("auto" is the reference), under torch.compile tracing (the graph gets
the plan measured before compiling, else our kernel: call the model once eagerly, or attention_plan()
for each shape, before compiling to have the winner compiled in), and during CUDA graph capture (our
kernel, not cached).

``dit_fast.ops.attention_plan(q, k, v, ...)`` (the function ``attention_plan`` below, re-exported by
dit_fast.ops; this module is ``dit_fast.ops.attention_planner``) says which implementation
a call would run and why; the first choice of each class is also logged at DEBUG level on the
"dit_fast" logger. Tests inject timings with ``set_timer`` and the device facts (a GPU with Triton
runnable) with ``dit_fast._backend.set_device_facts``: everything between is the code a GPU runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dit_fast import _backend
from dit_fast.ops import _attention_checks as checks

log = logging.getLogger("dit_fast")

IMPLS = ("triton", "sdpa", "sdpa_grouped", "flex", "reference")  # + ":<SDPA backend>" for the SDPA ones


class Call(NamedTuple):
    """The arguments of an attention call besides q, k, v and the key padding mask, after validation.
    grid None: attention(); else spacetime_attention() (q, k already rotated unless rope_in_kernel)."""
    scale: float
    return_lse: bool = False
    grid: Optional[Tuple[int, int, int]] = None
    mode: str = "full"
    window: Optional[Tuple[int, int, int]] = None
    window_tile: Optional[Tuple[int, int, int]] = None
    rope_in_kernel: bool = False
    kernel_options: bool = False  # deterministic= or tma= given: options of our kernel, so it runs


@dataclass(frozen=True)
class AttentionPlan:
    """What an attention call runs. impl: one of IMPLS; reason: why, in words; times_ms: the
    measured candidates (fwd, or fwd+bwd when gradients are needed), None when nothing was timed;
    kept_fraction: for a block-sparse call, the kept (query, key) token pairs over all S * S (the work
    left), None for a dense one."""
    impl: str
    reason: str
    times_ms: Optional[Dict[str, float]] = None
    kept_fraction: Optional[float] = None

    def __str__(self) -> str:
        return f"{self.impl} ({self.reason})"


# ---------------------------------------------------------------------------------------------
# torch's candidates. Each takes (q, k, v) (B, S, heads, D), the key padding mask (B, Sk), per head
# (B, heads, Sk), or None,
# and the Call; returns out (B, Sq, heads, D), or (out, lse (B, heads, Sq) fp32) with return_lse.
# ---------------------------------------------------------------------------------------------


def _heads_first(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # (B, S, heads, D) -> (B, heads, S, D), a view


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call) -> Tensor:
    """Dense attention through SDPA's dispatch. With key padding ((B, Sk), or per head (B, heads, Sk))
    the masked key rows are zeroed first (SDPA's math path adds -inf to a NaN score: NaN; and 0 * NaN
    is NaN), and a query of a batch (and head) without any visible key gets zeros, as in
    attention_reference and our kernel."""
    if mask is None:
        out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), scale=call.scale)
        return out.transpose(1, 2)
    per_head = mask if mask.dim() == 3 else mask[:, None, :]  # (B, heads or 1, Sk)
    hide = ~per_head.transpose(1, 2)[..., None]  # (B, Sk, heads or 1, 1)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k, v = torch.where(hide, zero, k), torch.where(hide, zero, v)
    has_key = per_head.any(-1)[:, :, None, None]  # (B, heads or 1, 1, 1)
    attn_mask = per_head[:, :, None, :] | ~has_key  # (B, heads or 1, 1, Sk); no key: attend to zeros, then zero
    out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), attn_mask=attn_mask,
                                         scale=call.scale)  # (B, heads, Sq, D)
    out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)


def sdpa_grouped(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call) -> Tensor:
    """Spatial: each frame is a batch entry (a view of the raster layout, no copy). Temporal: each
    (h, w) column is one (a permute and a copy in, one out), as video DiTs write it."""
    B, S, heads, D = q.shape
    T, H, W = call.grid
    if call.mode == "spatial":
        def group(t):  # (B, S, heads, D) -> (B * T, heads, H * W, D)
            return t.reshape(B * T, H * W, heads, D).transpose(1, 2)

        out = F.scaled_dot_product_attention(group(q), group(k), group(v), scale=call.scale)
        return out.transpose(1, 2).reshape(B, S, heads, D)

    def group(t):  # (B, S, heads, D) -> (B * H * W, heads, T, D)
        return t.reshape(B, T, H * W, heads, D).transpose(1, 2).reshape(B * H * W, T, heads, D).transpose(1, 2)

    out = F.scaled_dot_product_attention(group(q), group(k), group(v), scale=call.scale)  # (B*H*W, heads, T, D)
    return out.transpose(1, 2).reshape(B, H * W, T, heads, D).transpose(1, 2).reshape(B, S, heads, D)


def _flex_module():
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # torch < 2.5
        return None
    return flex_attention


_flex_layouts: Dict[tuple, tuple] = {}


def flex_layout(grid: Sequence[int], window: Sequence[int], window_tile: Optional[Sequence[int]], device):
    """(perm, inverse, block_mask) for a window: perm (S,) the raster token at each position of the
    3D-tile order (tiles in raster order, tokens in raster order inside a tile, edge tiles partial),
    inverse its inverse, and Flex's block mask of the window on tokens in that order. Tile order keeps
    a window's keys in few 128-token blocks (Sliding Tile Attention's layout); the tile is window_tile,
    or (2, 8, 8) (clamped to the grid) for a token window. Built once per (grid, window, tile, device)."""
    key = (tuple(grid), tuple(window), None if window_tile is None else tuple(window_tile), str(device))
    if key not in _flex_layouts:
        _flex_layouts[key] = _build_flex_layout(grid, window, window_tile, device)
    return _flex_layouts[key]


def _build_flex_layout(grid, window, window_tile, device):
    from dit_fast.ops.rope import grid_positions

    fa = _flex_module()
    T, H, W = grid
    tile = tuple(window_tile) if window_tile is not None else (min(T, 2), min(H, 8), min(W, 8))
    pos = grid_positions(grid, device)  # (S, 3) raster (t, h, w)
    tiles = [-(-n // t) for n, t in zip(grid, tile)]
    unit = pos // torch.tensor(tile, device=device)  # tile coordinates
    tile_id = (unit[:, 0] * tiles[1] + unit[:, 1]) * tiles[2] + unit[:, 2]
    perm = torch.sort(tile_id, stable=True).indices  # (S,)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    if window_tile is not None:  # the window rule on tile coordinates, in tiles (spacetime_mask)
        coords, sizes, lengths = unit[perm], [w // t for w, t in zip(window, tile)], tiles
    else:
        coords, sizes, lengths = pos[perm], list(window), list(grid)
    coords = [coords[:, a].contiguous() for a in range(3)]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        for c, size, length in zip(coords, sizes, lengths):
            start = torch.clamp(c[q_idx] - (size - 1) // 2, 0, length - size)
            inside = (c[kv_idx] >= start) & (c[kv_idx] < start + size)
            keep = inside if keep is None else keep & inside
        return keep

    S = perm.numel()
    block_mask = fa.create_block_mask(mask_mod, None, None, S, S, device=device)
    return perm, inverse, block_mask


def _flex_call(qh, kh, vh, bias, block_mask, scale: float, return_lse: bool):
    """flex_attention with a per-key score bias (0, or NaN on a non-finite key or value row)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx]

    fa = _flex_module()
    if not return_lse:
        return fa.flex_attention(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale)
    if hasattr(fa, "AuxRequest"):  # torch >= 2.9; return_lse= is deprecated there
        out, aux = fa.flex_attention(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                     return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return fa.flex_attention(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale, return_lse=True)


_compiled_flex: List[Callable] = []


def _run_flex(qh, kh, vh, bias, block_mask, scale, return_lse):
    if torch.compiler.is_compiling():  # inside a compiled model: Dynamo traces Flex itself
        return _flex_call(qh, kh, vh, bias, block_mask, scale, return_lse)
    if qh.device.type != "cuda":  # CPU: Flex's unfused eager path (tests), forward only
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return _flex_call(qh, kh, vh, bias, block_mask, scale, return_lse)
    if not _compiled_flex:  # Flex is only fast compiled; bias is an input, so no recompile per call
        _compiled_flex.append(torch.compile(_flex_call, dynamic=False))
    return _compiled_flex[0](qh, kh, vh, bias, block_mask, scale, return_lse)


def flex(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call):
    """FlexAttention for window / window_tile, on tokens gathered into 3D-tile order and back."""
    perm, inverse, block_mask = flex_layout(call.grid, call.window, call.window_tile, q.device)
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))[:, perm]  # (B, S, heads), tile order
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    qp = q[:, perm]
    kp, vp = torch.where(bad[..., None], zero, k[:, perm]), torch.where(bad[..., None], zero, v[:, perm])
    bias = torch.where(bad, float("nan"), 0.0).transpose(1, 2).contiguous()  # (B, heads, S) fp32
    result = _run_flex(_heads_first(qp), _heads_first(kp), _heads_first(vp), bias, block_mask, call.scale,
                       call.return_lse)
    out, lse = result if call.return_lse else (result, None)
    out = out.transpose(1, 2)[:, inverse]  # (B, S, heads, D), raster order
    return (out, lse[..., inverse].float().detach()) if call.return_lse else out


TORCH_IMPLS: Dict[str, Callable] = {"sdpa": sdpa, "sdpa_grouped": sdpa_grouped, "flex": flex}
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def run_torch(impl: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call):
    """Runs torch's implementation ``impl``: a TORCH_IMPLS name, for SDPA ones optionally with one SDPA
    backend forced ("sdpa:cudnn", "sdpa_grouped:flash"; sdpa_kernel, so autograd runs that backend's
    backward too)."""
    name, _, backend = impl.partition(":")
    if not backend:
        return TORCH_IMPLS[name](q, k, v, mask, call)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]):
        return TORCH_IMPLS[name](q, k, v, mask, call)


# ---------------------------------------------------------------------------------------------
# Choosing: candidates, timing, the cache.
# ---------------------------------------------------------------------------------------------


FORCED_SDPA = ("cudnn", "flash")  # SDPA backends also timed forced on a GPU (fp16 / bf16: what they take)


def candidates(call: Call, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tuple[Tuple[str, ...], str]:
    """(implementations to time, a note on what was left out and why). On a GPU, for fp16 / bf16 (or
    dtype None), the SDPA calls are also timed with cuDNN's and flash's backends forced: SDPA's
    dispatch does not always pick the fastest (H100, D = 128, S = 16k: cuDNN 1.25x our kernel, our
    kernel 1.38x flash; README), and "auto" must not lose to any of them."""
    if call.rope_in_kernel:
        return ("triton",), "rope_in_kernel=True asks for our fused kernel"
    if call.kernel_options:
        return ("triton",), "deterministic= or tma= given: options of our kernel"
    if call.grid is None or (call.mode == "full" and call.window is None):
        torch_impl = "sdpa"
    elif call.window is None:
        torch_impl = "sdpa_grouped"
    else:
        torch_impl = "flex"
        if _flex_module() is None:
            return ("triton",), "FlexAttention needs torch >= 2.5"
    if call.return_lse and torch_impl != "flex":
        return ("triton",), "return_lse: SDPA gives no log-sum-exp, our kernel does"
    if torch_impl != "flex" and device.type == "cuda" and dtype in (None, torch.float16, torch.bfloat16):
        return ("triton", torch_impl) + tuple(f"{torch_impl}:{b}" for b in FORCED_SDPA), ""
    return ("triton", torch_impl), ""


def _default_timer(impl: str, fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds per call of fn: CUDA events on a GPU (_backend._time_ms), else perf_counter."""
    if device.type == "cuda":
        return _backend._time_ms(fn)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) * 1000 / 3


Timer = Callable[[str, Callable[[], object], torch.device], float]
_timer: List[Timer] = [_default_timer]
_plans: Dict[tuple, AttentionPlan] = {}


def set_timer(timer: Optional[Timer] = None) -> Timer:
    """Replaces how candidates are timed: timer(impl, fn, device) -> ms per call of fn (None: the default,
    CUDA events). Returns the previous timer. Clears the cached plans. For tests and experiments."""
    previous = _timer[0]
    _timer[0] = timer or _default_timer
    clear()
    return previous


def clear() -> None:
    """Forgets every measured plan (the next call of each class measures again)."""
    _plans.clear()


def cached_plans() -> Dict[tuple, AttentionPlan]:
    """A copy of the measured plans, by call class."""
    return dict(_plans)


class CallClass(NamedTuple):
    """The cache key of a call (see the module docstring): plain Python values. Sizes are power-of-two
    classes (B * heads, Sq, Sk: "up to"); mask 0: none, 2: key padding (B, Sk), 3: per head."""
    device: str
    dtype: str
    head_dim: int
    batch_heads: int
    q_len: int
    k_len: int
    mask: int
    grid: Optional[Tuple[int, int, int]]
    mode: str
    window: Optional[Tuple[int, int, int]]
    window_tile: Optional[Tuple[int, int, int]]
    rope_in_kernel: bool
    kernel_options: bool
    return_lse: bool
    needs_grad: bool

    def __str__(self) -> str:
        if self.grid is None:
            what = "attention()"
        else:
            extra = "".join(f", {n}={getattr(self, n)}" for n in ("window", "window_tile") if getattr(self, n))
            what = f"spacetime_attention(grid={self.grid}, mode={self.mode!r}{extra})"
        mask = {0: "", 2: ", key padding (B, Sk)", 3: ", key padding per head (B, heads, Sk)"}[self.mask]
        return (f"{what} {self.dtype.replace('torch.', '')} on {self.device}, D = {self.head_dim}, B * heads <= "
                f"{self.batch_heads}, Sq <= {self.q_len}, Sk <= {self.k_len}{mask}"
                f"{', return_lse' if self.return_lse else ''}, {'fwd+bwd' if self.needs_grad else 'fwd'}")


def call_class(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call) -> CallClass:
    """The cache key of a call. Plain Python values, also under torch.compile with dynamic shapes
    (shape_class and exact_int turn symbolic sizes into ints, by guards)."""
    B, Sq, heads, D = q.shape
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return CallClass(str(q.device), str(q.dtype), _backend.exact_int(D), _backend.shape_class(B * heads),
                     _backend.shape_class(Sq), _backend.shape_class(k.shape[1]), 0 if mask is None else mask.dim(),
                     call.grid, call.mode, call.window, call.window_tile, call.rope_in_kernel, call.kernel_options,
                     call.return_lse, needs_grad)


_device_labels: Dict[str, str] = {}


def _device_label(device: str) -> str:
    """The device's name ("NVIDIA H200"), so that plans are per kind of GPU; cached per device."""
    if device not in _device_labels:
        d = torch.device(device)
        _device_labels[device] = torch.cuda.get_device_name(d) if d.type == "cuda" else d.type
    return _device_labels[device]


def run_ours(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call):
    """Our kernel on a call, through its custom op (registered by dit_fast/ops/flash_attention.py), as
    the public functions run it with backend="triton": out, or (out, lse) with return_lse. q and k are
    already rotated (the planner never times rope_in_kernel calls) and the kernel options are the
    environment's (calls that name them are not timed)."""
    grid, window, tile = (list(x) if x is not None else [] for x in (call.grid, call.window, call.window_tile))
    out, lse = torch.ops.dit_fast.attention_fwd(q, k, v, mask, grid, call.mode, window, tile, 0.0, [], call.scale,
                                                "triton", None, None)
    return (out, lse) if call.return_lse else out


def _timed(impl: str, q, k, v, mask, call: Call, needs_grad: bool) -> Callable[[], object]:
    """fn() running impl once on these inputs: the forward, or forward + backward of a random dout."""
    if impl == "triton":
        def run(q, k, v):
            return run_ours(q, k, v, mask, call)
    else:
        def run(q, k, v):
            return run_torch(impl, q, k, v, mask, call)

    if not needs_grad:
        def forward():
            with torch.no_grad():
                return run(q, k, v)
        return forward
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    dout = torch.randn_like(q)

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = run(*leaves)
        torch.autograd.backward(out[0] if isinstance(out, tuple) else out, dout)
    return forward_backward


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


class OwnKernelError(RuntimeError):
    """Our kernel failed while "auto" timed it: a bug in dit_fast, reported instead of losing to torch."""


def _measure(key: CallClass, q, k, v, mask, call: Call) -> AttentionPlan:
    names, note = candidates(call, q.device, q.dtype)
    if len(names) == 1:
        return AttentionPlan(names[0], note)
    times: Dict[str, float] = {}
    left_out: Dict[str, str] = {}
    for impl in names:
        try:
            times[impl] = float(_timer[0](impl, _timed(impl, q, k, v, mask, call, key.needs_grad), q.device))
        except Exception as exc:
            if impl == "triton":  # never hidden behind torch's result
                raise OwnKernelError(f"attention auto: our kernel failed on the call class {key}: "
                                     f"{_one_line(exc)}") from exc
            left_out[impl] = _one_line(exc)  # torch's candidate cannot run this call
    if left_out:  # measured once per class (the plan is cached), so logged once per class
        log.warning("dit_fast attention auto: left out for %s (they cannot run it): %s", key,
                    "; ".join(f"{n}: {e}" for n, e in left_out.items()))
    best = min(times, key=times.get)
    what = "fwd+bwd" if key.needs_grad else "fwd"
    reason = "measured " + what + ": " + ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(times.items(),
                                                                                       key=lambda x: x[1]))
    if left_out:
        reason += "; left out: " + ", ".join(f"{n} ({e})" for n, e in left_out.items())
    return AttentionPlan(best, reason, times)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _isolated(fn: Callable[[], AttentionPlan], device: torch.device) -> AttentionPlan:
    """fn() in a fresh thread, whose autograd state is clean: the caller may be inside activation
    checkpointing, whose saved-tensor hooks (thread-local) would capture the timed forward + backward
    and break both. The caller's autocast state, CUDA device and stream are carried over."""
    autocast = torch.is_autocast_enabled(device.type)
    autocast_dtype = torch.get_autocast_dtype(device.type) if autocast else None
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    result: Dict[str, object] = {}

    def run():
        try:
            with contextlib.ExitStack() as stack:
                if stream is not None:
                    stack.enter_context(torch.cuda.device(device))
                    stack.enter_context(torch.cuda.stream(stream))
                if autocast:
                    stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype))
                result["plan"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread below
            result["error"] = exc

    thread = threading.Thread(target=run, name="dit_fast-attention-plan")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["plan"]


def plan_for(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call) -> AttentionPlan:
    """The plan of an "auto" call on a GPU, measured on this call's inputs the first time its class is
    seen (eager only: never while tracing or capturing a CUDA graph)."""
    key = call_class(q, k, v, mask, call)
    full_key = key + (_device_label(key[0]),)
    plan = _plans.get(full_key)
    if plan is not None:
        return plan
    if _capturing(q.device):
        return AttentionPlan("triton", "CUDA graph capture: nothing can be timed (not cached)")
    plan = _isolated(lambda: _measure(key, q, k, v, mask, call), q.device)
    _plans[full_key] = plan
    log.debug("dit_fast attention auto: %s for %s", plan, full_key)
    return plan


@_backend.assume_constant_result
def _compiled_choice(key: tuple) -> str:
    """Evaluated by Dynamo once while tracing (never timed): the measured winner, else our kernel."""
    plan = _plans.get(key + (_device_label(key[0]),))
    if plan is None:
        log.debug("dit_fast attention auto: triton for %s (traced by torch.compile before any measurement; "
                  "run the call once eagerly before compiling to compile the measured winner)", key)
        return "triton"
    return plan.impl


def auto(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], call: Call) -> Tuple[str, object]:
    """For the public functions, with backend "auto" resolved on a GPU: ("triton", None) when our kernel
    should run, else (impl, the result of torch's winner)."""
    if torch.compiler.is_compiling():
        impl = _compiled_choice(tuple(call_class(q, k, v, mask, call)))  # a plain tuple: Dynamo passes it as a constant
    else:
        impl = plan_for(q, k, v, mask, call).impl
    if impl == "triton":
        return impl, None
    return impl, run_torch(impl, q, k, v, mask, call)


# ---------------------------------------------------------------------------------------------
# Public: dit_fast.ops.attention_plan
# ---------------------------------------------------------------------------------------------


def attention_plan(q: Tensor, k: Tensor, v: Tensor, grid: Optional[Sequence[int]] = None, *, mode: str = "full",
                   window: Optional[Sequence[int]] = None, window_tile: Optional[Sequence[int]] = None,
                   rope=None, rope_in_kernel: bool = False, key_padding_mask: Optional[Tensor] = None,
                   scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
                   blocks=None) -> AttentionPlan:
    """Which implementation ``attention(q, k, v, ...)`` (grid None) or ``spacetime_attention(q, k, v, grid,
    ...)`` with the same arguments would run here, and why. On a GPU with backend "auto" this measures
    the candidates if the call's class was not measured yet, exactly as the call would (and caches
    the result, so the call then runs the winner without timing again). Gradients are taken to be
    needed when q, k or v requires grad and grad mode is on, as for the call.

    blocks: a ``SparseBlocks``: the plan of ``block_sparse_attention(q, k, v, blocks, ...)`` instead, with
    the kept fraction of the call (``plan.kept_fraction`` and the reason); nothing is timed (sparse
    attention is opt-in: our kernel on a GPU, the reference on CPU)."""
    from dit_fast.ops.rope import as_rope

    checks._check_qkv(q, k, v)
    if blocks is not None:
        return _block_sparse_plan(q, k, blocks, grid, mode, window, window_tile, rope, backend)
    if grid is None:
        for name, value in (("mode", mode != "full"), ("window", window), ("window_tile", window_tile),
                            ("rope", rope), ("rope_in_kernel", rope_in_kernel)):
            if value not in (None, False):
                raise ValueError(f"{name} needs a grid (spacetime_attention); attention() takes only the key "
                                 "padding mask")
        mask = checks._check_key_padding_mask(key_padding_mask, q, k)
        call = Call(checks._check_scale(scale, q.shape[-1]), bool(return_lse))
    else:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is an attention() argument; spacetime_attention takes none")
        grid = checks._check_grid(grid, q, k)
        window = checks._check_mode_window(mode, window, grid, window_tile)
        window_tile = checks._check_window_tile(window_tile, window, grid)
        as_rope(rope)
        mask = None
        call = Call(checks._check_scale(scale, q.shape[-1]), bool(return_lse), tuple(grid), mode,
                    None if window is None else tuple(window), None if window_tile is None else tuple(window_tile),
                    bool(rope_in_kernel) and rope is not None)
    requested = _backend.requested_backend(backend)
    name = checks._resolve(backend, q)
    if name == "torch":
        if requested == "torch":
            return AttentionPlan("reference", "backend 'torch' requested (call, use_backend or DIT_FAST_BACKEND)")
        if q.dtype not in checks.FLOAT_DTYPES:
            return AttentionPlan("reference", f"{q.dtype}: only the reference takes it")
        return AttentionPlan("reference", f"auto on {q.device.type}: the PyTorch reference")
    if name != "auto":
        return AttentionPlan(name, f"backend {name!r} requested (call, use_backend or DIT_FAST_BACKEND)")
    return plan_for(q, k, v, mask, call)


def _block_sparse_plan(q: Tensor, k: Tensor, blocks, grid, mode, window, window_tile, rope, backend) -> AttentionPlan:
    """attention_plan(..., blocks=...): what block_sparse_attention would run, and the work it keeps."""
    from dit_fast.ops.sparse_layout import SparseBlocks

    if not isinstance(blocks, SparseBlocks):
        raise TypeError(f"blocks must be a dit_fast.ops.sparse_layout.SparseBlocks, got {type(blocks).__name__}")
    for name, value in (("grid", grid), ("mode", mode != "full"), ("window", window), ("window_tile", window_tile),
                        ("rope", rope)):
        if value not in (None, False):
            raise ValueError(f"{name} is a spacetime_attention argument; with blocks= the layout is the blocks' own "
                             f"({blocks.layout})")
    layout = blocks.layout
    B, S, heads, _ = q.shape
    b, h = blocks.kv_count.shape[:2]
    if S != layout.tokens or k.shape[1] != layout.tokens or b not in (1, B) or h not in (1, heads):
        raise ValueError(f"blocks for (B, heads) = ({b}, {h}) over S = {layout.tokens} tokens cannot serve q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    kept = blocks.kept_fraction()
    tiles = int(blocks.tile_mask().sum())
    work = (f"kept {kept:.1%} of the token pairs ({tiles} of {b * h * layout.n_tiles ** 2} tile pairs over "
            f"{b} x {h} (batch, head) lists; grid {layout.grid}, tile {layout.tile}, {layout.extra} extra tokens)")
    name = _backend.resolve_backend(backend, q.device, "block_sparse_attention", implemented=("triton",))
    if name == "torch" or q.dtype not in checks.FLOAT_DTYPES:
        return AttentionPlan("reference", f"block-sparse on {q.device.type}, the PyTorch reference with the blocks' "
                                          f"token mask: {work}", kept_fraction=kept)
    return AttentionPlan("triton", f"block-sparse kernels (opt-in, untimed: no torch candidate does the same work): "
                                   f"{work}", kept_fraction=kept)
