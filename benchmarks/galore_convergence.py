"""Convergence: the same tiny DiTVideo trained with AdamW and with GaLoreAdamW (rank = width / 4), on CPU.

    python benchmarks/galore_convergence.py [--steps 400] [--out benchmarks/results/galore_convergence]

Task: DDPM noise prediction (DiT's linear betas, 1000 steps) on synthetic class-conditioned clips
(B, 4, 2, 8, 8): each class is a travelling sinusoid with its own frequency and direction, with a
random phase and amplitude per sample. Every optimizer sees the same batches, timesteps and noise.
The evaluation loss is the same 64 fixed (clip, t, noise) triples at every checkpoint. Writes
<out>.json (rows of the loss curves and the final eval losses) and <out>.png (the curves).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

from dit_fast.models import DiTVideo
from dit_fast.optim import GaLoreAdamW, galore_param_groups

HIDDEN, DEPTH, HEADS, CLASSES = 64, 4, 4, 10
SHAPE = (4, 2, 8, 8)  # C, T, H, W


def make_clips(labels, gen):
    """Class-dependent travelling waves: frequency, direction and channel mix depend on the label."""
    b = labels.shape[0]
    c, t, h, w = SHAPE
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    freq = 0.4 + 0.15 * labels.float()  # (B,)
    angle = labels.float() * (2 * math.pi / CLASSES)
    phase = torch.rand(b, generator=gen) * 2 * math.pi
    amp = 0.7 + 0.6 * torch.rand(b, generator=gen)
    f, cos, sin = freq.view(-1, 1, 1, 1), torch.cos(angle).view(-1, 1, 1, 1), torch.sin(angle).view(-1, 1, 1, 1)
    arg = f * (cos * xx + sin * yy) + 0.8 * tt + phase.view(-1, 1, 1, 1)  # (B, T, H, W)
    chan = torch.arange(c).float()
    mix = chan.view(1, -1, 1, 1, 1) * (1 + labels.float().view(-1, 1, 1, 1, 1) / 5)
    clip = torch.sin(arg[:, None] + mix)
    return amp[:, None, None, None, None] * clip  # (B, C, T, H, W)


def diffusion_batch(gen, batch, alphas_bar):
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    x0 = make_clips(labels, gen)
    t = torch.randint(0, len(alphas_bar), (batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas_bar[t].view(-1, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, labels, noise


def loss_of(model, batch):
    xt, t, labels, noise = batch
    out = model(xt, t, labels)  # (B, 2C, T, H, W): eps and learned sigma
    return torch.nn.functional.mse_loss(out[:, : SHAPE[0]], noise)


def build_model():
    torch.manual_seed(0)
    return DiTVideo(input_size=SHAPE[1:], patch_size=(1, 2, 2), in_channels=SHAPE[0], hidden_size=HIDDEN, depth=DEPTH,
                    num_heads=HEADS, num_classes=CLASSES, class_dropout_prob=0.0, backend="torch")


def make_optimizer(name, model, lr):
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state_dtype = name.split()[-1]
    groups = galore_param_groups(model, rank=HIDDEN // 4, target="linear", update_proj_gap=50, scale=1.0)
    return GaLoreAdamW(groups, lr=lr, weight_decay=0.0, state_dtype=state_dtype, backend="torch")


def run(name, steps, batch, lr, eval_batch, alphas_bar, eval_every):
    model = build_model()
    model.train()
    opt = make_optimizer(name, model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # 20-step warm-up
    gen = torch.Generator().manual_seed(1)
    train, evals = [], []
    start = time.time()
    for step in range(steps):
        loss = loss_of(model, diffusion_batch(gen, batch, alphas_bar))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        train.append(loss.item())
        if (step + 1) % eval_every == 0 or step == 0:
            with torch.no_grad():
                evals.append((step + 1, loss_of(model, eval_batch).item()))
    return dict(optimizer=name, train_loss=train, eval_loss=evals, seconds=time.time() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizers", default="AdamW,GaLore fp32,GaLore int8")
    parser.add_argument("--out", default="benchmarks/results/galore_convergence")
    args = parser.parse_args()
    torch.set_num_threads(1)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_bar = torch.cumprod(1 - betas, 0).float()
    eval_batch = diffusion_batch(torch.Generator().manual_seed(12345), 64, alphas_bar)
    runs = []
    for name in args.optimizers.split(","):
        runs.append(run(name, args.steps, args.batch, args.lr, eval_batch, alphas_bar, eval_every=max(1, args.steps // 20)))
        r = runs[-1]
        print(f"{name:12s} final eval {r['eval_loss'][-1][1]:.4f}  last-50 train {sum(r['train_loss'][-50:]) / len(r['train_loss'][-50:]):.4f}"
              f"  ({r['seconds']:.0f} s)", flush=True)
    base = runs[0]["eval_loss"][-1][1]
    summary = {r["optimizer"]: dict(final_eval_loss=r["eval_loss"][-1][1], ratio_to_adamw=r["eval_loss"][-1][1] / base,
                                    mean_train_loss_last_50=sum(r["train_loss"][-50:]) / len(r["train_loss"][-50:])) for r in runs}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(benchmark="galore_convergence", device="cpu", command=" ".join(["python"] + sys.argv),
                  model=f"DiTVideo hidden {HIDDEN}, depth {DEPTH}, heads {HEADS}, input {SHAPE}, patch (1,2,2)",
                  galore=f"rank {HIDDEN // 4} (width/4), all linears projected, update_proj_gap 50, scale 1.0, svd refresh",
                  steps=args.steps, batch=args.batch, lr=args.lr, torch=torch.__version__,
                  python=platform.python_version(), commit=commit, summary=summary, runs=runs)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        k = 20
        smooth = [sum(r["train_loss"][max(0, i - k + 1): i + 1]) / len(r["train_loss"][max(0, i - k + 1): i + 1])
                  for i in range(len(r["train_loss"]))]
        axes[0].plot(range(1, len(smooth) + 1), smooth, label=r["optimizer"])
        axes[1].plot(*zip(*r["eval_loss"]), marker="o", ms=3, label=r["optimizer"])
    axes[0].set_title("train loss (moving average, 20 steps)")
    axes[1].set_title("eval loss (64 fixed clip/t/noise triples)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"tiny DiTVideo (CPU): AdamW vs GaLoreAdamW rank {HIDDEN // 4}, {args.steps} steps, lr {args.lr}")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
