"""What sequence parallelism and FSDP2 + GaLore leave on each GPU, measured on one GPU.

    python -m benchmarks.bench_parallel                       # GPU: both parts, DiT-XL block, H200-sized model
    python -m benchmarks.bench_parallel --part compute --tokens 32768 --degrees 2,4,8,16
    python -m benchmarks.bench_parallel --part memory --memory-hidden 4096 --memory-depths 16,32
    python -m benchmarks.bench_parallel --cpu-smoke           # tiny CPU run of both parts (tests)

One GPU cannot show scaling, so it measures each rank's share of the work:

compute  a DiT-XL block (width 1152, 16 heads, MLP 4x, 3D RoPE, full attention) forward + backward on
         S tokens (one GPU doing everything) against what a rank of N does:
           Ulysses  the block's token-local work (adaLN, qkv / out projections, MLP) on S / N tokens
                    + attention over all S tokens for 16 / N heads (the kernels);
           ring     the same token-local work + N blocks of attention of S / N queries against S / N
                    keys (attention_parts' kernels, merged by LSE; backward from the merged output).
         efficiency = (one GPU / N) / rank time. The all-to-all and ring bytes a rank sends per block
         are benchmarks/parallel_plan.py's (exact, tested); their time at a link bandwidth
         (--link-gbps, default NVLink 4's 450 GB/s per direction) is a prediction, not measured.
memory   the peak of two training steps of a DiTVideo that fills the card, FSDP2 (apply_fsdp, bf16
         compute, fp32 master weights and gradients) on a 1-rank mesh, with AdamW vs GaLoreAdamW int8
         (rank 256, every linear, randomized refresh), gradient checkpointing, 1024 tokens; beside
         parallel_plan's prediction of the same (weights + gradients + states + FSDP buffers +
         activations). "OOM" when a configuration does not fit.
"""

import argparse
import datetime
import json
import os
import tempfile
from typing import List

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import parallel_plan as plan
from benchmarks.common import device_name, require_cuda, time_fn

GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# compute: one rank's share of a block
# ---------------------------------------------------------------------------------------------


class _TokenLocalAttention(nn.Module):
    """A SpacetimeAttention's work without the attention: qkv projection, v through, output projection
    (the per-token part that stays on a rank; its attention is timed separately)."""

    def __init__(self, attn):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj

    def forward(self, x, grid):
        B, L, C = x.shape
        v = self.qkv(x).reshape(B, L, 3, C)[:, :, 2]  # (B, L, C)
        return self.proj(v)


def _grid(tokens: int, frame: int):
    """A (T, H, W) grid of ``tokens`` tokens with frames of ``frame`` = H * W tokens (square-ish)."""
    h = int(frame ** 0.5)
    while frame % h:
        h -= 1
    return (tokens // frame, h, frame // h)


def _block(hidden, heads, backend, device, dtype):
    from dit_fast.models.dit_video import DiTVideoBlock
    from dit_fast.ops.rope import RoPE3D
    torch.manual_seed(0)
    return DiTVideoBlock(hidden, heads, 4.0, mode="full", rope=RoPE3D(), backend=backend).to(device, dtype)


def _block_step(block, tokens, grid, hidden, device, dtype):
    """fn() running block forward + backward on (1, tokens, hidden) and its grads to reset."""
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    c = torch.randn(1, hidden, device=device, dtype=dtype)
    gx, gb = torch.randn_like(x), torch.randn_like(x)

    def fn():
        out, _, branch = block(x, None, None, c, grid)
        torch.autograd.backward([out, branch], [gx, gb])
    return fn, [x] + list(block.parameters())


def _attention_step(tokens, heads, head_dim, grid, backend, device, dtype):
    from dit_fast.ops.flash_attention import spacetime_attention
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def fn():
        spacetime_attention(q, k, v, grid, rope="3d", backend=backend).backward(dout)
    return fn, [q, k, v]


def _ring_attention_step(chunk, degree, heads, head_dim, backend, device, dtype):
    """One rank of a ring of ``degree``: its chunk's queries against ``degree`` key blocks, forward and backward."""
    from dit_fast.parallel.attention_parts import attention_block_backward, attention_block_forward, merge_partials
    q = torch.randn(1, chunk, heads, head_dim, device=device, dtype=dtype)
    blocks = [tuple(torch.randn_like(q) for _ in range(2)) for _ in range(degree)]
    dout = torch.randn_like(q)

    def fn():
        out = lse = None
        for k, v in blocks:
            o, s = attention_block_forward(q, k, v, backend=backend)
            out, lse = (o.float(), s) if out is None else merge_partials(out, lse, o, s)
        out = out.to(dtype)
        for k, v in blocks:
            attention_block_backward(q, k, v, out, lse, dout, backend=backend)
    return fn


def compute_rows(tokens: int, degrees, device, *, hidden=1152, heads=16, frame=1024, backend="auto",
                 dtype=torch.bfloat16, link_gbps=450.0, quick=False) -> List[dict]:
    timing = dict(warmup_ms=5, rep_ms=20, min_reps=2) if quick else {}
    head_dim = hidden // heads
    grid = _grid(tokens, frame)
    block = _block(hidden, heads, backend, device, dtype)
    fn, grads = _block_step(block, tokens, grid, hidden, device, dtype)
    one = time_fn(fn, device, grad_to_none=grads, **timing).median_ms
    local_block = _block(hidden, heads, backend, device, dtype)
    local_block.attn = _TokenLocalAttention(local_block.attn)
    rows = []
    for n in degrees:
        if tokens % n or heads % n or grid[0] % n:
            print(f"skip N={n}: {tokens} tokens, {heads} heads and {grid[0]} frames must divide by it")
            continue
        chunk = tokens // n
        local_grid = (grid[0] // n, grid[1], grid[2])
        fn, grads = _block_step(local_block, chunk, local_grid, hidden, device, dtype)
        t_local = time_fn(fn, device, grad_to_none=grads, **timing).median_ms
        fn, grads = _attention_step(tokens, heads // n, head_dim, grid, backend, device, dtype)
        t_ulysses_attn = time_fn(fn, device, grad_to_none=grads, **timing).median_ms
        t_ring_attn = time_fn(_ring_attention_step(chunk, n, heads, head_dim, backend, device, dtype), device,
                              **timing).median_ms
        a2a = plan.ulysses_bytes(chunk, hidden, n, 1, item=2)
        ring = plan.ring_bytes(chunk, hidden, 1, n, 1, item=2)
        rows.append(dict(tokens=tokens, degree=n, one_gpu_ms=one, local_ms=t_local,
                         ulysses_attn_ms=t_ulysses_attn, ring_attn_ms=t_ring_attn,
                         ulysses_rank_ms=t_local + t_ulysses_attn, ring_rank_ms=t_local + t_ring_attn,
                         ulysses_efficiency=one / n / (t_local + t_ulysses_attn),
                         ring_efficiency=one / n / (t_local + t_ring_attn),
                         a2a_bytes=a2a, ring_bytes=ring,
                         a2a_ms_predicted=a2a / (link_gbps * 1e9) * 1e3, ring_ms_predicted=ring / (link_gbps * 1e9) * 1e3))
    print(f"\ncompute: one block fwd+bwd, width {hidden}, {heads} heads, grid {grid}, {dtype}, backend {backend}; "
          f"one GPU {one:.3f} ms; link {link_gbps:.0f} GB/s for the predicted transfer times")
    print(f"{'N':>4} {'local ms':>9} {'U attn':>9} {'U rank':>9} {'U eff':>6} {'R attn':>9} {'R rank':>9} {'R eff':>6} "
          f"{'a2a MiB':>8} {'a2a ms*':>8} {'ring MiB':>9} {'ring ms*':>8}")
    for r in rows:
        print(f"{r['degree']:>4} {r['local_ms']:>9.3f} {r['ulysses_attn_ms']:>9.3f} {r['ulysses_rank_ms']:>9.3f} "
              f"{r['ulysses_efficiency']:>6.2f} {r['ring_attn_ms']:>9.3f} {r['ring_rank_ms']:>9.3f} "
              f"{r['ring_efficiency']:>6.2f} {r['a2a_bytes'] / 2**20:>8.1f} {r['a2a_ms_predicted']:>8.3f} "
              f"{r['ring_bytes'] / 2**20:>9.1f} {r['ring_ms_predicted']:>8.3f}")
    print("(* predicted from the bytes, not measured)")
    return rows


# ---------------------------------------------------------------------------------------------
# memory: FSDP2 + AdamW vs FSDP2 + GaLore int8 on a 1-rank mesh
# ---------------------------------------------------------------------------------------------


def _one_rank_group(device) -> bool:
    """A 1-rank process group (FileStore in a temp dir) unless one exists; True if this call made it."""
    if dist.is_initialized():
        return False
    store = os.path.join(tempfile.mkdtemp(prefix="bench_parallel_"), "store")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                            world_size=1, timeout=datetime.timedelta(minutes=5))
    return True


def _memory_config(hidden, depth, heads):
    return dict(hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=4.0, patch_size=(1, 2, 2), in_channels=4,
                num_classes=0, learn_sigma=False, pos="rope")


def _predicted_bytes(config, optimizer, tokens, galore_rank):
    from dit_fast.optim import galore_param_groups
    model = plan.build_meta(config)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "AdamW":
        states = plan.adamw_state_bytes(params)
    else:
        states = plan.galore_groups_bytes(galore_param_groups(model, rank=galore_rank, target="linear"), "int8")
    block = sum(p.numel() for p in model.blocks[0].parameters())
    acts = plan.activation_bytes(config, tokens, checkpointing=True)
    return dict(weights_grads=2 * plan.param_bytes(params), states=states, fsdp_buffers=3 * 2 * block,
                activations=acts, num_params=sum(p.numel() for p in params))


def memory_rows(device, *, hidden=4096, depths=(16, 32), heads=32, grid=(4, 16, 16), steps=2, galore_rank=256,
                backend="auto") -> List[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from dit_fast.models.dit_video import DiTVideo
    from dit_fast.optim import GaLoreAdamW, galore_param_groups
    from dit_fast.parallel.fsdp import apply_fsdp
    made = _one_rank_group(device)
    rows = []
    try:
        mesh = init_device_mesh(device.type, (1,))
        tokens = grid[0] * grid[1] * grid[2]
        for depth in depths:
            config = _memory_config(hidden, depth, heads)
            for optimizer in ("AdamW", "GaLore int8"):
                predicted = _predicted_bytes(config, optimizer, tokens, galore_rank)
                row = dict(hidden=hidden, depth=depth, optimizer=optimizer, tokens=tokens, **predicted,
                           predicted_bytes=sum(v for k, v in predicted.items() if k != "num_params"))
                model = opt = None
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    torch.manual_seed(0)
                    with torch.device(device):
                        model = DiTVideo(input_size=tuple(g * p for g, p in zip(grid, (1, 2, 2))), backend=backend,
                                         gradient_checkpointing=True, **config)
                    apply_fsdp(model, mesh, mixed_precision="bf16")
                    if optimizer == "AdamW":
                        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                    else:
                        opt = GaLoreAdamW(galore_param_groups(model, rank=galore_rank, target="linear",
                                                              refresh="randomized", state_dtype="int8"), lr=1e-4)
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn((1, 4, *model.input_size), generator=g).to(device)
                    t = torch.randint(0, 1000, (1,), generator=g).to(device)
                    for _ in range(steps):
                        model(x, t).float().square().mean().backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    row["state_bytes"] = sum(v.to_local().numel() * v.element_size() if hasattr(v, "to_local")
                                             else v.numel() * v.element_size()
                                             for st in opt.state.values() for v in st.values()
                                             if isinstance(v, torch.Tensor))
                    row["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                except torch.cuda.OutOfMemoryError:
                    row["peak_bytes"] = "OOM"
                finally:
                    del model, opt
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
    finally:
        if made:
            dist.destroy_process_group()
    print(f"\nmemory: FSDP2 (1 rank, bf16 compute, fp32 weights/grads), checkpointing, {rows[0]['tokens'] if rows else 0} "
          f"tokens, {steps} steps; GiB")
    print(f"{'params':>8} {'optimizer':>12} {'peak':>8} {'predicted':>9} {'states':>8} {'states pred':>11}")
    for r in rows:
        peak = r["peak_bytes"]
        peak = "n/a" if peak is None else ("OOM" if peak == "OOM" else f"{peak / GIB:.2f}")
        states = r.get("state_bytes")
        print(f"{r['num_params'] / 1e9:>7.2f}B {r['optimizer']:>12} {peak:>8} {r['predicted_bytes'] / GIB:>9.2f} "
              f"{'-' if states is None else f'{states / GIB:.3f}':>8} {r['states'] / GIB:>11.3f}")
    return rows


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("compute", "memory", "both"), default="both")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--degrees", default="2,4,8,16")
    parser.add_argument("--link-gbps", type=float, default=450.0)
    parser.add_argument("--memory-hidden", type=int, default=4096)
    parser.add_argument("--memory-depths", default="16,32")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the PyTorch paths)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    out = {}
    if args.cpu_smoke:
        device = torch.device("cpu")
        print("cpu smoke: tiny sizes on the CPU, PyTorch reference paths (no GPU figures)")
        out["compute"] = compute_rows(64, (2, 4), device, hidden=64, heads=4, frame=16, backend="torch",
                                      dtype=torch.float32, quick=True)
        out["memory"] = memory_rows(device, hidden=64, depths=(2,), heads=4, grid=(2, 4, 4), galore_rank=8,
                                    backend="torch")
    else:
        device = torch.device("cuda")
        if not require_cuda(device):
            return out
        print(f"device: {device_name(device)}")
        if args.part in ("compute", "both"):
            out["compute"] = compute_rows(args.tokens, [int(d) for d in args.degrees.split(",")], device,
                                          link_gbps=args.link_gbps, quick=args.quick)
        if args.part in ("memory", "both"):
            out["memory"] = memory_rows(device, hidden=args.memory_hidden,
                                        depths=[int(d) for d in args.memory_depths.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
