"""The "dit_fast" attention backend as a function (diffusers' backend signature): key padding masks on the
kernels, return_lse in diffusers' layout, the native fallbacks (one warning per reason), per-head masks under
context parallelism (two ranks as threads), a FlexAttention BlockMask. Models on the backend and dit_fast.patch:
tests/test_diffusers.py; under torch.compile: tests/test_diffusers_compile.py; hypothesis over masks:
tests/test_diffusers_properties.py.
"""

import threading
import types
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
import dit_fast.integrations.diffusers as dd  # noqa: E402
from dit_fast.integrations.diffusers import backend as dd_backend  # noqa: E402
from tests.launches import count_launches  # noqa: E402
from tests.test_diffusers import KERNEL_DEVICE, Calls, assert_launched, rel_err  # noqa: E402

from diffusers.models import attention_dispatch  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The backend function: masks, return_lse, fallbacks
# ---------------------------------------------------------------------------------------------


def _qkv(heads=3, sq=37, sk=19, d=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, sq, heads, d, generator=g).to(dtype), torch.randn(2, sk, heads, d, generator=g).to(dtype),
            torch.randn(2, sk, heads, d, generator=g).to(dtype))


def _sdpa(q, k, v, mask=None, **kw):
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                                           **kw)
    return out.transpose(1, 2)


def _padding(sk=19):
    keep = torch.ones(2, sk, dtype=torch.bool)
    keep[1, 11:] = False
    return keep


MASKS = {
    "bool (B, 1, 1, Sk)": lambda: _padding()[:, None, None, :],
    "bool (B, Sk)": lambda: _padding(),
    "LTX additive (B, heads, 1, Sk)": lambda: ((1 - _padding().float()) * -10000.0)[:, None, None].repeat(1, 3, 1, 1),
    "bf16-rounded -9984": lambda: ((1 - _padding().float()) * -9984.0)[:, None, None, :],
    "bool broadcast over batch (1, 1, Sq, Sk)": lambda: _padding()[1][None, None, None, :].expand(1, 1, 37, 19),
    # per head: (B, heads, Sk) to the kernels
    "bool per head (B, heads, 1, Sk)": lambda: _per_head()[:, :, None, :],
    "additive per head (B, heads, 1, Sk)": lambda: ((1 - _per_head().float()) * -10000.0)[:, :, None, :],
    "bool per head, constant over queries (B, heads, Sq, Sk)": lambda: _per_head()[:, :, None, :].expand(2, 3, 37, 19),
}
PER_HEAD_MASKS = [name for name in MASKS if "per head" in name]


def _per_head(sk=19):
    """(2, 3, Sk) bool: a different key padding in each head, every head with a visible key."""
    keep = torch.rand(2, 3, sk, generator=torch.Generator().manual_seed(4)) > 0.4
    keep[..., 0] = True
    keep[1, 2] = ~keep[1, 0]
    keep[1, 2, -1] = True
    return keep


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backend_key_padding_masks_run_on_dit_fast(mask, backend, monkeypatch):
    q, k, v = (t.to(KERNEL_DEVICE if backend == "triton" else "cpu") for t in _qkv())
    m = MASKS[mask]().to(q.device)
    calls = Calls(monkeypatch)
    given = []  # the key padding masks our kernels got
    counted = dd_backend.attention
    monkeypatch.setattr(dd_backend, "attention",
                        lambda *a, **kw: given.append(kw["key_padding_mask"]) or counted(*a, **kw))
    with dit_fast.use_backend(backend), count_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = dd.dit_fast_attention(q, k, v, attn_mask=m)
    assert calls.counts == {"attention": 1}
    assert_launched(launches, "_attn_fwd_kernel", 1 if backend == "triton" else 0)
    assert given[0].shape == ((2, 3, 19) if mask in PER_HEAD_MASKS else (2, 19))  # per head only when it must be
    native_mask = m[:, None, None, :] if m.dim() == 2 else m
    assert rel_err(out, _sdpa(q, k, v, native_mask)) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backend_return_lse_in_diffusers_layout(backend):
    q, k, v = (t.to(KERNEL_DEVICE if backend == "triton" else "cpu") for t in _qkv(sq=21, sk=40))
    mask = _padding(40)[:, None, None, :].to(q.device)
    with dit_fast.use_backend(backend), count_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, lse = dd.dit_fast_attention(q, k, v, attn_mask=mask, scale=0.3, return_lse=True)
    assert_launched(launches, "_attn_fwd_kernel", 1 if backend == "triton" else 0)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.3
    expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1).transpose(1, 2)  # (B, Sq, heads)
    assert lse.dtype == torch.float32 and lse.shape == (2, 21, 3)
    assert rel_err(lse, expected) <= 1e-5
    assert rel_err(out, _sdpa(q, k, v, mask, scale=0.3)) <= 1e-5


def _no_key_in_one_head(q, k, v):
    keep = _per_head(k.shape[1])
    keep[0, 1] = False  # sample 0, head 1: every key masked
    return dict(attn_mask=keep[:, :, None, :])


FALLBACKS = {  # case -> (reason in the warning, call)
    "dropout_p": ("dropout_p", lambda q, k, v: dict(dropout_p=0.5)),
    "is_causal": ("is_causal", lambda q, k, v: dict(is_causal=True)),
    "additive biases": ("additive biases", lambda q, k, v: dict(attn_mask=torch.randn(2, 1, q.shape[1], k.shape[1]))),
    "per-query mask": ("per-query mask",
                       lambda q, k, v: dict(attn_mask=torch.rand(2, 1, q.shape[1], k.shape[1]) > 0.3)),
    "per-head per-query mask": ("per-query mask",
                                lambda q, k, v: dict(attn_mask=torch.rand(2, 3, q.shape[1], k.shape[1]) > 0.3)),
    "every key masked": ("every key masked",
                         lambda q, k, v: dict(attn_mask=torch.zeros(2, 1, 1, k.shape[1], dtype=torch.bool))),
    "every key masked in one head": ("every key masked", _no_key_in_one_head),
    "a padding mask that requires grad": ("requires grad", lambda q, k, v: dict(
        attn_mask=((1 - _padding(k.shape[1]).float()) * -10000.0)[:, None, None, :].requires_grad_())),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_backend_falls_back_with_one_warning(case, monkeypatch):
    q, k, v = _qkv()
    reason, make = FALLBACKS[case]
    kwargs = make(q, k, v)
    calls = Calls(monkeypatch)
    monkeypatch.setattr(dd_backend, "_warned", set())
    for attempt in range(2):
        torch.manual_seed(7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = dd.dit_fast_attention(q, k, v, **kwargs)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if attempt == 0:
            assert len(messages) == 1 and reason in messages[0], messages
        else:
            assert messages == []  # once per reason
    assert calls.counts == {}  # never our kernels
    torch.manual_seed(7)
    expected = _sdpa(q, k, v, kwargs.get("attn_mask"), dropout_p=kwargs.get("dropout_p", 0.0),
                     is_causal=kwargs.get("is_causal", False))
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)


class _ThreadRanks:
    """The torch.distributed calls the backend makes, for `world` threads of this process, one rank each:
    collectives exchange tensors through a shared table between barriers (with a timeout: no hang)."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, world):
        self.world, self.local = world, threading.local()
        self.barrier, self.table = threading.Barrier(world, timeout=60), {}

    def get_rank(self, group=None):
        return self.local.rank

    def get_world_size(self, group=None):
        return self.world

    def _exchange(self, x):
        self.barrier.wait()
        self.table[self.local.rank] = x.detach().clone()
        self.barrier.wait()
        every = [self.table[r] for r in range(self.world)]
        self.barrier.wait()
        return every

    def all_gather(self, parts, x, group=None):
        for part, got in zip(parts, self._exchange(x)):
            part.copy_(got)

    def all_reduce(self, x, op=torch.distributed.ReduceOp.SUM, group=None):
        every = torch.stack(self._exchange(x))
        x.copy_(every.amin(0) if op == torch.distributed.ReduceOp.MIN else every.sum(0))


def test_per_head_mask_under_context_parallelism(monkeypatch):
    """Under context parallelism (2 ranks, threads here) a per-head mask gathers the keys: each rank attends
    with its own queries to every key, on the kernels' path, forward and backward equal to one process.
    Rank 0's shard of the mask is the same in every head, rank 1's is not: the ranks agree (one
    all-reduce) on the per-head mask. Self-attention (as many keys as queries on each rank): the per-head
    mask alone is what sends the call to the gathered keys (diffusers' Ulysses template would hand each
    rank some of the heads but all of the mask; here, with no real mesh, it fails)."""
    world, sq, sk = 2, 10, 20
    (q, k, v), mask = _qkv(sq=world * sq, sk=sk), _per_head(sk)
    mask[:, 1:, :sk // 2] = mask[:, :1, :sk // 2]
    assert not torch.equal(mask[:, 1], mask[:, 0])
    weights = torch.randn(2, world * sq, 3, 24)
    fake = _ThreadRanks(world)
    monkeypatch.setattr(dd_backend, "dist", fake)
    calls = Calls(monkeypatch)
    gathered = []
    monkeypatch.setattr(dd_backend, "_gathered_keys_attention",
                        lambda *a, _fn=dd_backend._gathered_keys_attention: gathered.append(a[3].shape) or _fn(*a))
    cp = types.SimpleNamespace(ring_degree=1, ulysses_degree=world,
                               _flattened_mesh=types.SimpleNamespace(get_group=lambda: "cp group"))
    config = types.SimpleNamespace(context_parallel_config=cp)
    results, errors = {}, []

    def rank(r):
        try:
            fake.local.rank = r
            shard = [t[:, r * n:(r + 1) * n].clone().requires_grad_(True) for t, n in ((q, sq), (k, sk // 2),
                                                                                        (v, sk // 2))]
            local_mask = mask[:, :, None, r * (sk // 2):(r + 1) * (sk // 2)]  # (B, heads, 1, Sk / 2)
            with dit_fast.use_backend("torch"), warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                out = dd.dit_fast_attention(*shard, attn_mask=local_mask, _parallel_config=config)
            (out * weights[:, r * sq:(r + 1) * sq]).sum().backward()
            results[r] = (out.detach(), *(t.grad for t in shard))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)
            fake.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert calls.counts == {"attention": world} and gathered == [(2, 3, sk // 2)] * world
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = _sdpa(*leaves, mask[:, :, None, :])
    (want * weights).sum().backward()
    got = [torch.cat([results[r][i] for r in range(world)], 1) for i in range(4)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (want, *(t.grad for t in leaves))):
        assert rel_err(g, w) <= 1e-5, name


def test_backend_falls_back_for_gqa_head_dim_and_float64(monkeypatch):
    calls = Calls(monkeypatch)
    monkeypatch.setattr(dd_backend, "_warned", set())
    q, _, _ = _qkv(heads=4)
    _, k, v = _qkv(heads=2)
    with pytest.warns(RuntimeWarning, match="grouped-query"):
        out = dd.dit_fast_attention(q, k, v, enable_gqa=True)
    assert rel_err(out, _sdpa(q, k, v, enable_gqa=True)) <= 1e-6
    q, k, v = _qkv(d=264)
    with pytest.warns(RuntimeWarning, match="head dim 264"):
        out = dd.dit_fast_attention(q, k, v)
    assert rel_err(out, _sdpa(q, k, v)) <= 1e-6
    with pytest.warns(RuntimeWarning, match="head dim 272"):  # each head dim is its own reason (issue 17)
        dd.dit_fast_attention(*_qkv(d=272))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the same reason: warned already
        dd.dit_fast_attention(*_qkv(d=264, seed=1))
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64, torch.float64, torch.float64"):
        dd.dit_fast_attention(q, k, v)
    with pytest.raises(ValueError, match="return_lse"):
        dd.dit_fast_attention(q, k, v, return_lse=True)
    assert calls.counts == {}


def test_backend_runs_a_flex_block_mask_on_diffusers_flex_attention():
    """Kandinsky 5's NABLA sparse attention hands the backend a FlexAttention BlockMask: it runs diffusers'
    flex backend, warned once, with flex's own result; a mask that is neither a tensor nor a BlockMask is a
    TypeError naming its type."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    block_mask = create_block_mask(lambda b, h, qi, ki: (qi // 8) >= (ki // 8), None, None, 40, 40, device="cpu")
    dd_backend._warned.discard("a FlexAttention BlockMask as attn_mask (a block-sparse pattern only FlexAttention "
                               "computes)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dd_backend.dit_fast_attention(q, k, v, attn_mask=block_mask)
        dd_backend.dit_fast_attention(q, k, v, attn_mask=block_mask)
    ours = [w for w in caught if "BlockMask" in str(w.message)]
    assert len(ours) == 1 and "flex attention" in str(ours[0].message)
    expected = attention_dispatch._native_flex_attention(q, k, v, attn_mask=block_mask)
    assert torch.equal(out, expected)
    with pytest.raises(TypeError, match="attn_mask must be a tensor or a FlexAttention BlockMask, got list"):
        dd_backend.dit_fast_attention(q, k, v, attn_mask=[1, 2])
