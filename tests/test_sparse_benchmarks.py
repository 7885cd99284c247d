"""The sparse attention benchmarks run: benchmarks/sparse_flops.py (FLOP accounting, predictions) and
benchmarks/sparse_quality.py (dense vs sparse generations) on tiny inputs."""

import json
import math

import pytest
import torch

from benchmarks import sparse_flops


def test_sparse_flops_counts_and_predictions(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert sparse_flops.main(["--models", "wan2.1-1.3b", "--densities", "0.25", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "PREDICTION" in data["note"] and "PRED" in capsys.readouterr().out
    rows = {r["pattern"]: r for r in data["rows"]}
    dense = rows["dense"]
    assert dense["step_tflop"] == pytest.approx(283, abs=1)  # benchmarks/NOTES.md's count of a Wan-1.3B step
    assert dense["attention_share"] == pytest.approx(0.70, abs=0.005)
    for name in ("sliding_tile", "radial", "topk"):
        r = rows[name]
        assert 0.25 <= r["kept_fraction"] <= 0.3, r
        assert r["attention_tflop_per_step"] == pytest.approx(dense["attention_tflop_per_step"] * r["kept_fraction"])
        assert r["prediction"]["attention_speedup"]["0.85"] == pytest.approx(0.85 / r["kept_fraction"])
        share = dense["attention_share"]
        step = 1 / ((1 - share) + share * r["kept_fraction"] / 0.85)
        assert r["prediction"]["step_speedup"]["0.85"] == pytest.approx(step)


def test_sparse_flops_rejects_bad_arguments(capsys):
    from benchmarks import bench_sparse

    for main, argv in ((sparse_flops.main, ["--models", "sd3"]), (sparse_flops.main, ["--densities", "1.5"]),
                       (sparse_flops.main, ["--dense-steps", "60", "--steps", "50"]),
                       (sparse_flops.main, ["--tile", "4,4"]), (bench_sparse.main, ["--flops", "--tile", "4,x,4"])):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv


def test_one_flop_accounting_for_both_command_lines():
    """bench_sparse --flops and sparse_flops count through the same functions (sparse_flops): the same kept and
    issued fractions per shape, pattern and density; 4 * D FLOPs per kept pair forward, 3.5x with the backward;
    a static pattern's pairs are its blocks'; topk's expected count is exact on whole tiles, for any q and k."""
    from benchmarks import bench_sparse
    from dit_fast.ops.sparse_layout import TileLayout
    from dit_fast.sparse import patterns

    table = {r["pattern"]: r for r in bench_sparse.flop_table(densities=(0.25,), shapes=("wan2.1-1.3b",))}
    rows = {r["pattern"]: r for r in sparse_flops.account("wan2.1-1.3b", [0.25], steps=50, dense_steps=10)}
    S, heads = 21 * 30 * 52, 12
    for name in ("sliding_tile", "radial", "topk"):
        assert table[name]["params"] == rows[name]["params"]
        row = rows[name]
        assert (table[name]["kept"], table[name]["issued"]) == (row["kept_fraction"], row["issued_fraction"])
        assert table[name]["fwd_tflop"] == pytest.approx(4 * 128 * heads * S ** 2 * table[name]["kept"] / 1e12)
    assert sparse_flops.attention_flops(10, 64, "fwd+bwd") == 3.5 * sparse_flops.attention_flops(10, 64) == 3.5 * 2560

    layout = TileLayout((4, 8, 12), (2, 4, 4), extra=10)  # 24 whole 32-token video tiles, one partial text tile
    choice = {"pattern": "sliding_tile", "window": [1, 2, 1]}
    blocks = patterns.sliding_tile(layout, (1, 2, 1))
    assert sparse_flops.choice_pairs(layout, choice) == sparse_flops.pair_counts(blocks)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, layout.tokens, 2, 8, generator=g).unbind(0)
    blocks = patterns.topk(q, k, layout, keep=5)
    kept, issued = sparse_flops.pair_counts(blocks)  # both heads
    expected = sparse_flops.choice_pairs(layout, {"pattern": "topk", "keep": 5, "local": [1, 1, 1]})
    assert (kept, issued) == tuple(round(2 * pairs) for pairs in expected)


def test_psnr_and_ssim():
    from benchmarks.sparse_quality import psnr, ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 20, generator=g)
    assert psnr(x, x, 1.0) == float("inf") and ssim(x, x) == pytest.approx(1.0)
    assert psnr(x + 0.1, x, 1.0) == pytest.approx(20.0)  # MSE 0.01
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert 0 < ssim(noisy, x) < ssim((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), x) < 1


def test_sparse_quality_on_a_tiny_wan_pipeline():
    """Dense (diffusers' own transformer) vs sparse (patched with sparse=) on a tiny random WanPipeline: per-step
    attention errors of the sparse steps only (the schedule's dense step 0 not listed), the kept fraction,
    latent and frame PSNR / SSIM (a dense first step keeps the latents closer)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from benchmarks.sparse_quality import run_pipeline, summary
    from tests.test_diffusers_pipeline import CALL, NEGATIVE, PROMPT, pipeline, tiny_transformer

    parts = _tiny_parts()
    pipe = pipeline(parts, tiny_transformer())
    call = {**CALL, "num_inference_steps": 2}
    specs = ["sliding_tile:density=0.3,tile=1x2x2", "sliding_tile:density=0.3,tile=1x2x2,dense_steps=1"]
    sparse, scheduled = run_pipeline(pipe, specs, [PROMPT], [0], call, negative_prompt=NEGATIVE)
    # 2 layers x 2 calls per step (WanPipeline's guidance calls the transformer twice per step: the same step)
    assert set(sparse["attention_error"]) == {"0", "1"} and set(scheduled["attention_error"]) == {"1"}
    assert all(s["layers"] == 4 and s["max"] > 0.05 for r in (sparse, scheduled) for s in r["attention_error"].values())
    assert 0 < sparse["kept_fraction"] < 1 and 0 < sparse["frame_ssim"] < 0.99
    assert sparse["latent_psnr"] < scheduled["latent_psnr"] < math.inf  # measured: 38 and 104 dB
    rows = [sparse, scheduled]
    assert pipe.transformer is not None and not hasattr(pipe.transformer, "_dit_fast_sparse")  # the pipe is restored
    assert [s["sparse"] for s in summary(rows)] == [r["sparse"] for r in rows]


def _tiny_parts():
    from tests.test_diffusers_pipeline import tiny_wan_parts

    return tiny_wan_parts()


def test_sparse_quality_on_the_bundled_model(tmp_path):
    from benchmarks import sparse_quality

    out = tmp_path / "q.json"
    assert sparse_quality.main(["--sparse", "sliding_tile:density=0.25,tile=2x2x2", "--prompts",
                                "a red circle moving left", "--seeds", "0", "--steps", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert data["model"].startswith("bundled") and "--steps 2" in data["command"]
    assert set(row["attention_error"]) == {"0", "1"} and row["sparse_calls"] == 2 * 4  # 2 steps x 4 blocks
    assert 0.2 < row["kept_fraction"] < 0.35 and row["frame_ssim"] < 1


def test_bench_diffusers_sparse_mode_cpu_smoke(capsys):
    """bench_diffusers --sparse: the sparse providers run on the tiny Wan (a patched copy each, before the
    in-place ours-patch); at density 1 the output equals native; the row holds the kept fraction."""
    pytest.importorskip("diffusers")
    from diffusers.models import attention_dispatch

    from benchmarks import bench_diffusers

    registry = attention_dispatch._AttentionBackendRegistry
    active = registry._active_backend
    dense, sparse = "sliding_tile:density=1,tile=1x2x2", "sliding_tile:density=0.3,tile=1x2x2,dense_steps=5"
    try:
        rows = bench_diffusers.cpu_smoke(models=("wan",), providers=("native", "ours-patch"), sparse=(dense, sparse))
    finally:
        registry.set_active_backend(active)
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["native", f"sparse:{dense}", f"sparse:{sparse}", "ours-patch"]
    assert by[f"sparse:{dense}"]["kept_fraction"] == 1.0 and by[f"sparse:{dense}"]["max_rel_err_vs_native"] <= 1e-5
    assert by[f"sparse:{sparse}"]["kept_fraction"] < 1 and by[f"sparse:{sparse}"]["dense_steps"] == 5
    assert by[f"sparse:{sparse}"]["max_rel_err_vs_native"] > 1e-3  # the timed step was sparse despite dense_steps
