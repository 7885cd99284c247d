"""Drift: every block forward and attention processor dit_fast rewrites, against diffusers' own, on the same inputs.

For each case (tests/diffusers_zoo.py) the model runs once as diffusers wrote it, with every module
that ``dit_fast.patch`` rewrites (a block whose ``forward`` it replaces, an attention module whose
processor it replaces) recording its inputs and output. The patched copy's module then runs on those
very inputs on dit_fast's torch path and must give diffusers' output to fp32 rounding (relative error
<= 1e-5, every output tensor: a dual-stream block's text stream included). A diffusers release that
changes a block's math, a processor's layout or a block's signature fails here, naming the module,
instead of the patched model drifting away from diffusers in silence.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
from dit_fast.integrations.diffusers._processor import DitFastProcessor  # noqa: E402
from tests import diffusers_zoo as zoo  # noqa: E402

# case -> module classes whose rewrite it must exercise (so that a case cannot pass by comparing nothing)
CASES = {
    "wan": {"WanTransformerBlock", "WanAttention"},
    "wan_per_token": {"WanTransformerBlock"},  # (B, S, 6, C) modulation
    "wan_i2v": {"WanTransformerBlock", "WanAttention"},  # image keys in the cross-attention
    "wan_vace": {"WanTransformerBlock", "WanVACETransformerBlock"},
    "wan_animate": {"WanTransformerBlock", "WanAttention"},
    "skyreels_v2": {"SkyReelsV2TransformerBlock", "SkyReelsV2Attention"},
    "skyreels_v2_df": {"SkyReelsV2TransformerBlock"},  # (B, 6, S, C) modulation, block-causal mask
    "chronoedit": {"WanTransformerBlock", "WanAttention"},
    "hunyuan_video": {"HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock", "Attention"},
    "hunyuan_video15": {"HunyuanVideo15TransformerBlock", "Attention"},
    "ltx": {"LTXVideoTransformerBlock", "LTXAttention"},
    "ltx2": {"LTX2Attention"},
    "ltx2_stg": {"LTX2Attention"},
    "cogvideox": {"CogVideoXBlock", "Attention"},
    "consisid": {"ConsisIDBlock", "Attention"},
    "mochi": {"MochiAttention"},
    "cosmos": {"CosmosTransformerBlock", "Attention"},
    "cosmos_per_frame": {"CosmosTransformerBlock"},
    "easyanimate": {"Attention"},
    "allegro": {"Attention"},
    "latte": {"Attention"},
}


def _rewritten(patched):
    """{name: module} of the modules the patch rewrote: a replaced forward or a dit_fast processor."""
    return {name: m for name, m in patched.named_modules()
            if "forward" in vars(m) or isinstance(getattr(m, "processor", None), DitFastProcessor)}


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _record(model, names):
    """Forward hooks on ``names``: calls[name] = [(args, kwargs, output), ...], cloned when recorded."""
    calls = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda module, args, kwargs, output, _name=name: calls[_name].append((_clone(args), _clone(kwargs),
                                                                              _clone(output))),
        with_kwargs=True) for name in names]
    return calls, handles


def _rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def _drift(case):
    """[(module name, class, output index, relative error)] of the rewritten modules that differ from diffusers'
    own on the inputs diffusers' forward gave them (relative error > 1e-5, or another number or shape of outputs)."""
    model, inputs = zoo.build(case)
    patched = copy.deepcopy(model)
    dit_fast.patch(patched)
    rewritten = _rewritten(patched)
    assert CASES[case] <= {type(m).__name__ for m in rewritten.values()}, sorted(
        {type(m).__name__ for m in rewritten.values()})

    calls, handles = _record(model, rewritten)
    drift = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")  # Mochi's RoPE asks CPU autocast for fp32
        model(**inputs(torch.float32, torch.Generator().manual_seed(1)), return_dict=False)
        for handle in handles:
            handle.remove()
        with dit_fast.use_backend("torch"):
            # the patched model's own forward records its token grid (its processors rotate with apply_rope_3d there)
            patched(**inputs(torch.float32, torch.Generator().manual_seed(1)), return_dict=False)
            for name, module in rewritten.items():
                assert calls[name], f"{name} ({type(module).__name__}) never ran in diffusers' forward"
                for args, kwargs, expected in calls[name]:
                    got = zoo.tensors(module(*_clone(args), **_clone(kwargs)))
                    want = zoo.tensors(expected)
                    if len(got) != len(want):
                        drift.append((name, type(module).__name__, "outputs", f"{len(got)} != {len(want)}"))
                    for i, (g, w) in enumerate(zip(got, want)):
                        err = _rel_err(g, w) if g.shape == w.shape else float("inf")
                        if err > 1e-5:
                            drift.append((name, type(module).__name__, i, err))
    return drift


@pytest.mark.parametrize("case", list(CASES))
def test_rewritten_modules_equal_diffusers_own(case):
    assert _drift(case) == []


def test_a_changed_diffusers_block_is_caught(monkeypatch):
    """A diffusers whose WanTransformerBlock computed something else (its output 0.1% larger): the drift names it."""
    from diffusers.models.transformers import transformer_wan

    forward = transformer_wan.WanTransformerBlock.forward
    monkeypatch.setattr(transformer_wan.WanTransformerBlock, "forward",
                        lambda self, *args, **kwargs: forward(self, *args, **kwargs) * 1.001)
    drift = _drift("wan")
    assert drift and {(name, cls) for name, cls, *_ in drift} == {("blocks.0", "WanTransformerBlock")}, drift
