"""The "dit_fast" attention backend of diffusers' dispatcher (``diffusers.models.attention_dispatch``).

diffusers keys its backends by the closed enum ``AttentionBackendName``; ``register_backend`` adds the
member ``DIT_FAST = "dit_fast"`` to it (idempotent) and registers ``dit_fast_attention`` with
``supports_context_parallel=True``. Then ``model.set_attention_backend("dit_fast")``, diffusers'
``attention_backend("dit_fast")`` context and ``enable_parallelism(...)`` route attention here.

What runs on dit_fast.ops.attention (any head count, any head dim from 1 to 256, short
cross-attention keys, fp32 / fp16 / bf16):
  * no mask, or a mask that is a key-padding mask: bool (True = attend), or float with only 0
    (attend) and <= -9000 (masked: LTX's -10000) entries, constant over queries, the same for every
    head ((B, Sk) to the kernels) or per head ((B, heads, Sk): LTX's (B, heads, 1, Sk)), every query
    with at least one visible key in its head. The masked keys' float weights, exp(<= -9000 + score
    spread), are exactly 0 in fp32, so the result is the same as the additive mask's;
  * ``return_lse``: the log-sum-exp in diffusers' layout (B, Sq, heads), fp32;
  * context parallelism: self-attention through diffusers' Ulysses / ring / unified templates, with
    forward / backward ops on dit_fast.parallel.attention_parts (LSE-carrying blocks). Sharded
    cross-attention keys (LTX's text), masked ring attention and per-head masks are gathered over
    the CP mesh instead, each rank attending with its own queries: diffusers' Ulysses backward
    assumes as many keys as queries, its ring merge turns a fully masked first block into a NaN LSE,
    and its Ulysses hands each rank some of the heads but all of a mask. Mask checks are combined
    over the mesh (one all-reduce), so every rank takes the same path.
Everything else (dropout, causal, grouped-query heads, float biases, a mask that requires grad, masks
that differ between queries, rows with no visible key, float64, other head dims) runs diffusers' native
attention, with one RuntimeWarning per distinct reason (each head dim, dtype combination: the numbers are kept): never a
silently different result. A mask that neither could run (SDPA refuses it too: an integer dtype, a float
dtype other than float32 or the query's, a shape that does not broadcast to (B, heads, Sq, Sk), 1-D) is a
TypeError / ValueError naming it, eagerly and compiled alike.

Under torch.compile (fullgraph=True included) nothing is read on the host while tracing: flags,
shapes and dtypes decide what they can (a static fallback is warned while tracing), and a mask's
values are checked on the device, ``torch.cond`` running our kernels or the native fallback
(``_device_checked``): the eager result, no graph break. Context parallelism keeps its host read (the
mesh-wide check), so it is for eager runs.
"""

import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.attention.flex_attention  # noqa: F401  (BlockMask, for masks that are no tensor)
from torch import Tensor

from diffusers.models import attention_dispatch as _dispatch

from dit_fast._backend import assume_constant_result
from dit_fast.ops.flash_attention import MAX_HEAD_DIM, attention

BACKEND_NAME = "dit_fast"
MEMBER_NAME = "DIT_FAST"
MASKED_AT_OR_BELOW = -9000.0  # float mask entries treated as "masked" (bf16 rounds LTX's -10000 to -9984)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REQUIRED = ("AttentionBackendName", "_AttentionBackendRegistry", "_native_attention",
             "_templated_context_parallel_attention")


# ---------------------------------------------------------------------------------------------
# Registration: one member added to diffusers' closed enum, one registry entry.
# ---------------------------------------------------------------------------------------------


def _extend_str_enum(enum_cls, name: str, value: str):
    """Adds ``name = value`` to a (str, Enum) class after its creation; returns the member (idempotent).

    Enum has no public way to do this; the member is built as Enum builds its own (str.__new__ then
    _name_ / _value_) and entered in the three tables lookups read: _member_map_ (by name,
    __members__), _value2member_map_ (``Enum(value)``) and _member_names_ (iteration).
    """
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(next(iter(enum_cls)), "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    if hasattr(enum_cls, "_add_member_"):  # Python 3.13+: the class attribute and _member_map_
        enum_cls._add_member_(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def backend_member():
    """``AttentionBackendName.DIT_FAST`` (after ``register_backend``)."""
    return _dispatch.AttentionBackendName(BACKEND_NAME)


def register_backend():
    """Registers ``dit_fast_attention`` as diffusers' "dit_fast" backend; safe to call again. Returns the member."""
    missing = [n for n in _REQUIRED if not hasattr(_dispatch, n)]
    if missing:
        raise ImportError(f"diffusers.models.attention_dispatch lacks {missing}: this diffusers is not one the "
                          "dit_fast backend was written for")
    member = _extend_str_enum(_dispatch.AttentionBackendName, MEMBER_NAME, BACKEND_NAME)
    if member.name != MEMBER_NAME or _dispatch.AttentionBackendName(BACKEND_NAME) is not member:
        raise RuntimeError(f"could not add {MEMBER_NAME} to diffusers' AttentionBackendName")
    registry = _dispatch._AttentionBackendRegistry
    if registry._backends.get(member) is not dit_fast_attention:
        registry.register(member, constraints=[_dispatch._check_device, _dispatch._check_shape],
                          supports_context_parallel=True)(dit_fast_attention)
    return member


# ---------------------------------------------------------------------------------------------
# What the kernels can run; everything else goes to diffusers' native attention, warned once per reason.
# ---------------------------------------------------------------------------------------------

_warned = set()


@assume_constant_result  # torch.compile runs it once while tracing (Dynamo cannot trace warnings.warn)
def _warn_once(reason: str, runs: str = "diffusers' native attention") -> bool:
    """One RuntimeWarning per distinct reason, its numbers kept: head dims 264 and 300 are two reasons."""
    if reason in _warned:
        return False
    _warned.add(reason)
    warnings.warn(f"dit_fast attention backend: {reason}; such calls run {runs} (this warning is shown once per "
                  "reason)", RuntimeWarning, stacklevel=4)
    return True


def _unsupported(query, key, value, dropout_p, is_causal) -> Optional[str]:
    """Why the kernels cannot run this call, or None. Reads static facts only (flags, shapes, dtypes)."""
    if dropout_p:
        return "dropout_p > 0"
    if is_causal:
        return "is_causal=True"
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key, value)):
        return "q, k, v are not all (B, S, heads, D) tensors"
    if not query.dtype == key.dtype == value.dtype or query.dtype not in KERNEL_DTYPES:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype} (the kernels take one of fp32, fp16, bf16)"
    if key.shape[2] != query.shape[2]:
        return f"grouped-query attention ({query.shape[2]} query heads, {key.shape[2]} key heads)"
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[3] != query.shape[3]:
        return f"shapes q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}"
    head_dim = query.shape[3]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} (the kernels take 1 to {MAX_HEAD_DIM})"
    if query.shape[1] == 0 or key.shape[1] == 0:
        return "an empty sequence"
    return None


# A mask is read as SDPA reads it, broadcast to (B, heads, Sq, Sk), except that a (B, Sk) mask is a key
# padding mask, as in diffusers' native backend. Static facts (its shape, its dtype) and value checks
# (on the device, no host read) are apart, so that eager (one host read) and torch.compile (torch.cond)
# share them.

_EVERY_KEY_MASKED = ("a query with every key masked (the native result there is NaN or a uniform average, "
                     "dit_fast's zeros)")


def _check_mask(attn_mask: Tensor, query_dtype: torch.dtype) -> None:
    """A mask neither path could run (diffusers' native attention, SDPA, refuses it too): a TypeError
    or ValueError naming it, the same eagerly and while tracing (static facts only). Shapes are
    checked by ``_mask_4d``."""
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"dit_fast attention backend: attn_mask must be bool (True = attend) or float (added to "
                        f"the scores), got dtype {attn_mask.dtype}")
    if attn_mask.is_floating_point() and attn_mask.dtype not in (torch.float32, query_dtype):
        raise TypeError(f"dit_fast attention backend: a float attn_mask must be float32 or the query's dtype "
                        f"{query_dtype} (as SDPA takes it), got {attn_mask.dtype}")


def _mask_4d(attn_mask: Tensor, batch: int, heads: int, seq_q: int, seq_k: int) -> Tensor:
    """attn_mask as (B | 1, heads | 1, Sq | 1, Sk), broadcast as SDPA reads it (a (B, Sk) mask as a key
    padding mask, as diffusers' native backend reads it); a ValueError naming the shapes for a mask that
    does not broadcast to (B, heads, Sq, Sk) (SDPA refuses it too; so does a 1-D mask)."""
    m = attn_mask
    if m.dim() == 2 and tuple(m.shape) == (batch, seq_k):
        m = m[:, None, None, :]
    while 2 <= m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4 or m.shape[-1] != seq_k or any(
            s not in (1, full) for s, full in zip(m.shape[:3], (batch, heads, seq_q), strict=True)):
        raise ValueError(f"dit_fast attention backend: attn_mask of shape {tuple(attn_mask.shape)} does not "
                         f"broadcast to (B, heads, Sq, Sk) = ({batch}, {heads}, {seq_q}, {seq_k}) (q is (B, Sq, "
                         f"heads, D); a 2-D mask is (B, Sk) or (Sq, Sk))")
    return m


def _visible(m: Tensor) -> Tensor:
    """The attended pairs of a mask: a bool mask as given, a float mask where it is 0."""
    return m if m.dtype == torch.bool else m == 0


def _mask_checks(m: Tensor, batch: int, heads: int, seq_k: int):
    """What makes a 4-D mask a key padding mask, as device tensors: ([(reason, passed: 0-dim bool)],
    has_key: (B, heads) bool, some visible key in each row)."""
    visible = _visible(m)
    checks = []
    if m.is_floating_point():
        checks.append(("a float mask with entries other than 0 and <= -9000 (additive biases)",
                       (visible | (m <= MASKED_AT_OR_BELOW)).all()))
    if visible.shape[2] > 1:
        checks.append(("a per-query mask", (visible == visible[:, :, :1]).all()))
    has_key = visible[:, :, 0, :].expand(batch, heads, seq_k).any(dim=-1)  # (B, heads)
    return checks, has_key


def _as_key_padding(m: Tensor, batch: int, heads: int, seq_k: int, per_head: bool) -> Tensor:
    """A checked 4-D mask as the kernels take it: (B, Sk), or per head (B, heads, Sk)."""
    visible = _visible(m)[:, :, 0, :]  # (B | 1, heads | 1, Sk): the same for every query (checked)
    if per_head:
        return visible.expand(batch, heads, seq_k).contiguous()
    return visible[:, 0].expand(batch, seq_k).contiguous()


def key_padding_mask(attn_mask: Optional[Tensor], batch: int, heads: int, seq_q: int, seq_k: int,
                     group=None) -> Tuple[Optional[Tensor], Optional[str]]:
    """``attn_mask`` as a bool key-padding mask (True = attend): (mask, None), or (None, why not).

    The mask is (B, Sk) when it is the same for every head, else per head (B, heads, Sk) (LTX's
    cross-attention mask, (B, heads, 1, Sk)); a mask that differs between queries is none. Costs one
    host sync when a mask is given (torch.compile checks on the device instead: ``_device_checked``).
    ``group``: under context parallelism the keys (and the mask) are sharded over this process group:
    the checks are combined over it (one all-reduce), so every rank takes the same path and the same
    mask shape.
    """
    if attn_mask is None:
        return None, None
    m = _mask_4d(attn_mask, batch, heads, seq_q, seq_k)
    checks, has_key = _mask_checks(m, batch, heads, seq_k)
    visible = _visible(m)
    same_heads = (visible == visible[:, :1]).all() if visible.shape[1] > 1 else visible.new_ones((), dtype=torch.bool)
    # each flag is 1 when its check passes (then one for "the same mask for every head"); "some visible
    # key" per (batch, head) is negated so that one MIN all-reduce gives every flag's AND and every
    # row's OR over the shards of the keys
    flags = torch.cat([torch.stack([ok for _, ok in checks] + [same_heads]).int(), -has_key.flatten().int()])
    if group is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    passed = flags.tolist()  # one host sync for every check
    for (reason, _), ok in zip(checks, passed[:len(checks)], strict=True):
        if not ok:
            return None, reason
    if not all(f == -1 for f in passed[len(checks) + 1:]):
        return None, _EVERY_KEY_MASKED
    return _as_key_padding(m, batch, heads, seq_k, per_head=not passed[len(checks)]), None


def _native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, parallel_config,
            reason):
    """diffusers' native attention; ``reason`` (why not ours) is warned once, None warns nothing."""
    if reason is not None:
        _warn_once(reason)
    if return_lse:
        raise ValueError(f"dit_fast attention backend: {reason}, and diffusers' native attention, the fallback, "
                         "has no return_lse")
    return _dispatch._native_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                       _parallel_config=parallel_config)


def _unaliased(tensors):
    """torch.cond takes no operands that share memory: one that views the base of an earlier one (q, k, v
    chunks of one fused projection, q passed again as k) is copied."""
    def base(t):
        return t if t._base is None else t._base

    out = []
    for t in tensors:
        if any(base(t) is base(o) for o in out):
            t = t.clone()
        out.append(t)
    return tuple(out)


def _device_checked(query, key, value, attn_mask, scale, enable_gqa, return_lse):
    """A masked call under torch.compile: the path decided without reading the mask on the host.

    A mask of a shape or dtype that no path takes was refused before. The mask's head dim (static) picks
    its layout (1: (B, Sk) to the kernels, heads: per head, (B, heads, Sk); the same result). The value
    checks of ``key_padding_mask`` (float entries 0 or <= -9000, the same for every query, a visible key
    in every row) become one 0-dim bool on the device, and ``torch.cond`` runs our kernel when it holds,
    else diffusers' native attention on the mask as given: the eager result either way, one branch run
    (one runtime sync, as eager's host read), no graph break. What is lost: the warning of a fallback
    that the values decide.
    """
    batch, seq_q, heads, _ = query.shape
    seq_k = key.shape[1]
    m = _mask_4d(attn_mask, batch, heads, seq_q, seq_k)
    if return_lse:
        raise ValueError("dit_fast attention backend: return_lse with a mask under torch.compile: the mask's values "
                         "choose between dit_fast's kernels and diffusers' native attention, which has no return_lse")
    checks, has_key = _mask_checks(m, batch, heads, seq_k)
    ok = torch.stack([passed for _, passed in checks] + [has_key.all()]).all()
    per_head = m.shape[1] > 1

    def ours(q, k, v, mask):
        kpm = _as_key_padding(_mask_4d(mask, batch, heads, seq_q, seq_k), batch, heads, seq_k, per_head)
        return attention(q, k, v, scale=scale, key_padding_mask=kpm)

    def theirs(q, k, v, mask):
        return _native(q, k, v, mask, 0.0, False, scale, enable_gqa, False, None, None)

    return torch.cond(ok, ours, theirs, _unaliased((query, key, value, attn_mask)))


# ---------------------------------------------------------------------------------------------
# The backend.
# ---------------------------------------------------------------------------------------------


def dit_fast_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                       dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                       enable_gqa: bool = False, return_lse: bool = False, _parallel_config=None):
    """diffusers' backend signature: q (B, Sq, heads, D), k / v (B, Sk, heads, D) -> out (B, Sq, heads, D).

    With ``return_lse`` also the log-sum-exp (B, Sq, heads) fp32. The dit_fast backend of the call is
    "auto" (so ``dit_fast.use_backend`` and $DIT_FAST_BACKEND choose it). Under torch.compile a mask is
    checked on the device (``_device_checked``): no graph break, the eager result.
    """
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        return _block_mask_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa, return_lse,
                                     _parallel_config)
    if attn_mask is not None and all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key)):
        _check_mask(attn_mask, query.dtype)  # what no path runs: an error, eagerly and compiled alike
        _mask_4d(attn_mask, query.shape[0], query.shape[2], query.shape[1], key.shape[1])
    reason = _unsupported(query, key, value, dropout_p, is_causal)
    if reason is None and attn_mask is not None and attn_mask.requires_grad:
        reason = "a float mask that requires grad (the kernels would give it no gradient)"
    parallel = _parallel_config is not None and _parallel_config.context_parallel_config is not None
    if reason is None and attn_mask is not None and not parallel and torch.compiler.is_compiling():
        return _device_checked(query, key, value, attn_mask, scale, enable_gqa, return_lse)
    kpm = None
    if reason is None:
        group = _parallel_config.context_parallel_config._flattened_mesh.get_group() if parallel else None
        kpm, reason = key_padding_mask(attn_mask, query.shape[0], query.shape[2], query.shape[1], key.shape[1],
                                       group)
    if reason is not None:
        return _native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                       _parallel_config, reason)
    if parallel:
        return _context_parallel(query, key, value, kpm, scale, return_lse, _parallel_config)
    result = attention(query, key, value, scale=scale, key_padding_mask=kpm, return_lse=return_lse)
    if return_lse:
        out, lse = result
        return out, lse.transpose(1, 2)  # (B, Sq, heads): diffusers' layout
    return result


def _block_mask_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa, return_lse, parallel_config):
    """A mask that is no tensor: FlexAttention's BlockMask (Kandinsky 5's NABLA sparse attention passes one)
    runs diffusers' flex backend, warned once; anything else is a TypeError naming it."""
    block_mask_type = getattr(getattr(torch.nn.attention, "flex_attention", None), "BlockMask", None)
    if block_mask_type is None or not isinstance(attn_mask, block_mask_type):
        raise TypeError(f"dit_fast attention backend: attn_mask must be a tensor or a FlexAttention BlockMask, got "
                        f"{type(attn_mask).__name__}")
    _warn_once("a FlexAttention BlockMask as attn_mask (a block-sparse pattern only FlexAttention computes)",
               "diffusers' flex attention")
    return _dispatch._native_flex_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                            enable_gqa=enable_gqa, return_lse=return_lse,
                                            _parallel_config=parallel_config)


# ---------------------------------------------------------------------------------------------
# Context parallelism: diffusers' Ulysses / ring templates call these ops (lse in (B, S, heads)).
# ---------------------------------------------------------------------------------------------


def _cp_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """One block: (out (B, Sq, heads, D), lse (B, Sq, heads) fp32); saves what the backward op needs."""
    from dit_fast.parallel.attention_parts import attention_block_forward

    kpm = None if attn_mask is None else attn_mask.bool()  # (B, Sk): Ulysses gathers it along Sk
    out, lse = attention_block_forward(query, key, value, key_padding_mask=kpm, scale=scale)
    lse = lse.transpose(1, 2).contiguous()  # (B, Sq, heads)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.dit_fast_mask = kpm
        ctx.dit_fast_scale = scale
    return (out, lse) if return_lse else out


def _cp_backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """(dq, dk, dv) of one block; ring attention passes the rotated k / v and the merged out / lse."""
    from dit_fast.parallel.attention_parts import attention_block_backward

    saved_q, saved_k, saved_v, saved_out, saved_lse = ctx.saved_tensors
    query = saved_q if query is None else query
    key = saved_k if key is None else key
    value = saved_v if value is None else value
    out = saved_out if out is None else out.to(saved_out.dtype)
    lse = saved_lse if lse is None else lse
    lse = lse.transpose(1, 2).float().contiguous()  # (B, heads, Sq)
    return attention_block_backward(query, key, value, out, lse, grad_out.to(query.dtype),
                                    key_padding_mask=ctx.dit_fast_mask, scale=ctx.dit_fast_scale)


def _context_parallel(query, key, value, kpm, scale, return_lse, parallel_config):
    """Sequence-sharded q, k, v (and key mask) over the context-parallel mesh -> this rank's out."""
    cp = parallel_config.context_parallel_config
    if key.shape[1] != query.shape[1] or (kpm is not None and (cp.ring_degree > 1 or kpm.dim() == 3)):
        # Cross-attention (short text keys; diffusers' Ulysses backward assumes Sk = Sq), masked ring
        # attention (diffusers' ring merge gives a NaN LSE after a fully masked block) and per-head masks
        # (Ulysses would hand each rank some of the heads but all of the mask): gather the keys.
        return _gathered_keys_attention(query, key, value, kpm, scale, return_lse, cp._flattened_mesh.get_group())
    mask = None if kpm is None else kpm.to(torch.uint8)  # gloo gathers no bool tensors
    result = _dispatch._templated_context_parallel_attention(
        query, key, value, mask, 0.0, False, scale, False, return_lse, forward_op=_cp_forward_op,
        backward_op=_cp_backward_op, _parallel_config=parallel_config)
    return result


class _GatherSequence(torch.autograd.Function):
    """All-gathers (B, S_local, ...) along S over ``group``; the backward sums the gradients of all ranks
    and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        ctx.local = x.shape[1]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local], None


def _gathered_keys_attention(query, key, value, kpm, scale, return_lse, group):
    """Every rank attends with its own queries to all keys, gathered once over ``group`` (keys are sharded
    over the flattened CP mesh in rank order, whatever the ring and Ulysses degrees)."""
    key = _GatherSequence.apply(key, group)  # (B, Sk, heads, D)
    value = _GatherSequence.apply(value, group)
    if kpm is not None:  # (B, Sk) or (B, heads, Sk), gathered along Sk (moved to dim 1 for the gather)
        kpm = _GatherSequence.apply(kpm.to(torch.uint8).movedim(-1, 1), group).movedim(1, -1).bool()
    result = attention(query, key, value, scale=scale, key_padding_mask=kpm, return_lse=return_lse)
    if return_lse:
        out, lse = result
        return out, lse.transpose(1, 2)
    return result


__all__ = ["BACKEND_NAME", "backend_member", "dit_fast_attention", "key_padding_mask", "register_backend"]
