"""Text to video with a trained model: the bundled one by default, or your own checkpoint.

    from dit_fast.generate import load_model, generate, save_video
    model, cfg = load_model()                                    # dit_fast/assets/shapes_t2v.*
    video = generate(model, cfg, ["a red circle moving right"], seed=0)   # (1, 3, T, H, W) in [-1, 1]
    save_video(video[0], "out.gif")

A checkpoint is any of: a training directory (its ``latest``), a ``ckpt_<step>.safetensors`` written
by ``dit_fast.train`` (EMA weights by default), or an exported model file like the bundled one (a
safetensors file of weights whose metadata holds the config and the vocabulary). A sharded (--fsdp)
run becomes one with ``export_model`` (``dit-fast export``).

Under torchrun, ``dit-fast generate --sp N`` splits the video's tokens over N ranks
(dit_fast.parallel.sequence_parallel on the model's DiTVideo): every rank runs ``generate`` with the
same inputs and gets the same video; rank 0 writes it (dit_fast/cli.py).
"""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

from dit_fast.models.checkpoint import check_state_dict, read_safetensors
from dit_fast.train import (TextToVideo, TrainConfig, atomic_save_safetensors, atomic_write_text, build_model,
                            checkpoint_paths, make_flow, read_weights)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED = os.path.join(ASSETS, "shapes_t2v.safetensors")
BUNDLED_JSON = os.path.join(ASSETS, "shapes_t2v.json")

# What `dit-fast generate` does unless told otherwise (kept in the bundled json too). Chosen by the
# bundled model's shape accuracy on its training combinations (benchmarks/results/bundled_model_phases:
# for the patch (1, 8, 8) model, CFG 1 / 1.5 / 2 gave 89% / 87% / 77%; guidance rounds squares).
DEFAULT_STEPS = 50
DEFAULT_CFG = 1.0
VIDEO_FORMATS = (".gif", ".mp4")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_FPS = 100  # a GIF's frame delay is in hundredths of a second
MAX_SCALE = 64


# --------------------------------------------------------------------------------------------
# Loading and exporting
# --------------------------------------------------------------------------------------------


def load_model(checkpoint: Optional[str] = None, device: Union[str, torch.device] = "cpu", ema: bool = True,
               backend: Optional[str] = None) -> Tuple[TextToVideo, TrainConfig]:
    """The model (eval mode, on ``device``) and its training config.

    checkpoint: None for the bundled model; a training directory; ``ckpt_<step>.safetensors``; or an
    exported model file. ema: use the EMA weights of a training checkpoint (exported files hold one set).
    backend: override the config's op backend (e.g. "auto" on a GPU).
    """
    path = BUNDLED if checkpoint is None else checkpoint
    if checkpoint is None and not os.path.exists(path):
        raise FileNotFoundError(f"the bundled model {BUNDLED} is missing from this installation "
                                f"(package data dit_fast/assets/*); pass --checkpoint")
    state, meta = read_weights(path, ema=ema)
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' in its safetensors metadata: not a dit_fast text-to-video "
                         f"checkpoint")
    cfg = TrainConfig.from_dict(json.loads(meta["config"]))
    if backend is not None:
        cfg.backend = backend
    vocabulary = json.loads(meta["vocabulary"]) if "vocabulary" in meta else None
    model = build_model(cfg, vocabulary)
    check_state_dict(model, state, path, optional=[k for k, _ in model.named_buffers()])
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), cfg


def read_config(checkpoint: Optional[str] = None) -> TrainConfig:
    """The training config of a checkpoint (as ``load_model`` takes it), without building the model."""
    _, meta = read_weights(BUNDLED if checkpoint is None else checkpoint)
    if "config" not in meta:
        raise ValueError(f"{checkpoint} has no 'config' in its safetensors metadata: not a dit_fast text-to-video "
                         f"checkpoint")
    return TrainConfig.from_dict(json.loads(meta["config"]))


def export_model(run_dir: str, dest: str, extra: Optional[dict] = None) -> dict:
    """Write a run's EMA weights as a standalone model file ``dest`` (.safetensors) and ``dest``.json.

    run_dir: a training directory or its ``ckpt_<step>.safetensors``, or a sharded (--fsdp) run (its
    directory, ``dcp`` root or a ``step_*`` directory: read in this one process through
    dit_fast.parallel.checkpoint.export_safetensors, whatever the number of ranks that wrote it).
    The json holds the config, the vocabulary and anything in ``extra`` (the training command,
    measured scores). Both files are written atomically. Returns the json dict. A file that cannot be
    read is a CheckpointError naming it.
    """
    from dit_fast.models.checkpoint import CheckpointError
    from dit_fast.train_parallel import export_sharded, sharded_root

    if sharded_root(run_dir) is not None:
        saved = export_sharded(run_dir, dest)
    else:
        weights, _ = checkpoint_paths(run_dir)
        tensors, meta = read_safetensors(weights)
        missing = [k for k in ("config", "vocabulary", "step") if k not in meta]
        if missing:
            raise CheckpointError(f"checkpoint {weights!r} has no {', '.join(missing)} in its metadata: not written by "
                                  "dit-fast train")
        ema = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")}
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        # buffers (e.g. positional tables) are not EMA'd: take them from the live model
        for k, v in model_sd.items():
            ema.setdefault(k, v)
        atomic_save_safetensors(ema, dest, metadata={"config": meta["config"], "vocabulary": meta["vocabulary"],
                                                     "step": meta["step"]})
        saved = {"config": json.loads(meta["config"]), "vocabulary": json.loads(meta["vocabulary"]),
                 "step": int(meta["step"])}
    info = {**saved, "default_steps": DEFAULT_STEPS, "default_cfg": DEFAULT_CFG, **(extra or {})}
    atomic_write_text(json.dumps(info, indent=2) + "\n", os.path.splitext(dest)[0] + ".json")
    return info


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model: TextToVideo, cfg: TrainConfig, prompts: Sequence[str], seed: int = 0, steps: int = DEFAULT_STEPS,
             cfg_scale: float = DEFAULT_CFG, frames: Optional[int] = None, progress_bar: bool = True,
             seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Videos (B, 3, T, H, W) in [-1, 1] for ``prompts``.

    Each prompt's starting noise comes from its own generator seeded ``seed + i`` (or ``seeds[i]``),
    so a video does not depend on the batch it was generated in. An unknown word raises ValueError
    listing the vocabulary.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    frames = cfg.num_frames if frames is None else frames
    pt = cfg.patch[0]
    if not _is_int(frames) or frames < 1 or frames % pt:
        raise ValueError(f"frames must be a positive multiple of the temporal patch {pt}, got {frames!r}")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1: no guidance), got {cfg_scale!r}")
    seeds = [seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
    if len(seeds) != len(prompts) or not all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seed(s) must be {len(prompts)} integer(s) in [0, 2**63 - 1], got {seeds}")
    device = next(model.parameters()).device
    ids, mask = model.tokenizer(prompts, device=device)  # raises on unknown words, listing the vocabulary
    shape = (len(prompts), 3, frames, cfg.size, cfg.size)
    noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    flow = make_flow(cfg)
    x = flow.sample(model, shape, steps=steps, model_kwargs={"ids": ids, "mask": mask}, cfg_scale=cfg_scale,
                    noise=noise, progress_bar=progress_bar)
    return x.clamp(-1, 1)


def to_uint8_frames(video: torch.Tensor, scale: int = 1) -> List:
    """(3, T, H, W) in [-1, 1] -> T arrays (H * scale, W * scale, 3) uint8 (nearest-neighbour upscaling)."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video, got {tuple(video.shape)}")
    v = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    if scale > 1:
        v = v.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return [frame.permute(1, 2, 0).numpy() for frame in v.unbind(1)]


def check_output_path(path, formats: Sequence[str] = VIDEO_FORMATS) -> str:
    """``path`` if a file of one of ``formats`` can be written there, else ValueError saying why.

    Checks the name (not empty, one of the extensions), that it is not a directory, that the nearest
    existing parent is a writable directory (not a file), and for .mp4 that imageio-ffmpeg is
    installed: all before any work is done. Creates nothing.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"output path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    expected = " or ".join(formats)
    name = os.path.basename(path)
    if not name or name in (".", ".."):
        raise ValueError(f"expected a file name ending in {expected}, got {path!r}")
    ext = os.path.splitext(name)[1].lower()
    if ext not in formats:
        raise ValueError(f"expected a file name ending in {expected}, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, expected a file name ending in {expected}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {path!r}: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path!r}: the directory {parent!r} is not writable")
    if ext == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError(f"writing {path!r} needs imageio-ffmpeg: pip install 'dit_fast[video]' "
                             "(or write a .gif)") from None
    return path


def save_video(video: torch.Tensor, path: str, fps: int = 8, scale: int = 4) -> str:
    """Write a (3, T, H, W) clip as .gif or .mp4 (needs imageio-ffmpeg: pip install dit_fast[video]).

    fps: frames per second (a GIF stores each frame's delay in hundredths of a second: 1000 / fps ms,
    rounded down to 10 ms). scale: nearest-neighbour upscaling. Missing parent directories are
    created, and removed again if the write fails.
    """
    check_output_path(path)
    if not _is_int(fps) or not 1 <= fps <= MAX_FPS:
        raise ValueError(f"fps must be an integer in [1, {MAX_FPS}], got {fps!r}")
    if not _is_int(scale) or not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"scale must be an integer in [1, {MAX_SCALE}], got {scale!r}")
    frames = to_uint8_frames(video, scale)
    created = []  # the directories made here, deepest last
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        created.insert(0, parent)
        parent = os.path.dirname(parent)
    existed = os.path.exists(path)
    try:
        for d in created:
            os.mkdir(d)
        if os.path.splitext(path)[1].lower() == ".gif":
            from PIL import Image

            # PIL's duration is in milliseconds, per frame (imageio's meaning of `duration` changed
            # between its plugins: seconds, then milliseconds; writing through PIL avoids both)
            first, *rest = [Image.fromarray(f) for f in frames]
            first.save(path, format="GIF", save_all=True, append_images=rest, duration=1000 // fps, loop=0)
        else:
            import imageio.v2 as imageio

            # H.264 wants sizes that are multiples of 16: pad through macro_block_size
            imageio.mimsave(path, frames, fps=fps, macro_block_size=16)
    except BaseException:
        if not existed and os.path.exists(path):
            os.remove(path)
        for d in reversed(created):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    return path


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
