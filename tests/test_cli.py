"""`dit-fast generate` with the bundled model and with a checkpoint, export, and the error paths."""

import json
import os
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import pytest
import torch

from dit_fast.cli import main
from dit_fast.data import VOCABULARY
from dit_fast.generate import BUNDLED, BUNDLED_JSON, export_model, generate, load_model
from dit_fast.train import Trainer, TrainConfig


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(out_dir=str(out), num_frames=4, size=16, patch=(2, 8, 8), hidden_size=32, depth=1, num_heads=2,
                      text_dim=16, batch_size=4, steps=3, checkpoint_every=3, warmup=1, prediction="x0",
                      backend="torch", device="cpu")
    Trainer(cfg, resume=None, progress_bar=False).train()
    return str(out)


def _gif_frames(path):
    return imageio.mimread(path)


def test_bundled_model_ships_with_its_command_and_scores():
    assert os.path.exists(BUNDLED) and os.path.exists(BUNDLED_JSON)
    assert os.path.getsize(BUNDLED) < 20 * 2**20  # a few MB
    info = json.load(open(BUNDLED_JSON))
    assert info["vocabulary"] == VOCABULARY
    assert "scripts/train_bundled.sh" in info["training_command"]
    model, cfg = load_model()
    assert cfg.size == info["config"]["size"] and not model.training


def test_generate_bundled_console_script(tmp_path):
    """The installed `dit-fast` entry point, default model, to a gif."""
    exe = shutil.which("dit-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "dit_fast.cli"]
    out = tmp_path / "out.gif"
    res = subprocess.run(cmd + ["generate", "a red circle moving right", "-o", str(out), "--steps", "4", "--device",
                                "cpu"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    frames = _gif_frames(out)
    _, cfg = load_model()
    assert len(frames) == cfg.num_frames
    assert frames[0].shape[:2] == (cfg.size * 4, cfg.size * 4)
    assert "wrote" in res.stdout


def test_unknown_word_lists_vocabulary(tmp_path, capsys):
    out = tmp_path / "x.gif"
    code = main(["generate", "a purple circle moving right", "-o", str(out), "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "purple" in err and "vocabulary" in err
    assert all(w in err for w in VOCABULARY)


def test_checkpoint_frames_seed(tmp_path, tiny_run):
    a, b, c = tmp_path / "a.gif", tmp_path / "b.gif", tmp_path / "c.gif"
    base = ["generate", "a blue square bouncing", "--checkpoint", tiny_run, "--steps", "3", "--device", "cpu",
            "--quiet", "--scale", "1"]
    assert main(base + ["-o", str(a), "--seed", "5"]) == 0
    assert main(base + ["-o", str(b), "--seed", "5"]) == 0
    assert main(base + ["-o", str(c), "--seed", "6", "--frames", "6"]) == 0
    fa, fb, fc = _gif_frames(a), _gif_frames(b), _gif_frames(c)
    assert len(fa) == 4 and fa[0].shape[:2] == (16, 16)
    assert all((x == y).all() for x, y in zip(fa, fb))  # same seed, same video
    assert len(fc) == 6
    assert main(base + ["-o", str(tmp_path / "d.gif"), "--frames", "5"]) == 2  # not a multiple of pt = 2


def test_generate_api_seeds_are_per_prompt(tiny_run):
    model, cfg = load_model(tiny_run)
    one = generate(model, cfg, ["a red circle moving left"], seed=3, steps=3, progress_bar=False)
    two = generate(model, cfg, ["a green triangle moving up", "a red circle moving left"], seeds=[9, 3], steps=3,
                   progress_bar=False)
    torch.testing.assert_close(one[0], two[1], rtol=1e-5, atol=1e-5)
    assert one.shape == (1, 3, 4, 16, 16) and one.min() >= -1 and one.max() <= 1


def test_export_round_trip(tmp_path, tiny_run):
    dest = tmp_path / "model.safetensors"
    info = export_model(tiny_run, str(dest), {"training_command": "test"})
    assert info["step"] == 3 and json.load(open(tmp_path / "model.json"))["training_command"] == "test"
    exported, cfg = load_model(str(dest))
    from_run, _ = load_model(tiny_run, ema=True)
    raw, _ = load_model(tiny_run, ema=False)
    x1 = generate(exported, cfg, ["a red circle moving left"], steps=3, progress_bar=False)
    x2 = generate(from_run, cfg, ["a red circle moving left"], steps=3, progress_bar=False)
    x3 = generate(raw, cfg, ["a red circle moving left"], steps=3, progress_bar=False)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_bad_paths_and_formats(tmp_path, tiny_run):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        main(["generate", "a red circle moving left", "--checkpoint", tiny_run, "--steps", "1", "--device", "cpu",
              "--quiet", "-o", str(tmp_path / "x.png")])
    try:
        import imageio_ffmpeg  # noqa: F401
        have_ffmpeg = True
    except ImportError:
        have_ffmpeg = False
    mp4 = tmp_path / "x.mp4"
    args = ["generate", "a red circle moving left", "--checkpoint", tiny_run, "--steps", "1", "--device", "cpu",
            "--quiet", "-o", str(mp4)]
    if have_ffmpeg:  # installed with the test extras: the .mp4 path is checked by reading it back
        assert main(args) == 0
        frames = imageio.mimread(mp4)
        assert len(frames) == 4 and frames[0].shape == (64, 64, 3)  # 16 x 16 pixels at the default scale 4
    else:
        with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
            main(args)


def test_vocab_command(capsys):
    assert main(["vocab"]) == 0
    assert capsys.readouterr().out.split("\n")[0].split() == VOCABULARY


def test_eval_prompt_following_script(tmp_path, tiny_run):
    """The benchmark runs end to end on a checkpoint and writes its json (accuracies in [0, 1])."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "eval_prompt_following.py")
    spec = importlib.util.spec_from_file_location("eval_prompt_following", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "pf.json"
    gif = tmp_path / "grid.gif"
    assert mod.main(["--checkpoint", tiny_run, "--seeds", "1", "--steps", "2", "--out", str(out), "--quiet",
                     "--samples-gif", str(gif)]) == 0
    res = json.load(open(out))
    assert res["clips"] == res["combinations"] == 15
    assert set(res["accuracy"]) == {"color", "shape", "motion", "all_three"}
    assert all(0.0 <= v <= 1.0 for v in res["accuracy"].values())
    assert "eval_prompt_following.py" in res["command"] and res["device"].startswith("cpu")
    assert len(_gif_frames(gif)) == 4
