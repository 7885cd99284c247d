"""Optimizer-state bytes, exactly, for a DiT-XL/2-shaped parameter set: AdamW vs GaLoreAdamW.

    python benchmarks/galore_memory.py [--rank 256] [--out benchmarks/results/galore_memory.json]

The parameters are DiT-XL/2's (facebookresearch/DiT: depth 28, hidden 1152, 16 heads, patch 2,
4 input channels, learned sigma, 1000 classes + the CFG null class, mlp ratio 4), built on the meta
device: 675,129,632 parameters (674,834,720 trainable: pos_embed is frozen), nothing allocated. State bytes are counted per parameter:
  AdamW (torch.optim.AdamW): exp_avg + exp_avg_sq in the parameter dtype + a float32 step tensor;
  GaLoreAdamW: dit_fast.optim.state_bytes_for, the allocation the optimizer makes (checked equal to
  the live optimizer's state bytes in tests/test_galore.py::test_state_bytes_formula_is_exact).
Training memory is analytic (weights + gradients + optimizer states, fp32, activations excluded):
per-layer mode holds only the largest gradient alive at once instead of all of them.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
from torch import nn

from dit_fast.optim import galore_param_groups, state_bytes_for


class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class _Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)


class _Block(nn.Module):
    """DiTBlock's parameters: norm1/norm2 have no affine parameters in DiT."""

    def __init__(self, d, mlp_ratio):
        super().__init__()
        self.attn = _Attention(d)
        self.mlp = _Mlp(d, int(d * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))


class DiTShapes(nn.Module):
    """DiT's parameter set (names as in facebookresearch/DiT models.py); pos_embed is frozen, as there."""

    def __init__(self, depth=28, hidden=1152, patch=2, in_channels=4, num_classes=1000, mlp_ratio=4.0,
                 learn_sigma=True, frequency_embedding_size=256):
        super().__init__()
        out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = nn.Module()
        num_patches = (32 // patch) ** 2  # 256x256 images -> 32x32 latents
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden), requires_grad=False)  # fixed sin-cos
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(),
                                            nn.Linear(hidden, hidden))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden)  # + CFG null class
        self.blocks = nn.ModuleList([_Block(hidden, mlp_ratio) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))


def adamw_state_bytes(p):
    return 2 * p.numel() * p.element_size() + 4  # exp_avg, exp_avg_sq, step (float32 scalar tensor)


def galore_state_bytes(groups, state_dtype):
    total = 0
    for group in groups:
        for p in group["params"]:
            total += state_bytes_for(p.shape, p.dtype, group.get("rank"), group.get("proj_type", "std"), state_dtype)
    return total


def measure_peak(model_name: str, rank: int, device, batch: int, steps: int = 3) -> list:
    """Peak allocated bytes of real training steps (GPU): AdamW vs GaLoreAdamW on dit_fast's DiTVideo.

    Same model, inputs and loss per configuration; the peak includes the activations (the same for
    all), so the differences are the optimizer's. On CPU the peak is not tracked (None).
    """
    from dit_fast.models import DiT_models
    from dit_fast.optim import GaLoreAdamW

    device = torch.device(device)
    cuda = device.type == "cuda"
    configs = ("AdamW", "GaLore fp32", "GaLore int8", "GaLore int8 per-layer")
    rows = []
    for config in configs:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model = DiT_models[model_name](class_dropout_prob=0.0).to(device)
        if config == "AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            groups = galore_param_groups(model, rank=rank, target="linear", update_proj_gap=200, scale=0.25)
            opt = GaLoreAdamW(groups, lr=1e-4, state_dtype=config.split()[1], per_layer=config.endswith("per-layer"))
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn((batch, model.in_channels, *model.input_size), generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        for _ in range(steps):
            model(x, t, y).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        rows.append(dict(config=config, peak_bytes=peak, state_bytes=state))
        print(f"{config:24s} state {state / 2**20:9.1f} MiB   peak "
              f"{'n/a (CPU)' if peak is None else f'{peak / 2**30:.2f} GiB'}", flush=True)
        del model, opt
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/galore_memory.json")
    parser.add_argument("--measure-peak", default=None, metavar="DEVICE",
                        help="also train DiTVideo DiT-XL/2 for 3 steps per configuration on DEVICE (cuda) and "
                             "report the measured peak memory; written to <out>_peak_<device>.json")
    parser.add_argument("--peak-model", default="DiT-XL/2")
    parser.add_argument("--peak-batch", type=int, default=8)
    args = parser.parse_args()

    with torch.device("meta"):
        model = DiTShapes()
    n_params = sum(p.numel() for p in model.parameters())  # 675,129,632 with the frozen pos_embed
    params = [p for p in model.parameters() if p.requires_grad]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_grad = max(p.numel() * p.element_size() for p in params)
    adamw = sum(adamw_state_bytes(p) for p in params)

    targets = {
        # the default of galore_param_groups: attention and MLP linears
        "attn+mlp": None,
        # every Linear of the blocks and the final layer, adaLN modulations included
        "all linears": "linear",
    }
    rows = [dict(config="AdamW fp32", state_bytes=adamw, ratio_to_adamw=1.0, projected_params=0,
                 train_bytes=weight_bytes * 2 + adamw, train_bytes_per_layer=weight_bytes + largest_grad + adamw)]
    for target_name, target in targets.items():
        kw = {} if target is None else {"target": target}
        groups = galore_param_groups(model, rank=args.rank, **kw)
        projected = sum(p.numel() for g in groups if "rank" in g for p in g["params"])
        for state_dtype in ("fp32", "bf16", "int8"):
            state = galore_state_bytes(groups, state_dtype)
            rows.append(dict(config=f"GaLore {state_dtype}, rank {args.rank}, {target_name}", state_bytes=state,
                             ratio_to_adamw=state / adamw, projected_params=projected,
                             train_bytes=weight_bytes * 2 + state,
                             train_bytes_per_layer=weight_bytes + largest_grad + state))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(benchmark="galore_memory", model="DiT-XL/2 parameter shapes (meta device)", params=n_params,
                  trainable_params=sum(p.numel() for p in params),
                  rank=args.rank, weight_bytes=weight_bytes, command=" ".join(["python"] + sys.argv),
                  torch=torch.__version__, python=platform.python_version(), commit=commit,
                  note="state bytes exact (tensor bytes the optimizers allocate); train_bytes analytic: "
                       "weights + grads + states, fp32, activations excluded; per_layer: only the largest "
                       "gradient alive",
                  rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"DiT-XL/2: {n_params:,} parameters ({sum(p.numel() for p in params):,} trainable), rank {args.rank}")
    print(f"{'config':48s} {'state MiB':>10s} {'/AdamW':>7s} {'train GiB':>10s} {'per-layer GiB':>14s}")
    for r in rows:
        print(f"{r['config']:48s} {r['state_bytes'] / 2**20:10.1f} {r['ratio_to_adamw']:7.1%} "
              f"{r['train_bytes'] / 2**30:10.2f} {r['train_bytes_per_layer'] / 2**30:14.2f}")
    if args.measure_peak:
        device = torch.device(args.measure_peak)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak_rows = measure_peak(args.peak_model, args.rank, device, args.peak_batch)
        path = args.out.replace(".json", "") + f"_peak_{device.type}.json"
        with open(path, "w") as f:
            json.dump(dict(benchmark="galore_memory_peak", model=args.peak_model, device=name, rank=args.rank,
                           batch=args.peak_batch, command=" ".join(["python"] + sys.argv), torch=torch.__version__,
                           commit=commit, rows=peak_rows), f, indent=1)


if __name__ == "__main__":
    main()
