"""GaLoreAdamW on CPU (backend="torch"): settings, state dtypes, refresh, resume, per-layer mode, groups."""

import copy
import io

import pytest
import torch

from dit_fast.optim import GaLoreAdamW, galore_param_groups
from dit_fast.optim import reference as ref


class TinyNet(torch.nn.Module):
    """Attention- and MLP-named linears (projected) plus a norm, an embedding and a conv (plain)."""

    def __init__(self, dim=37, hidden=53, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(11, dim)
        self.conv = torch.nn.Conv1d(dim, dim, 3, padding=1)
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn.proj = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim))
        self.head = torch.nn.Linear(dim, 5)
        self.to(dtype)

    def forward(self, tokens):
        x = self.embed(tokens)  # (B, T, D)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.attn.proj(a)
        x = x + self.mlp(self.norm(x))
        return self.head(x).float()


def _batch(seed, batch=4, tokens=9):
    g = torch.Generator().manual_seed(seed % 3)  # three batches, cycled: a task the net can fit
    return torch.randint(0, 11, (batch, tokens), generator=g), torch.randint(0, 5, (batch, tokens), generator=g)


def _loss(model, seed):
    x, y = _batch(seed)
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1))


def _train(model, opt, steps, start=0, sched=None):
    losses = []
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = _loss(model, i)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _make(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = TinyNet(dtype=dtype)
    opt_kw = {k: kw.pop(k) for k in list(kw) if k in ("lr", "weight_decay", "per_layer", "accumulation_steps", "seed")}
    groups = galore_param_groups(model, rank=kw.pop("rank", 8), update_proj_gap=kw.pop("gap", 5), **kw)
    opt_kw.setdefault("lr", 1e-2)
    return model, GaLoreAdamW(groups, backend="torch", **opt_kw)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("key,value,exc", [
    ("rank", 0, ValueError), ("rank", -3, ValueError), ("rank", 2.5, TypeError),
    ("update_proj_gap", 0, ValueError), ("update_proj_gap", -1, ValueError),
    ("proj_type", "diagonal", ValueError), ("state_dtype", "int4", ValueError), ("refresh", "qr", ValueError),
    ("weight_decay_mode", "l2", ValueError), ("lr", -1.0, ValueError), ("betas", (0.9, 1.0), ValueError),
    ("eps", "small", TypeError), ("kernel", "magic", ValueError),
])
def test_bad_settings_raise_naming_the_key(key, value, exc):
    w = torch.nn.Parameter(torch.randn(8, 8))
    group = dict(params=[w], rank=4, update_proj_gap=10, scale=1.0, proj_type="std")
    group[key] = value
    with pytest.raises(exc, match=key):
        GaLoreAdamW([group])


def test_bad_constructor_arguments():
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="accumulation_steps"):
        GaLoreAdamW([w], accumulation_steps=0)
    with pytest.raises(ValueError, match="backend"):
        GaLoreAdamW([w], backend="jax")
    with pytest.raises(ValueError, match="rank"):
        galore_param_groups(TinyNet(), rank=0)


def test_param_groups_split():
    model = TinyNet()
    projected, plain = galore_param_groups(model, rank=8)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in projected["params"]) == [
        "attn.proj.weight", "attn.qkv.weight", "mlp.0.weight", "mlp.2.weight"]
    assert projected["rank"] == 8
    assert "rank" not in plain
    assert len(projected["params"]) + len(plain["params"]) == len(list(model.parameters()))
    # the head (5 x 37) is too small for rank 8 even with target="linear"
    projected, _ = galore_param_groups(model, rank=8, target="linear")
    assert "head.weight" not in {names[id(p)] for p in projected["params"]}
    projected, _ = galore_param_groups(model, rank=8, target=lambda name, m: name == "mlp.0")
    assert [names[id(p)] for p in projected["params"]] == ["mlp.0.weight"]


# ------------------------------------------------------------------ math pieces


def test_quantize_roundtrip_error_is_bounded():
    x = torch.randn(1000) * torch.logspace(-4, 0, 1000)
    codes, absmax = ref.quantize_blockwise(x, signed=True)
    assert codes.dtype == torch.int8 and absmax.shape == (4,)
    back = ref.dequantize_blockwise(codes, absmax, signed=True)
    # companded: error <= half a code step of sqrt(|x| / absmax), i.e. ~ sqrt(|x| * absmax) / 127
    blocks = absmax.repeat_interleave(ref.QBLOCK)[:1000]
    bound = (x.abs() * blocks).sqrt() / 127 + blocks / 127 ** 2
    assert ((back - x).abs() <= bound).all()
    v = x.square()
    codes, absmax = ref.quantize_blockwise(v, signed=False)
    assert codes.dtype == torch.uint8
    back = ref.dequantize_blockwise(codes, absmax, signed=False)
    assert (back >= 0).all()
    rel = ((back.sqrt() - v.sqrt()).abs() / absmax.repeat_interleave(ref.QBLOCK)[:1000].sqrt())
    assert rel.max() < 4 / 255  # sqrt(v) keeps ~ 1 / 255 of its block's range per code step


def test_randomized_refresh_captures_the_svd_energy():
    g = torch.Generator().manual_seed(3)
    # a gradient with a decaying spectrum, as real gradients have
    u = torch.linalg.qr(torch.randn(120, 60, generator=g)).Q
    v = torch.linalg.qr(torch.randn(90, 60, generator=g)).Q
    grad = u @ torch.diag(torch.logspace(0, -3, 60)) @ v.t()
    for side in ("right", "left", "full"):
        exact = ref.captured_energy(grad, side, ref.svd_basis(grad, 12, side, torch.float32))
        fast = ref.captured_energy(grad, side, ref.randomized_basis(grad, 12, side, torch.float32, generator=g))
        assert fast >= exact * 0.99, (side, fast, exact)
        # warm start from the exact basis of a slightly different gradient
        prev = ref.svd_basis(grad + 1e-3 * torch.randn(grad.shape, generator=g), 12, side, torch.float32)
        warm = ref.captured_energy(grad, side, ref.randomized_basis(grad, 12, side, torch.float32, previous=prev,
                                                                     iters=1, generator=g))
        assert warm >= exact * 0.99, (side, warm, exact)


def test_rotation_carries_first_moment_exactly():
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(30, 20, generator=g)
    old = ref.svd_basis(grad, 6, "right", torch.float32)
    # a new basis spanning the same subspace, rotated inside it: m must map exactly
    q = torch.linalg.qr(torch.randn(6, 6, generator=g)).Q
    new = (q @ old[0],)
    m = ref.project(grad, "right", old)
    m_new, v_new = ref.rotate_moments(m, m * m, "right", ref.rotation(old, new, "right"))
    torch.testing.assert_close(m_new, ref.project(grad, "right", new), atol=1e-5, rtol=1e-5)
    assert (v_new >= 0).all()


# ------------------------------------------------------------------ training behaviour


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_loss_decreases_every_setting(state_dtype, proj_type):
    model, opt = _make(state_dtype=state_dtype, proj_type=proj_type, weight_decay=0.01)
    losses = _train(model, opt, 12)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]) * 0.9, losses


def test_int8_state_is_small_and_tracks_fp32():
    model32, opt32 = _make(state_dtype="fp32")
    model8, opt8 = _make(state_dtype="int8")
    l32 = _train(model32, opt32, 12)
    l8 = _train(model8, opt8, 12)
    assert abs(l8[-1] - l32[-1]) < 0.05 * l32[0], (l8, l32)
    assert opt8.state_bytes() < 0.45 * opt32.state_bytes()
    for state in opt8.state.values():
        assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8


@pytest.mark.parametrize("refresh", ["svd", "randomized"])
@pytest.mark.parametrize("rotate", [False, True])
def test_refresh_methods_train(refresh, rotate):
    model, opt = _make(refresh=refresh, rotate_moments=rotate)
    losses = _train(model, opt, 12)  # gap 5: refreshes at steps 0, 5, 10
    assert sum(losses[-3:]) < sum(losses[:3]) * 0.9, losses
    assert max(s.get("refreshes", 0) for s in opt.state.values()) == 3


def test_bf16_parameters_and_non_2d_parameters():
    model, opt = _make(dtype=torch.bfloat16, state_dtype="fp32")
    losses = _train(model, opt, 10)
    assert sum(losses[-3:]) < sum(losses[:3]) * 0.9
    # moments stay fp32 for bf16 weights; bases are in the weight's dtype
    st = opt.state[model.attn.qkv.weight]
    assert st["exp_avg"].dtype == torch.float32 and st["basis_right"].dtype == torch.bfloat16
    # a rank group holding non-2D parameters (conv weight, biases) steps them as plain AdamW
    w = torch.nn.Parameter(torch.randn(6, 5, 3))
    b = torch.nn.Parameter(torch.randn(6))
    opt = GaLoreAdamW([dict(params=[w, b], rank=2, update_proj_gap=3, scale=1.0, proj_type="std")], lr=0.1)
    plain = torch.optim.AdamW([w2 := torch.nn.Parameter(w.detach().clone()), b2 := torch.nn.Parameter(b.detach().clone())],
                              lr=0.1, eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        for o, ps in ((opt, (w, b)), (plain, (w2, b2))):
            o.zero_grad()
            (ps[0].sin().sum() + ps[1].square().sum()).backward()
            o.step()
    # same update as torch's AdamW up to where eps enters (HF/galore: sqrt(v) + eps before bias correction)
    torch.testing.assert_close(w, w2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, b2, atol=1e-5, rtol=1e-5)


def test_weight_decay_modes():
    w0 = torch.randn(12, 10)
    out = {}
    for mode in ("adamw", "galore"):
        w = torch.nn.Parameter(w0.clone())
        opt = GaLoreAdamW([dict(params=[w], rank=3, update_proj_gap=5, scale=1.0, proj_type="std")], lr=0.1,
                          weight_decay=0.5, weight_decay_mode=mode)
        w.grad = torch.zeros_like(w)
        opt.step()  # zero gradient: only the decay acts
        out[mode] = w.detach().clone()
    torch.testing.assert_close(out["adamw"], w0 * 0.95)
    torch.testing.assert_close(out["galore"], w0 * 0.95)
    w = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.ones_like(w)
    opt.step()
    # adamw: decay the old weight, then the update (m / (sqrt(v) + eps) = 1 at step 1)
    torch.testing.assert_close(w.detach(), w0 * 0.95 - 0.1, atol=1e-6, rtol=1e-6)


def test_closure_is_called_and_returned():
    model, opt = _make()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    before = model.attn.qkv.weight.detach().clone()
    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)
    assert not torch.equal(before, model.attn.qkv.weight)


def test_rank_at_least_the_small_dimension():
    for proj_type in ("std", "reverse_std", "left", "right", "full"):
        w = torch.nn.Parameter(torch.randn(7, 11))
        opt = GaLoreAdamW([dict(params=[w], rank=64, update_proj_gap=2, scale=1.0, proj_type=proj_type)], lr=0.05)
        for _ in range(4):
            opt.zero_grad()
            (w.sin() * torch.arange(77.0).view(7, 11)).sum().backward()
            opt.step()
        assert torch.isfinite(w).all()


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("state_dtype,refresh", [("fp32", "svd"), ("int8", "randomized"), ("bf16", "svd")])
def test_resume_is_bitwise(state_dtype, refresh):
    model, opt = _make(state_dtype=state_dtype, refresh=refresh, rotate_moments=True, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    _train(model, opt, 7, sched=sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    rest = _train(model, opt, 8, start=7, sched=sched)  # crosses refreshes at steps 10 and 15

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = _make(state_dtype=state_dtype, refresh=refresh, rotate_moments=True, weight_decay=0.01)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=4, gamma=0.5)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    st = opt2.state[model2.attn.qkv.weight]
    assert st["exp_avg"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[state_dtype]
    rest2 = _train(model2, opt2, 8, start=7, sched=sched2)
    assert rest == rest2
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ per-layer mode


def _train_per_layer(model, opt, steps, micro=1, sched=None):
    for i in range(steps):
        for j in range(micro):
            (_loss(model, i * micro + j) / micro).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def _train_accumulated(model, opt, steps, micro, sched=None):
    for i in range(steps):
        opt.zero_grad()
        for j in range(micro):
            (_loss(model, i * micro + j) / micro).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("micro", [1, 3])
def test_per_layer_equals_plain_with_accumulation_and_scheduler(micro):
    model_a, opt_a = _make(state_dtype="int8", weight_decay=0.01)
    model_b, opt_b = _make(state_dtype="int8", weight_decay=0.01, per_layer=True, accumulation_steps=micro)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    _train_accumulated(model_a, opt_a, 7, micro, sched_a)
    _train_per_layer(model_b, opt_b, 7, micro, sched_b)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
        assert b.grad is None  # per-layer mode frees each gradient once used
    assert opt_b.state[model_b.mlp[0].weight]["step"] == 7


def test_per_layer_never_holds_every_gradient():
    model, opt = _make(per_layer=True)
    alive = []
    params = list(model.parameters())
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: alive.append(sum(q.grad is not None for q in params)))
    _loss(model, 0).backward()
    assert max(alive) < len(params)


def test_state_dict_is_plain():
    model, opt = _make(state_dtype="int8", refresh="randomized")
    _train(model, opt, 2)
    sd = opt.state_dict()

    def check(x):
        if isinstance(x, dict):
            for k, v in x.items():
                check(k)
                check(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                check(v)
        else:
            assert x is None or isinstance(x, (torch.Tensor, int, float, str, bool)), type(x)

    check(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["state"].keys() == sd["state"].keys()
    copy.deepcopy(sd)


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_state_bytes_formula_is_exact(state_dtype, proj_type):
    from dit_fast.optim import state_bytes_for

    model, opt = _make(state_dtype=state_dtype, proj_type=proj_type, rank=9)
    _train(model, opt, 1)
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            expected += state_bytes_for(p.shape, p.dtype, group.get("rank"), group["proj_type"], state_dtype)
    assert opt.state_bytes() == expected
