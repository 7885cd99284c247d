"""dit_fast.parallel.checkpoint: DCP checkpoints of FSDP2 + GaLoreAdamW runs, resharded, atomic, no pickles.

One run on 4 gloo processes trains 4 steps, saves (model, optimizer, trainer: step, RNG, EMA), trains
on to step 8 with a save at step 6 that fails midway on one rank. Resumed from step 4 on 4 ranks it
ends bitwise where it ended; on 2 ranks and in one process it ends there to fp32 rounding (the same
global batch, another summation order). A save killed midway (os._exit inside the writer) leaves the
previous checkpoint loadable. Malicious or corrupt checkpoints are refused before anything is unpickled.
The same 4 processes also run HSDP (a (replicate 2, shard 2) mesh) + GaLoreAdamW against one process.
"""

import multiprocessing
import os
import pickle

import pytest
import torch

from dit_fast.models.checkpoint import CheckpointError, CheckpointNotFoundError
from dit_fast.optim import GaLoreAdamW, galore_param_groups
from dit_fast.parallel import checkpoint as ckpt
from tests.dist_utils import run_distributed
from tests.test_parallel_fsdp import TinyNet, batch, make_net

SAVE_AT, STEPS, FAIL_AT = 4, 8, 6
CONFIGS = {"fp32": ("std", "fp32", False), "int8": ("reverse_std", "int8", True)}


def make_optimizer(model, proj_type, state_dtype, rotate):
    groups = galore_param_groups(model, rank=4, target=lambda name, m: name.startswith("blocks"), update_proj_gap=3,
                                 scale=0.5, proj_type=proj_type, state_dtype=state_dtype)
    opt = GaLoreAdamW(groups, lr=2e-2, weight_decay=0.01, refresh="randomized", oversample=4, refresh_iters=1,
                      rotate_moments=rotate, backend="torch", seed=3)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # lr lives in the checkpoint


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, opt, sched, ema, start, stop, rank=0, world=1):
    for step in range(start, stop):
        x, y = batch(step)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                local(e).lerp_(local(p), 0.25)


def build(config, mesh):
    from dit_fast.parallel.fsdp import apply_fsdp

    model, ema = make_net(), make_net()
    if mesh is not None:
        model, ema = apply_fsdp(model, mesh, mixed_precision=None), apply_fsdp(ema, mesh, mixed_precision=None)
    opt, sched = make_optimizer(model, *CONFIGS[config])
    return model, ema, opt, sched


def snapshot(model, ema, opt):
    sd = opt.state_dict()
    return dict(params={n: whole(p).detach().clone() for n, p in model.named_parameters()},
                ema={n: whole(p).detach().clone() for n, p in ema.named_parameters()},
                opt={i: {k: whole(v).clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                     for i, st in sd["state"].items()},
                lr=[g["lr"] for g in sd["param_groups"]])


class _FailOnRank1(Exception):
    pass


def _run_on_4(rank, world, roots):
    """The uninterrupted run (with a failed save at step 6), then a resume from step 4 on the same ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for config, root in roots.items():
        model, ema, opt, sched = build(config, mesh)
        train(model, opt, sched, ema, 0, SAVE_AT, rank, world)
        ckpt.save_checkpoint(root, SAVE_AT, model=model, optimizer=opt, scheduler=sched,
                             trainer=ckpt.TrainerState(ema=ema))
        saved = snapshot(model, ema, opt)
        probe = torch.rand(3)  # the RNG stream right after the save
        train(model, opt, sched, ema, SAVE_AT, FAIL_AT, rank, world)
        write = torch.distributed.checkpoint.FileSystemWriter.write_data

        def failing(self, plan, planner):
            result = write(self, plan, planner)
            if rank == 1:
                raise _FailOnRank1("disk full (simulated)")
            return result

        torch.distributed.checkpoint.FileSystemWriter.write_data = failing
        try:
            ckpt.save_checkpoint(root, FAIL_AT, model=model, optimizer=opt, scheduler=sched,
                                 trainer=ckpt.TrainerState(ema=ema))
            failed = "no error"
        except Exception as e:  # every rank hears of rank 1's failure
            failed = f"{type(e).__name__}: {e}"
        finally:
            torch.distributed.checkpoint.FileSystemWriter.write_data = write
        latest = ckpt.latest_checkpoint(root).name
        train(model, opt, sched, ema, FAIL_AT, STEPS, rank, world)
        final = snapshot(model, ema, opt)

        model, ema, opt, sched = build(config, mesh)
        trainer = ckpt.TrainerState(ema=ema)
        ckpt.load_checkpoint(root, model=model, optimizer=opt, scheduler=sched, trainer=trainer)
        resumed_probe = torch.rand(3)
        loaded = snapshot(model, ema, opt)
        train(model, opt, sched, ema, trainer.step, STEPS, rank, world)
        out[config] = dict(saved=saved, final=final, probe=probe, failed=failed, latest=latest, loaded=loaded,
                           resumed=snapshot(model, ema, opt), resumed_probe=resumed_probe, step=trainer.step)
    # HSDP: rows split over the "shard" dimension, replicated over "replicate"; data over all 4 ranks
    from dit_fast.parallel.fsdp import apply_fsdp
    from tests.test_parallel_fsdp import make_optimizer as fsdp_optimizer

    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = apply_fsdp(make_net(), hsdp, mixed_precision=None)
    opt = fsdp_optimizer(model, "reverse_std", "fp32", True)
    for step in range(STEPS):
        x, y = batch(step)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
    out["hsdp"] = {n: whole(p).detach() for n, p in model.named_parameters()}
    return out


def _resume_on(rank, world, roots):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for config, root in roots.items():
        model, ema, opt, sched = build(config, mesh)
        trainer = ckpt.TrainerState(ema=ema)
        ckpt.load_checkpoint(root, model=model, optimizer=opt, scheduler=sched, trainer=trainer)
        probe = torch.rand(3)
        loaded = snapshot(model, ema, opt)
        train(model, opt, sched, ema, trainer.step, STEPS, rank, world)
        out[config] = dict(loaded=loaded, resumed=snapshot(model, ema, opt), probe=probe, step=trainer.step)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp")
    roots = {config: str(base / config) for config in CONFIGS}
    on4 = run_distributed(_run_on_4, 4, base, roots, timeout_s=120)
    on2 = run_distributed(_resume_on, 2, base, roots, timeout_s=120)
    return roots, on4, on2


def _equal(a, b, exact, atol=2e-6):
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=2e-5, atol=atol, msg=key)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_on_4_is_bitwise(runs, config):
    _, on4, _ = runs
    for r in on4:
        res = r[config]
        assert res["step"] == SAVE_AT and res["latest"] == f"step_{SAVE_AT:08d}"
        assert "disk full (simulated)" in res["failed"]
        assert torch.equal(res["probe"], res["resumed_probe"])  # each rank's RNG stream restored
        _equal(res["final"]["params"], res["resumed"]["params"], exact=True)
        _equal(res["final"]["ema"], res["resumed"]["ema"], exact=True)
        assert res["final"]["lr"] == res["resumed"]["lr"]
    moved = (on4[0][config]["final"]["params"]["blocks.0.0.weight"] - make_net().blocks[0][0].weight).abs().max()
    assert moved > 0.01


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_on_2_reshards(runs, config):
    _, on4, on2 = runs
    saved = on4[0][config]["saved"]
    for rank, r in enumerate(on2):
        res = r[config]
        assert res["step"] == SAVE_AT
        assert torch.equal(res["probe"], on4[rank][config]["probe"])  # ranks 0, 1 get their streams back
        # loading moves data only: the state saved on 4 ranks arrives exactly, int8 codes and absmax too
        _equal(saved["params"], res["loaded"]["params"], exact=True)
        _equal(saved["ema"], res["loaded"]["ema"], exact=True)
        for i, st in saved["opt"].items():
            for key, value in st.items():
                got = res["loaded"]["opt"][i][key]
                assert torch.equal(value, got) if isinstance(value, torch.Tensor) else value == got, (i, key)
        # then 2 ranks continue as 4 did: the same global batch, summed in another order; int8 codes may
        # flip one level on a rounding tie (tests/test_parallel_fsdp.py)
        final = on4[0][config]["final"]
        _equal(final["params"], res["resumed"]["params"], exact=False, atol=1e-3 if config == "int8" else 2e-6)
        _equal(final["ema"], res["resumed"]["ema"], exact=False, atol=1e-3 if config == "int8" else 2e-6)


def test_resume_in_one_process_and_export(runs, tmp_path):
    roots, on4, _ = runs
    model, ema, opt, sched = build("fp32", None)
    trainer = ckpt.TrainerState(ema=ema)
    loaded = ckpt.load_checkpoint(roots["fp32"], model=model, optimizer=opt, scheduler=sched, trainer=trainer)
    assert loaded.name == f"step_{SAVE_AT:08d}" and trainer.step == SAVE_AT
    assert torch.equal(torch.rand(3), on4[0]["fp32"]["probe"])  # rank 0's stream
    train(model, opt, sched, ema, SAVE_AT, STEPS)
    final = on4[0]["fp32"]["final"]
    _equal(final["params"], dict(model.named_parameters()), exact=False)
    from safetensors.torch import load_file

    out = ckpt.export_safetensors(roots["fp32"], tmp_path / "model.safetensors")
    _equal(on4[0]["fp32"]["saved"]["params"], load_file(out), exact=True)
    out = ckpt.export_safetensors(os.path.join(roots["fp32"], f"step_{SAVE_AT:08d}"), tmp_path / "ema.safetensors",
                                  which="ema")
    _equal(on4[0]["fp32"]["saved"]["ema"], load_file(out), exact=True)


def test_failed_save_leaves_the_previous_one(runs):
    roots, _, _ = runs
    for root in roots.values():
        assert (open(os.path.join(root, "latest")).read().strip()) == f"step_{SAVE_AT:08d}"
        assert not os.path.exists(os.path.join(root, f"step_{FAIL_AT:08d}"))
        assert os.path.isdir(os.path.join(root, f".step_{FAIL_AT:08d}.partial"))  # cleared by the next save


# ------------------------------------------------------------------ one process: kill, bad checkpoints


def _save_then_die(root, marker):
    torch.set_num_threads(1)
    model, ema, opt, sched = build("int8", None)
    train(model, opt, sched, ema, 0, 2)
    ckpt.save_checkpoint(root, 2, model=model, optimizer=opt, scheduler=sched, trainer=ckpt.TrainerState(ema=ema))
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, marker)
    train(model, opt, sched, ema, 2, 3)
    write = torch.distributed.checkpoint.FileSystemWriter.write_data

    def die(self, plan, planner):
        write(self, plan, planner)  # the shard is on disk, the .metadata and the rename are not
        os._exit(17)

    torch.distributed.checkpoint.FileSystemWriter.write_data = die
    ckpt.save_checkpoint(root, 3, model=model, optimizer=opt)


def test_killed_save_leaves_the_previous_one_loadable(tmp_path):
    root, marker = str(tmp_path / "run"), str(tmp_path / "params.pt")
    proc = multiprocessing.get_context("spawn").Process(target=_save_then_die, args=(root, marker))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    assert proc.exitcode == 17
    assert os.path.isdir(os.path.join(root, ".step_00000003.partial"))
    assert ckpt.latest_checkpoint(root).name == "step_00000002"
    model, ema, opt, sched = build("int8", None)
    trainer = ckpt.TrainerState(ema=ema)
    ckpt.load_checkpoint(root, model=model, optimizer=opt, scheduler=sched, trainer=trainer)
    assert trainer.step == 2 and sched.last_epoch == 2
    _equal(torch.load(marker, weights_only=True), dict(model.named_parameters()), exact=True)
    ckpt.save_checkpoint(root, 3, model=model, optimizer=opt, keep=1)  # clears the partial, keeps one
    assert sorted(os.listdir(root)) == ["latest", "step_00000003"]


class _Killed(BaseException):
    """A simulated kill: not an Exception, so no handler on the way reports it as a failed save."""


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _loaded_params(root):
    model = make_net(seed=5)
    ckpt.load_checkpoint(root, model=model)
    return _params(model)


def test_saving_a_step_again_is_atomic_under_a_kill(tmp_path, monkeypatch):
    """step 1 saved, then saved again with other weights, killed before the k-th rename / replace / removal
    of the publish, for every k: latest always names a complete directory that loads the old or the new
    weights, and the next save finishes the swap (nothing left behind)."""
    import shutil

    old_model, new_model = make_net(seed=1), make_net(seed=2)
    old, new = _params(old_model), _params(new_model)
    template = tmp_path / "template"
    ckpt.save_checkpoint(template, 1, model=old_model)
    ops = {"count": 0, "kill_at": None, "armed": False}
    publish = ckpt._publish

    def armed_publish(*args):  # observes where publishing starts; the publish itself runs unchanged
        ops["armed"] = True
        return publish(*args)

    def killable(fn):
        def op(*args, **kwargs):
            if ops["armed"]:
                ops["count"] += 1
                if ops["count"] == ops["kill_at"]:
                    raise _Killed(f"killed before {fn.__name__}{args}")
            return fn(*args, **kwargs)
        return op

    monkeypatch.setattr(ckpt, "_publish", armed_publish)
    for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, killable(getattr(module, name)))
    def which(got):
        return "new" if all(torch.equal(got[n], new[n]) for n in new) else \
            "old" if all(torch.equal(got[n], old[n]) for n in old) else "neither"

    seen, after, k = [], [], 1
    while True:
        root = tmp_path / f"run{k}"
        shutil.copytree(template, root)
        ops.update(count=0, kill_at=k, armed=False)
        try:
            ckpt.save_checkpoint(root, 1, model=new_model)
        except _Killed:
            pass
        else:
            break  # k is past the last operation: the save completed
        ops.update(armed=False, kill_at=None)
        latest = (root / "latest").read_text().strip()
        assert (root / latest / ".metadata").is_file(), f"kill {k}: latest names {latest!r}, not a checkpoint"
        seen.append(which(_loaded_params(root)))
        ckpt.save_checkpoint(root, 2, model=old_model)  # any later save finishes (or drops) the swap first
        assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"], (k, os.listdir(root))
        after.append(which(_loaded_params(root / "step_00000001")))
        k += 1
    assert sorted(os.listdir(root)) == ["latest", "step_00000001"] and which(_loaded_params(root)) == "new"
    assert "neither" not in seen + after and "old" in seen and "new" in seen and len(seen) >= 5, (seen, after)
    assert after == sorted(after, key=["old", "new"].index), f"once published, never undone: {after}"


def _rank0_fails_worker(rank, world, base):
    """Rank 0 cannot create the root (a file is in the way), then cannot publish (``latest`` is a directory):
    every rank gets the error; how long each took, and the group still works."""
    import time

    model, out = make_net(), {}
    for case, root in (("prepare", os.path.join(base, "a_file", "run")), ("publish", os.path.join(base, "run"))):
        start = time.monotonic()
        try:
            ckpt.save_checkpoint(root, 1, model=model)
            out[case] = "no error"
        except ckpt.CheckpointSaveError as e:
            out[case] = str(e)
        out[f"{case}_s"] = time.monotonic() - start
        torch.distributed.barrier()
    ok = torch.ones(1)
    torch.distributed.all_reduce(ok)
    out["healthy"] = int(ok.item())
    return out


def test_a_failure_on_rank0_reaches_every_rank(tmp_path):
    base = tmp_path / "shared"
    base.mkdir()
    (base / "a_file").write_text("in the way\n")
    (base / "run" / "latest").mkdir(parents=True)
    timeout = 30
    results = run_distributed(_rank0_fails_worker, 2, tmp_path, str(base), timeout_s=timeout)
    for rank, got in enumerate(results):
        assert "preparing" in got["prepare"] and "rank 0 failed: " in got["prepare"] \
            and "Error" in got["prepare"], (rank, got["prepare"])
        assert "publishing" in got["publish"] and "IsADirectoryError" in got["publish"], (rank, got["publish"])
        assert got["prepare_s"] < timeout / 3 and got["publish_s"] < timeout / 3, (rank, got)
        assert got["healthy"] == 2


def _run_json_fails_worker(rank, world, base):
    """save_sharded (the trainer's sharded save): rank 0 alone writes run.json first; here it cannot (a
    directory is in the way). Every rank gets the error, quickly, and the group still works."""
    import time
    import types

    from dit_fast.train_parallel import RUN_JSON, SHARDED_DIR, save_sharded

    os.makedirs(os.path.join(base, SHARDED_DIR, RUN_JSON), exist_ok=True)
    model = make_net()
    model.vocabulary = ["a", "b"]
    cfg = types.SimpleNamespace(out_dir=base, keep_checkpoints=None, to_json=lambda: "{}")
    trainer = types.SimpleNamespace(cfg=cfg, dist=types.SimpleNamespace(is_main=rank == 0), model=model,
                                    optimizer=None, ema=None, losses=[1.0], step=1)
    start, out = time.monotonic(), {}
    try:
        save_sharded(trainer)
        out["error"] = "no error"
    except ckpt.CheckpointSaveError as e:
        out["error"] = str(e)
    out["seconds"] = time.monotonic() - start
    ok = torch.ones(1)
    torch.distributed.all_reduce(ok)
    out["healthy"] = int(ok.item())
    return out


def test_a_failed_run_description_on_rank0_reaches_every_rank(tmp_path):
    base = tmp_path / "shared"
    base.mkdir()
    timeout = 30
    results = run_distributed(_run_json_fails_worker, 2, tmp_path, str(base), timeout_s=timeout)
    for rank, got in enumerate(results):
        assert "run.json" in got["error"] and "rank 0 failed: " in got["error"], (rank, got["error"])
        assert got["seconds"] < timeout / 3 and got["healthy"] == 2, (rank, got)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture
def saved(tmp_path):
    model, ema, opt, sched = build("fp32", None)
    train(model, opt, sched, ema, 0, 1)
    return ckpt.save_checkpoint(tmp_path / "run", 1, model=model, optimizer=opt)


def _rewrite_metadata(ckpt_dir, edit):
    path = os.path.join(ckpt_dir, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)  # our own file, written by this test's save
    edit(md)
    with open(path, "wb") as f:
        pickle.dump(md, f)


def test_malicious_metadata_is_never_unpickled(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _rewrite_metadata(saved, lambda md: md.planner_data.update(x=_Payload()))
    model = make_net()
    with pytest.raises(CheckpointError, match="posix.system|os.system|refusing to unpickle"):
        ckpt.load_checkpoint(saved, model=model)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        ckpt.export_safetensors(saved, tmp_path / "m.safetensors")
    assert not os.path.exists(tmp_path / "PWNED")


def test_pickled_items_and_odd_storage_are_refused(saved):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    _rewrite_metadata(saved, lambda md: md.state_dict_metadata.update({"model.head.bias": BytesStorageMetadata()}))
    with pytest.raises(CheckpointError, match="'model.head.bias' is a pickled object"):
        ckpt.load_checkpoint(saved, model=make_net())

    def escape(md):
        index = next(iter(md.storage_data))
        md.storage_data[index].relative_path = "../elsewhere.distcp"

    _rewrite_metadata(saved, escape)
    with pytest.raises(CheckpointError, match="not a plain file of this directory"):
        ckpt.load_checkpoint(saved, model=make_net())


def test_bad_checkpoints_and_arguments(saved, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "empty", model=make_net())
    wide = TinyNet()
    wide.head = torch.nn.Linear(20, 5)
    with pytest.raises(CheckpointError, match=r"'model.head.weight' is torch.float32 of shape \(3, 20\), expected "
                                              r"torch.float32 of shape \(5, 20\)"):
        ckpt.load_checkpoint(saved, model=wide)
    with pytest.raises(CheckpointError, match="has no 'trainer.step'"):
        ckpt.load_checkpoint(saved, model=make_net(), trainer=ckpt.TrainerState())
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        ckpt.save_checkpoint(tmp_path / "x", -1, model=make_net())
    with pytest.raises(ValueError, match="keep must be None or an int >= 1"):
        ckpt.save_checkpoint(tmp_path / "x", 1, model=make_net(), keep=0)
    with pytest.raises(TypeError, match="'trainer.extra.note' is a str"):
        ckpt.save_checkpoint(tmp_path / "x", 1, model=make_net(), trainer=ckpt.TrainerState(extra={"note": "hi"}))
    with pytest.raises(ValueError, match="which must be one of"):
        ckpt.export_safetensors(saved, tmp_path / "m.safetensors", which="optim")
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.export_safetensors(saved, tmp_path / "missing" / "m.safetensors")
    with pytest.raises(CheckpointError, match="holds no ema weights"):
        ckpt.export_safetensors(saved, tmp_path / "m.safetensors", which="ema")
    with open(os.path.join(saved, ".metadata"), "wb") as f:
        f.write(os.urandom(300))
    with pytest.raises(CheckpointError, match="unreadable .metadata"):
        ckpt.load_checkpoint(saved, model=make_net())


def test_hsdp_equals_one_process(runs):
    from tests.test_parallel_fsdp import make_optimizer as fsdp_optimizer
    from tests.test_parallel_fsdp import train_step

    model = make_net()
    opt = fsdp_optimizer(model, "reverse_std", "fp32", True)
    for step in range(STEPS):
        train_step(model, opt, step)
    for r in runs[1]:
        _equal(dict(model.named_parameters()), r["hsdp"], exact=False)
