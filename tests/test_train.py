"""dit_fast.train on a tiny text-to-video config (backend="torch", CPU): learning, checkpoints, resume, DDP."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dit_fast import train as train_mod
from dit_fast.train import Trainer, TrainConfig, checkpoint_paths, learning_rate


def tiny(out_dir, **kw):
    base = dict(out_dir=str(out_dir), num_frames=4, size=16, patch=(2, 8, 8), hidden_size=32, depth=1, num_heads=2,
                text_dim=16, batch_size=4, lr=3e-3, warmup=2, steps=6, checkpoint_every=3, log_every=1,
                ema_decay=0.9, backend="torch", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def fixed_batch_loss(trainer, n=8):
    """Velocity loss of the current weights on a fixed batch (fixed noise and timesteps)."""
    trainer.model.eval()
    x0, kwargs, t, noise = trainer._batch(list(range(10_000, 10_000 + n)))
    kwargs = {**kwargs, "force_drop_ids": torch.zeros(n, dtype=torch.bool)}
    with torch.no_grad():
        return trainer.flow.training_losses(trainer.model, x0, kwargs, t=t, noise=noise)["loss"].mean().item()


def test_training_reduces_loss(tmp_path):
    trainer = Trainer(tiny(tmp_path, steps=40, checkpoint_every=100), resume=None, progress_bar=False)
    before = fixed_batch_loss(trainer)
    losses = trainer.train()
    after = fixed_batch_loss(trainer)
    assert len(losses) == 40 and all(l == l for l in losses)
    assert after < 0.75 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_checkpoint_files_weights_only_and_layout(tmp_path):
    trainer = Trainer(tiny(tmp_path), resume=None, progress_bar=False)
    trainer.train()
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt_0000003.safetensors", "ckpt_0000006.safetensors", "latest", "log.jsonl",
                     "state_0000003.pt", "state_0000006.pt"]
    assert open(tmp_path / "latest").read().strip() == "6"
    state = torch.load(tmp_path / "state_0000006.pt", weights_only=True)
    assert state["step"] == 6 and len(state["losses"]) == 6 and "optimizer" in state
    tensors = load_file(str(tmp_path / "ckpt_0000006.safetensors"))
    model_keys = {k for k in tensors if k.startswith("model.")}
    ema_keys = {k for k in tensors if k.startswith("ema.")}
    assert {k[6:] for k in model_keys} == set(trainer.model.state_dict())
    assert {k[4:] for k in ema_keys} == {n for n, _ in trainer.model.named_parameters()}
    differ = [n for n, p in trainer.model.named_parameters() if not torch.equal(tensors[f"ema.{n}"], p.detach())]
    assert len(differ) > len(ema_keys) // 2  # the EMA lags the weights that moved
    for n, p in trainer.model.named_parameters():
        assert torch.equal(tensors[f"model.{n}"], p.detach()), n
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_paths(str(tmp_path)) == (str(tmp_path / "ckpt_0000006.safetensors"),
                                               str(tmp_path / "state_0000006.pt"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing step 6 leaves step 3's checkpoint complete, `latest` at 3, and no partial file."""
    trainer = Trainer(tiny(tmp_path), resume=None, progress_bar=False)
    trainer.train(steps=3)
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path) if n != "log.jsonl"}

    real_save = train_mod.torch.save

    def crashing_save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        with open(path, "r+b") as f:  # half-written, then the process dies
            f.truncate(100)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(train_mod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(steps=6)
    monkeypatch.undo()
    after = set(os.listdir(tmp_path))
    assert not [n for n in after if n.endswith(".tmp")], after  # the temporary file was removed
    assert "state_0000006.pt" not in after
    assert open(tmp_path / "latest").read().strip() == "3"
    for name, data in before.items():
        assert open(tmp_path / name, "rb").read() == data, name
    # and the run resumes from step 3
    resumed = Trainer(tiny(tmp_path), resume="auto", progress_bar=False)
    assert resumed.step == 3


@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_exact_resume_is_bitwise(tmp_path, optimizer):
    kw = dict(optimizer=optimizer, galore_rank=4, galore_update_proj_gap=2, steps=6)
    straight = Trainer(tiny(tmp_path / "a", **kw), resume=None, progress_bar=False)
    losses_a = straight.train()

    first = Trainer(tiny(tmp_path / "b", **kw), resume=None, progress_bar=False)
    losses_b = first.train(steps=3)
    del first
    second = Trainer(tiny(tmp_path / "b", **kw), resume="auto", progress_bar=False)
    assert second.step == 3
    losses_b += second.train()
    assert losses_a == losses_b  # bitwise, float for float
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n
    for n in straight.ema:
        assert torch.equal(straight.ema[n], second.ema[n]), n
    assert second.losses == straight.losses


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full = Trainer(tiny(tmp_path / "full", batch_size=8, grad_accum=1, steps=2), resume=None, progress_bar=False)
    acc = Trainer(tiny(tmp_path / "acc", batch_size=8, grad_accum=4, steps=2), resume=None, progress_bar=False)
    la, lb = full.train(), acc.train()
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    for (n, p), (_, q) in zip(full.model.named_parameters(), acc.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    # and the accumulation really split the batch: a different batch would not match
    other = Trainer(tiny(tmp_path / "other", batch_size=8, steps=2, data_seed=1), resume=None, progress_bar=False)
    assert other.train() != pytest.approx(la, rel=1e-5)


def test_bf16_autocast_step(tmp_path):
    trainer = Trainer(tiny(tmp_path, bf16=True, steps=2), resume=None, progress_bar=False)
    losses = trainer.train()
    assert all(torch.isfinite(torch.tensor(losses)))
    fp32 = Trainer(tiny(tmp_path / "fp32", steps=2), resume=None, progress_bar=False).train()
    # step 0's output is exactly zero in both (adaLN-Zero), so step 1 is where bf16 shows
    assert losses[0] == fp32[0]
    assert losses[1] == pytest.approx(fp32[1], rel=0.05) and losses[1] != fp32[1]


def test_gradient_checkpointing_changes_nothing(tmp_path):
    """Recomputing each block in backward gives the same losses and weights, bit for bit."""
    plain = Trainer(tiny(tmp_path / "plain", steps=3), resume=None, progress_bar=False)
    recomputed = Trainer(tiny(tmp_path / "gc", steps=3, gradient_checkpointing=True), resume=None, progress_bar=False)
    assert recomputed.model.dit.gradient_checkpointing
    assert plain.train() == recomputed.train()
    for (n, p), (_, q) in zip(plain.model.named_parameters(), recomputed.model.named_parameters()):
        assert torch.equal(p, q), n


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.55)
    assert learning_rate(cfg, 110) == pytest.approx(0.1)
    constant = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=1.0)
    assert learning_rate(constant, 50) == learning_rate(constant, 109) == 1.0


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        Trainer(tiny(tmp_path, batch_size=6, grad_accum=4), resume=None)
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(tiny(tmp_path, optimizer="sgd"), resume=None)
    with pytest.raises(ValueError, match="patch"):
        Trainer(tiny(tmp_path, patch=(3, 8, 8)), resume=None)
    with pytest.raises(FileNotFoundError, match="latest"):
        checkpoint_paths(str(tmp_path))
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        TrainConfig.from_dict({"hidden": 3})


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("patch", (3, 3, 3)), ("patch", (0, 8, 8)), ("patch", (2, 8)), ("lr", -1.0), ("lr", float("nan")),
    ("num_heads", 3), ("num_heads", 0), ("hidden_size", 0), ("text_dim", 6), ("optimizer", "sgd"), ("depth", 0),
    ("ema_decay", 2.0), ("warmup", -1), ("grad_accum", 0), ("size", 8), ("num_frames", 1), ("shift", 0.0),
    ("t_min", 0.0), ("backend", "fast"), ("checkpoint_every", 0), ("galore_rank", 0), ("mlp_ratio", float("inf")),
    ("two_object_prob", 1.5), ("bf16", "yes"), ("steps", 2.5),
    ("sp", 0), ("sp_mode", "tensor"), ("ring", 0), ("fsdp", "yes"), ("gradient_checkpointing", "yes"),
])
def test_every_bad_setting_names_its_field(tmp_path, field, value):
    """TrainConfig.validate: a ConfigError (a ValueError) naming the field, before anything is built."""
    cfg = tiny(tmp_path, **{field: value})
    with pytest.raises(train_mod.ConfigError) as e:
        cfg.validate()
    assert e.value.field == field and (repr(value) in str(e.value) or str(value) in str(e.value)), str(e.value)
    with pytest.raises(ValueError):
        Trainer(cfg, resume=None)


def test_device_names(monkeypatch):
    """An index-less "cuda" is the local rank's GPU (torch.cuda.set_device needs an index); a bad or
    absent device is a ConfigError naming the device."""
    resolve = train_mod.resolve_device
    assert resolve("cpu") == torch.device("cpu")
    with pytest.raises(train_mod.ConfigError, match="expected auto, cpu, cuda"):
        resolve("bogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("auto") == torch.device("cpu")
    with pytest.raises(train_mod.ConfigError, match="CUDA is not available"):
        resolve("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve("cuda") == resolve("auto") == torch.device("cuda", 2)
    assert resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(train_mod.ConfigError, match="4 GPU"):
        resolve("cuda:4")


def test_resume_with_other_settings_names_the_flags(tmp_path):
    Trainer(tiny(tmp_path, steps=3), resume=None, progress_bar=False).train()
    with pytest.raises(train_mod.ConfigError) as e:
        Trainer(tiny(tmp_path, steps=6, hidden_size=48, optimizer="galore"), progress_bar=False)
    msg = str(e.value)
    assert e.value.field == "out_dir" and "step 3" in msg and "--no-resume" in msg
    assert "--hidden-size 32 there, 48 here" in msg and "--optimizer adamw there, galore here" in msg
    with pytest.raises(train_mod.ConfigError, match="--patch 2 8 8 there, 1 8 8 here") as e:
        Trainer(tiny(tmp_path / "other", patch=(1, 8, 8)), resume=str(tmp_path), progress_bar=False)
    assert e.value.field == "resume"
    # the training-only settings may change (the bundled model's second phase changes the schedule)
    assert Trainer(tiny(tmp_path, steps=6, lr=1e-4, min_lr_ratio=1.0), progress_bar=False).step == 3


def test_fresh_run_over_a_longer_one_keeps_its_latest(tmp_path):
    """--no-resume into a directory holding a run at step 6: the new run's checkpoints survive pruning
    and the old run's later ones go, so ``latest`` always names files that exist."""
    Trainer(tiny(tmp_path, steps=6), resume=None, progress_bar=False).train()
    Trainer(tiny(tmp_path, steps=3), resume=None, progress_bar=False).train()
    weights, state = checkpoint_paths(str(tmp_path))
    assert weights.endswith("ckpt_0000003.safetensors") and os.path.exists(state)
    assert not os.path.exists(tmp_path / "ckpt_0000006.safetensors")


# --------------------------------------------------------------------------------------------
# DDP: 2 processes, gloo, torch.multiprocessing.spawn (what torchrun sets up, minus the launcher)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(tiny(out_dir, batch_size=8, steps=3, checkpoint_every=3), resume=None, progress_bar=False)
    assert trainer.dist.world_size == world and trainer.ddp is not None
    losses = trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    torch.save({"losses": losses, "params": params}, os.path.join(result_dir, f"rank{rank}.pt"))
    train_mod.cleanup_distributed(trainer.dist)


def test_ddp_two_processes_gloo_match_one_process(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(results)), nprocs=2, join=True)
    r0 = torch.load(results / "rank0.pt", weights_only=True)
    r1 = torch.load(results / "rank1.pt", weights_only=True)
    assert r0["losses"] == r1["losses"]  # all-reduced
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n  # ranks stay in sync
    single = Trainer(tiny(tmp_path / "single", batch_size=8, steps=3, checkpoint_every=3), resume=None,
                     progress_bar=False)
    losses = single.train()
    assert r0["losses"] == pytest.approx(losses, rel=1e-5)
    for n, p in single.model.named_parameters():
        torch.testing.assert_close(r0["params"][n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    # rank 0 alone wrote the checkpoint
    assert sorted(os.listdir(tmp_path / "ddp")) == ["ckpt_0000003.safetensors", "latest", "log.jsonl",
                                                   "state_0000003.pt"]


def test_x0_prediction_is_turned_into_velocity(tmp_path):
    """prediction="x0": the DiT outputs the clean clip and TextToVideo hands the sampler (x_t - x0_hat) / t."""
    cfg = tiny(tmp_path, prediction="x0")
    model = train_mod.build_model(cfg).eval()
    torch.nn.init.normal_(model.dit.final_layer.linear.weight, std=0.1)  # non-zero output
    x = torch.randn(2, 3, 4, 16, 16)
    ids, mask = model.tokenizer(["a red circle moving left", "a blue square bouncing"])
    t = torch.tensor([500.0, 10.0])  # t = 0.5, and 0.01, below t_min = 0.05
    with torch.no_grad():
        v = model(x, t, ids, mask)
        x0_hat = model.dit(x, t, text=model.encode_text(ids, mask), text_mask=mask)
    torch.testing.assert_close(v[0], (x[0] - x0_hat[0]) / 0.5)
    torch.testing.assert_close(v[1], (x[1] - x0_hat[1]) / 0.05)
    with pytest.raises(ValueError, match="prediction"):
        Trainer(tiny(tmp_path, prediction="eps"), resume=None)


def test_text_conditioning_path_learns(tmp_path):
    """After a few steps the output depends on the prompt (a zero cross-attention projection times a zero
    adaLN gate would keep the text path dead forever)."""
    trainer = Trainer(tiny(tmp_path, steps=5, text_dropout=0.0), resume=None, progress_bar=False)
    trainer.train()
    model = trainer.model.eval()
    x = torch.randn(1, 3, 4, 16, 16).expand(2, -1, -1, -1, -1)
    ids, mask = model.tokenizer(["a red circle moving left", "a blue square moving up"])
    with torch.no_grad():
        v = model(x, torch.tensor([500.0, 500.0]), ids, mask)
    assert (v[0] - v[1]).abs().max() > 1e-4
    gate_rows = model.dit.blocks[0].adaLN_modulation[-1].bias[-model.dit.hidden_size:]
    assert gate_rows.abs().max() > 0


def test_init_from_another_temporal_patch_keeps_the_function(tmp_path):
    """A run with patch (1, 8, 8) started from a (2, 8, 8) run: on a clip that is still across each
    pair of frames, and with the positional tables left out, the new DiT returns for both frames of a
    pair the mean of what the old one returned for them (patch embedding summed over its frame taps,
    final layer averaged over its frame rows; attention over duplicated tokens is unchanged)."""
    src = Trainer(tiny(tmp_path / "src"), resume=None, progress_bar=False)
    src.train()
    dst = Trainer(tiny(tmp_path / "dst", patch=(1, 8, 8), init_from=str(tmp_path / "src")), resume=None,
                  progress_bar=False)
    old_dit = train_mod.build_model(src.cfg).dit
    missing, _ = old_dit.load_state_dict({k[4:]: v for k, v in src.ema.items() if k.startswith("dit.")}, strict=False)
    assert missing == ["pos_embed"]
    new_dit = dst.model.dit
    for name, p in new_dit.named_parameters():  # everything but the converted layers is the source EMA
        if not name.startswith(("x_embedder.proj.", "final_layer.linear.")):
            assert torch.equal(p, src.ema["dit." + name]), name
    for m in (old_dit, new_dit):
        m.pos_embed.zero_()
        m.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 16, 16).repeat_interleave(2, dim=2)  # (B, C, T=4, H, W), frames 2k == 2k + 1
    t = torch.rand(2)
    text = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        old = old_dit(x, t, text=text, text_mask=mask)  # (B, C, 4, H, W)
        new = new_dit(x, t, text=text, text_mask=mask)
    pair_mean = old.reshape(2, 3, 2, 2, 16, 16).mean(dim=3).repeat_interleave(2, dim=2)
    torch.testing.assert_close(new, pair_mean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(old, pair_mean, atol=1e-3)  # the old model does tell the two frames apart


def test_convert_temporal_patch_round_trip_and_errors():
    from dit_fast.models.checkpoint import convert_temporal_patch

    torch.manual_seed(0)
    state = {"x_embedder.proj.weight": torch.randn(8, 3, 1, 4, 4), "final_layer.linear.weight": torch.randn(48, 8),
             "final_layer.linear.bias": torch.randn(48), "pos_embed": torch.randn(1, 4, 8), "other": torch.randn(2)}
    inflated = convert_temporal_patch(state, (2, 4, 4))
    assert inflated["x_embedder.proj.weight"].shape == (8, 3, 2, 4, 4)
    assert inflated["final_layer.linear.weight"].shape == (96, 8) and "pos_embed" not in inflated
    back = convert_temporal_patch(inflated, (1, 4, 4))
    for k in ("x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias", "other"):
        torch.testing.assert_close(back[k], state[k])
    with pytest.raises(ValueError, match="spatial patch differs"):
        convert_temporal_patch(state, (1, 2, 2))
    with pytest.raises(ValueError, match="only pt -> 1 and 1 -> pt"):
        convert_temporal_patch(inflated, (4, 4, 4))


def test_init_from_a_different_model_is_a_clear_error(tmp_path):
    Trainer(tiny(tmp_path / "src", steps=3), resume=None, progress_bar=False).train()
    with pytest.raises(ValueError, match="does not fit this model"):
        Trainer(tiny(tmp_path / "dst", hidden_size=48, init_from=str(tmp_path / "src")), resume=None,
                progress_bar=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny(tmp_path / "dst2", init_from=str(tmp_path / "nowhere")), resume=None, progress_bar=False)
