"""GaLoreAdamW refuses bad input with a clear error: settings, parameters, gradients and loaded state.

Every refusal is a ValueError or TypeError naming the parameter (index, group, shape) or group and the
key; nothing changes in the optimizer when it refuses. Groups without ``rank`` step exactly as
torch.optim.AdamW.
"""

import copy
import warnings

import pytest
import torch

from dit_fast.optim import GaLoreAdamW


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter(torch.randn(23, 17, generator=g))  # std -> right
    w2 = torch.nn.Parameter(torch.randn(13, 29, generator=g))  # std -> left
    b = torch.nn.Parameter(torch.randn(23, generator=g))
    return [w1, w2, b]


def _loss(params, step):
    w1, w2, b = params
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(31, 17, generator=g)
    h = torch.tanh(x @ w1.t() + b)  # (31, 23)
    return (torch.tanh(h[:, :13] @ w2) ** 2).mean()


def _optimizer(params, state_dtype="fp32", **kw):
    groups = [dict(params=params[:2], rank=4, update_proj_gap=3, scale=0.5, proj_type="std"), dict(params=params[2:])]
    return GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01, state_dtype=state_dtype, refresh="randomized",
                       backend="torch", **kw)


def _trained(state_dtype="fp32", steps=4, **kw):
    params = _params()
    opt = _optimizer(params, state_dtype, **kw)
    for step in range(steps):
        opt.zero_grad()
        _loss(params, step).backward()
        opt.step()
    return params, opt


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _same(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key, value in a["state"][i].items():
            other = b["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (i, key)


# ------------------------------------------------------------------ load_state_dict


def _corrupt(edit):
    def apply(sd):
        edit(sd)
        return sd
    return apply


def _entry(i):
    return lambda sd: sd["state"][i]


BAD_STATES = [
    # (description, edit, error type, message pattern)
    ("not a dict", lambda sd: [1, 2], TypeError, "must be a dict"),
    ("no state", _corrupt(lambda sd: sd.pop("state")), ValueError, "no 'state'"),
    ("state not a dict", _corrupt(lambda sd: sd.update(state=[])), TypeError, r"state_dict\['state'\]"),
    ("groups not a list", _corrupt(lambda sd: sd.update(param_groups=3)), TypeError, "param_groups"),
    ("one group fewer", _corrupt(lambda sd: sd["param_groups"].pop()), ValueError, "1 parameter groups"),
    ("missing group key", _corrupt(lambda sd: sd["param_groups"][0].pop("update_proj_gap")), ValueError,
     r"param_groups'\]\[0\] is missing the keys \['update_proj_gap'\]"),
    ("bad group value", _corrupt(lambda sd: sd["param_groups"][1].update(lr="fast")), TypeError,
     r"param_groups'\]\[1\]: lr must be a real number"),
    ("eps zero in group", _corrupt(lambda sd: sd["param_groups"][1].update(eps=0.0)), ValueError, "eps must be > 0"),
    ("group size", _corrupt(lambda sd: sd["param_groups"][0]["params"].pop()), ValueError, "holds 1 parameters"),
    ("unknown id", _corrupt(lambda sd: sd["state"].update({7: {}})), ValueError, "no group lists"),
    ("entry not a dict", _corrupt(lambda sd: sd["state"].update({0: 3})), TypeError,
     r"parameter 0 \(group 0, shape \(23, 17\)\) must be a dict"),
    ("unexpected key", _corrupt(lambda sd: sd["state"][2].update(momentum=torch.zeros(1))), ValueError,
     r"parameter 2 \(group 1, shape \(23,\)\): unexpected keys \['momentum'\]"),
    ("step float", _corrupt(lambda sd: sd["state"][0].update(step=2.5)), TypeError, "step must be an int"),
    ("step negative", _corrupt(lambda sd: sd["state"][2].update(step=-1)), ValueError, "step must be >= 0"),
    ("side string", _corrupt(lambda sd: sd["state"][0].update(side="right")), TypeError, "side must be an int"),
    ("side out of range", _corrupt(lambda sd: sd["state"][0].update(side=5)), ValueError, r"side must be in \[0, 2\]"),
    ("side flipped", _corrupt(lambda sd: sd["state"][0].update(side=1)), ValueError,
     r"parameter 0 .*basis_left is missing"),
    ("no refreshes", _corrupt(lambda sd: sd["state"][1].pop("refreshes")), ValueError, "needs 'refreshes'"),
    ("zero refreshes", _corrupt(lambda sd: sd["state"][1].update(refreshes=0)), ValueError, "refreshes must be >= 1"),
    ("basis missing", _corrupt(lambda sd: sd["state"][1].pop("basis_left")), ValueError,
     r"parameter 1 \(group 0, shape \(13, 29\)\): basis_left is missing .*\(13, 4\)"),
    ("basis shape", _corrupt(lambda sd: sd["state"][0].update(basis_right=torch.zeros(4, 23))), ValueError,
     r"basis_right has shape \(4, 23\), expected \(4, 17\)"),
    ("basis dtype", _corrupt(lambda sd: sd["state"][0].update(basis_right=sd["state"][0]["basis_right"].double())),
     ValueError, "basis_right has dtype torch.float64, expected torch.float32"),
    ("basis not a tensor", _corrupt(lambda sd: sd["state"][0].update(basis_right=[[0.0]])), TypeError,
     "basis_right must be a tensor"),
    ("basis nan", _corrupt(lambda sd: sd["state"][0]["basis_right"].fill_(float("nan"))), ValueError,
     "basis_right holds NaN or inf"),
    ("moment shape", _corrupt(lambda sd: sd["state"][2].update(exp_avg=torch.zeros(22))), ValueError,
     r"parameter 2 .*exp_avg has shape \(22,\), expected \(23,\)"),
    ("moment dtype", _corrupt(lambda sd: sd["state"][1].update(exp_avg=sd["state"][1]["exp_avg"].bfloat16())),
     ValueError, "exp_avg has dtype torch.bfloat16, expected torch.float32"),
    ("moment inf", _corrupt(lambda sd: sd["state"][2]["exp_avg"].fill_(float("inf"))), ValueError,
     "exp_avg holds NaN or inf"),
    ("negative v", _corrupt(lambda sd: sd["state"][2]["exp_avg_sq"].fill_(-1.0)), ValueError, "negative values"),
    ("moments missing", _corrupt(lambda sd: sd["state"][2].pop("exp_avg_sq")), ValueError, "exp_avg_sq is missing"),
    ("no step", _corrupt(lambda sd: sd["state"][2].pop("step")), ValueError, "but no 'step'"),
    # the state of the (23, 17) weight offered to the (13, 29) one, and the reverse
    ("swapped states", _corrupt(lambda sd: sd["state"].update({0: sd["state"][1], 1: sd["state"][0]})), ValueError,
     r"parameter 0 \(group 0, shape \(23, 17\)\)"),
]


@pytest.mark.parametrize("name,edit,exc,pattern", BAD_STATES, ids=[c[0] for c in BAD_STATES])
def test_load_state_dict_refuses_bad_entries(name, edit, exc, pattern):
    _, opt = _trained()
    before = _snapshot(opt)
    with pytest.raises(exc, match=pattern):
        opt.load_state_dict(edit(copy.deepcopy(opt.state_dict())))
    _same(before, _snapshot(opt))  # a refused load changes nothing


INT8_BAD = [
    ("absmax missing", lambda sd: sd["state"][0].pop("exp_avg_absmax"), ValueError, "exp_avg_absmax is missing"),
    ("absmax length", lambda sd: sd["state"][1].update(exp_avg_sq_absmax=torch.zeros(5)), ValueError,
     r"exp_avg_sq_absmax has shape \(5,\), expected \(1,\)"),
    ("codes dtype", lambda sd: sd["state"][2].update(exp_avg=sd["state"][2]["exp_avg"].float()), ValueError,
     "exp_avg has dtype torch.float32, expected torch.int8"),
    ("absmax negative", lambda sd: sd["state"][2]["exp_avg_absmax"].fill_(-2.0), ValueError, "negative"),
]


@pytest.mark.parametrize("name,edit,exc,pattern", INT8_BAD, ids=[c[0] for c in INT8_BAD])
def test_load_state_dict_refuses_bad_int8_entries(name, edit, exc, pattern):
    _, opt = _trained("int8")
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    with pytest.raises(exc, match=pattern):
        opt.load_state_dict(sd)


def test_load_state_dict_refuses_another_state_dtype():
    _, opt8 = _trained("int8")
    _, opt32 = _trained("fp32")
    sd = opt8.state_dict()
    for group in sd["param_groups"]:
        group["state_dtype"] = "fp32"  # the groups say fp32, the moments are int8 codes
    with pytest.raises(ValueError, match="unexpected keys"):
        opt32.load_state_dict(sd)


def test_load_state_dict_accepts_its_own_and_older_state_dicts():
    params, opt = _trained("int8")
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["plain_step"]  # saved before plain_step existed: taken from the current group
    params2 = _params()
    opt2 = _optimizer(params2, "int8")
    opt2.load_state_dict(sd)
    for p, q in zip(params, params2):
        q.data.copy_(p.data)
    for step in range(4, 7):  # crosses the refresh at step 6
        for o, ps in ((opt, params), (opt2, params2)):
            o.zero_grad()
            _loss(ps, step).backward()
            o.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ settings and parameters


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=1e-300), ValueError, "eps must be > 0 and at least fp32's smallest normal"),
    (dict(eps=-1e-8), ValueError, "eps must be finite and >= 0"),
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(lr=float("inf")), ValueError, "lr must be finite"),
    (dict(lr=1e39), ValueError, "lr = 1e[+]?39 overflows fp32"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be finite and >= 0"),
    (dict(betas=(1.0, 0.9)), ValueError, r"betas\[0\] must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
    (dict(betas=(0.9,)), TypeError, "betas must be a pair"),
    (dict(betas=0.9), TypeError, "betas must be a pair"),
    (dict(correct_bias=1), TypeError, "correct_bias must be a bool"),
    (dict(plain_step="hf"), ValueError, "plain_step must be one of"),
    (dict(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
])
def test_constructor_validates_like_adamw(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(3, 4))], **kw)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_parameters_are_refused(dtype):
    w = torch.nn.Parameter(torch.randn(4, 5))
    bad = torch.zeros(4, 5, dtype=dtype)
    with pytest.raises(TypeError, match=r"param group 0: parameter 1 has dtype"):
        GaLoreAdamW([w, bad])
    opt = GaLoreAdamW([w])
    with pytest.raises(TypeError, match=r"param group 1: parameter 1 has dtype"):
        opt.add_param_group(dict(params=[bad]))
    assert len(opt.param_groups) == 1  # the refused group was not kept


# ------------------------------------------------------------------ non-finite gradients


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", [0, 2])  # a projected weight at a refresh step, a plain bias
def test_nonfinite_gradient_raises_before_any_update(value, which):
    params = _params()
    opt = _optimizer(params)
    before = [p.detach().clone() for p in params]
    _loss(params, 0).backward()
    params[which].grad[0, ...].fill_(value)
    with pytest.raises(ValueError, match=rf"parameter {which} \(group {which // 2}, .*holds NaN or inf"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0


def test_nonfinite_gradient_skip_option():
    params = _params()
    opt = _optimizer(params, nonfinite="skip")
    _loss(params, 0).backward()
    opt.step()
    state = _snapshot(opt)
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    _loss(params, 1).backward()
    params[1].grad[3, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    _same(state, _snapshot(opt))
    opt.zero_grad()
    _loss(params, 1).backward()
    opt.step()  # a finite gradient steps again
    assert opt.state[params[0]]["step"] == 2


def test_nonfinite_gradient_per_layer():
    params = _params()
    opt = _optimizer(params, per_layer=True)
    loss = _loss(params, 0) * float("nan")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        loss.backward()


# ------------------------------------------------------------------ groups without rank = torch.optim.AdamW


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plain_groups_step_as_torch_adamw(backend):
    g = torch.Generator().manual_seed(5)
    init = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g), torch.randn(3, 4, 2, generator=g)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = GaLoreAdamW([dict(params=ours[:2]), dict(params=ours[2:], rank=2)], backend=backend, **kw)  # 3-D: plain
    ref = torch.optim.AdamW([dict(params=theirs[:2]), dict(params=theirs[2:])], **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for step in range(6):
        for o, ps in ((opt, ours), (ref, theirs)):
            o.zero_grad()
            # gradients from 1 down to 1e-7: where eps matters, galore-torch's bias correction differs
            sum(((p * torch.linspace(-1, 1, p.numel()).view(p.shape) * 10.0 ** -step).sin()).sum()
                for p in ps).backward()
            o.step()
        for s in scheds:
            s.step()
        for a, b in zip(ours, theirs):
            if backend == "torch":
                assert torch.equal(a, b), step  # the same ops in the same order
            else:  # the kernel's eps' = eps * sqrt(1 - b2^t) form of the same update
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (ours[0] - init[0]).abs().max() > 0.05  # the weights moved


def test_plain_step_galore_is_hf_adamw_and_differs():
    init = torch.linspace(-1, 1, 12)
    out = {}
    for mode in ("adamw", "galore"):
        w = torch.nn.Parameter(init.clone())
        opt = GaLoreAdamW([w], lr=0.1, betas=(0.9, 0.999), eps=1e-6, plain_step=mode)
        w.grad = torch.full_like(w, 1e-6)  # |g| ~ eps: the two bias corrections differ most
        opt.step()
        out[mode] = w.detach()
    # step 1, AdamW: lr * m_hat / (sqrt(v_hat) + eps) = lr * g / (g + eps) = lr / 2;
    # HF: lr * sqrt(1 - b2) g / (sqrt(1 - b2) g + eps) = lr * 0.0307: 16x smaller
    s = 0.001 ** 0.5 * 1e-6
    torch.testing.assert_close(init - out["adamw"], torch.full_like(init, 0.05), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(init - out["galore"], torch.full_like(init, 0.1 * s / (s + 1e-6)), rtol=1e-4,
                               atol=1e-7)


def test_no_warning_on_clean_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trained(steps=4)
