"""Plan calculator: per-GPU memory and bytes sent per training step for sequence-parallel + FSDP2 DiTVideo.

    python -m benchmarks.parallel_plan                      # DiT-XL and Wan-14B sizes, 32k-1M tokens, 8-64 GPUs
    python -m benchmarks.parallel_plan --tokens 128k --gpus 16 --galore-rank 512 --json plan.json
    python -m benchmarks.parallel_plan --gpu H200          # mark the totals past 141 GB instead of 80 GB

The setup it describes: one video (batch 1) of S tokens shared by all N GPUs (sequence parallel,
N = ulysses x ring: the largest Ulysses degree that divides both N and the heads, the rest ring),
the model sharded by FSDP2 over the same N GPUs (fp32 master weights, gradients and optimizer
states in row shards; bf16 compute, gradients reduced in fp32), bf16 activations.

Exact (the tests measure the same bytes on CPU, tests/test_parallel_plan.py):
  * parameter, gradient and optimizer-state bytes of a rank: FSDP2's row chunks (torch.chunk) of
    every parameter of the real DiTVideo (built on the meta device); AdamW's two fp32 moments and
    its step; GaLoreAdamW's moments, absmaxes and bases as dit_fast.optim allocates them
    (state_bytes_for on one GPU; on N, the row-split layout of dit_fast/optim/sharded.py);
  * activation bytes of one transformer block (the tensors autograd saves, Triton kernel path),
    with and without gradient checkpointing (then: the block inputs, plus one block recomputed);
  * bytes each rank sends for sequence parallelism (Ulysses all-to-all, ring K/V and dK/dV), as
    dit_fast.parallel.comm.count_traffic counts them.
Predictions (formulas, not measured here): FSDP2's all-gather / reduce-scatter bytes (ring
algorithm: (N - 1) / N of the tensor per rank) and its unsharded working set (two blocks of bf16
weights and one of bf16 gradients in flight), the sequence-parallel transients.
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# ---------------------------------------------------------------------------------------------
# Models: DiTVideo configurations, built on the meta device (no memory)
# ---------------------------------------------------------------------------------------------

MODELS = {
    # DiT-XL/2's transformer on video latents (4 channels, patch 1 x 2 x 2), 3D RoPE, no classes
    "DiT-XL": dict(hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, patch_size=(1, 2, 2), in_channels=4,
                   num_classes=0, learn_sigma=False, pos="rope"),
    # Wan2.1-14B's sizes: width 5120, 40 layers, 40 heads, FFN 13824, umT5 text (4096), 16 latent channels,
    # shared timestep projection with per-block tables (adaLN-single), qk-norm, 3D RoPE
    "Wan-14B": dict(hidden_size=5120, depth=40, num_heads=40, mlp_ratio=2.7, patch_size=(1, 2, 2), in_channels=16,
                    num_classes=0, learn_sigma=False, text_dim=4096, adaln_single=True, qk_norm=True, pos="rope"),
}
TEXT_TOKENS = 512  # Wan's text length
# what one GPU holds, GiB, as nvidia-smi reports the card (81559 MiB on an H100 80 GB SXM, 143771 MiB on an
# H200 141 GB); CUDA's context and PyTorch's allocator take some of it, so a row near the line may still not fit
GPU_MEMORY_GIB = {"H100": 81559 / 1024, "H200": 143771 / 1024}
TOKENS = (32 * 1024, 128 * 1024, 256 * 1024, 1024 * 1024)
GPUS = (8, 16, 32, 64)
GIB = 2 ** 30


def build_meta(config: dict):
    """The DiTVideo of a config on the meta device: real parameter shapes, nothing allocated."""
    from dit_fast.models.dit_video import DiTVideo
    with torch.device("meta"):
        return DiTVideo(input_size=(1, 2, 2), **config)


# ---------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer states per rank (FSDP2 row chunks)
# ---------------------------------------------------------------------------------------------


def row_span(rows: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of rank's rows, as torch.chunk / FSDP2 / DTensor Shard(0) cut them."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def local_numel(shape: Sequence[int], world: int, rank: int) -> int:
    if len(shape) == 0:
        return 1 if rank == 0 else 0  # a scalar is not split (FSDP2 keeps it on the first shard)
    lo, hi = row_span(shape[0], world, rank)
    return (hi - lo) * math.prod(shape[1:])


def param_bytes(params, world: int = 1, rank: int = 0, item: int = 4) -> int:
    """Bytes of this rank's chunks of the parameters (fp32 master weights; gradients are the same)."""
    return sum(local_numel(p.shape, world, rank) * item for p in params)


def adamw_state_bytes(params, world: int = 1, rank: int = 0) -> int:
    """torch.optim.AdamW on the local shards: exp_avg + exp_avg_sq (fp32) and a float32 step per parameter."""
    return sum(2 * 4 * local_numel(p.shape, world, rank) + 4 for p in params)


def _int8_blocks(lo_row: int, hi_row: int, row_numel: int) -> int:
    """256-element absmax blocks of the whole flattened moment that rows [lo, hi) touch."""
    from dit_fast.optim.reference import QBLOCK
    if hi_row <= lo_row or row_numel == 0:
        return 0
    return (hi_row * row_numel - 1) // QBLOCK - lo_row * row_numel // QBLOCK + 1


def _moments_bytes(rows: Tuple[int, int], row_numel: int, state_dtype: str) -> int:
    """Two moments over rows [lo, hi) of a (total, row_numel) moment, stored as state_dtype."""
    numel = (rows[1] - rows[0]) * row_numel
    if state_dtype == "int8":
        return 2 * numel + 2 * 4 * _int8_blocks(rows[0], rows[1], row_numel)  # codes + fp32 absmaxes
    return 2 * numel * {"fp32": 4, "bf16": 2}[state_dtype]


def galore_state_bytes(shape, rank: Optional[int], proj_type: str = "std", state_dtype: str = "fp32",
                       world: int = 1, shard: int = 0, item: int = 4) -> int:
    """GaLoreAdamW's state bytes for one parameter on one rank of a row-split (FSDP2) group of ``world``.

    rank=None: a plain parameter (AdamW moments in state_dtype). Projected (m, n), k = min(rank, m, n):
    right side: basis (k, n) whole, moments (m, k) with the rows; left: basis (m, k) with the rows,
    moments (k, n) in chunks of k; full: (m, k) rows + (k, n) whole, moments (k, k) in chunks of k
    (dit_fast/optim/sharded.py). world=1: dit_fast.optim.state_bytes_for.
    """
    from dit_fast.optim import resolve_side
    shape = tuple(int(s) for s in shape)
    if rank is None or len(shape) != 2:
        if len(shape) == 0:
            return _moments_bytes((0, 1), 1, state_dtype) if shard == 0 else 0
        return _moments_bytes(row_span(shape[0], world, shard), math.prod(shape[1:]), state_dtype)
    m, n = shape
    k = min(rank, m, n)
    side = resolve_side(proj_type, shape)
    rows = row_span(m, world, shard)
    if side == "right":
        return k * n * item + _moments_bytes(rows, k, state_dtype)
    if side == "left":
        return (rows[1] - rows[0]) * k * item + _moments_bytes(row_span(k, world, shard), n, state_dtype)
    return ((rows[1] - rows[0]) * k + k * n) * item + _moments_bytes(row_span(k, world, shard), k, state_dtype)


def galore_groups_bytes(groups, state_dtype: str, world: int = 1, shard: int = 0) -> int:
    """Sum over galore_param_groups(model, ...) groups (projected ones carry "rank")."""
    return sum(galore_state_bytes(p.shape, g.get("rank"), g.get("proj_type", "std"), state_dtype, world, shard)
               for g in groups for p in g["params"])


# ---------------------------------------------------------------------------------------------
# Activations: the bytes autograd saves per transformer block (Triton kernel path)
# ---------------------------------------------------------------------------------------------


def block_activation_bytes(config: dict, tokens: int, *, batch: int = 1, item: int = 2, text_tokens: int = 0,
                           checkpointing: bool = False, norm_stats_item: int = 4) -> int:
    """Bytes one DiTVideoBlock keeps for its backward, for ``tokens`` tokens of ``batch`` samples.

    Per token, in the activation dtype (``item`` bytes), C = width, M = MLP width:
      adaLN + residual (two fused residual-LN-modulate ops): their x and y, 4 C; qkv input C;
      q, k, v 3 C (one qkv tensor); RoPE'd q and k 2 C; attention output C; MLP input C, fc1
      output M and GELU output M. Cross-attention adds its residual-LN x and y 2 C, its q input C,
      q C and output C (and the qk-normed q C). Per token in fp32: two statistics per fused LN (4,
      cross-attention 2 more), one LSE per head per attention. qk-norm (nn.LayerNorm over each head)
      keeps two statistics per head for q and for k, in ``norm_stats_item`` bytes (fp32 on CUDA; the
      input dtype on CPU).
    Per sample: the modulations (6 or 9) x C, the pending gate C (a tensor of its own: a block returns
    no views), and SiLU(c) C (per-block adaLN, not adaLN-single);
    text: the context's k, v 2 L C (and its qk-normed k L C and two statistics per head per key).
    With gradient checkpointing a block keeps only its inputs: the stream x and the pending
    branch (2 C per token) and the pending gate (C per sample).
    """
    C, heads = config["hidden_size"], config["num_heads"]
    M = int(C * config.get("mlp_ratio", 4.0))
    text, qk_norm = bool(config.get("text_dim")), bool(config.get("qk_norm"))
    rope = config.get("pos", "sincos") in ("rope", "both")
    mods = 9 if text else 6
    if checkpointing:
        return batch * (tokens * 2 * C + C) * item
    per_token = 10 * C + 2 * M + (2 * C if rope else 0) + (5 * C if text else 0) + (C if text and qk_norm else 0)
    per_token_fp32 = 4 + heads + (2 + heads if text else 0)
    norm_stats = (4 * heads + (2 * heads if text else 0)) if qk_norm else 0  # per token
    per_sample = mods * C + C + (0 if config.get("adaln_single") else C)
    if text:
        per_sample += 2 * text_tokens * C + (text_tokens * C if qk_norm else 0)
        norm_stats_per_sample = 2 * heads * text_tokens if qk_norm else 0
    else:
        norm_stats_per_sample = 0
    return batch * (tokens * (per_token * item + per_token_fp32 * 4 + norm_stats * norm_stats_item)
                    + per_sample * item + norm_stats_per_sample * norm_stats_item)


def activation_bytes(config: dict, tokens: int, *, checkpointing: bool, item: int = 2, text_tokens: int = 0) -> int:
    """All blocks: depth x one block; with checkpointing, depth x the block inputs + one block recomputed."""
    full = block_activation_bytes(config, tokens, item=item, text_tokens=text_tokens)
    if not checkpointing:
        return config["depth"] * full
    kept = block_activation_bytes(config, tokens, item=item, text_tokens=text_tokens, checkpointing=True)
    return config["depth"] * kept + full


# ---------------------------------------------------------------------------------------------
# Communication per training step (forward + backward), bytes one rank sends
# ---------------------------------------------------------------------------------------------


def sp_split(num_heads: int, sp: int) -> Tuple[int, int]:
    """(ulysses, ring): the largest Ulysses degree dividing both the heads and sp; ring takes the rest."""
    ulysses = max(d for d in range(1, sp + 1) if sp % d == 0 and num_heads % d == 0)
    return ulysses, sp // ulysses


def local_tokens(tokens: int, sp: int) -> int:
    """Tokens per rank, padding included (dit_fast.parallel.sequence.TokenShard's chunk)."""
    return -(-tokens // sp)


def ulysses_bytes(chunk: int, hidden: int, ulysses: int, layers: int, item: int = 2, batch: int = 1,
                  recompute: bool = False) -> int:
    """All-to-all per attention layer: q, k, v (3 C per token) there and the output (C) back, in the forward,
    and the same in the backward (again in the recomputed forward with checkpointing); each rank keeps
    1 / ulysses of what it exchanges."""
    x = batch * chunk * hidden * item
    forward = 3 * x * (ulysses - 1) // ulysses + x * (ulysses - 1) // ulysses
    return layers * forward * (3 if recompute else 2)


def ring_bytes(chunk: int, hidden: int, ulysses: int, ring: int, layers: int, item: int = 2, batch: int = 1,
               recompute: bool = False) -> int:
    """Ring attention per layer: the K/V block (ulysses * chunk tokens of hidden / ulysses channels each)
    passed ring - 1 times in the forward (again in the recomputed forward with checkpointing) and in the
    backward, plus the fp32 dK/dV accumulators ring times."""
    if ring == 1:
        return 0
    kv = 2 * batch * chunk * hidden  # elements of K and V per block (after Ulysses: the same count)
    return layers * ((ring - 1) * kv * item * (3 if recompute else 2) + ring * kv * 4)


def gather_bytes(chunk: int, patch_dim: int, sp: int, item: int = 2, batch: int = 1) -> int:
    """The output gather (gather_output=True): this rank's tokens to sp - 1 peers."""
    return batch * chunk * patch_dim * item * (sp - 1)


def grad_reduce_bytes(nbytes: int, ulysses: int, ring: int) -> int:
    """reduce_gradients without FSDP: an all-reduce over the Ulysses group, then over the ring group."""
    return sum(2 * nbytes * (g - 1) // g for g in (ulysses, ring) if g > 1)


def fsdp_bytes(num_params: int, world: int, param_item: int = 2, reduce_item: int = 4) -> Dict[str, int]:
    """FSDP2 per step (prediction): bf16 weights all-gathered in the forward and again in the backward,
    fp32 gradients reduce-scattered; a ring all-gather / reduce-scatter sends (N - 1) / N of the tensor."""
    frac = (world - 1) / world
    return {"all_gather": int(2 * num_params * param_item * frac),
            "reduce_scatter": int(num_params * reduce_item * frac)}


def attention_layers(config: dict, frames: int, sp: int) -> int:
    """Layers whose attention exchanges: all of a full-attention model; of a spatial/temporal one, the
    temporal half when each rank holds whole frames (spatial layers run locally)."""
    depth = config["depth"]
    if config.get("attention", "full") == "full":
        return depth
    return depth // 2 if frames % sp == 0 else depth


# ---------------------------------------------------------------------------------------------
# One row of the table
# ---------------------------------------------------------------------------------------------


@dataclass
class PlanRow:
    model: str
    tokens: int
    gpus: int
    ulysses: int
    ring: int
    tokens_per_gpu: int
    params_gib: float
    grads_gib: float
    adamw_gib: float
    galore_fp32_gib: float
    galore_int8_gib: float
    act_gib: float
    act_ckpt_gib: float
    fsdp_buffers_gib: float
    total_adamw_ckpt_gib: float
    total_galore_int8_ckpt_gib: float
    ulysses_gib: float
    ring_gib: float
    fsdp_gib: float


def plan(name: str, tokens: int, gpus: int, galore_rank: int = 256, galore_target="linear") -> PlanRow:
    from dit_fast.optim import galore_param_groups
    config = MODELS[name]
    model = build_meta(config)
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    ulysses, ring = sp_split(config["num_heads"], gpus)
    chunk = local_tokens(tokens, gpus)
    text_tokens = TEXT_TOKENS if config.get("text_dim") else 0
    groups = galore_param_groups(model, rank=galore_rank, target=galore_target)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    p_bytes = param_bytes(params, gpus)
    act = activation_bytes(config, chunk, checkpointing=False, text_tokens=text_tokens)
    act_ckpt = activation_bytes(config, chunk, checkpointing=True, text_tokens=text_tokens)
    buffers = 2 * block * 2 + block * 2  # two blocks of bf16 weights gathered, one of bf16 gradients
    adamw = adamw_state_bytes(params, gpus)
    g_int8 = galore_groups_bytes(groups, "int8", gpus)
    layers = attention_layers(config, tokens, gpus)
    fsdp = fsdp_bytes(num_params, gpus)
    return PlanRow(
        model=name, tokens=tokens, gpus=gpus, ulysses=ulysses, ring=ring, tokens_per_gpu=chunk,
        params_gib=p_bytes / GIB, grads_gib=p_bytes / GIB, adamw_gib=adamw / GIB,
        galore_fp32_gib=galore_groups_bytes(groups, "fp32", gpus) / GIB, galore_int8_gib=g_int8 / GIB,
        act_gib=act / GIB, act_ckpt_gib=act_ckpt / GIB, fsdp_buffers_gib=buffers / GIB,
        total_adamw_ckpt_gib=(2 * p_bytes + adamw + act_ckpt + buffers) / GIB,
        total_galore_int8_ckpt_gib=(2 * p_bytes + g_int8 + act_ckpt + buffers) / GIB,
        ulysses_gib=ulysses_bytes(chunk, config["hidden_size"], ulysses, layers, recompute=True) / GIB,
        ring_gib=ring_bytes(chunk, config["hidden_size"], ulysses, ring, layers, recompute=True) / GIB,
        fsdp_gib=sum(fsdp.values()) / GIB)


def _tokens_label(n: int) -> str:
    return f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else f"{n // 1024}k"


def fits(row: PlanRow, gpu: str) -> Dict[str, bool]:
    """Whether each total (AdamW, GaLore int8; with checkpointing) fits in one ``gpu``'s memory."""
    memory = GPU_MEMORY_GIB[gpu]
    return {"adamw": row.total_adamw_ckpt_gib <= memory, "galore_int8": row.total_galore_int8_ckpt_gib <= memory}


def print_table(rows: List[PlanRow], gpu: str = "H100") -> None:
    head = ("model", "tokens", "GPUs", "U x R", "tok/GPU", "params", "grads", "AdamW", "GaLore32", "GaLore8",
            "act", "act+ckpt", "FSDPbuf", "tot AdamW", "tot GaL8", "Ulysses", "ring", "FSDP")
    print("per GPU, GiB; memory: fp32 weights/grads/states in FSDP2 shards, bf16 activations (batch 1); "
          "totals and traffic with checkpointing (the recomputed forward exchanges again); traffic: bytes one GPU "
          "sends per training step")
    print(f"* after a total: more than one {gpu} holds ({GPU_MEMORY_GIB[gpu]:.1f} GiB, the card's memory as "
          "nvidia-smi reports it; --gpu H100|H200); totals are predictions without the allocator's slack")
    print("  ".join(f"{h:>9}" for h in head))
    for r in rows:
        ok = fits(r, gpu)
        cells = (r.model, _tokens_label(r.tokens), r.gpus, f"{r.ulysses}x{r.ring}", r.tokens_per_gpu, r.params_gib,
                 r.grads_gib, r.adamw_gib, r.galore_fp32_gib, r.galore_int8_gib, r.act_gib, r.act_ckpt_gib,
                 r.fsdp_buffers_gib, (r.total_adamw_ckpt_gib, ok["adamw"]),
                 (r.total_galore_int8_ckpt_gib, ok["galore_int8"]), r.ulysses_gib, r.ring_gib, r.fsdp_gib)
        print("  ".join(f"{c:>9.2f}" if isinstance(c, float) else
                        f"{c[0]:>8.2f}{' ' if c[1] else '*'}" if isinstance(c, tuple) else f"{c!s:>9}"
                        for c in cells))


def _parse_tokens(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def main(argv=None) -> List[PlanRow]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parallel_plan", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--tokens", default="32k,128k,256k,1M")
    parser.add_argument("--gpus", default=",".join(map(str, GPUS)))
    parser.add_argument("--galore-rank", type=int, default=256)
    parser.add_argument("--gpu", default="H100", choices=sorted(GPU_MEMORY_GIB),
                        help="mark the totals that do not fit this card's memory (H100: 80 GB, H200: 141 GB)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    rows = [plan(m, _parse_tokens(t), int(g), args.galore_rank) for m in args.models.split(",")
            for t in args.tokens.split(",") for g in args.gpus.split(",")]
    print_table(rows, args.gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), gpu=args.gpu, gpu_memory_gib=GPU_MEMORY_GIB[args.gpu],
                            **{f"fits_{k}": v for k, v in fits(r, args.gpu).items()}) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
