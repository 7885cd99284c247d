"""Sequence-parallel DiTVideo (dit_fast.parallel.sequence_parallel) equals one process: forward, the input's
gradient and every parameter's, on 2 and 4 gloo processes (Ulysses, ring, USP 2 x 2), for full 3D attention,
spatial/temporal blocks, 3D windows, tile windows, 3D RoPE, text cross-attention, per-frame conditioning and
gradient checkpointing, with token counts that divide the ranks and ones that do not.

Spawning a process costs seconds here, so each group of processes runs many cases (tests/dist_utils.py);
the single-process references run in the test process. Gradients: each rank back-propagates the same
loss through the gathered output; every backward ends with the parameter gradients summed over the
ranks (grad_sync="auto"), and the reduce_gradients call after it must change nothing (the traffic check
counts every byte, so a second sum fails it). grad_sync="manual" is checked on its own: an optimizer
step before reduce_gradients raises, accumulation over backwards sums each share once. The input
gradients of the ranks (each its own frames) are summed here. The Triton cases run the attention
kernels (interpreter) on every rank: their launches are counted.
"""

import math

import pytest
import torch
import torch.distributed as dist

from dit_fast.models.dit_video import DiT_tiny
from dit_fast.ops.patchify import patchify_3d
from dit_fast.parallel import ParallelDims, reduce_gradients, sequence_parallel
from dit_fast.parallel import comm
from dit_fast.parallel.ring import pair_mask, rope_on_tokens
from dit_fast.parallel.sequence import TokenShard
from tests.dist_utils import run_distributed
from tests.launches import count_launches

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

# name -> the model (DiT_tiny keywords), optional attention window / tile applied to every block, backend
CONFIGS = {
    # 4 frames: whole frames per rank (2 or 4 ranks), no padding
    "full": dict(model=dict(input_size=(4, 4, 6))),
    "st_rope_frames": dict(model=dict(input_size=(4, 4, 6), attention="spatial_temporal", pos="rope",
                                      per_frame_timesteps=True)),
    "window_frame_local": dict(model=dict(input_size=(4, 6, 6)), window=(1, 3, 3)),
    # 27 tokens: 14 + 13 (one padded) on 2 ranks, 7 x 4 (one padded) on 4; frames cut across ranks
    "st_padded": dict(model=dict(input_size=(3, 6, 6), attention="spatial_temporal", pos="both")),
    "window_rope_padded": dict(model=dict(input_size=(3, 6, 6), pos="rope"), window=(2, 3, 3)),
    "tile_window": dict(model=dict(input_size=(3, 8, 8)), window=(2, 4, 4), window_tile=(1, 4, 4)),
    # 20 tokens, 5 frames: per-frame conditioning becomes one row per token; text keys replicated
    "text_adaln_single_ckpt": dict(model=dict(input_size=(5, 4, 4), text_dim=24, adaln_single=True, qk_norm=True,
                                              num_classes=0, per_frame_timesteps=True, gradient_checkpointing=True)),
    "heads4": dict(model=dict(input_size=(3, 6, 6), hidden_size=64, num_heads=4, attention="spatial_temporal")),
    # the Triton attention kernels (interpreter here): 9 tokens, 5 + 4 (one padded) on 2 ranks; the ring masks
    # the padded key, Ulysses drops it before attending over the whole grid
    "triton_padded": dict(model=dict(input_size=(3, 2, 6), depth=1), attention_backend="triton"),
}


def _build(cfg):
    torch.manual_seed(0)
    model = DiT_tiny(backend="torch", **cfg["model"])
    for name, p in model.named_parameters():  # DiT zero-inits its output layers: random weights everywhere
        p.data.normal_(std=0.15 if "qkv" in name else 0.05)
    for block in model.blocks:
        block.attn.backend = cfg.get("attention_backend", "torch")
        block.attn.window = cfg.get("window")
        block.attn.window_tile = cfg.get("window_tile")
    return model.train()


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    kw = cfg["model"]
    T, H, W = kw["input_size"]
    x = torch.randn(2, 4, T, H, W, generator=g)
    t = torch.rand((2, T) if kw.get("per_frame_timesteps") else (2,), generator=g) * 999
    extra = {}
    if kw.get("num_classes", 10):
        extra["y"] = torch.tensor([1, 7])
    if kw.get("text_dim"):
        extra["text"] = torch.randn(2, 5, kw["text_dim"], generator=g)
        extra["text_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return x, t, extra


def _loss_weights(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


def _step(model, cfg, sp_reduce=False):
    """Forward with CFG dropout off, a fixed weighted-sum loss, backward: (out, x.grad, {name: grad}).

    A model returning its own tokens (gather_output=False) weighs them with their part of the same
    weights: the ranks' losses add up to the single-process loss."""
    x, t, extra = _inputs(cfg)
    x.requires_grad_(True)
    out = model(x, t, force_drop_ids=torch.tensor([False, True]), **extra)
    plan = model.sequence_parallel_plan
    if plan is None or plan.gather_output:
        weights = _loss_weights(out.shape)
    else:
        out_channels = model.out_channels
        weights = patchify_3d(_loss_weights((x.shape[0], out_channels, *x.shape[2:])), model.patch_size, order="thwc")
        shard = plan.shard(tuple(s // p for s, p in zip(x.shape[2:], model.patch_size)))
        weights = weights[:, shard.lo:shard.hi]  # (B, n, pt * ph * pw * C): this rank's tokens
    (out * weights).sum().backward()
    if sp_reduce:
        reduce_gradients(model)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _meshes(world):
    from torch.distributed.device_mesh import init_device_mesh
    meshes = {"ulysses": init_device_mesh("cpu", (world,), mesh_dim_names=("ulysses",)),
              "ring": init_device_mesh("cpu", (world,), mesh_dim_names=("ring",))}
    if world == 4:
        meshes["usp"] = ParallelDims(world_size=4, ulysses=2, ring=2).build_mesh("cpu")
    return meshes


def _sp_worker(rank, world, cases):
    """Each case (mode, config name, gather_output): out, x.grad, summed parameter grads, traffic, and the
    Triton kernel launches of the training step and of the no-grad forward."""
    meshes = _meshes(world)
    results = []
    for mode, name, gather in cases:
        cfg = CONFIGS[name]
        model = sequence_parallel(_build(cfg), meshes[mode], mode, gather_output=gather)
        with comm.count_traffic() as traffic, count_launches() as step_launches:
            out, x_grad, grads = _step(model, cfg, sp_reduce=True)
        x, t, extra = _inputs(cfg)
        with torch.no_grad(), count_launches() as sample_launches:  # sampling: the same output without autograd
            sampled = model.eval()(x, t, force_drop_ids=torch.tensor([False, True]), **extra)
        results.append(dict(out=out, x_grad=x_grad, grads=grads, traffic=dict(traffic.bytes), sampled=sampled,
                            launches=dict(step_launches), sample_launches=dict(sample_launches)))
    return results


def _single_process(name):
    cfg = {k: v for k, v in CONFIGS[name].items() if k != "attention_backend"}  # the reference attention
    return _step(_build(cfg), cfg)


def _close(name, got, want, rtol=2e-5):
    """|got - want| <= rtol * max|want| (fp32 sums in another order; measured errors ~5e-7 relative)."""
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rtol * max(scale, 1e-3), f"{name}: max error {err:.3g}, allowed {rtol * scale:.3g}"


def _check_case(case, per_rank, world):
    mode, name, gather = case
    want_out, want_xg, want_grads = _single_process(name)
    label = f"{mode}/{name}/gather={gather}"
    if gather:
        for r in range(world):
            _close(f"{label} out (rank {r})", per_rank[r]["out"], want_out)
    else:  # the ranks' own output tokens, in chunk order, are the model's tokens
        cfg = CONFIGS[name]
        tokens = torch.cat([per_rank[r]["out"] for r in range(world)], dim=1)
        grid = tuple(s // p for s, p in zip(cfg["model"]["input_size"], (1, 2, 2)))
        _close(f"{label} reassembled out", _build(cfg).unpatchify(tokens, grid), want_out)
    for r in range(world):
        _close(f"{label} no_grad eval out (rank {r})", per_rank[r]["sampled"], per_rank[r]["out"], rtol=1e-6)
    _check_launches(case, per_rank, world)
    _close(f"{label} x.grad (sum over ranks)", sum(per_rank[r]["x_grad"] for r in range(world)), want_xg)
    for pname, want in want_grads.items():
        for r in range(world):
            _close(f"{label} grad {pname} (rank {r})", per_rank[r]["grads"][pname], want)


def _check_launches(case, per_rank, world):
    """Triton cases: every rank ran our attention kernels, forward and backward, once per key block (the ring:
    one block per rank; Ulysses: the whole grid at once); torch cases launched nothing."""
    mode, name, _ = case
    if CONFIGS[name].get("attention_backend") != "triton":
        assert all(not r["launches"] and not r["sample_launches"] for r in per_rank), (case, per_rank[0]["launches"])
        return
    blocks = CONFIGS[name]["model"]["depth"] * (world if mode == "ring" else 1)
    for r in range(world):
        step, sample = per_rank[r]["launches"], per_rank[r]["sample_launches"]
        assert step.get("_attn_fwd_kernel") == blocks and sample.get("_attn_fwd_kernel") == blocks, (case, r, step)
        assert step.get("_attn_bwd_dkdv_kernel") == blocks and step.get("_attn_bwd_dq_kernel") == blocks, \
            (case, r, step)


TWO_RANK_CASES = [(mode, name, True) for mode in ("ulysses", "ring") for name in (
    "full", "st_rope_frames", "window_frame_local", "st_padded", "window_rope_padded", "tile_window",
    "text_adaln_single_ckpt")] + [("ring", "st_padded", False), ("ulysses", "full", False),
                                  ("ring", "triton_padded", True), ("ulysses", "triton_padded", True)]
FOUR_RANK_CASES = [("usp", name, True) for name in (
    "full", "st_rope_frames", "st_padded", "window_rope_padded", "text_adaln_single_ckpt")] + [
    ("ring", "st_padded", True), ("ulysses", "heads4", True), ("usp", "window_rope_padded", False)]


def _bad_input_worker(rank, world):
    """Bad configurations raise the same clear error on every rank before any collective; the group stays usable."""
    meshes = _meshes(world)
    messages = {}

    def expect(key, error, fn):
        try:
            fn()
        except error as exc:
            messages[key] = str(exc)
        else:
            messages[key] = "no error"

    three_heads = DiT_tiny(hidden_size=48, num_heads=3, backend="torch")
    expect("heads", ValueError, lambda: sequence_parallel(three_heads, meshes["ulysses"], "ulysses"))
    expect("usp_1d", ValueError, lambda: sequence_parallel(DiT_tiny(backend="torch"), meshes["ring"], "usp"))
    expect("mode", ValueError, lambda: sequence_parallel(DiT_tiny(backend="torch"), meshes["ring"], "rings"))
    expect("type", TypeError, lambda: sequence_parallel(torch.nn.Linear(2, 2), meshes["ring"], "ring"))
    twice = sequence_parallel(DiT_tiny(backend="torch"), meshes["ring"], "ring")
    expect("twice", ValueError, lambda: sequence_parallel(twice, meshes["ring"], "ring"))
    one_token = sequence_parallel(DiT_tiny(input_size=(1, 2, 2), backend="torch"), meshes["ring"], "ring")
    expect("too_small", ValueError, lambda: one_token(torch.randn(1, 4, 1, 2, 2), torch.ones(1), torch.ones(1).long()))
    from dit_fast.parallel import init_from_env
    expect("init_env", ValueError, lambda: init_from_env(ulysses=3))
    ok = torch.ones(1)
    dist.all_reduce(ok)  # every rank got here: nobody is stuck in a collective
    messages["healthy"] = str(int(ok.item()))
    return messages


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _guard_message(model):
    """What an optimizer step on the model's gradients says now ("" when it steps)."""
    try:
        torch.optim.SGD(model.parameters(), lr=0.0).step()
    except RuntimeError as exc:
        return str(exc)
    return ""


def _grad_sync_worker(rank, world):
    """grad_sync="auto" and "manual" on one configuration: the gradients after each phase, the bytes a
    reduce_gradients call with nothing pending sends, and what an optimizer step says."""
    cfg, mesh, got = CONFIGS["st_padded"], _meshes(world)["ring"], {}
    # auto: each backward ends summed; a second backward (no zeroing) adds a second summed gradient
    model = sequence_parallel(_build(cfg), mesh, "ring")
    _step(model, cfg)
    got["auto_1"], got["auto_guard_1"] = _grads(model), _guard_message(model)
    with comm.count_traffic() as traffic:
        reduce_gradients(model)
    got["auto_reduce_bytes"] = sum(traffic.bytes.values())
    _step(model, cfg)
    got["auto_2"] = _grads(model)
    # manual: the local shares until reduce_gradients; an optimizer step before it raises
    model = sequence_parallel(_build(cfg), mesh, "ring", grad_sync="manual")
    _step(model, cfg)
    got["manual_local"], got["manual_guard"] = _grads(model), _guard_message(model)
    reduce_gradients(model)
    got["manual_1"], got["manual_guard_1"] = _grads(model), _guard_message(model)
    with comm.count_traffic() as traffic:
        reduce_gradients(model)
    got["manual_reduce_bytes"] = sum(traffic.bytes.values())
    _step(model, cfg)  # accumulates onto the summed gradients: only the new shares are summed next
    reduce_gradients(model)
    got["manual_2"] = _grads(model)
    got["reentrant"] = _reentrant_checkpoint_grads(rank, world)
    return got


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1))


def _mlp_loss(model, x, reentrant):
    """The middle layers under activation checkpointing: reentrant (their backward is an inner backward, a graph
    task of its own, in the middle of the outer one), or none."""
    h = model[0](x)
    h = model[1:4](h) if reentrant is None else torch.utils.checkpoint.checkpoint(model[1:4], h, use_reentrant=True)
    return model[4](h).pow(2).sum()


def _mlp_data(rank, step):
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 * step + rank))


def _reentrant_checkpoint_grads(rank, world):
    """GradSync "auto" on a small MLP, each rank its own data, three backwards accumulated (no zero_grad), the
    middle layers under reentrant checkpointing: the sums at the end of the inner backwards and of the outer ones
    must add up to the single process's gradient of every rank's loss, each share summed once."""
    from dit_fast.parallel.grad_sync import GradSync
    model = _mlp()
    GradSync([dist.group.WORLD], "auto").track(model)
    for step in range(3):
        _mlp_loss(model, _mlp_data(rank, step).requires_grad_(), reentrant=True).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_grad_sync(got, world):
    _, _, want = _single_process("st_padded")
    for r in range(world):
        g = got[r]
        for phase, factor in (("auto_1", 1), ("auto_2", 2), ("manual_1", 1), ("manual_2", 2)):
            assert set(g[phase]) == set(want), phase
            for pname, w in want.items():
                _close(f"grad_sync {phase} grad {pname} (rank {r})", g[phase][pname], factor * w)
        assert g["auto_reduce_bytes"] == 0 and g["manual_reduce_bytes"] == 0, "reduce_gradients summed twice"
        assert g["auto_guard_1"] == "" and g["manual_guard_1"] == "", (g["auto_guard_1"], g["manual_guard_1"])
        assert "SGD.step() on gradients that hold this rank's share only" in g["manual_guard"], g["manual_guard"]
        assert "reduce_gradients(model)" in g["manual_guard"] and "'x_embedder.proj.weight'" in g["manual_guard"], g["manual_guard"]
    for pname, w in want.items():  # what the guard stopped: each rank's share, the sum of them the gradient
        _close(f"manual local shares of {pname} sum to the gradient", sum(got[r]["manual_local"][pname]
                                                                         for r in range(world)), w)
    assert any(not torch.allclose(got[0]["manual_local"][n], w) for n, w in want.items())
    model = _mlp()  # reentrant checkpointing + accumulation: every rank's three losses, in one process
    for step in range(3):
        for r in range(world):
            _mlp_loss(model, _mlp_data(r, step), reentrant=None).backward()
    for r in range(world):
        for n, p in model.named_parameters():
            _close(f"reentrant checkpointing, 3 backwards: grad {n} (rank {r})", got[r]["reentrant"][n], p.grad)


def _fsdp_worker(rank, world):
    """Sequence parallel under FSDP2 (fp32), both ways: sharded over the same ranks (FSDP's reduce-scatter
    sums the ranks' shares: the loss is scaled by the degree, since FSDP averages; reduce_gradients must add
    nothing), and over the mesh's data-parallel dimension (size 1 here): the local shards of the DTensor
    gradients summed at the end of backward (auto), or by reduce_gradients (manual; the optimizer refuses
    to step before it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from dit_fast.parallel import apply_fsdp, init_from_env
    cfg, grads, guards = CONFIGS["st_padded"], {}, {}
    dims, mesh = init_from_env(ulysses=world)  # reuses the group; mesh ("dp", "ring", "ulysses") = (1, 1, 2)
    for name, shard_mesh, mode, scale, sync in (
            ("same_ranks_ring", init_device_mesh("cpu", (world,)), "ring", world, "auto"),
            ("dp_dim_ulysses", mesh["dp"], "ulysses", 1, "auto"),
            ("dp_dim_ulysses_manual", mesh["dp"], "ulysses", 1, "manual")):
        sp_mesh = mesh if mode == "ulysses" else _meshes(world)[mode]
        model = apply_fsdp(sequence_parallel(_build(cfg), sp_mesh, mode, grad_sync=sync), shard_mesh,
                           mixed_precision=None)
        x, t, extra = _inputs(cfg)
        out = model(x, t, force_drop_ids=torch.tensor([False, True]), **extra)
        (scale * (out * _loss_weights(out.shape)).sum()).backward()
        guards[name] = _guard_message(model)
        reduce_gradients(model)  # manual: the sum; auto: nothing left to sum
        grads[name] = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}
        if name == "dp_dim_ulysses":  # a second backward onto FSDP's summed gradients cannot be kept apart
            try:
                model(x, t, force_drop_ids=torch.tensor([False, True]), **extra).sum().backward()
                guards["accumulate"] = "no error"
            except RuntimeError as exc:
                guards["accumulate"] = str(exc)
    return dict(grads=grads, guards=guards, dims=(dims.dp, dims.ring, dims.ulysses, dims.sp_mode),
                mesh=list(mesh.mesh_dim_names))


def _two_rank_worker(rank, world):
    return dict(cases=_sp_worker(rank, world, TWO_RANK_CASES), bad=_bad_input_worker(rank, world),
                grad_sync=_grad_sync_worker(rank, world), fsdp=_fsdp_worker(rank, world))


def _check_fsdp(fsdp, world):
    _, _, want = _single_process("st_padded")
    for r in range(world):
        assert fsdp[r]["dims"] == (1, 1, 2, "ulysses") and fsdp[r]["mesh"] == ["dp", "ring", "ulysses"]
        guards = fsdp[r]["guards"]
        assert guards["same_ranks_ring"] == "" and guards["dp_dim_ulysses"] == "", guards
        assert "were not summed over the sequence-parallel ranks" in guards["dp_dim_ulysses_manual"], guards
        assert "after it was summed over the sequence-parallel ranks" in guards["accumulate"] \
            and "set_requires_gradient_sync(False)" in guards["accumulate"], guards["accumulate"]
        for how, grads in fsdp[r]["grads"].items():
            assert set(grads) == set(want), how
            for pname, g in grads.items():
                _close(f"FSDP2 {how} grad {pname} (rank {r})", g, want[pname])


def _expected_traffic(case, world):
    """The bytes benchmarks/parallel_plan.py's formulas give for this case (fp32 model, batch 2)."""
    from benchmarks import parallel_plan as plan
    mode, name, gather = case
    cfg = CONFIGS[name]
    model = _build(cfg)
    ulysses, ring = {"ulysses": (world, 1), "ring": (1, world), "usp": (2, world // 2)}[mode]
    grid = model.grid
    shard = TokenShard(grid, world, 0)
    frame_local = [(b.attn.mode == "spatial" or (b.attn.window is not None and b.attn.window[0] == 1))
                   and shard.by_frames for b in model.blocks]
    layers = frame_local.count(False)
    recompute = model.gradient_checkpointing
    C, item, batch = model.hidden_size, 4, 2
    expected = {
        "all_to_all": plan.ulysses_bytes(shard.chunk, C, ulysses, layers, item, batch, recompute),
        "ring": plan.ring_bytes(shard.chunk, C, ulysses, ring, layers, item, batch, recompute),
        "all_gather": plan.gather_bytes(shard.chunk, model.final_layer.linear.out_features, world, item, batch)
        if gather else 0,
        "all_reduce": plan.grad_reduce_bytes(sum(g.numel() * 4 for g in _single_process(name)[2].values()),
                                             ulysses, ring),
    }
    return {k: v for k, v in expected.items() if v}


def _check_group(cases, results, world):
    """Every case against one process, and its traffic against benchmarks/parallel_plan.py's formulas
    (bytes each rank sent, by kind, from comm.count_traffic); one failure listing every bad case."""
    failures = []
    for index, case in enumerate(cases):
        per_rank = [results[r][index] for r in range(world)]
        try:
            _check_case(case, per_rank, world)
            expected = _expected_traffic(case, world)
            for rank in range(world):
                assert per_rank[rank]["traffic"] == expected, \
                    f"traffic of rank {rank} {per_rank[rank]['traffic']} != the calculator's {expected}"
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def _check_bad_input(bad):
    assert bad[0] == bad[1], "every rank must raise the same error"
    m = bad[0]
    assert "num_heads = 3 is not divisible by the Ulysses degree 2" in m["heads"], m["heads"]
    assert "needs a mesh with dims named 'ring' and 'ulysses'" in m["usp_1d"], m["usp_1d"]
    assert "mode must be one of" in m["mode"], m["mode"]
    assert "splits a dit_fast DiTVideo, got Linear" in m["type"], m["type"]
    assert "already sequence parallel" in m["twice"], m["twice"]
    assert "(1, 1, 1) (1 tokens) cannot be split over 2" in m["too_small"], m["too_small"]
    assert "world_size = 2 ranks cannot hold ulysses x ring = 3 x 1 = 3" in m["init_env"], m["init_env"]
    assert m["healthy"] == "2"


def _check_frame_local_traffic(cases, results):
    """Whole frames per rank: attention within frames (spatial blocks, one-frame windows) exchanges nothing;
    only the output gather and the gradient sum move bytes."""
    for (mode, name, _), result in zip(cases, results):
        traffic = result["traffic"]
        if name == "window_frame_local":
            assert set(traffic) == {"all_gather", "all_reduce"}, (mode, traffic)
        if name == "st_rope_frames":  # the temporal block exchanges, the spatial one does not
            assert traffic.get("all_to_all" if mode == "ulysses" else "ring", 0) > 0, (mode, traffic)


def test_two_ranks_equal_one_process(tmp_path):
    """Ulysses and ring on 2 processes, every configuration (one group of processes: starting them is the
    slow part), the Triton kernels among them; bad configurations raise the same clear error on every rank
    and leave the group usable; automatic and manual gradient sums; under FSDP2 the gradients are one
    process's too."""
    results = run_distributed(_two_rank_worker, 2, tmp_path, timeout_s=60)
    _check_group(TWO_RANK_CASES, [r["cases"] for r in results], 2)
    _check_bad_input([r["bad"] for r in results])
    _check_frame_local_traffic(TWO_RANK_CASES, results[0]["cases"])
    _check_grad_sync([r["grad_sync"] for r in results], 2)
    _check_fsdp([r["fsdp"] for r in results], 2)


def test_four_ranks_equal_one_process(tmp_path):
    """USP on a 2 x 2 mesh, ring on 4 and Ulysses on 4 processes."""
    results = run_distributed(_sp_worker, 4, tmp_path, FOUR_RANK_CASES, timeout_s=60)
    _check_group(FOUR_RANK_CASES, results, 4)


# ---------------------------------------------------------------------------------------------
# Single-process pieces (no spawning)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,mode,window,window_tile", [
    ((3, 4, 5), "full", None, None), ((3, 4, 5), "spatial", None, None), ((3, 4, 5), "temporal", None, None),
    ((3, 4, 5), "full", (2, 3, 3), None), ((3, 8, 8), "full", (2, 4, 8), (1, 4, 4))])
def test_pair_mask_is_spacetime_mask_by_global_index(grid, mode, window, window_tile):
    from dit_fast.ops.flash_attention import spacetime_mask
    S = math.prod(grid)
    want = spacetime_mask(grid, mode, window, window_tile=window_tile)
    rows, cols = torch.arange(5, 17), torch.arange(S - 9, S + 3)  # a block of queries, keys past the end
    got = pair_mask(grid, rows, cols, mode, window, window_tile)
    assert torch.equal(got[:, :9], want[5:17, S - 9:]) and not got[:, 9:].any()


def test_rope_on_tokens_uses_global_positions():
    from dit_fast.ops.rope import RoPE3D, apply_rope_3d_reference
    grid, x = (3, 4, 5), torch.randn(2, 60, 2, 24)
    want = apply_rope_3d_reference(x, grid)
    idx = torch.arange(23, 41)
    torch.testing.assert_close(rope_on_tokens(x[:, 23:41], grid, idx, RoPE3D()), want[:, 23:41], rtol=0, atol=0)


def test_token_shards_cover_the_grid_once():
    for grid, degree in (((4, 2, 3), 2), ((3, 3, 3), 2), ((3, 3, 3), 4), ((5, 1, 3), 4), ((8, 2, 2), 8)):
        shards = [TokenShard(grid, degree, i) for i in range(degree)]
        covered = torch.cat([torch.arange(s.lo, s.hi) for s in shards])
        assert torch.equal(covered, torch.arange(math.prod(grid))), (grid, degree)
        assert all(s.chunk == shards[0].chunk and s.real > 0 for s in shards)
        assert shards[0].by_frames == (grid[0] % degree == 0)


def test_init_from_env_needs_torchrun(monkeypatch):
    from dit_fast.parallel import init_from_env
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process (init_from_env reuses it)")
    with pytest.raises(RuntimeError, match="init_from_env runs under torchrun: RANK, WORLD_SIZE not set"):
        init_from_env(ulysses=2)


def test_parallel_dims_check_degrees_against_the_world():
    dims = ParallelDims(world_size=8, ulysses=2, ring=2)
    assert (dims.dp, dims.sp, dims.sp_mode) == (2, 4, "usp")
    assert ParallelDims(world_size=4, ring=4).sp_mode == "ring"
    with pytest.raises(ValueError, match=r"ulysses x ring = 3 x 1 = 3 sequence-parallel ranks: 3 does not divide 8"):
        ParallelDims(world_size=8, ulysses=3)
    with pytest.raises(ValueError, match=r"dp x ring x ulysses = 2 x 2 x 1 = 4 must equal world_size = 8"):
        ParallelDims(world_size=8, ring=2, dp=2)
    with pytest.raises(ValueError, match="ulysses must be a positive int"):
        ParallelDims(world_size=8, ulysses=0)
    with pytest.raises(ValueError, match="num_heads = 6 is not divisible by the Ulysses degree ulysses = 4"):
        ParallelDims(world_size=4, ulysses=4).check_heads(6)
