"""Reading checkpoints, validating them against a model, and loading facebookresearch/DiT image checkpoints.

    model = load_dit_checkpoint("DiT-XL-2-256x256.pt", backend="triton")
    out = model(x[:, :, None], t, y)[:, :, 0]        # == DiT(x, t, y)

    tensors, meta = read_safetensors("ckpt_0001000.safetensors")   # CheckpointError on a bad file
    check_state_dict(model, tensors, "ckpt_0001000.safetensors")   # CheckpointError naming key and shape

Every failure to read or fit a checkpoint (missing, empty, truncated, not a checkpoint, a directory, a
wrong key, shape or dtype) is one error type, ``CheckpointError`` (a ValueError; a missing file is also
a FileNotFoundError), whose message names the file, the key and what was expected. Files load with
``weights_only=True`` (or safetensors): no pickled code runs, and a file that would need it is refused.

For DiT checkpoints the config (size, patch, input size, classes, learn_sigma) is read from the tensor
shapes; the 2D patch-embedding weight (D, C, p, p) becomes the 3D one (D, C, 1, p, p).
"""

import argparse
import math
import os
import pickle
from typing import Collection, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from dit_fast.models.dit_video import DiT_models, DiTVideo

# (depth, hidden_size) -> (name, num_heads) of DiT's sizes; heads are not visible in the tensor shapes.
DIT_SIZES = {(28, 1152): ("XL", 16), (24, 1024): ("L", 16), (12, 768): ("B", 12), (12, 384): ("S", 6)}


#################################################################################
#                        Reading and validating checkpoints                     #
#################################################################################

class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file, the key and what was
    expected."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (both a CheckpointError and a FileNotFoundError)."""


def _existing_file(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    return path


def read_safetensors(path, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; CheckpointError if it is not a complete one."""
    from safetensors import SafetensorError, safe_open

    path = _existing_file(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:  # truncated, empty, random bytes
        raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file "
                              f"(truncated or corrupt?): {e}") from None
    return tensors, meta


def read_torch_file(path, map_location="cpu", safe_globals: Collection[type] = ()):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never pickled code.

    ``safe_globals``: extra classes the file may hold (DiT's training checkpoints carry an
    argparse.Namespace). Anything else is refused with a CheckpointError.
    """
    path = _existing_file(path)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, i.e. running the file's code: never do that here
        reason = str(e)
        detail = next((line.strip().rstrip(".") for line in reason.splitlines()
                       if "GLOBAL" in line or "Unsupported operand" in line), "")
        raise CheckpointError(f"checkpoint {path!r} was refused: it is not a plain tensor file (it would need "
                              f"to run pickled code, or it is corrupt){': ' + detail if detail else ''}. "
                              "Re-save its tensors as .safetensors or with torch.save(state_dict)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path!r} is not a readable torch file (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def read_state_dict(checkpoint, safe_globals: Collection[type] = ()) -> Dict[str, torch.Tensor]:
    """A {name: tensor} dict from a path (.safetensors, or .pt / .pth read weights-only) or a mapping.

    CheckpointError if the file cannot be read or is not a flat mapping from str to tensors.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if path.endswith(".safetensors"):
            state = read_safetensors(path)[0]
        else:
            state = read_torch_file(path, safe_globals=safe_globals)
    else:
        path, state = "<state dict>", checkpoint
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a state dict "
                              "(a mapping of names to tensors)")
    return state


def _check_entries(state: Mapping, path: str) -> None:
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {path!r} has a non-str key {key!r}, expected parameter names")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path!r}: {key!r} is a {type(value).__name__}, expected a tensor")


def check_state_dict(model: nn.Module, state: Mapping, path: str = "<state dict>", *,
                     optional: Collection[str] = (), strict: bool = True) -> None:
    """Checks that ``state`` fits ``model`` before ``model.load_state_dict``: CheckpointError otherwise.

    Every model key must be present (except those in ``optional``: e.g. positional buffers the model
    recomputes), with no extra keys (``strict=False`` allows both), each a tensor of the model's shape
    and of its kind (a floating-point weight from a floating-point tensor, any precision; an integer
    or bool buffer from the same dtype). ``path`` names the file in the messages.
    """
    _check_entries(state, path)
    own = model.state_dict()
    if strict:
        missing = [k for k in own if k not in state and k not in optional]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s) the model expects, e.g. {missing[:3]}")
            if unexpected:
                parts.append(f"{len(unexpected)} key(s) the model does not have, e.g. {unexpected[:3]}")
            raise CheckpointError(f"checkpoint {path!r} does not fit this model: {'; '.join(parts)}")
    for key, value in state.items():
        if key not in own:
            continue
        expected = own[key]
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointError(f"checkpoint {path!r} does not fit this model: {key!r} has shape "
                                  f"{tuple(value.shape)}, the model expects {tuple(expected.shape)}")
        if expected.is_floating_point():
            if not value.is_floating_point():
                raise CheckpointError(f"checkpoint {path!r}: {key!r} is {value.dtype}, expected a floating-point "
                                      f"tensor (the model holds {expected.dtype})")
        elif value.dtype != expected.dtype:
            raise CheckpointError(f"checkpoint {path!r}: {key!r} is {value.dtype}, expected {expected.dtype}")


#################################################################################
#                          facebookresearch/DiT checkpoints                     #
#################################################################################

def _read(checkpoint) -> Mapping[str, torch.Tensor]:
    """A DiT state dict from a path (.pt/.pth with weights_only=True, or .safetensors) or a dict."""
    if not isinstance(checkpoint, (str, os.PathLike, Mapping)):
        raise TypeError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    path = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"
    # DiT's training checkpoints also hold {"args": argparse.Namespace}: allow that class only
    checkpoint = read_state_dict(checkpoint, safe_globals=[argparse.Namespace])
    for key in ("ema", "model", "state_dict"):  # DiT's training checkpoints: prefer the EMA weights
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    _check_entries(checkpoint, path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    if "x_embedder.proj.weight" not in state:
        raise CheckpointError(f"checkpoint {path!r} is not a DiT state dict: it has no 'x_embedder.proj.weight' "
                              f"(first keys: {list(state)[:5]})")
    return state


def _entry(state: Mapping, key: str, dims: Tuple[int, ...], path: str) -> torch.Tensor:
    """state[key], which must be a tensor with one of ``dims`` dimensions, or CheckpointError."""
    if key not in state:
        raise CheckpointError(f"checkpoint {path!r} is not a DiT state dict: it has no {key!r}")
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dim() not in dims or 0 in value.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"checkpoint {path!r}: {key!r} has shape {shape}, expected a non-empty "
                              f"{' or '.join(map(str, dims))}-dimensional tensor")
    return value


def infer_dit_config(state: Mapping[str, torch.Tensor], path: str = "<state dict>") -> dict:
    """DiTVideo keyword arguments read from the shapes of a DiT state dict; CheckpointError if unreadable."""
    proj = _entry(state, "x_embedder.proj.weight", (4, 5), path)  # (D, C, p, p) or (D, C, pt, ph, pw)
    hidden_size, in_channels = proj.shape[:2]
    patch = tuple(proj.shape[2:]) if proj.dim() == 5 else (1, *proj.shape[2:])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.endswith("attn.qkv.weight")})
    if depth == 0:
        raise CheckpointError(f"checkpoint {path!r} has no blocks.<i>.attn.qkv.weight")
    mlp_ratio = _entry(state, "blocks.0.mlp.fc1.weight", (2,), path).shape[0] / hidden_size
    out_features = _entry(state, "final_layer.linear.weight", (2,), path).shape[0]
    out_channels = out_features // (patch[0] * patch[1] * patch[2])
    if out_features % (patch[0] * patch[1] * patch[2]) or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"checkpoint {path!r}: final_layer.linear has {out_features} outputs; expected "
                              f"patch volume x {in_channels} or x {2 * in_channels} channels")
    config = dict(hidden_size=hidden_size, in_channels=in_channels, patch_size=patch, depth=depth,
                  mlp_ratio=mlp_ratio, learn_sigma=out_channels == 2 * in_channels)
    if "pos_embed" in state:
        num_patches = _entry(state, "pos_embed", (3,), path).shape[1]
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(f"checkpoint {path!r}: pos_embed has {num_patches} positions, not a square "
                                  "grid; pass input_size=")
        config["input_size"] = (patch[0], side * patch[1], side * patch[2])
    if "y_embedder.embedding_table.weight" in state:
        rows = _entry(state, "y_embedder.embedding_table.weight", (2,), path).shape[0]
        config["num_classes"] = rows - 1  # DiT always keeps one extra row for the CFG "null" class
        config["class_dropout_prob"] = 0.1
    else:
        config["num_classes"] = 0
    size = DIT_SIZES.get((depth, hidden_size))
    if size is not None:
        config["num_heads"] = size[1]
    return config


def _named_size(name: str) -> dict:
    """depth, width, heads and patch of an image DiT name such as "DiT-XL/2"."""
    sizes = {size: (depth, hidden, heads) for (depth, hidden), (size, heads) in DIT_SIZES.items()}
    prefix, _, patch = name.partition("/")
    size = prefix[len("DiT-"):]
    if name not in DiT_models or size not in sizes or not patch.isdigit():
        image_names = [n for n in DiT_models if n.partition("/")[2].isdigit()]
        raise ValueError(f"name must be one of DiT's image models {image_names}, got {name!r}")
    depth, hidden_size, num_heads = sizes[size]
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=(1, int(patch), int(patch)))


def load_dit_checkpoint(checkpoint, name: Optional[str] = None, strict: bool = True, **model_kwargs) -> DiTVideo:
    """A DiTVideo holding the weights of a facebookresearch/DiT checkpoint.

    checkpoint: a path (.pt, .pth, .safetensors), a state dict, or a training checkpoint dict with an
    "ema" (or "model") entry. name: a DiT_models name ("DiT-XL/2"); by default the config is inferred
    from the tensor shapes. model_kwargs go to DiTVideo (e.g. ``backend="triton"``) and win over both.
    Guidance applies to 3 channels, as DiT's ``forward_with_cfg``.
    """
    path = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"
    state = _read(checkpoint)
    config = infer_dit_config(state, path)
    if name is not None:
        named = _named_size(name)
        for key in ("depth", "hidden_size", "patch_size"):
            if named[key] != config[key]:
                raise CheckpointError(f"checkpoint {path!r} has {key}={config[key]} but {name} has "
                                      f"{key}={named[key]}")
        config.update(named)
    if "num_heads" not in config and "num_heads" not in model_kwargs:
        raise ValueError(f"depth {config['depth']} x width {config['hidden_size']} is not one of DiT's sizes; "
                         "pass num_heads=")
    config.update(cfg_channels=3)
    config.update(model_kwargs)
    model = DiTVideo(**config)
    if state["x_embedder.proj.weight"].dim() == 4:
        state = dict(state)
        state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].unsqueeze(2)  # (D, C, 1, p, p)
    check_state_dict(model, state, path, strict=strict)
    model.load_state_dict(state, strict=strict)
    return model.eval()


def convert_temporal_patch(state: Mapping[str, torch.Tensor], patch_size, prefix: str = "") -> dict:
    """A DiTVideo state dict re-cut for another temporal patch: pt -> 1 or 1 -> pt, spatial patch equal.

    Lets a model trained with patch (pt, p, p) start a run with patch (1, p, p), or the reverse (as
    Open-Sora and Latte start video models from image ones). The patch embedding sums its pt frame taps
    (a one-frame token of a clip that is still across pt frames embeds as before) or splits one tap
    evenly over pt; the final layer averages or repeats its pt frames' rows. ``pos_embed`` is dropped:
    the model recomputes it for its own grid. Keys are ``prefix + "x_embedder.proj.weight"`` and so on.
    """
    new_pt, ph, pw = (int(v) for v in patch_size)
    conv = state[prefix + "x_embedder.proj.weight"]  # (D, C, pt, ph, pw)
    if conv.dim() != 5:
        raise ValueError(f"{prefix}x_embedder.proj.weight must be (D, C, pt, ph, pw), got {tuple(conv.shape)}")
    old_pt = conv.shape[2]
    if tuple(conv.shape[3:]) != (ph, pw):
        raise ValueError(f"spatial patch differs: checkpoint {tuple(conv.shape[2:])}, requested {(new_pt, ph, pw)}")
    out = {k: v for k, v in state.items() if k != prefix + "pos_embed"}
    if old_pt == new_pt:
        return out
    if 1 not in (old_pt, new_pt):
        raise ValueError(f"temporal patch {old_pt} -> {new_pt}: only pt -> 1 and 1 -> pt are supported")
    w, b = state[prefix + "final_layer.linear.weight"], state[prefix + "final_layer.linear.bias"]  # rows (pt, ph, pw, C)
    if old_pt > 1:
        out[prefix + "x_embedder.proj.weight"] = conv.sum(dim=2, keepdim=True)
        out[prefix + "final_layer.linear.weight"] = w.reshape(old_pt, -1, w.shape[-1]).mean(dim=0)
        out[prefix + "final_layer.linear.bias"] = b.reshape(old_pt, -1).mean(dim=0)
    else:
        out[prefix + "x_embedder.proj.weight"] = conv.repeat(1, 1, new_pt, 1, 1) / new_pt
        out[prefix + "final_layer.linear.weight"] = w.repeat(new_pt, 1)
        out[prefix + "final_layer.linear.bias"] = b.repeat(new_pt)
    return out
