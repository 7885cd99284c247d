"""`dit-fast generate` with the bundled model and with a checkpoint, export, and the error paths."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import pytest
import torch

import dit_fast
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
    assert "purple" in err and "a <color> <shape> <motion>" in err and len(err.strip().splitlines()) == 1
    assert all(w in err for w in VOCABULARY)


def test_checkpoint_frames_seed(tmp_path, tiny_run, capsys):
    a, b, c = tmp_path / "a.gif", tmp_path / "b.gif", tmp_path / "c.gif"
    base = ["generate", "a blue square bouncing", "--checkpoint", tiny_run, "--steps", "3", "--device", "cpu",
            "--quiet", "--scale", "1"]
    assert main(base + ["-o", str(a), "--seed", "5"]) == 0
    assert main(base + ["-o", str(b), "--seed", "5"]) == 0
    capsys.readouterr()
    assert main(base + ["-o", str(c), "--seed", "6", "--frames", "6"]) == 0
    warning = capsys.readouterr().err.strip().splitlines()  # other than the training length: one line
    assert len(warning) == 1 and "warning" in warning[0] and "--frames 6" in warning[0] and "4-frame" in warning[0]
    fa, fb, fc = _gif_frames(a), _gif_frames(b), _gif_frames(c)
    assert len(fa) == 4 and fa[0].shape[:2] == (16, 16)
    assert all((x == y).all() for x, y in zip(fa, fb))  # same seed, same video
    assert len(fc) == 6
    assert main(base + ["-o", str(tmp_path / "d.gif"), "--frames", "5"]) == 2  # not a multiple of pt = 2
    assert "--frames" in capsys.readouterr().err


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


def test_load_model_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("fps", [4, 10])
def test_gif_frame_delay_follows_fps(tmp_path, tiny_run, fps):
    """A GIF stores each frame's delay (in 10 ms units): 1000 / fps ms, read back with PIL."""
    from PIL import Image

    out = tmp_path / "x.gif"
    assert main(["generate", "a red circle moving left", "--checkpoint", tiny_run, "--steps", "1", "--device", "cpu",
                 "--quiet", "--fps", str(fps), "-o", str(out)]) == 0
    with Image.open(out) as im:
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            delays.append(im.info["duration"])
    assert delays == [1000 // fps] * 4


def test_mp4_read_back_with_its_fps(tmp_path, tiny_run):
    pytest.importorskip("imageio_ffmpeg", reason="the .mp4 writer needs imageio-ffmpeg (pip install 'dit_fast[video]')")
    mp4 = tmp_path / "x.mp4"
    assert main(["generate", "a red circle moving left", "--checkpoint", tiny_run, "--steps", "1", "--device", "cpu",
                 "--quiet", "--fps", "5", "-o", str(mp4)]) == 0
    reader = imageio.get_reader(mp4)
    frames = [f for f in reader]
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3)  # 16 x 16 pixels at the default scale 4
    assert reader.get_meta_data()["fps"] == pytest.approx(5)


def test_failed_write_leaves_no_directories(tmp_path, monkeypatch):
    from PIL import Image

    from dit_fast.generate import save_video

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_video(torch.zeros(3, 2, 16, 16), str(tmp_path / "a" / "b" / "x.gif"))
    assert os.listdir(tmp_path) == []


def test_vocab_command(capsys):
    """vocab says what the bundled model can draw: the grammar, every word of each slot, one object."""
    from dit_fast.data import COLORS, SHAPES, describe_prompts

    assert main(["vocab"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompts read: a <color> <shape> <motion>")
    assert all(w in out for w in [*COLORS, *SHAPES, "moving left", "bouncing"])
    assert "one object per prompt" in out
    assert "two objects" in describe_prompts(two_objects=True)


def test_help_shows_every_option_with_meaning_and_default(capsys):
    from dit_fast.cli import TRAIN_HELP
    from dit_fast.train import TrainConfig

    assert set(TRAIN_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    for cmd in ("generate", "train", "export", "vocab"):
        assert main([cmd, "--help"]) == 0
        text = capsys.readouterr().out
        if cmd == "generate":
            assert "(default: 50)" in text and "(default: out.gif)" in text
        if cmd == "train":
            assert "{adamw,galore}" in text and "(default: 1000)" in text
            assert all("--" + f.name.replace("_", "-") in text for f in dataclasses.fields(TrainConfig))
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dit-fast {dit_fast.__version__}"


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


# --------------------------------------------------------------------------------------------
# Every user mistake: exit 2, one line on stderr naming the argument, no traceback, nothing sampled,
# trained or created. Paths: {d} is a directory of bad files (bad_files), {run} a finished tiny run.
# --------------------------------------------------------------------------------------------

GEN = ["generate", "a red circle moving right", "--steps", "2", "--device", "cpu", "--quiet", "-o", "{d}/out/x.gif"]
TINY = ["--num-frames", "4", "--size", "16", "--patch", "2", "8", "8", "--hidden-size", "32", "--depth", "1",
        "--num-heads", "2", "--text-dim", "16", "--batch-size", "4", "--steps", "3", "--checkpoint-every", "3",
        "--warmup", "1", "--prediction", "x0", "--device", "cpu", "--quiet"]  # tiny_run's settings
TRAIN = ["train", "--out-dir", "{d}/new_run", *TINY]

MISTAKES = {
    # generate: the output
    "output parent is a file": (GEN + ["-o", "{d}/a_file/x.gif"], "--output"),
    "output .png": (GEN + ["-o", "{d}/new_dir/x.png"], "--output"),
    "output empty name": (GEN + ["-o", ""], "--output"),
    "output a directory": (GEN + ["-o", "{d}"], "--output"),
    "output dir/ only": (GEN + ["-o", "{d}/new_dir/"], "--output"),
    "output .mp4 without imageio-ffmpeg": (GEN + ["-o", "{d}/new_dir/x.mp4"], "--output"),
    # generate: the checkpoint
    "checkpoint missing": (GEN + ["--checkpoint", "{d}/nowhere.safetensors"], "--checkpoint"),
    "checkpoint random bytes": (GEN + ["--checkpoint", "{d}/random.safetensors"], "--checkpoint"),
    "checkpoint truncated": (GEN + ["--checkpoint", "{d}/truncated.safetensors"], "--checkpoint"),
    "checkpoint empty file": (GEN + ["--checkpoint", "{d}/empty.safetensors"], "--checkpoint"),
    "checkpoint empty directory": (GEN + ["--checkpoint", "{d}/empty_dir"], "--checkpoint"),
    # generate: device, backend, numbers
    "device bogus": (GEN + ["--device", "bogus"], "--device"),
    "device cuda without CUDA": (GEN + ["--device", "cuda"], "--device"),
    "device cuda:7 without CUDA": (GEN + ["--device", "cuda:7"], "--device"),
    "backend triton on CPU": (GEN + ["--backend", "triton"], "--backend"),
    "backend cuda on CPU": (GEN + ["--backend", "cuda"], "--backend"),
    "backend bogus": (GEN + ["--backend", "bogus"], "--backend"),
    "fps 0": (GEN + ["--fps", "0"], "--fps"),
    "fps text": (GEN + ["--fps", "fast"], "--fps"),
    "threads -1": (GEN + ["--threads", "-1"], "--threads"),
    "seed huge": (GEN + ["--seed", str(2**64)], "--seed"),
    "seed negative": (GEN + ["--seed", "-1"], "--seed"),
    "cfg nan": (GEN + ["--cfg", "nan"], "--cfg"),
    "cfg inf": (GEN + ["--cfg", "inf"], "--cfg"),
    "cfg negative": (GEN + ["--cfg", "-2"], "--cfg"),
    "scale 0": (GEN + ["--scale", "0"], "--scale"),
    "steps 0": (GEN + ["--steps", "0"], "--steps"),
    "frames 0": (GEN + ["--frames", "0"], "--frames"),
    "frames not a multiple of the patch": (GEN + ["--checkpoint", "{run}", "--frames", "3"], "--frames"),
    # generate: the prompt
    "prompt with two objects": (["generate", "a red circle moving right and a blue square bouncing", "-o",
                                 "{d}/out/x.gif"], "prompt"),
    "prompt out of grammar": (["generate", "red circle right", "-o", "{d}/out/x.gif"], "prompt"),
    "prompt unknown word": (["generate", "a purple circle moving right", "-o", "{d}/out/x.gif"], "prompt"),
    "prompt empty": (["generate", "", "-o", "{d}/out/x.gif"], "prompt"),
    "prompt missing": (["generate"], "prompt"),
    "unknown option": (GEN + ["--bogus"], "--bogus"),
    # train
    "train optimizer sgd": (TRAIN + ["--optimizer", "sgd"], "--optimizer"),
    "train steps 0": (TRAIN + ["--steps", "0"], "--steps"),
    "train patch 3 3 3": (TRAIN + ["--patch", "3", "3", "3"], "--patch"),
    "train patch 0 8 8": (TRAIN + ["--patch", "0", "8", "8"], "--patch"),
    "train lr -1": (TRAIN + ["--lr", "-1"], "--lr"),
    "train lr nan": (TRAIN + ["--lr", "nan"], "--lr"),
    "train num-heads 3": (TRAIN + ["--num-heads", "3"], "--num-heads"),
    "train text-dim 6": (TRAIN + ["--text-dim", "6"], "--text-dim"),
    "train batch not divisible": (TRAIN + ["--batch-size", "6", "--grad-accum", "4"], "--batch-size"),
    "train ema-decay 2": (TRAIN + ["--ema-decay", "2"], "--ema-decay"),
    "train warmup -1": (TRAIN + ["--warmup", "-1"], "--warmup"),
    "train size 8": (TRAIN + ["--size", "8"], "--size"),
    "train resume missing": (TRAIN + ["--resume", "{d}/nowhere"], "--resume"),
    "train resume empty directory": (TRAIN + ["--resume", "{d}/empty_dir"], "--resume"),
    "train resume and no-resume": (TRAIN + ["--resume", "{run}", "--no-resume"], "--resume"),
    "train init-from missing": (TRAIN + ["--init-from", "{d}/nowhere"], "--init-from"),
    "train init-from random bytes": (TRAIN + ["--init-from", "{d}/random.safetensors"], "--init-from"),
    "train out-dir under a file": (["train", "--out-dir", "{d}/a_file/run", *TINY], "--out-dir"),
    "train device bogus": (TRAIN + ["--device", "bogus"], "--device"),
    "train device cuda without CUDA": (TRAIN + ["--device", "cuda"], "--device"),
    "train backend triton on CPU": (TRAIN + ["--backend", "triton"], "--backend"),
    "train threads -1": (TRAIN + ["--threads", "-1"], "--threads"),
    "train resume with another architecture": (["train", "--out-dir", "{run}", *TINY, "--hidden-size", "48",
                                                "--patch", "1", "8", "8"], "--out-dir"),
    # export, vocab, the command itself
    "export missing run": (["export", "{d}/nowhere", "{d}/m.safetensors"], "run_dir"),
    "export empty directory": (["export", "{d}/empty_dir", "{d}/m.safetensors"], "run_dir"),
    "export to .bin": (["export", "{run}", "{d}/m.bin"], "dest"),
    "export under a file": (["export", "{run}", "{d}/a_file/m.safetensors"], "dest"),
    "vocab checkpoint missing": (["vocab", "--checkpoint", "{d}/nowhere"], "--checkpoint"),
    "no command": ([], "{generate,train,export,vocab,bench}"),
    "unknown command": (["paint"], "paint"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "a_file").write_text("not a directory")
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    (d / "truncated.safetensors").write_bytes(open(BUNDLED, "rb").read()[:5000])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "empty_dir").mkdir()
    return d


def _tree(path):
    return sorted((os.path.relpath(os.path.join(r, n), path), os.path.getsize(os.path.join(r, n)) if n in fs else -1)
                  for r, ds, fs in os.walk(path) for n in ds + fs)


@pytest.mark.parametrize("name", list(MISTAKES))
def test_every_mistake_is_one_line_and_exit_2(name, bad_files, tiny_run, capsys, monkeypatch):
    argv, argument = MISTAKES[name]
    argv = [a.format(d=bad_files, run=tiny_run) for a in argv]
    import dit_fast.generate
    import dit_fast.train

    def never(*a, **k):
        raise AssertionError("sampled or trained before checking the arguments")

    monkeypatch.setattr(dit_fast.generate, "generate", never)
    monkeypatch.setattr(dit_fast.train.Trainer, "train", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton on CPU only through the interpreter (conftest sets it)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if imageio-ffmpeg were not installed
    before = _tree(bad_files), _tree(tiny_run)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert argument in lines[0] and "error" in lines[0], lines[0]
    assert (_tree(bad_files), _tree(tiny_run)) == before  # nothing created, nothing left behind


def test_integer_options_say_what_is_wrong():
    """Text that is no integer is said to be that, not out of a range (train's --size parses as any int64 first,
    its bound checked later: '1.5' got 'expected an integer in [-9223372036854775808, ...]')."""
    import argparse

    from dit_fast.cli import int_range

    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected an integer, got '1.5'$"):
        int_range(-2**63, 2**63 - 1)("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected an integer >= 1, got '0'$"):
        int_range(1)("0")
    assert int_range(0, 3)("3") == 3


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc: a directory nobody can create in")
@pytest.mark.parametrize("where", ["/proc/dit_fast_run", "{d}/a_file", "{d}/a_file/run"])
def test_train_out_dir_checked_before_any_model(where, bad_files, capsys, monkeypatch):
    """A run directory that cannot be created or written (even by root: /proc), or a file in the way: one line,
    exit 2, before the trainer is built (today's cost of finding out late: a whole training run)."""
    import dit_fast.train

    def never(*a, **k):
        raise AssertionError("built the trainer before checking --out-dir")

    monkeypatch.setattr(dit_fast.train.Trainer, "__init__", never)
    code = main(["train", "--out-dir", where.format(d=bad_files), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "argument --out-dir" in err and where.format(d=bad_files) in err, err


def test_export_writes_the_same_file_modes_from_single_file_and_sharded_runs(tiny_run, tmp_path):
    """dit-fast export: the model file and its json get the mode open() gives (0666 & ~umask) from a single-file
    run and from a sharded one (safetensors' own writer makes 0600; mkstemp too)."""
    import stat

    from dit_fast.generate import checkpoint_paths
    from dit_fast.models.checkpoint import read_safetensors
    from dit_fast.parallel.checkpoint import TrainerState, save_checkpoint

    tensors, meta = read_safetensors(checkpoint_paths(tiny_run)[0])
    sharded = tmp_path / "sharded"  # the tiny run's EMA as a sharded run (one rank)
    save_checkpoint(sharded / "dcp", int(meta["step"]), model=torch.nn.Linear(1, 1), trainer=TrainerState(
        ema={k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, rng=False))
    (sharded / "dcp" / "run.json").write_text(json.dumps({"config": json.loads(meta["config"]),
                                                          "vocabulary": json.loads(meta["vocabulary"])}))
    for umask in (0o027, 0o002):
        old = os.umask(umask)
        try:
            for name, run in (("single", tiny_run), ("sharded", str(sharded))):
                assert main(["export", run, str(tmp_path / f"{name}-u{umask:03o}.safetensors")]) == 0
            (tmp_path / f"plain-u{umask:03o}").write_text("made by open()")
        finally:
            os.umask(old)
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.glob(f"*-u{umask:03o}*")}
        assert len(modes) == 5 and set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_bench_help_names_dit_fast_bench(capfd):
    """`dit-fast bench --help` is benchmarks/run.py's help under the name the user typed."""
    assert main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("usage: dit-fast bench") and "--ops" in out, out[:200]


def test_finished_run_says_it_is_done(tiny_run, capsys):
    argv = ["train", "--out-dir", tiny_run, *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "already at step 3" in out and "--steps" in out


def test_no_traceback_reaches_a_terminal(bad_files):
    """The console entry point, as a user runs it: a file that is not a checkpoint, one line, exit 2."""
    exe = shutil.which("dit-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "dit_fast.cli"]
    res = subprocess.run(cmd + ["generate", "a red circle moving right", "--device", "cpu", "-o",
                                str(bad_files / "new_dir" / "x.gif"), "--checkpoint",
                                str(bad_files / "random.safetensors")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--checkpoint" in res.stderr
    assert not (bad_files / "new_dir").exists()


def test_bench_hands_every_argument_to_the_benchmarks(monkeypatch):
    """`dit-fast bench --help` is benchmarks/run.py's own help: main passes the arguments on unparsed."""
    import subprocess as sp

    from dit_fast.cli import bench_runner

    calls, progs = [], []
    monkeypatch.setattr(sp, "call", lambda cmd, env=None: calls.append(cmd) or progs.append(env["DIT_FAST_BENCH_PROG"]) or 0)
    assert main(["bench", "--help"]) == 0 and main(["bench", "--quick", "--ops", "rope"]) == 0
    assert calls == [[sys.executable, bench_runner(), "--help"], [sys.executable, bench_runner(), "--quick", "--ops", "rope"]]
    assert progs == ["dit-fast bench"] * 2
    assert os.path.exists(bench_runner())


# --------------------------------------------------------------------------------------------
# The demo's install: setup.py builds the CUDA extension only where a GPU is visible or it is asked for
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, plan", [
    ({}, "no GPU visible, skipping the CUDA extension (nvcc is here: DIT_FAST_BUILD_CUDA=1"),
    ({"DIT_FAST_CUDA_ARCHS": "90a"}, "building the CUDA extension for sm_90a (DIT_FAST_CUDA_ARCHS is set"),
    ({"DIT_FAST_BUILD_CUDA": "1"}, "building the CUDA extension for sm_90a, sm_80 (DIT_FAST_BUILD_CUDA=1"),
    ({"DIT_FAST_BUILD_CUDA": "0", "DIT_FAST_CUDA_ARCHS": "90a"}, "DIT_FAST_BUILD_CUDA=0, skipping"),
], ids=["nothing asked", "archs asked", "forced", "off"])
def test_cuda_build_plan(tmp_path, env, plan):
    """`python setup.py --cuda-plan` (what scripts/install.sh prints first), with an nvcc and no visible GPU."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIT_FAST_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "setup.py", "--cuda-plan"], cwd=root, capture_output=True, text=True,
                         env={**clean, "CUDA_HOME": str(tmp_path / "cuda"), "CUDA_VISIBLE_DEVICES": "", **env},
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and plan in lines[0], lines
