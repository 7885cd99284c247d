"""Whole-model benchmark: a DiT-XL-size video model, dit_fast kernels vs PyTorch, training and sampling.

Model: DiTVideo at DiT-XL size (28 blocks, width 1152, 16 heads), 16 latent frames of 32x32x4 with
patch (1, 2, 2): 4096 tokens per sample, full spacetime attention, class-conditional (1000 classes).
Same inputs and weights for every provider, in one run:

    ours-triton          DiTVideo(backend="triton"), eager PyTorch around the fused kernels
    ours-triton-galore   the same with GaLoreAdamW (rank 256, int8 states) instead of AdamW (train only)
    eager                DiTVideo(backend="torch"): the readable reference model, eager
    compile              torch.compile of that reference model (default mode)

    train   one optimizer step: bf16 autocast forward, backward, AdamW (fp32 master weights, fp32 states)
    sample  50 Euler steps of rectified flow with classifier-free guidance (batch doubled), bf16 weights

peak_mem_bytes of a train row is the absolute peak during one step (weights + grads + optimizer state +
activations); of a sample row, the peak above the loaded weights. FLOPs counted: 6 * params * tokens
(train) and 2 * params * tokens per forward (sample), plus attention 4 * B * heads * N^2 * D (fwd) and
2.5x that (fwd+bwd).

Targets (issue 5): train ours-triton >= 1.5x eager and >= 1.15x compile; peak memory <= the
reference's, and <= 0.6x with GaLoreAdamW.

    python -m benchmarks.bench_model [--quick] [--device cuda]
    python benchmarks/bench_model.py            # on a CPU-only machine: says so, runs a tiny smoke, exits 0
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from dit_fast.diffusion import RectifiedFlow
from dit_fast.models import DiT_models

OP = "model"
MODEL = "DiT-XL/1x2x2-video"
INPUT = (16, 32, 32)  # latent frames, height, width
CHANNELS = 4
SAMPLING_STEPS = 50
CFG_SCALE = 4.0
TRAIN_PROVIDERS = ("ours-triton", "ours-triton-galore", "eager", "compile")
SAMPLE_PROVIDERS = ("ours-triton", "eager", "compile")


def build(provider: str, device, *, name: str = MODEL, input_size=INPUT, **overrides):
    """The benchmark model for ``provider``, weights from seed 0 (identical across providers)."""
    torch.manual_seed(0)
    backend = "torch" if provider in ("eager", "compile") else "triton"
    model = DiT_models[name](input_size=input_size, num_classes=1000, backend=backend, **overrides).to(device)
    return model


def _forward(model, provider):
    return torch.compile(model) if provider == "compile" else model


def _optimizer(model, provider):
    if provider.endswith("galore"):
        from dit_fast.optim import GaLoreAdamW, galore_param_groups

        return GaLoreAdamW(galore_param_groups(model, rank=256, state_dtype="int8"), lr=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(next(model.parameters()).device).type == "cuda")


def setup_train(provider: str, device, batch: int, **model_kwargs) -> Callable[[], object]:
    """fn() runs one training step of ``provider`` on fixed inputs."""
    model = build(provider, device, **model_kwargs).train()
    fwd = _forward(model, provider)
    opt = _optimizer(model, provider)
    flow = RectifiedFlow()
    T, H, W = model.input_size
    gen = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(batch, CHANNELS, T, H, W, device=device, generator=gen)
    y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    t = torch.rand(batch, device=device, generator=gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = flow.training_losses(fwd, x0, {"y": y}, t=t, noise=noise)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.model = model
    return step


def setup_sample(provider: str, device, batch: int, steps: int = SAMPLING_STEPS, **model_kwargs):
    """fn() runs one ``steps``-step guided generation of ``provider`` (bf16 weights)."""
    model = build(provider, device, **model_kwargs).to(torch.bfloat16).eval()
    if provider == "compile":
        model.forward = torch.compile(model.forward)  # forward_with_cfg calls self.forward: compiled too
    flow = RectifiedFlow()
    T, H, W = model.input_size
    y = torch.arange(batch, device=device) % 1000

    def generate():
        gen = torch.Generator(device=device).manual_seed(2)
        return flow.sample(model, (batch, CHANNELS, T, H, W), steps=steps, model_kwargs={"y": y},
                           cfg_scale=CFG_SCALE, generator=gen, device=device, dtype=torch.bfloat16,
                           progress_bar=False)

    generate.model = model
    return generate


def _flops(model, batch: int, train: bool) -> float:
    params = sum(p.numel() for p in model.parameters())
    N = 1
    for g in model.grid:
        N *= g
    D = model.hidden_size
    attention = 4 * batch * N * N * D * len(model.blocks)  # QK^T and PV, fwd
    if train:
        return 6 * params * batch * N + 3.5 * attention
    return 2 * params * batch * N + attention


def _absolute_peak(fn, device) -> Optional[int]:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _release():
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(device="cuda", quick: bool = False, write: bool = True) -> List[dict]:
    if not common.require_cuda(device):
        smoke()
        return []
    if torch.device(device).type != "cuda":
        print(f"{common.GPU_MESSAGE}: the model benchmark times a DiT-XL-size model on a GPU only.")
        smoke()
        return []
    rows: List[dict] = []
    train_batch = 1 if quick else 2
    sample_batch = 1
    steps = 10 if quick else SAMPLING_STEPS
    shape = {"model": MODEL, "T": INPUT[0], "H": INPUT[1], "W": INPUT[2], "C": CHANNELS, "patch": [1, 2, 2],
             "tokens": INPUT[0] * INPUT[1] * INPUT[2] // 4}
    for provider in TRAIN_PROVIDERS:
        if common.out_of_time():
            break
        step = setup_train(provider, device, train_batch)
        step()  # compile, autotune and allocate the optimizer state outside the timing
        peak = _absolute_peak(step, device)
        timing = common.time_fn(step, device, warmup_ms=200, rep_ms=2000, min_reps=5, flush_l2=False)
        rows.append(common.make_row(OP, "train", provider, {**shape, "B": train_batch}, torch.bfloat16, timing,
                                    device=device, flops=_flops(step.model, train_batch, True),
                                    peak_mem_bytes=peak))
        print(f"train  {provider:20s} {timing.median_ms:9.1f} ms  peak {peak / 2**30:6.2f} GiB", flush=True)
        del step
        _release()
    for provider in SAMPLE_PROVIDERS:
        if common.out_of_time():
            break
        generate = setup_sample(provider, device, sample_batch, steps)
        generate()
        peak = common.peak_memory(generate, device)
        timing = common.time_fn(generate, device, warmup_ms=0, rep_ms=0, min_reps=3, flush_l2=False)
        rows.append(common.make_row(OP, f"sample{steps}", provider, {**shape, "B": sample_batch, "cfg": CFG_SCALE},
                                    torch.bfloat16, timing, device=device,
                                    flops=steps * _flops(generate.model, 2 * sample_batch, False),
                                    peak_mem_bytes=peak))
        print(f"sample {provider:20s} {timing.median_ms:9.1f} ms  peak {peak / 2**30:6.2f} GiB", flush=True)
        del generate
        _release()
    if write and rows:
        print(f"rows appended to {common.write_rows(rows, OP)}")
    common.print_ratio_table(rows, metric="tflops")
    _print_targets(rows)
    return rows


def _print_targets(rows: List[dict]) -> None:
    by: Dict[tuple, dict] = {(r["variant"], r["provider"]): r for r in rows}
    ours, eager, comp, galore = (by.get(("train", p)) for p in ("ours-triton", "eager", "compile", "ours-triton-galore"))
    checks = []
    if ours and eager:
        checks.append(("train vs eager >= 1.5x", eager["median_ms"] / ours["median_ms"], 1.5, True))
        checks.append(("train peak <= eager's", ours["peak_mem_bytes"] / eager["peak_mem_bytes"], 1.0, False))
    if ours and comp:
        checks.append(("train vs compile >= 1.15x", comp["median_ms"] / ours["median_ms"], 1.15, True))
    if galore and eager:
        checks.append(("GaLore peak <= 0.6x eager's", galore["peak_mem_bytes"] / eager["peak_mem_bytes"], 0.6, False))
    for name, value, target, higher in checks:
        ok = value >= target if higher else value <= target
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value:.2f}")


def smoke() -> None:
    """Tiny CPU check of the benchmark's code paths: a training step and a 2-step guided generation."""
    kwargs = dict(name="DiT-tiny", input_size=(2, 4, 4), learn_sigma=False)
    loss = setup_train("eager", "cpu", batch=1, **kwargs)()
    sample = setup_sample("eager", "cpu", batch=1, steps=2, **kwargs)()
    assert loss.isfinite() and sample.isfinite().all() and sample.shape == (1, CHANNELS, 2, 4, 4)
    print("[model] smoke: a training step and a 2-step guided generation of DiT-tiny ran on CPU (eager)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 10 sampling steps")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append result rows")
    args = parser.parse_args(argv)
    run(args.device, quick=args.quick, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
