"""Loading facebookresearch/DiT image checkpoints into DiTVideo (patch (1, p, p)).

    model = load_dit_checkpoint("DiT-XL-2-256x256.pt", backend="triton")
    out = model(x[:, :, None], t, y)[:, :, 0]        # == DiT(x, t, y)

The config (size, patch, input size, classes, learn_sigma) is read from the tensor shapes; the 2D
patch-embedding weight (D, C, p, p) becomes the 3D one (D, C, 1, p, p). Files load with
``weights_only=True`` (or safetensors): no pickled code runs.
"""

import argparse
import math
import os
from typing import Mapping, Optional

import torch

from dit_fast.models.dit_video import DiT_models, DiTVideo

# (depth, hidden_size) -> (name, num_heads) of DiT's sizes; heads are not visible in the tensor shapes.
DIT_SIZES = {(28, 1152): ("XL", 16), (24, 1024): ("L", 16), (12, 768): ("B", 12), (12, 384): ("S", 6)}


def _read(checkpoint) -> Mapping[str, torch.Tensor]:
    """A state dict from a path (.pt/.pth with weights_only=True, or .safetensors) or a dict."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint = load_file(path)
        else:
            # DiT's training checkpoints also hold {"args": argparse.Namespace}: allow that class only
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    for key in ("ema", "model", "state_dict"):  # DiT's training checkpoints: prefer the EMA weights
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    if "x_embedder.proj.weight" not in state:
        raise ValueError("checkpoint is not a DiT state dict: it has no 'x_embedder.proj.weight' "
                         f"(first keys: {list(state)[:5]})")
    return state


def infer_dit_config(state: Mapping[str, torch.Tensor]) -> dict:
    """DiTVideo keyword arguments read from the shapes of a DiT state dict."""
    proj = state["x_embedder.proj.weight"]  # (D, C, p, p) or (D, C, pt, ph, pw)
    hidden_size, in_channels = proj.shape[:2]
    patch = tuple(proj.shape[2:]) if proj.dim() == 5 else (1, *proj.shape[2:])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.endswith("attn.qkv.weight")})
    if depth == 0:
        raise ValueError("checkpoint has no blocks.<i>.attn.qkv.weight")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size
    out_features = state["final_layer.linear.weight"].shape[0]
    out_channels = out_features // (patch[0] * patch[1] * patch[2])
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final_layer.linear has {out_features} outputs; expected patch volume x {in_channels} "
                         f"or x {2 * in_channels} channels")
    config = dict(hidden_size=hidden_size, in_channels=in_channels, patch_size=patch, depth=depth,
                  mlp_ratio=mlp_ratio, learn_sigma=out_channels == 2 * in_channels)
    if "pos_embed" in state:
        num_patches = state["pos_embed"].shape[1]
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"pos_embed has {num_patches} positions, not a square grid; pass input_size=")
        config["input_size"] = (patch[0], side * patch[1], side * patch[2])
    if "y_embedder.embedding_table.weight" in state:
        rows = state["y_embedder.embedding_table.weight"].shape[0]
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
    state = _read(checkpoint)
    config = infer_dit_config(state)
    if name is not None:
        named = _named_size(name)
        for key in ("depth", "hidden_size", "patch_size"):
            if named[key] != config[key]:
                raise ValueError(f"checkpoint has {key}={config[key]} but {name} has {key}={named[key]}")
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
