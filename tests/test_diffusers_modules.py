"""Patched models stay ordinary modules: copy.deepcopy, pickle and torch.save / torch.load work after
dit_fast.patch, the copy is still patched (its own hooks, processors and forwards, bound to its own
modules) and gives the unpatched model's output; fused QKV projections keep dit_fast's attention.

Tiny diffusers models from tests/test_diffusers.py (and facebookresearch/DiT's, tests/reference_dit.py),
on dit_fast's torch path: outputs equal diffusers' own to fp32 rounding (relative error <= 1e-5).
"""

import copy
import io
import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
from dit_fast.integrations.diffusers import _processor as P  # noqa: E402
from dit_fast.models import patching  # noqa: E402
from dit_fast.models.patching import PatchedMethod, patch_method  # noqa: E402
from tests import diffusers_zoo as zoo  # noqa: E402
from tests import reference_dit as R  # noqa: E402
from tests.test_diffusers import EXPECTED_OPS, Calls, build, patched_copy, rel_err, run  # noqa: E402
from tests.test_diffusers_models import PATCHED  # noqa: E402
from tests.test_diffusers_models import _run as run_zoo  # noqa: E402
from tests.utils import REPO_ROOT  # noqa: E402

FAMILIES = ("wan", "hunyuan_video", "ltx", "cogvideox", "mochi")


def _save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": _save_load}


def _layers(name):
    return 2 if name == "hunyuan_video" else 1  # HunyuanVideo: one dual-stream and one single-stream block


def assert_patched_like(other, original):
    """``other`` carries every patch of ``original``, bound to its own modules, none shared with it."""
    assert other._dit_fast_patched == original._dit_fast_patched
    patched = 0
    for (name, mine), (_, theirs) in zip(other.named_modules(), original.named_modules()):
        for attr, value in vars(theirs).items():
            if isinstance(value, PatchedMethod):
                got = vars(mine).get(attr)
                assert isinstance(got, PatchedMethod) and got.module is mine, f"{name}.{attr}: {got!r}"
                assert got.function is value.function, name
                patched += 1
        processor = getattr(theirs, "processor", None)
        if isinstance(processor, P.DitFastProcessor):
            assert type(mine.processor) is type(processor) and mine.processor is not processor, name
            patched += 1
    assert patched > 0
    hooks = [h for h in other._forward_pre_hooks.values() if isinstance(h, P.GridRecorder)]
    grids = {id(m.processor.grid) for m in other.modules()
             if isinstance(getattr(m, "processor", None), P.DitFastProcessor) and m.processor.grid is not None}
    if hooks or grids:  # the copy's grid hook feeds the copy's processors
        assert len(hooks) == 1 and grids == {id(hooks[0].state)}


def assert_same_state(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("name", FAMILIES)
def test_patched_diffusers_model_copies_stay_patched(name, monkeypatch):
    """Each copy (deepcopy, pickle, torch.save / torch.load): patched, same state dict as the unpatched model,
    its output equal to diffusers' own, through dit_fast's ops."""
    model, inputs = build(name, layers=_layers(name))
    patched = patched_copy(model)
    with torch.no_grad():
        run(patched, inputs(torch.float32, torch.Generator().manual_seed(1)))  # a grid recorded before copying
        kwargs = inputs(torch.float32, torch.Generator().manual_seed(2))
        expected = run(model, kwargs)
        for how, make_copy in COPIES.items():
            other = make_copy(patched)
            assert_patched_like(other, patched)
            assert_same_state(other, model)
            calls = Calls(monkeypatch)
            with dit_fast.use_backend("torch"), warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # no fallback to diffusers' attention
                actual = run(other, kwargs)
            assert rel_err(actual, expected) <= 1e-5, how
            assert EXPECTED_OPS[name] <= set(calls.counts), (how, calls.counts)
            monkeypatch.undo()


@pytest.mark.parametrize("case", list(PATCHED))
def test_other_patched_families_survive_torch_save(case):
    """The families past the first five (tests/test_diffusers_models.py's PATCHED table: a family added there
    is checked here too) through torch.save / torch.load: patched, same state dict, same output."""
    model, inputs = zoo.build(case)
    expected = run_zoo(model, inputs)
    patched = patched_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # SkyReels-V2 DF's named fallback, tested in that file
        run_zoo(patched, inputs)  # a grid recorded before saving
        other = _save_load(patched)
        assert_patched_like(other, patched)
        assert_same_state(other, model)
        with dit_fast.use_backend("torch"):
            actual = run_zoo(other, inputs)
    for a, e in zip(actual, expected):
        assert rel_err(a, e) <= 1e-5


@pytest.mark.parametrize("name", ["wan", "hunyuan_video"])
def test_copies_record_their_own_token_grid(name):
    """A copy made after the original ran on a 3 x 3 x 5 grid, run on a 5 x 3 x 3 grid (the same 45 tokens):
    its RoPE must use its own call's grid (a hook shared with the original would leave it the old one)."""
    model, inputs = build(name, layers=_layers(name))
    patched = patched_copy(model)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(1))
    other_grid = dict(kwargs, hidden_states=torch.randn(2, 4, 5, 6, 6, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad(), dit_fast.use_backend("torch"):
        run(patched, kwargs)
        for how, make_copy in COPIES.items():
            other = make_copy(patched)
            assert rel_err(run(other, other_grid), run(model, other_grid)) <= 1e-5, how
        assert rel_err(run(patched, kwargs), run(model, kwargs)) <= 1e-5  # the original still its own


def test_torch_load_in_a_new_process(tmp_path):
    """torch.save(patched Wan) loaded by a process that imports neither dit_fast nor the tests: the
    unpickler imports what it needs (the backend registers itself) and the model runs dit_fast's path."""
    model, inputs = build("wan", layers=1)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = run(model, kwargs)
    torch.save(patched_copy(model), tmp_path / "model.pt")
    torch.save({"kwargs": kwargs, "expected": expected}, tmp_path / "io.pt")
    code = """if True:
        import json, sys, torch
        model = torch.load(sys.argv[1], weights_only=False)
        data = torch.load(sys.argv[2])
        import dit_fast
        from dit_fast import ops
        called = []
        original = ops.layernorm_modulate
        ops.layernorm_modulate = lambda *a, **k: called.append(1) or original(*a, **k)
        with torch.no_grad(), dit_fast.use_backend("torch"):
            out = model(**data["kwargs"], return_dict=False)[0]
        err = ((out - data["expected"]).abs().max() / data["expected"].abs().max()).item()
        print(json.dumps({"err": err, "layernorm_modulate": len(called),
                          "processor": type(model.blocks[0].attn1.processor).__name__}))
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt"), str(tmp_path / "io.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["processor"] == "WanProcessor" and result["layernorm_modulate"] > 0, result
    assert result["err"] <= 1e-5, result


def test_patched_dit_copies_stay_patched(monkeypatch):
    """facebookresearch/DiT patched by dit_fast.patch: copies patched, same state dict, same output through
    dit_fast's ops; ``del module.forward`` gives back the class's forward."""
    model = R.randomize_(R.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                               num_classes=3)).eval()
    patched = copy.deepcopy(model)
    dit_fast.patch(patched, backend="torch")
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        expected = model(x, t, y)
        for how, make_copy in COPIES.items():
            other = make_copy(patched)
            assert_patched_like(other, patched)
            assert_same_state(other, model)
            calls = Calls(monkeypatch)
            monkeypatch.setattr(patching, "attention", calls._counting("attention", patching.attention))
            assert rel_err(other(x, t, y), expected) <= 1e-5, how
            assert calls.counts.keys() >= {"layernorm_modulate", "gated_residual", "attention"}, (how, calls.counts)
            monkeypatch.undo()
        for module in patched.modules():
            if isinstance(vars(module).get("forward"), PatchedMethod):
                del module.forward
        calls = Calls(monkeypatch)
        assert rel_err(patched(x, t, y), expected) <= 1e-5
        assert calls.counts == {}


def _module_level(module, x):
    return x


def test_patch_method_refuses_what_pickle_cannot_find():
    module = torch.nn.Identity()
    for bad in (lambda self, x: x, _closure(), print):
        with pytest.raises(TypeError, match="forward must be a module-level function"):
            patch_method(module, "forward", bad)
    patch_method(module, "forward", _module_level)
    assert pickle.loads(pickle.dumps(module))(torch.ones(2)).tolist() == [1.0, 1.0]


def _closure():
    def forward(self, x):
        return x
    return forward


# ---------------------------------------------------------------------------------------------
# Fused QKV projections
# ---------------------------------------------------------------------------------------------


class LayerCalls:
    """Counts the calls of every nn.Linear of a model, by qualified name."""

    def __init__(self, model):
        self.counts = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)]

    def _hook(self, name):
        def hook(module, args, output):
            self.counts[name] = self.counts.get(name, 0) + 1
        return hook

    def called(self, suffix):
        return sorted(name for name in self.counts if name.endswith(suffix))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _run_counting(model, kwargs, monkeypatch):
    """(output, Calls of the dit_fast ops, LayerCalls) of one torch-path forward, no fallback allowed."""
    calls, layers = Calls(monkeypatch), LayerCalls(model)
    with dit_fast.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = run(model, kwargs)
    layers.remove()
    monkeypatch.undo()
    return out, calls, layers


def test_cogvideox_fuse_qkv_projections_keeps_dit_fast_attention(monkeypatch):
    """fuse_qkv_projections() on a patched CogVideoX: dit_fast's processors stay and read the fused to_qkv;
    unfuse_qkv_projections() goes back to to_q / to_k / to_v and the unfused state dict; a model fused
    before patching is patched the same way."""
    model, inputs = build("cogvideox", layers=2)
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(1))
    attn1 = [f"transformer_blocks.{i}.attn1" for i in range(2)]
    with torch.no_grad():
        expected = run(model, kwargs)
        patched = patched_copy(model)
        patched.fuse_qkv_projections()
        fused_first = copy.deepcopy(model)
        fused_first.fuse_qkv_projections()
        dit_fast.patch(fused_first)
        for fused in (patched, fused_first):
            assert {type(m.processor).__name__ for m in fused.modules() if hasattr(m, "processor")} == {
                "CogVideoXProcessor"}
            out, calls, layers = _run_counting(fused, kwargs, monkeypatch)
            assert rel_err(out, expected) <= 1e-5
            assert calls.counts.get("attention") == 2
            assert layers.called(".to_qkv") == [f"{a}.to_qkv" for a in attn1] and layers.called(".to_k") == []
        patched.unfuse_qkv_projections()
        assert list(patched.state_dict()) == list(model.state_dict())
        out, calls, layers = _run_counting(patched, kwargs, monkeypatch)
    assert rel_err(out, expected) <= 1e-5 and calls.counts.get("attention") == 2
    assert layers.called(".to_k") == [f"{a}.to_k" for a in attn1]


@pytest.mark.parametrize("name", ["wan", "hunyuan_video"])
def test_fused_attention_projections_run_on_dit_fast(name, monkeypatch):
    """Each patched attention module's fuse_projections() (the models have no model-level call): the fused
    layers (to_qkv, to_kv, HunyuanVideo's to_added_qkv) replace the separate ones in dit_fast's processors."""
    model, inputs = build(name, layers=_layers(name))
    kwargs = inputs(torch.float32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = run(model, kwargs)
        patched = patched_copy(model)
        ours = [m for m in patched.modules() if isinstance(getattr(m, "processor", None), P.DitFastProcessor)]
        for module in ours:
            module.fuse_projections()
        out, calls, layers = _run_counting(patched, kwargs, monkeypatch)
    assert rel_err(out, expected) <= 1e-5 and calls.counts.get("attention", 0) > 0
    names = [n for n, m in patched.named_modules() if m in ours]
    fused = sorted(f"{n}.{layer}" for n in names for layer in ("to_qkv", "to_kv", "to_added_qkv")
                   if hasattr(patched.get_submodule(n), layer))
    assert fused and all(layers.counts.get(n, 0) > 0 for n in fused), (fused, layers.counts)
    separate = [n for n in layers.counts if n.rsplit(".", 1)[0] in names and n.endswith((".to_k", ".add_k_proj"))]
    assert separate == []
