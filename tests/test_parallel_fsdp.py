"""FSDP2 (fully_shard, gloo, 2 CPU processes) + GaLoreAdamW equals one process of GaLoreAdamW.

Each rank holds row shards of every parameter (DTensor Shard(0)); GaLoreAdamW steps them with the
randomized refresh on the shards. Over 7 steps (refreshes at steps 0, 3 and 6) the weights and the
moments equal single-process GaLoreAdamW on the whole batch to fp32 rounding, for proj types std,
reverse_std and full, fp32 / int8 / bf16 states; and no collective during a step moves as many
elements as the smallest projected weight (recorded by a dispatch mode that sees every c10d op).

Two things rounding cannot reach, and how the test handles them:
* int8 moments: a different summation order moves a value by an ulp, and a value that sits on a
  rounding tie of its code (floor(x + 0.5)) flips by one level (seen: 1 or 2 codes of 800 per step).
  The weights then differ by about one code step of one update (~1e-4 here, against ~3e-2 of motion):
  int8 cases compare weights at that tolerance and codes within one level. The sharded 8-bit layout
  itself (global blocks across rank boundaries) is checked exactly on shared inputs.
* proj_type "full": at a refresh R = A^T G B^T is diagonal (the singular values); its off-diagonal
  entries are rounding noise (~1e-8) that Adam normalises to O(0.1) unless eps dominates them, so
  any two summation orders disagree. The full case runs with eps = 1e-4.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dit_fast.optim import GaLoreAdamW, galore_param_groups
from tests.dist_utils import run_distributed

STEPS = 7
CONFIGS = [  # (proj_type, state_dtype, rotate_moments, eps)
    ("std", "fp32", False, 1e-8),
    ("reverse_std", "fp32", True, 1e-8),
    ("std", "int8", True, 1e-8),
    ("reverse_std", "int8", False, 1e-8),
    ("full", "bf16", True, 1e-4),
    # Triton kernels (the interpreter here) on the row shards: fused right side, hybrid left side, plain AdamW
    ("std", "fp32", False, 1e-8, "triton", "fused"),
]


class TinyNet(nn.Module):
    """Two projected linears, (200, 24) and (20, 200), so both sides occur and 8-bit blocks straddle the
    ranks' rows; a (3, 20) head whose rows do not split evenly (an empty shard on 4 ranks)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(24, 200), nn.Tanh()),
                                     nn.Sequential(nn.Linear(200, 20), nn.Tanh())])
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_net(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def make_optimizer(model, proj_type, state_dtype, rotate, eps=1e-8, backend="torch", kernel="hybrid"):
    groups = galore_param_groups(model, rank=4, target=lambda name, m: name.startswith("blocks"), update_proj_gap=3,
                                 scale=0.5, proj_type=proj_type, state_dtype=state_dtype)
    return GaLoreAdamW(groups, lr=2e-2, eps=eps, weight_decay=0.01, refresh="randomized", oversample=4,
                       refresh_iters=1, rotate_moments=rotate, backend=backend, kernel=kernel, seed=3)


def batch(step, size=16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 24, generator=g), torch.randn(size, 3, generator=g)


def train_step(model, opt, step, rank=0, world=1):
    x, y = batch(step)
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # FSDP averages the ranks' gradients
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    opt.step()


class CollectiveSizes(TorchDispatchMode):
    """Records (op, largest tensor numel) of every c10d / functional-collective op dispatched under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "c10d" in str(func):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self.calls.append((str(func), max((t.numel() for t in leaves if isinstance(t, torch.Tensor)), default=0)))
        return func(*args, **(kwargs or {}))


def whole(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _fsdp_worker(rank, world, configs, steps):
    from torch.distributed.device_mesh import init_device_mesh

    from dit_fast.parallel.fsdp import apply_fsdp

    mesh = init_device_mesh("cpu", (world,))
    results = []
    from dit_fast.triton_kernels import galore as kernels

    launches = []
    for name in ("project_back_update", "down_project_adam", "adam_step"):  # count the kernel launchers' calls
        def counted(*args, _f=getattr(kernels, name), _name=name, **kw):
            launches.append(_name)
            return _f(*args, **kw)
        setattr(kernels, name, counted)
    for config in configs:
        model = apply_fsdp(make_net(), mesh, mixed_precision=None)
        opt = make_optimizer(model, *config)
        launches.clear()
        record = CollectiveSizes()
        for step in range(steps):
            x, y = batch(step)
            rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            with record:
                opt.step()
        sd = opt.state_dict()  # collective: int8 absmax whole, DTensors for the row-split state
        results.append(dict(params={n: whole(p).detach() for n, p in model.named_parameters()},
                            state={i: {k: whole(v) for k, v in st.items()} for i, st in sd["state"].items()},
                            calls=record.calls, local_bytes=opt.state_bytes(), launches=sorted(set(launches))))
    # the row-split primitives on shared inputs: exact where nothing is summed
    from torch.distributed.tensor import Shard

    from dit_fast.optim import reference as ref
    from dit_fast.optim.sharded import ShardGroup

    shards = ShardGroup(mesh, [Shard(0)], 0)
    x = torch.randn(37, 11, generator=torch.Generator().manual_seed(7))  # 407 elements: blocks straddle ranks
    start, stop = shards.span(37)
    codes, absmax = ref.quantize_blockwise(x[start:stop], signed=True, offset=start * 11)
    partial = absmax.clone()
    shards.fix_absmax([absmax], 37, 11)
    codes = ref.quantize_with_absmax(x[start:stop], absmax, True, start * 11)
    y = torch.randn(37, 6, generator=torch.Generator().manual_seed(8))
    q, r = shards.qr_rows(y[start:stop])
    parts = torch.arange(15.0).view(5, 3) * (shards.rank + 1)  # summed over ranks: (1 + 2) x
    primitives = dict(codes=shards.all_gather_rows(codes, 37), absmax=shards.whole_absmax(absmax, 37, 11),
                      partial_differs=bool((partial != absmax).any()), q=shards.all_gather_rows(q, 37), r=r,
                      scattered=shards.reduce_scatter_rows(parts), span=shards.span(5))
    # bad input on a real mesh: clear errors, no hang
    errors = []
    for make in (lambda: apply_fsdp(nn.Linear(3, 3), mesh), lambda: apply_fsdp(make_net(), mesh, "fp8"),
                 lambda: GaLoreAdamW(galore_param_groups(apply_fsdp(make_net(), mesh, None), rank=4, target="linear",
                                                       refresh="svd")),
                 lambda: GaLoreAdamW(apply_fsdp(make_net(), mesh, None).parameters(), per_layer=True)):
        try:
            make()
            errors.append("no error")
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    return dict(results=results, errors=errors, primitives=primitives)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return run_distributed(_fsdp_worker, 2, tmp_path_factory.mktemp("fsdp"), CONFIGS, STEPS, timeout_s=90)


def _single_process(*config):
    model = make_net()
    opt = make_optimizer(model, *config[:4])  # always the torch reference
    for step in range(STEPS):
        train_step(model, opt, step)
    return model, opt


@pytest.mark.parametrize("case", range(len(CONFIGS)), ids=["-".join(map(str, c)) for c in CONFIGS])
def test_fsdp_galore_equals_one_process(fsdp_runs, case):
    model, opt = _single_process(*CONFIGS[case])
    int8 = CONFIGS[case][1] == "int8"
    kernels = len(CONFIGS[case]) > 4  # kernels vs the reference: fp32 rounding of another op order
    ranks = [r["results"][case] for r in fsdp_runs]
    atol = 1e-3 if int8 else 2e-5 if kernels else 2e-6
    for name, p in model.named_parameters():
        for r in ranks:  # every rank gathers the same weights
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=2e-5, atol=atol, msg=name)
    start = make_net()
    # the kernel case ran the kernels: fused down-projection (right), up-projection, Adam (left, plain)
    assert ranks[0]["launches"] == (["adam_step", "down_project_adam", "project_back_update"] if kernels else [])
    moved = max((model.blocks[i][0].weight - start.blocks[i][0].weight).abs().max() for i in (0, 1))
    assert moved > max(10 * atol, 1e-3), "the weights hardly moved: the comparison would be vacuous"
    ours = opt.state_dict()["state"]
    for i, st in ours.items():
        theirs = ranks[0]["state"][i]
        assert theirs.keys() == st.keys(), i
        for key, value in st.items():
            if not isinstance(value, torch.Tensor):
                assert theirs[key] == value, (i, key)
            elif value.dtype in (torch.int8, torch.uint8):  # codes: a rounding tie may flip one level
                flips = theirs[key].int() - value.int()
                assert flips.abs().max() <= 1 and (flips != 0).float().mean() < 0.02, (i, key)
            elif key.startswith("basis") and not int8:  # orthonormal bases: same signs, same vectors
                torch.testing.assert_close(theirs[key].float(), value.float(), rtol=1e-4, atol=1e-4 if kernels else 1e-5,
                                           msg=(i, key))
            elif not int8:  # bf16 moments: a rounding tie may flip one bf16 ulp (2^-8 relative)
                rtol = 8e-3 if value.dtype == torch.bfloat16 else 1e-2 if kernels else 1e-3
                torch.testing.assert_close(theirs[key].float(), value.float(), rtol=rtol, atol=1e-6, msg=(i, key))
        if "refreshes" in st:
            assert st["refreshes"] == 3  # steps 0, 3 and 6


def test_no_collective_moves_a_whole_weight(fsdp_runs):
    smallest = min(20 * 200, 200 * 24)
    seen = set()
    for r in fsdp_runs:
        for res in r["results"]:
            for op, numel in res["calls"]:
                assert numel < smallest, (op, numel)
                seen.add(op.split(".")[1])
    # not vacuous: the refresh's all-reduce and TSQR all-gather, the left side's reduce-scatter
    assert {"allreduce_", "_allgather_base_", "_reduce_scatter_base_"} <= seen, seen


def test_sharded_state_is_split(fsdp_runs):
    for case in range(len(CONFIGS)):
        _, opt = _single_process(*CONFIGS[case])
        local = [r["results"][case]["local_bytes"] for r in fsdp_runs]
        # each rank holds its rows of the moments and left bases; right bases are whole on both
        assert max(local) < 0.75 * opt.state_bytes(), (local, opt.state_bytes())


def test_bad_input_on_a_mesh(fsdp_runs):
    for r in fsdp_runs:
        no_blocks, bad_mp, svd, per_layer = r["errors"]
        assert "no `blocks` ModuleList" in no_blocks
        assert "mixed_precision must be one of" in bad_mp
        assert "refresh='svd' needs each whole gradient" in svd
        assert "per_layer=True cannot step DTensor" in per_layer


def test_row_split_primitives(fsdp_runs):
    from dit_fast.optim import reference as ref

    x = torch.randn(37, 11, generator=torch.Generator().manual_seed(7))
    codes, absmax = ref.quantize_blockwise(x, signed=True)
    y = torch.randn(37, 6, generator=torch.Generator().manual_seed(8))
    q, r = ref.canonical_qr(y)
    # a block straddled the ranks and one of them needed the other's half of it
    assert any(res["primitives"]["partial_differs"] for res in fsdp_runs)
    for res in fsdp_runs:
        got = res["primitives"]
        assert torch.equal(got["codes"], codes) and torch.equal(got["absmax"], absmax)  # int8: exact
        torch.testing.assert_close(got["q"], q, rtol=0, atol=1e-5)  # TSQR = one QR, diag(R) >= 0
        torch.testing.assert_close(got["r"], r, rtol=0, atol=1e-5)
        start, stop = got["span"]
        assert torch.equal(got["scattered"], 3 * torch.arange(15.0).view(5, 3)[start:stop])


def _block_view_worker(rank, world):
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    from dit_fast.models import DiTVideo
    from dit_fast.parallel import apply_fsdp

    def forward_backward(model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # nothing hidden by the defaults: only apply_fsdp's own silencing
            out = model(torch.randn(2, 3, 2, 8, 8), torch.rand(2), torch.tensor([0, 1]))
            out.square().mean().backward()
        return [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]

    def build():
        torch.manual_seed(0)
        return DiTVideo(input_size=(2, 8, 8), patch_size=(1, 4, 4), in_channels=3, hidden_size=32, depth=2,
                        num_heads=2, num_classes=4, learn_sigma=False)

    mesh = init_device_mesh("cpu", (world,))
    before = list(warnings.filters)
    model = apply_fsdp(build(), mesh, None)
    after = list(warnings.filters)
    silenced = forward_backward(model)
    after_forward = list(warnings.filters)
    # the same blocks sharded by a bare fully_shard: FSDP2 still warns there (the silencing is apply_fsdp's)
    from torch.distributed.fsdp import fully_shard
    bare = build()
    for block in bare.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(bare, mesh=mesh)
    return dict(silenced=silenced, bare=forward_backward(bare), same_filters=before == after == after_forward,
                added=[str(f) for f in after if f not in before])


def test_apply_fsdp_dit_blocks_warn_no_view(tmp_path):
    """DiTVideoBlock returns its MLP branch as a view (no copy per block): apply_fsdp silences FSDP2's
    warning about that for this class only, since nothing modifies the branch in place, and only while
    FSDP's post-forward hook of such a block runs: the process-wide warning filters are unchanged."""
    (got,) = run_distributed(_block_view_worker, 1, tmp_path, timeout_s=60)
    assert got["same_filters"], f"apply_fsdp changed warnings.filters: added {got['added']}"
    assert got["silenced"] == []
    assert len(got["bare"]) >= 2 and "DiTVideoBlock) returned a view tensor" in got["bare"][0], got["bare"]
