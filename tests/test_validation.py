"""Bad input to loaders, constructors and ops: one clear error naming the argument, never a deep crash.

Each test is one failure class from issue 11 ("Loading and state"): unreadable or ill-fitting
checkpoints (CheckpointError), constructors that divided by zero or truncated, values that vanish or
overflow in fp32, patchify defaults that were not each other's inverse, and lazy subpackages.
"""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from dit_fast.models import CheckpointError, DiTVideo, check_state_dict, load_dit_checkpoint, read_state_dict
from dit_fast.models.checkpoint import read_safetensors, read_torch_file

# ---------------------------------------------------------------------------------------------
# Checkpoints: every unreadable or ill-fitting file is a CheckpointError naming file, key, expectation.
# ---------------------------------------------------------------------------------------------


def tiny_model(**kwargs):
    defaults = dict(input_size=(1, 4, 4), patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2,
                    num_classes=5, backend="torch")
    return DiTVideo(**{**defaults, **kwargs})


class _RunsCode:
    def __reduce__(self):  # unpickling calls os.getcwd(): harmless, but code all the same
        return (os.getcwd, ())


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad_checkpoints")
    sd = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    save_file(sd, root / "ok.safetensors")
    torch.save(sd, root / "ok.pt")
    files = {}
    for ext in ("safetensors", "pt"):
        data = (root / f"ok.{ext}").read_bytes()
        for kind, content in (("truncated", data[: len(data) // 2]), ("truncated_tail", data[:-4]),
                              ("empty", b""), ("random", os.urandom(4096))):
            path = root / f"{kind}.{ext}"
            path.write_bytes(content)
            files[f"{kind}.{ext}"] = path
        directory = root / f"dir.{ext}"
        directory.mkdir()
        files[f"dir.{ext}"] = directory
    torch.save({"x_embedder.proj.weight": _RunsCode()}, root / "code.pt")
    files["code.pt"] = root / "code.pt"
    (root / "plain_pickle.pt").write_bytes(pickle.dumps({"a": _RunsCode()}))
    files["plain_pickle.pt"] = root / "plain_pickle.pt"
    torch.save([torch.zeros(2)], root / "list.pt")
    files["list.pt"] = root / "list.pt"
    return files


@pytest.mark.parametrize("name", ["truncated.safetensors", "truncated_tail.safetensors", "empty.safetensors",
                                  "random.safetensors", "dir.safetensors", "truncated.pt", "truncated_tail.pt",
                                  "empty.pt", "random.pt", "dir.pt", "list.pt"])
def test_unreadable_checkpoint_files(bad_files, name):
    path = str(bad_files[name])
    for load in (read_state_dict, load_dit_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert path in str(info.value)
        assert "Traceback" not in str(info.value)


def test_pickled_code_is_refused_without_suggesting_weights_only_false(bad_files):
    for name in ("code.pt", "plain_pickle.pt"):
        with pytest.raises(CheckpointError, match="refused") as info:
            load_dit_checkpoint(str(bad_files[name]))
        assert "weights_only" not in str(info.value) and str(bad_files[name]) in str(info.value)


def test_missing_checkpoint_is_also_file_not_found(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    for load in (read_state_dict, read_safetensors, read_torch_file, load_dit_checkpoint):
        with pytest.raises(CheckpointError, match="does not exist") as info:
            load(path)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(TypeError, match="checkpoint"):
        load_dit_checkpoint(3)


def _dit_state():
    return {k: v.clone() for k, v in tiny_model().state_dict().items()}


def test_state_dict_that_does_not_fit():
    model = tiny_model()
    cases = []
    sd = _dit_state()
    sd.pop("final_layer.linear.bias")
    cases.append((sd, "final_layer.linear.bias", "missing"))
    sd = _dit_state()
    sd["blocks.0.extra"] = torch.zeros(2)
    cases.append((sd, "blocks.0.extra", "does not have"))
    sd = _dit_state()
    sd["blocks.0.mlp.fc2.weight"] = torch.zeros(16, 63)
    cases.append((sd, "blocks.0.mlp.fc2.weight", r"\(16, 64\)"))
    sd = _dit_state()
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"].to(torch.int64)  # loaded silently before
    cases.append((sd, "blocks.0.attn.proj.weight", "floating-point"))
    sd = _dit_state()
    sd["blocks.0.attn.proj.bias"] = [0.0] * 16
    cases.append((sd, "blocks.0.attn.proj.bias", "expected a tensor"))
    for state, key, expected in cases:
        with pytest.raises(CheckpointError, match=expected) as info:
            check_state_dict(model, state, "ckpt.safetensors")
        assert key in str(info.value) and "ckpt.safetensors" in str(info.value)
    # a lower precision of a floating-point weight is fine: load_state_dict casts it
    sd = _dit_state()
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"].bfloat16()
    check_state_dict(model, sd, "ckpt.safetensors")


def test_dit_checkpoint_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    sd = _dit_state()
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].to(torch.int32)
    path = tmp_path / "int.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight.*floating-point"):
        load_dit_checkpoint(str(path), num_heads=2)
    sd = _dit_state()
    sd["final_layer.linear.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="final_layer.linear.weight"):
        load_dit_checkpoint(sd, num_heads=2)
    sd = _dit_state()
    del sd["blocks.0.mlp.fc1.weight"]
    with pytest.raises(CheckpointError, match="blocks.0.mlp.fc1.weight"):
        load_dit_checkpoint(sd, num_heads=2)
    sd = _dit_state()
    sd["y_embedder.embedding_table.weight"] = torch.zeros(5, 16)  # one row short of DiT's 5 classes + null
    sd["blocks.0.unknown"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="blocks.0.unknown"):
        load_dit_checkpoint(sd, num_heads=2)
    with pytest.raises(CheckpointError, match="expected a tensor"):
        load_dit_checkpoint({**_dit_state(), "pos_embed": "abc"}, num_heads=2)
