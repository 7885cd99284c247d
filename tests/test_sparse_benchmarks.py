"""The sparse attention benchmarks run: benchmarks/sparse_flops.py (FLOP accounting, predictions) and
benchmarks/sparse_quality.py (dense vs sparse generations) on tiny inputs."""

import json

import pytest

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
    for argv in (["--models", "sd3"], ["--densities", "1.5"], ["--dense-steps", "60", "--steps", "50"]):
        with pytest.raises(SystemExit) as exc:
            sparse_flops.main(argv)
        assert exc.value.code == 2
