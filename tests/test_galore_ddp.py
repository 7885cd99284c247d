"""GaLoreAdamW under DistributedDataParallel: gloo backend, 2 CPU processes on localhost.

Gradients are averaged by DDP before the optimizer projects them, and each new basis is broadcast
from rank 0, so both ranks hold the same weights, bases and moments, and these match one process
training on the whole batch.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dit_fast.optim import GaLoreAdamW

STEPS = 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Tanh(), torch.nn.Linear(53, 29))


def _optimizer(model, refresh):
    groups = [dict(params=[model[0].weight, model[2].weight], rank=6, update_proj_gap=2, scale=0.5, proj_type="std"),
              dict(params=[model[0].bias, model[2].bias])]
    return GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01, refresh=refresh, rotate_moments=True, backend="torch")


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 37, generator=g), torch.randn(16, 29, generator=g)


def _worker(rank, world, out_dir, refreshes):
    torch.set_num_threads(1)
    # A FileStore rendezvous: no free-port race and no TCP store thread in rank 0 to outlive the group.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world)
    try:
        for refresh in refreshes:  # one process group for every case: spawning is the slow part
            model = torch.nn.parallel.DistributedDataParallel(_model())
            opt = _optimizer(model.module, refresh)
            for step in range(STEPS):
                x, y = _data(step)
                shard = slice(rank * 8, (rank + 1) * 8)  # each rank sees half of the batch
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
                opt.step()
            torch.save({"params": [p.detach().clone() for p in model.module.parameters()],
                        "opt": opt.state_dict()}, os.path.join(out_dir, f"{refresh}_rank{rank}.pt"))
            del model, opt  # DDP's reducer holds gloo work: release it while the group is alive
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


REFRESHES = ("svd", "randomized")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(out), REFRESHES), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("refresh", REFRESHES)
def test_ddp_two_processes_match_single_process(ddp_results, refresh):
    r0 = torch.load(ddp_results / f"{refresh}_rank0.pt", weights_only=True)
    r1 = torch.load(ddp_results / f"{refresh}_rank1.pt", weights_only=True)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # same reduced gradients, same broadcast bases: identical ranks
    for i, st in r0["opt"]["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, r1["opt"]["state"][i][key]), key

    model = _model()
    opt = _optimizer(model, refresh)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), r0["params"]):
        # DDP averages two half-batch gradients: equal to the full-batch gradient up to rounding
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=1e-5)
