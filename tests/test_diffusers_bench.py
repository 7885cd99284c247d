"""benchmarks/bench_diffusers.py cannot rot: its --cpu-smoke mode builds the benchmark's models from the
same code at tiny sizes, runs every provider that runs on CPU and checks dit_fast's outputs against
diffusers' native attention."""

import pytest

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

from diffusers.models import attention_dispatch  # noqa: E402

from benchmarks import bench_diffusers  # noqa: E402


def test_cpu_smoke_runs(capsys):
    registry = attention_dispatch._AttentionBackendRegistry
    active = registry._active_backend
    try:
        assert bench_diffusers.main(["--cpu-smoke"]) == 0
    finally:
        registry.set_active_backend(active)
    out = capsys.readouterr().out
    for model in ("wan2.1-t2v-1.3b", "hunyuan-video-4"):
        for provider in ("native", "ours-backend", "ours-patch"):
            assert f"{model:16s} {provider:13s}" in out, out
    assert "cpu smoke:" in out


def test_real_configs_are_the_checkpoints():
    """The GPU shapes the issue names: Wan2.1-T2V-1.3B is 30 layers of 12 heads x 128 over 32,760 tokens."""
    wan = bench_diffusers.WAN_T2V_1_3B
    assert (wan["num_layers"], wan["num_attention_heads"], wan["attention_head_dim"]) == (30, 12, 128)
    frames, height, width = bench_diffusers.FRAMES, bench_diffusers.HEIGHT, bench_diffusers.WIDTH
    assert frames * (height // 2) * (width // 2) == 21 * 30 * 52 == 32760
    hv = bench_diffusers.HUNYUAN_VIDEO
    assert sum(hv["rope_axes_dim"]) == hv["attention_head_dim"] == 128
    assert sum(bench_diffusers.HUNYUAN_BLOCKS.values()) == 4
