"""What sparse attention costs in quality: the same prompts and seeds generated dense and sparse.

    python -m benchmarks.sparse_quality --sparse sliding_tile:density=0.25,tile=2x2x2 [--sparse ...]
        [--checkpoint PATH] [--prompts "a red circle moving left" ...] [--seeds 0,1] [--steps 20]
        [--json benchmarks/results/sparse_quality.json]
    python -m benchmarks.sparse_quality --pipeline PATH_OR_ID --sparse ... --height 480 --width 832 --frames 81

Models: a dit_fast checkpoint (default: the bundled text-to-video model, dit_fast/assets; sampled by
dit_fast.generate, its DiT rebuilt with ``attention="block_sparse"`` and the same weights), or a
diffusers video pipeline (``--pipeline``: DiffusionPipeline.from_pretrained; its transformer patched
with ``dit_fast.patch(transformer, sparse=...)``, the dense run being diffusers' own transformer). A
model fine-tuned into sparsity (``dit-fast train --sparse SPEC --init-from MODEL``) is measured against
the model it started from: ``--checkpoint RUN --dense-checkpoint MODEL`` (its own spec by default).

Per (sparse spec, prompt, seed), one row:
    attention_error    per denoising step, each sparse layer's ||o_sparse - o_dense|| / ||o_dense|| on that
                       step's own q, k, v (a dense attention run beside each sparse call: the schedule's
                       dense steps and layers are not listed, their error is 0); mean and max over layers
    kept_fraction      kept token pairs / all, averaged over the sparse calls (text included)
    latent_psnr        PSNR of the final latents (before decoding), peak = the dense latents' max - min
    frame_psnr, frame_ssim   the decoded frames in [0, 1] (PSNR peak 1; SSIM: 11 x 11 Gaussian window,
                       sigma 1.5, per frame and channel, averaged; Wang et al. 2004)
The bundled model denoises pixels (no VAE): its "latents" are the generated video (dit_fast.generate's
output, in [-1, 1]), its frames the same video mapped to [0, 1].
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from dit_fast.sparse import SparseAttention

DEFAULT_PROMPTS = ("a red circle moving left", "a blue square moving up")


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def psnr(actual: torch.Tensor, expected: torch.Tensor, peak: float) -> float:
    """10 log10(peak^2 / MSE) in dB (inf when equal)."""
    mse = float((actual.double() - expected.double()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def ssim(actual: torch.Tensor, expected: torch.Tensor, peak: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> float:
    """Mean SSIM of images (N, C, H, W) in [0, peak]: Gaussian-weighted local means, variances and covariance
    (window clipped to the image, odd), C1 = (0.01 peak)^2, C2 = (0.03 peak)^2, valid positions only."""
    x, y = actual.double(), expected.double()
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, size, size)  # depthwise, per channel

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def summarise_errors(log: List[dict]) -> Dict[str, dict]:
    """The runtime's error log -> per step {"mean", "max", "layers"} and the kept fraction over all calls."""
    steps: Dict[str, List[float]] = {}
    for entry in log:
        steps.setdefault(str(entry["step"]), []).append(entry["error"])
    return {step: {"mean": sum(e) / len(e), "max": max(e), "layers": len(e)} for step, e in steps.items()}


def compare(dense_latent, sparse_latent, dense_frames, sparse_frames, log: List[dict]) -> dict:
    """One row's metrics. frames (N, C, H, W) in [0, 1]."""
    peak = float(dense_latent.max() - dense_latent.min())
    return {"attention_error": summarise_errors(log),
            "kept_fraction": sum(e["kept"] for e in log) / len(log) if log else 1.0,
            "sparse_calls": len(log),
            "latent_psnr": psnr(sparse_latent, dense_latent, peak),
            "frame_psnr": psnr(sparse_frames, dense_frames, 1.0),
            "frame_ssim": ssim(sparse_frames, dense_frames)}


# ---------------------------------------------------------------------------------------------
# A dit_fast checkpoint (the bundled model by default)
# ---------------------------------------------------------------------------------------------


def sparse_twin(model, cfg, spec: str):
    """The checkpoint's TextToVideo rebuilt with --sparse ``spec`` ("" = dense) and the same weights (eval)."""
    from dit_fast.train import build_model

    twin = build_model(dataclasses.replace(cfg, sparse=spec), vocabulary=model.vocabulary)
    twin.load_state_dict(model.state_dict())
    return twin.to(next(model.parameters()).device).eval()


def run_checkpoint(checkpoint: Optional[str], specs: Sequence[str], prompts: Sequence[str], seeds: Sequence[int],
                   steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                   dense_checkpoint: Optional[str] = None) -> List[dict]:
    """specs: sparse configurations of ``checkpoint``'s weights ("" = the checkpoint's own --sparse, a model
    fine-tuned sparse). The dense run: ``dense_checkpoint``'s model (e.g. the model before a sparse
    fine-tune), else the checkpoint's own weights with dense attention."""
    from dit_fast.generate import BUNDLED_JSON, DEFAULT_CFG, DEFAULT_STEPS, generate, load_model

    model, cfg = load_model(checkpoint)
    if dense_checkpoint is not None:
        model_dense, cfg_dense = load_model(dense_checkpoint)
        if cfg_dense.sparse:
            raise ValueError(f"--dense-checkpoint {dense_checkpoint} was trained with --sparse {cfg_dense.sparse}")
    else:
        model_dense, cfg_dense = sparse_twin(model, cfg, ""), dataclasses.replace(cfg, sparse="")
    defaults = json.load(open(BUNDLED_JSON)) if checkpoint is None else {}  # the bundled model's own settings
    steps = steps or defaults.get("default_steps", DEFAULT_STEPS)
    cfg_scale = defaults.get("default_cfg", DEFAULT_CFG) if cfg_scale is None else cfg_scale
    rows, dense_runs = [], {}
    for spec in specs:
        if not (spec or cfg.sparse):
            raise ValueError(f"checkpoint {checkpoint} has no --sparse of its own: give a spec")
        spec = spec or cfg.sparse
        twin = sparse_twin(model, cfg, spec)
        runtime = twin.dit.sparse
        for prompt in prompts:
            for seed in seeds:
                with torch.no_grad():
                    if (prompt, seed) not in dense_runs:
                        dense_runs[prompt, seed] = generate(model_dense, cfg_dense, [prompt], seed=seed, steps=steps,
                                                            cfg_scale=cfg_scale, progress_bar=False)
                    dense = dense_runs[prompt, seed]
                    runtime.error_log = []
                    sparse = generate(twin, cfg, [prompt], seed=seed, steps=steps, cfg_scale=cfg_scale,
                                      progress_bar=False)
                to_frames = lambda v: ((v + 1) / 2)[0].transpose(0, 1)  # noqa: E731  (T, 3, H, W) in [0, 1]
                rows.append({"sparse": spec, "prompt": prompt, "seed": seed,
                             **compare(dense, sparse, to_frames(dense), to_frames(sparse), runtime.error_log)})
                runtime.error_log = None
    return rows


# ---------------------------------------------------------------------------------------------
# A diffusers pipeline
# ---------------------------------------------------------------------------------------------


def run_pipeline(pipe, specs: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], call: dict,
                 negative_prompt: Optional[str] = None) -> List[dict]:
    """Each spec: pipe.transformer patched with sparse= (a copy) vs diffusers' own transformer, same seeds."""
    import dit_fast

    dense_transformer = pipe.transformer
    rows, dense_runs = [], {}

    def run(prompt, seed):
        latents = []
        frames = pipe(prompt, negative_prompt=negative_prompt, **call, output_type="pt",
                      generator=torch.Generator().manual_seed(seed),
                      callback_on_step_end=lambda p, i, t, kw: latents.append(kw["latents"]) or {}).frames
        return latents[-1], frames[0]  # (C, F, h, w) latents, (F, 3, H, W) frames in [0, 1]

    try:
        for spec in specs:
            sparse_transformer = dit_fast.patch(copy.deepcopy(dense_transformer),
                                                sparse=SparseAttention.from_spec(spec))
            runtime = sparse_transformer._dit_fast_sparse
            for prompt in prompts:
                for seed in seeds:
                    with torch.no_grad():
                        if (prompt, seed) not in dense_runs:
                            pipe.transformer = dense_transformer
                            dense_runs[prompt, seed] = run(prompt, seed)
                        dense_latent, dense_frames = dense_runs[prompt, seed]
                        pipe.transformer = sparse_transformer
                        runtime.error_log = []
                        sparse_latent, sparse_frames = run(prompt, seed)
                    rows.append({"sparse": spec, "prompt": prompt, "seed": seed,
                                 **compare(dense_latent, sparse_latent, dense_frames, sparse_frames,
                                           runtime.error_log)})
                    runtime.error_log = None
    finally:
        pipe.transformer = dense_transformer
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def summary(rows: List[dict]) -> List[dict]:
    """Per spec: the means over prompts and seeds (PSNR means over finite values)."""
    out = []
    for spec in dict.fromkeys(r["sparse"] for r in rows):
        group = [r for r in rows if r["sparse"] == spec]

        def mean(key, group=group):
            values = [r[key] for r in group if math.isfinite(r[key])]
            return sum(values) / len(values) if values else math.inf

        errors = [s["mean"] for r in group for s in r["attention_error"].values()]
        out.append({"sparse": spec, "runs": len(group), "kept_fraction": mean("kept_fraction"),
                    "attention_error_mean": sum(errors) / len(errors) if errors else 0.0,
                    "latent_psnr": mean("latent_psnr"), "frame_psnr": mean("frame_psnr"),
                    "frame_ssim": mean("frame_ssim")})
    return out


def print_summary(summaries: List[dict]) -> None:
    print(f"{'sparse':<48} {'runs':>4} {'kept':>6} {'attn err':>9} {'latent PSNR':>12} {'frame PSNR':>11} {'SSIM':>7}")
    for s in summaries:
        print(f"{s['sparse']:<48} {s['runs']:>4} {s['kept_fraction']:>6.3f} {s['attention_error_mean']:>9.4f} "
              f"{s['latent_psnr']:>12.2f} {s['frame_psnr']:>11.2f} {s['frame_ssim']:>7.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparse", action="append", default=None,
                   help="a SparseAttention spec (repeat to compare); default: the checkpoint's own --sparse")
    p.add_argument("--checkpoint", default=None, help="a dit_fast checkpoint (default: the bundled model)")
    p.add_argument("--dense-checkpoint", default=None,
                   help="the dense reference (default: --checkpoint's weights, dense); e.g. the model a sparse "
                        "fine-tune started from")
    p.add_argument("--pipeline", default=None, help="a diffusers pipeline (DiffusionPipeline.from_pretrained)")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    p.add_argument("--seeds", default="0,1", help="comma-separated noise seeds")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--json", default=None, help="write the rows and the summary here")
    args = p.parse_args(argv)
    if args.sparse is None and args.pipeline:
        p.error("--pipeline needs --sparse SPEC")
    args.sparse = args.sparse or [""]
    try:
        for spec in filter(None, args.sparse):
            SparseAttention.from_spec(spec)
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as exc:
        p.error(str(exc))
    start = time.time()
    if args.pipeline:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.pipeline)
        call = dict(height=args.height, width=args.width, num_frames=args.frames)
        if args.steps:
            call["num_inference_steps"] = args.steps
        if args.cfg is not None:
            call["guidance_scale"] = args.cfg
        rows, model = run_pipeline(pipe, args.sparse, args.prompts, seeds, call), args.pipeline
    else:
        rows = run_checkpoint(args.checkpoint, args.sparse, args.prompts, seeds, args.steps, args.cfg,
                              args.dense_checkpoint)
        model = args.checkpoint or "bundled: dit_fast/assets/shapes_t2v.safetensors"
        if args.dense_checkpoint:
            model += f" vs dense {args.dense_checkpoint}"
    summaries = summary(rows)
    print_summary(summaries)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            command = " ".join(["python -m benchmarks.sparse_quality", *(sys.argv[1:] if argv is None else argv)])
            json.dump({"command": command,
                       "model": model, "device": device,
                       "torch": torch.__version__, "wall_s": round(time.time() - start, 1),
                       "summary": summaries, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
