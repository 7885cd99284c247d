"""benchmarks/parallel_plan.py's byte counts equal what is measured on CPU, exactly: optimizer states
(live AdamW / GaLoreAdamW), parameter shards (FSDP2 on 2 gloo processes) and the activations autograd
saves per block (the Triton kernel path, traced with fake tensors). Its traffic formulas are checked
against dit_fast.parallel.comm.count_traffic in tests/test_parallel_sequence.py."""

import json

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import parallel_plan as plan
from dit_fast.models.dit_video import DiTVideo
from dit_fast.optim import GaLoreAdamW, galore_param_groups, state_bytes_for
from tests.dist_utils import run_distributed


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(input_size=(2, 8, 8), patch_size=(1, 2, 2), hidden_size=48, num_heads=2, depth=2, num_classes=10,
               learn_sigma=False, backend="torch")
    return DiTVideo(**{**cfg, **kw})


def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def _train_step(model, opt):
    x, t, y = torch.randn(2, 4, 2, 8, 8), torch.rand(2) * 999, torch.tensor([1, 2])
    model(x, t, y).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_galore_state_bytes_match_the_live_optimizer(state_dtype, proj_type):
    """The calculator's per-parameter GaLore bytes (one GPU) = the tensors GaLoreAdamW allocates."""
    model = _tiny()
    groups = galore_param_groups(model, rank=8, target="linear", proj_type=proj_type)
    opt = GaLoreAdamW(groups, lr=1e-3, state_dtype=state_dtype, backend="torch")
    _train_step(model, opt)
    measured = _state_bytes(opt)
    assert plan.galore_groups_bytes(groups, state_dtype) == measured
    # and the library's own formula agrees (one GPU: no shards)
    assert sum(state_bytes_for(p.shape, p.dtype, g.get("rank"), g.get("proj_type", "std"), state_dtype)
               for g in groups for p in g["params"]) == measured


def test_adamw_and_parameter_bytes_match():
    model = _tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    _train_step(model, opt)
    assert plan.adamw_state_bytes(params) == _state_bytes(opt)
    assert plan.param_bytes(params) == sum(p.numel() * p.element_size() for p in params)
    assert plan.param_bytes(params) == sum(p.grad.numel() * p.grad.element_size() for p in params)


def _fsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    model = _tiny()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    local = sum(p.to_local().numel() * p.to_local().element_size() for p in params)
    return dict(local=local, shapes=[tuple(p.shape) for p in params])


def test_parameter_shards_match_fsdp2(tmp_path):
    """FSDP2's local row chunks on each of 2 ranks = the calculator's row_span bytes."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = run_distributed(_fsdp_worker, 2, tmp_path, timeout_s=60)
    for rank, res in enumerate(out):
        params = [torch.empty(s, device="meta") for s in res["shapes"]]
        assert plan.param_bytes(params, world=2, rank=rank) == res["local"], rank


# ---------------------------------------------------------------------------------------------
# Activations: the tensors autograd saves, traced with fake tensors (Triton kernel path, no compute)
# ---------------------------------------------------------------------------------------------


def _saved_bytes(config, depth, *, grid, dtype, text_tokens, checkpointing):
    """Bytes of the distinct storages autograd saves in one forward (parameters and buffers excluded)."""
    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)  # parameters built in dtype (.to() cannot swap fake parameters)
        try:
            model = DiTVideo(input_size=grid, patch_size=(1, 1, 1), depth=depth, in_channels=4, backend="triton",
                             gradient_checkpointing=checkpointing,
                             **{k: v for k, v in config.items() if k not in ("depth", "patch_size", "in_channels")})
        finally:
            torch.set_default_dtype(default)
        model = model.train()
        owned = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in owned:
                saved[storage._cdata] = storage.nbytes()
            return t

        x, t = torch.randn(1, 4, *grid, dtype=dtype), torch.rand(1) * 999
        extra = {}
        if config.get("num_classes", 1000):
            extra["y"] = torch.tensor([1])
        if config.get("text_dim"):
            extra["text"] = torch.randn(1, text_tokens, config["text_dim"], dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t, **extra)
    return sum(saved.values())


ACT_CONFIGS = {
    "rope": dict(hidden_size=64, num_heads=2, mlp_ratio=4.0, num_classes=10, learn_sigma=False, pos="rope"),
    "sincos": dict(hidden_size=64, num_heads=2, mlp_ratio=4.0, num_classes=10, learn_sigma=False, pos="sincos"),
    "text_rope": dict(hidden_size=64, num_heads=2, mlp_ratio=4.0, num_classes=0, learn_sigma=False, pos="rope",
                      text_dim=24),
    "wan_like": dict(hidden_size=80, num_heads=5, mlp_ratio=2.7, num_classes=0, learn_sigma=False, pos="rope",
                     text_dim=24, adaln_single=True, qk_norm=True),
    "dit_xl_width": dict(hidden_size=1152, num_heads=16, mlp_ratio=4.0, num_classes=0, learn_sigma=False, pos="rope"),
}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["saved", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ACT_CONFIGS))
def test_block_activation_bytes_match_what_autograd_saves(name, dtype, checkpointing):
    """One block's saved bytes (a depth-3 model minus a depth-2 one) = the calculator's formula."""
    config = ACT_CONFIGS[name]
    grid, text_tokens = ((4, 8, 16) if name == "dit_xl_width" else (2, 4, 5)), 7
    tokens = grid[0] * grid[1] * grid[2]
    kw = dict(grid=grid, dtype=dtype, text_tokens=text_tokens, checkpointing=checkpointing)
    measured = _saved_bytes(config, 3, **kw) - _saved_bytes(config, 2, **kw)
    item = torch.empty((), dtype=dtype).element_size()
    # nn.LayerNorm (qk-norm) keeps its statistics in the input dtype on CPU (fp32 on CUDA, the table's case)
    assert plan.block_activation_bytes(config, tokens, item=item, text_tokens=text_tokens, checkpointing=checkpointing,
                                       norm_stats_item=item) == measured


def test_calculator_prints_the_table(capsys):
    rows = plan.main(["--models", "DiT-XL,Wan-14B", "--tokens", "32k", "--gpus", "8"])
    text = capsys.readouterr().out
    assert "DiT-XL" in text and "Wan-14B" in text and len(rows) == 2
    wan = rows[1]
    assert (wan.ulysses, wan.ring) == (8, 1)  # 40 heads: Ulysses 8 divides them
    assert plan.sp_split(40, 64) == (8, 8) and plan.sp_split(16, 64) == (16, 4)
    # Wan-14B-size: ~14B parameters, each GPU holds 1/8 of them in fp32
    assert 13e9 < sum(p.numel() for p in plan.build_meta(plan.MODELS["Wan-14B"]).parameters()) < 17e9


def test_calculator_marks_rows_past_the_gpu_memory(capsys, tmp_path):
    """Totals past one GPU's memory (as nvidia-smi reports it: H100 80 GB, H200 141 GB) carry a '*'."""
    out = tmp_path / "plan.json"
    args = ["--models", "Wan-14B", "--tokens", "32k,1M", "--gpus", "8"]
    plan.main(args + ["--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert "more than one H100 holds (79.6 GiB" in lines[1]
    small, big = [line for line in lines if line.strip().startswith("Wan-14B")]
    assert "*" not in small and big.count("*") == 2, big  # 1M tokens on 8 GPUs: ~150 GiB a GPU
    rows = json.load(open(out))
    assert [(r["fits_adamw"], r["gpu"]) for r in rows] == [(True, "H100"), (False, "H100")]
    for r in rows:
        assert r["fits_adamw"] == (r["total_adamw_ckpt_gib"] <= r["gpu_memory_gib"])
    plan.main(args + ["--gpu", "H200"])
    h200 = capsys.readouterr().out
    assert "more than one H200 holds (140.4 GiB" in h200


def test_layernorm_statistics_are_fp32_on_cuda():
    """The table's norm_stats_item=4: PyTorch's meta kernels give bf16 LayerNorm fp32 statistics on CUDA
    (and bf16 ones on CPU, which the activation test above passes explicitly)."""
    with FakeTensorMode():
        for device, want in (("cuda", torch.float32), ("cpu", torch.bfloat16)):
            x = torch.empty(4, 8, dtype=torch.bfloat16, device=device)
            _, mean, rstd = torch.ops.aten.native_layer_norm(x, [8], None, None, 1e-5)
            assert mean.dtype == rstd.dtype == want, device


def test_bench_parallel_cpu_smoke():
    """benchmarks/bench_parallel.py --cpu-smoke runs both parts; the optimizer states of FSDP2 (1 rank) +
    AdamW / GaLoreAdamW int8 are exactly the calculator's bytes."""
    from benchmarks import bench_parallel
    out = bench_parallel.main(["--cpu-smoke"])
    assert [r["degree"] for r in out["compute"]] == [2, 4]
    for r in out["compute"]:
        assert r["ulysses_rank_ms"] > 0 and r["ring_rank_ms"] > 0 and r["a2a_bytes"] > 0 and r["ring_bytes"] > 0
    assert [r["optimizer"] for r in out["memory"]] == ["AdamW", "GaLore int8"]
    for r in out["memory"]:
        assert r["state_bytes"] == r["states"], r
    assert not dist.is_initialized()  # the smoke's 1-rank group is gone
