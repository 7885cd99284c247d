"""`dit-fast train` / `generate` / `export` past one process: --sp, --fsdp, sharded checkpoints (CPU, gloo).

What runs where (each torchrun process imports torch and dit_fast again, 4-15 s of CPU on this machine,
so there are three torchrun launches and the rest runs in forked processes or in this one):

* torchrun, 2 ranks: `train --sp 2` (Ulysses; gradients summed over the ranks without DDP) and
  `train --fsdp --gradient-checkpointing --grad-accum 2` (FSDP2 over both ranks, each with its own
  samples; sharded DCP checkpoints) both equal one process of the same run (losses, weights, EMA);
  `generate --sp 2` writes the same GIF, byte for byte, as one process.
* forked ranks (tests/dist_utils.run_distributed): the FSDP run resumed from its 2-rank step-2
  checkpoint through `dit-fast train` continues the 2-rank trajectory, bit for bit on 2 ranks and
  to float rounding on 1 (resharding), exports included; the gradients each optimizer step sees,
  every step, for --sp 2 with micro-batches, --fsdp with GaLore (randomized refresh on the shards, a
  refresh inside the run) and --fsdp --sp 2 --sp-mode ring, equal one process's.
* bad input: on every rank, one line, exit 2, before any process group exists (two real processes
  with torchrun's environment, and each case in this process).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from dit_fast import train as train_mod
from dit_fast.cli import main
from dit_fast.models.checkpoint import read_safetensors
from dit_fast.train import Trainer, TrainConfig
from tests.dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # per torchrun launch (measured: 7-10 s each on an idle machine)
TINY = dict(num_frames=4, size=16, patch=(1, 8, 8), hidden_size=32, depth=2, num_heads=2, text_dim=16, batch_size=4,
            steps=4, checkpoint_every=2, warmup=1, log_every=1, device="cpu")


def _flags(**kw):
    """TrainConfig fields -> dit-fast train flags."""
    out = []
    for name, value in {**TINY, **kw}.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, tuple):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out + ["--quiet"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(args, nproc=2):
    """python -m torch.distributed.run --standalone (its agent binds its own port: no free-port race)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "dit_fast.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(), cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(args)}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _log_losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "log.jsonl"))]


def _launch_all(base):
    """The three torchrun launches and the one-process references they are compared with, all on disk."""
    Trainer(TrainConfig(out_dir=str(base / "single"), **TINY), resume=None, progress_bar=False).train()
    _torchrun(["train", "--out-dir", str(base / "sp"), *_flags(sp=2)])
    res = _torchrun(["train", "--out-dir", str(base / "fsdp"), *_flags(fsdp=True, gradient_checkpointing=True,
                                                                      grad_accum=2)])
    (base / "fsdp_stdout.txt").write_text(res.stdout)
    gen = ["generate", "a red circle moving right", "--steps", "3", "--device", "cpu", "--quiet"]
    _torchrun([*gen, "--sp", "2", "-o", str(base / "sp.gif")])
    assert main([*gen, "-o", str(base / "one.gif")]) == 0
    (base / "done").write_text("ok\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, worker_id):
    """Paths of the launches' results. Under pytest-xdist the first worker that needs them launches them in
    the session's shared temporary directory and the others wait for and read the same files, so the
    torchrun launches happen once per session, whatever the number of workers."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    base = shared / "cli_distributed"
    with FileLock(str(shared / "cli_distributed.lock")):
        if not (base / "done").exists():
            shutil.rmtree(base, ignore_errors=True)  # a worker that failed halfway: start over
            base.mkdir()
            _launch_all(base)
    single, _ = read_safetensors(base / "single" / "ckpt_0000004.safetensors")
    return {"base": base, "sp": str(base / "sp"), "fsdp": str(base / "fsdp"),
            "fsdp_stdout": (base / "fsdp_stdout.txt").read_text(), "single_losses": _log_losses(base / "single"),
            "single_params": {k[6:]: v for k, v in single.items() if k.startswith("model.")},
            "single_ema": {k[4:]: v for k, v in single.items() if k.startswith("ema.")},
            "gif_sp": str(base / "sp.gif"), "gif_one": str(base / "one.gif")}


def test_train_sp2_equals_one_process(runs):
    assert _log_losses(runs["sp"]) == pytest.approx(runs["single_losses"], rel=1e-6)
    tensors, meta = read_safetensors(os.path.join(runs["sp"], "ckpt_0000004.safetensors"))
    assert json.loads(meta["config"])["sp"] == 2
    for name, p in runs["single_params"].items():
        torch.testing.assert_close(tensors[f"model.{name}"], p, rtol=1e-5, atol=1e-6, msg=name)
    # rank 0 alone wrote the single-file checkpoints
    assert sorted(os.listdir(runs["sp"])) == ["ckpt_0000002.safetensors", "ckpt_0000004.safetensors", "latest",
                                              "log.jsonl", "state_0000002.pt", "state_0000004.pt"]


def test_train_fsdp_equals_one_process_and_exports(runs, tmp_path):
    run = runs["fsdp"]
    assert _log_losses(run) == pytest.approx(runs["single_losses"], rel=1e-5)
    dcp = os.path.join(run, "dcp")
    assert sorted(os.listdir(dcp)) == ["latest", "run.json", "step_00000002", "step_00000004"]
    assert sorted(os.listdir(os.path.join(dcp, "step_00000004"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "checkpoints in " + dcp in runs["fsdp_stdout"]
    dest = tmp_path / "model.safetensors"
    assert main(["export", run, str(dest)]) == 0
    tensors, meta = read_safetensors(dest)
    assert meta["step"] == "4" and json.loads(meta["config"])["fsdp"] is True
    assert json.load(open(tmp_path / "model.json"))["step"] == 4
    assert set(tensors) == set(runs["single_ema"])
    for name, e in runs["single_ema"].items():
        torch.testing.assert_close(tensors[name], e, rtol=1e-4, atol=1e-6, msg=name)
    # the exported file is a model generate reads
    gif = tmp_path / "x.gif"
    assert main(["generate", "a blue square bouncing", "--checkpoint", str(dest), "--steps", "2", "--device", "cpu",
                 "--quiet", "-o", str(gif)]) == 0 and gif.exists()


def test_generate_sp2_writes_the_one_process_video(runs):
    sp, one = imageio.mimread(runs["gif_sp"]), imageio.mimread(runs["gif_one"])
    assert len(sp) == len(one) == 8
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(sp, one)) == 0
    assert open(runs["gif_sp"], "rb").read() == open(runs["gif_one"], "rb").read()


# --------------------------------------------------------------------------------------------
# In forked ranks: resume on another rank count, and the gradients of every parallel layout
# --------------------------------------------------------------------------------------------


def _resume_worker(rank, world, resume, out_dir, flags):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        code = main(["train", "--out-dir", out_dir, "--resume", resume, *flags])
    finally:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(name, None)
    return code


@pytest.mark.parametrize("world", [2, 1])
def test_fsdp_run_resumes_on_any_rank_count(runs, tmp_path, world):
    """The 2-rank run's step-2 checkpoint, continued by `dit-fast train --fsdp`: on 2 ranks bit for bit (losses and
    exported EMA); on 1 rank (resharded) to float summation order, since the samples, noise and timesteps are
    drawn per sample, never per rank."""
    out = str(tmp_path / "resumed")
    flags = _flags(fsdp=True, gradient_checkpointing=True, grad_accum=2)
    step2 = os.path.join(runs["fsdp"], "dcp", "step_00000002")
    assert run_distributed(_resume_worker, world, tmp_path, step2, out, flags, timeout_s=120) == [0] * world
    straight = _log_losses(runs["fsdp"])[2:]
    two, resumed = tmp_path / "two.safetensors", tmp_path / "resumed.safetensors"
    assert main(["export", runs["fsdp"], str(two)]) == 0
    assert main(["export", os.path.join(out, "dcp", "step_00000004"), str(resumed)]) == 0
    a, b = read_safetensors(two)[0], read_safetensors(resumed)[0]
    assert set(a) == set(b)
    if world == 2:
        assert _log_losses(out) == straight
        assert all(torch.equal(a[name], b[name]) for name in a)
    else:
        assert _log_losses(out) == pytest.approx(straight, rel=1e-5)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


GRAD_CASES = {  # TrainConfig overrides: the parallel run, and what its one-process reference shares
    "sp2_ulysses_accum": dict(sp=2, grad_accum=2),
    "fsdp_galore_checkpointing": dict(fsdp=True, optimizer="galore", galore_rank=4, galore_update_proj_gap=2,
                                      gradient_checkpointing=True),
    "fsdp_sp2_ring": dict(fsdp=True, sp=2, sp_mode="ring"),
}
GRAD_STEPS = 3


def _recording(trainer):
    """Wraps trainer.optimizer.step to record the whole gradients (and the loss) each step sees."""
    seen = []
    step = trainer.optimizer.step

    def recorded(*args, **kw):
        seen.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for n, p in trainer.model.named_parameters()})
        return step(*args, **kw)
    trainer.optimizer.step = recorded
    return seen


def _grads_worker(rank, world, base):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    out = {}
    for name, kw in GRAD_CASES.items():
        cfg = TrainConfig(out_dir=os.path.join(base, name), **{**TINY, "steps": GRAD_STEPS, "checkpoint_every": 100},
                          **kw)
        trainer = Trainer(cfg, resume=None, progress_bar=False)
        seen = _recording(trainer)
        losses = trainer.train()
        out[name] = {"losses": losses, "grads": seen}
    return out


def _single_grads(name, base):
    kw = {k: v for k, v in GRAD_CASES[name].items() if k not in ("sp", "sp_mode", "fsdp")}
    cfg = TrainConfig(out_dir=os.path.join(base, name), **{**TINY, "steps": GRAD_STEPS, "checkpoint_every": 100}, **kw)
    trainer = Trainer(cfg, resume=None, progress_bar=False)
    if cfg.optimizer == "galore":  # the FSDP run's optimizer: GaLore's randomized refresh (row-local on shards)
        trainer.optimizer = train_mod._make_optimizer(dataclasses.replace(cfg, fsdp=True), trainer.model)
    seen = _recording(trainer)
    return trainer.train(), seen


def test_every_parallel_layout_sees_one_process_gradients(tmp_path):
    results = run_distributed(_grads_worker, 2, tmp_path, str(tmp_path / "ranks"), timeout_s=120)
    failures = []
    for name in GRAD_CASES:
        losses, grads = _single_grads(name, str(tmp_path / "single"))
        for rank in range(2):
            got = results[rank][name]
            try:
                assert got["losses"] == pytest.approx(losses, rel=1e-5), (got["losses"], losses)
                assert len(got["grads"]) == len(grads) == GRAD_STEPS
                for step, (g_par, g_one) in enumerate(zip(got["grads"], grads)):
                    assert set(g_par) == set(g_one)
                    for pname in g_one:
                        torch.testing.assert_close(g_par[pname], g_one[pname], rtol=1e-4, atol=1e-6,
                                                   msg=f"step {step} {pname}")
            except AssertionError as e:
                failures.append(f"{name} rank {rank}: {str(e)[:600]}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------
# Bad input: one line on every rank, exit 2, before any process group exists
# --------------------------------------------------------------------------------------------


BAD = {  # name: (argv, WORLD_SIZE or None for no torchrun, the argument the line must name, text it must hold)
    "train --sp without torchrun": (["train", "--sp", "2"], None, "--sp", "torchrun --standalone --nproc-per-node 2"),
    "train --fsdp without torchrun": (["train", "--fsdp"], None, "--fsdp", "torchrun --standalone"),
    "train --sp not dividing the ranks": (["train", "--sp", "3"], 2, "--sp", "torchrun started 2"),
    "train --sp not dividing the heads": (["train", "--sp", "2", "--num-heads", "3", "--hidden-size", "48"], 2,
                                          "--sp", "use --sp-mode ring"),
    "train usp without a ring degree": (["train", "--sp", "2", "--sp-mode", "usp"], 2, "--ring", "between 1 and 2"),
    "train --ring without usp": (["train", "--sp", "2", "--ring", "2"], 2, "--ring", "--sp-mode usp"),
    "train too few tokens for --sp": (["train", "--sp", "2", "--num-frames", "2", "--size", "16", "--patch", "2", "16",
                                       "16"], 2,
                                      "--sp", "cannot be split over 2"),
    "train batch not divisible over dp": (["train", "--sp", "2", "--batch-size", "3"], 4, "--batch-size",
                                          "world_size / sp"),
    "train cuda without GPUs": (["train", "--sp", "2", "--device", "cuda"], 2, "--device", "CUDA is not available"),
    "generate --sp without torchrun": (["generate", "a red circle moving right", "--sp", "2"], None, "--sp",
                                       "torchrun --standalone --nproc-per-node 2"),
    "generate under torchrun without --sp": (["generate", "a red circle moving right"], 2, "--sp", "pass --sp 2"),
    "generate --sp not dividing the heads": (["generate", "a red circle moving right", "--sp", "3"], 3, "--sp",
                                             "num_heads 4 is not divisible"),
    "generate usp --ring not dividing": (["generate", "a red circle moving right", "--sp", "4", "--sp-mode", "usp",
                                          "--ring", "3"], 4, "--ring", "must divide 4"),
    "generate cuda without GPUs": (["generate", "a red circle moving right", "--sp", "2", "--device", "cuda"], 2,
                                   "--device", "CUDA is not available"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_parallel_input_is_one_line_on_every_rank(name, tmp_path, capsys, monkeypatch):
    argv, world, argument, text = BAD[name]
    argv = argv + (["--out-dir", str(tmp_path / "run"), "--device", "cpu"] if argv[0] == "train" else
                   ["-o", str(tmp_path / "x.gif"), "--device", "cpu"])
    if "cuda" in argv:  # the last --device wins
        argv += ["--device", "cuda"]

    def never(*a, **k):
        raise AssertionError("reached the process group before checking the arguments")

    monkeypatch.setattr("dit_fast.parallel.init_from_env", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    for rank in range(world or 1):
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(var, raising=False)
        if world is not None:
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("LOCAL_RANK", str(rank))
        code = main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (code, err)
        assert len(lines) == 1 and "Traceback" not in err, err
        prefix = f"[rank {rank}] " if world and world > 1 else ""
        assert lines[0].startswith(prefix + f"dit-fast {argv[0]}: error: argument {argument}:"), lines[0]
        assert text in lines[0], lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.gif").exists()


def test_bad_input_exits_on_every_rank_without_a_rendezvous(tmp_path):
    """Two real processes with the environment torchrun gives them (plain processes: torchrun's agent stops
    the other ranks once one fails, so whether they reach their own error would depend on timing). The
    rendezvous address is unreachable: a rank that tried to join a group would fail or hang, not exit 2."""
    argv = [sys.executable, "-m", "dit_fast.cli", "train", "--out-dir", str(tmp_path / "run"),
            *_flags(sp=2, num_heads=3, hidden_size=48)]
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=ROOT))
    try:
        results = [p.communicate(timeout=TIMEOUT_S) + (p.returncode,) for p in procs]
    finally:
        for p in procs:  # ours, by handle
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (out, err, code) in enumerate(results):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (rank, code, err)
        assert lines[0].startswith(f"[rank {rank}] dit-fast train: error: argument --sp: --sp 2 --sp-mode ulysses: "
                                   "num_heads 3 is not divisible by the Ulysses degree 2"), lines[0]
    assert not (tmp_path / "run").exists()


def test_checkpoint_formats_do_not_mix(runs, tmp_path, capsys, monkeypatch):
    """A sharded run continues only with --fsdp, a single-file run only without; both say what to do instead.
    A corrupt shard is one line naming the checkpoint (export), not a traceback."""
    monkeypatch.setattr("dit_fast.parallel.init_from_env", lambda *a, **k: pytest.fail("reached the process group"))
    cases = [
        (["train", "--out-dir", runs["fsdp"], *_flags(steps=6)], None, "--out-dir", "continue it with --fsdp"),
        (["train", "--out-dir", str(tmp_path / "new"), "--resume", runs["sp"], *_flags(fsdp=True, steps=6)], 2,
         "--resume", "single-file run, trained without --fsdp"),
        (["generate", "a red circle moving right", "--checkpoint", runs["fsdp"], "--device", "cpu", "-o",
          str(tmp_path / "x.gif")], None, "--checkpoint", f"dit-fast export {runs['fsdp']} model.safetensors"),
    ]
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs["fsdp"], corrupt)
    with open(corrupt / "dcp" / "step_00000004" / "__1_0.distcp", "r+b") as f:
        f.truncate(64)
    cases.append((["export", str(corrupt), str(tmp_path / "m.safetensors")], None, "run_dir", "step_00000004"))
    for argv, world, argument, text in cases:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(var, raising=False)
        if world:
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("RANK", "0")
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"argument {argument}:" in err and text in err, err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "x.gif").exists()
