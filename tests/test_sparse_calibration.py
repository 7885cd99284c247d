"""SparseAttention (dit_fast/sparse/config.py) and its run time (runtime.py): the schedule from the
timestep, the calibration per layer and head, save / load, the command line's spec, clear errors.

The calibration is fed heads whose attention is known: a head whose queries look only at their own
tile (q = k = a large vector per tile) is sparse within any tolerance; a head of near-uniform
attention is not, and stays dense.
"""

import json

import pytest
import torch

from dit_fast.ops.block_sparse import block_sparse_attention
from dit_fast.ops.flash_attention import attention
from dit_fast.ops.sparse_layout import TileLayout
from dit_fast.sparse import SparseAttention, SparseCalibrationError, SparseRuntime, StepTracker
from dit_fast.sparse.runtime import relative_error_per_head

LAYOUT = TileLayout((4, 6, 5), (2, 2, 2), extra=3)  # 3 x 3 x 3 tiles, partial along w; 3 text tokens


def test_step_tracker_reads_the_step_from_the_timestep():
    tracker = StepTracker()
    # CFG as two calls per step (the same timestep twice), a batched one, then a new generation
    timesteps = [999, 999, 950, 950, torch.tensor([900.0, 900.0]), 800, 999, 999, 700]
    steps = [tracker.observe(t) for t in timesteps]
    assert steps == [0, 0, 1, 1, 2, 3, 0, 0, 1]
    assert tracker.observe(torch.tensor([[3.0, 5.0]]), training=True) is None  # training: no schedule
    assert tracker.observe(10.0) == 0


def _local_and_global_heads(layout, seed=0):
    """q, k, v (2, S, 2, 16): head 0 attends within its own tile, head 1 almost uniformly."""
    g = torch.Generator().manual_seed(seed)
    S = layout.tokens
    per_tile = torch.nn.functional.normalize(torch.randn(layout.n_tiles, 16, generator=g), dim=-1)
    local = 8.0 * per_tile[layout.token_tile()]  # (S, 16): q . k = 64 within a tile, ~N(0, 16) across
    q = torch.stack([local, 0.01 * torch.randn(S, 16, generator=g)], dim=1).expand(2, S, 2, 16).clone()
    v = torch.randn(2, S, 2, 16, generator=g)
    return q, q.clone(), v


def test_calibration_picks_the_sparsest_within_tolerance_per_head():
    config = SparseAttention(pattern="sliding_tile", density=0.1, tolerance=0.02)
    runtime = SparseRuntime(config, "Test")
    q, k, v = _local_and_global_heads(LAYOUT)
    runtime.observe(999)
    out = runtime.attend(0, q, k, v, LAYOUT, backend="torch")
    choices = config.choices_for(LAYOUT.grid, 0)
    assert choices[1] == {"pattern": "dense"}  # uniform attention: no sparse candidate is within 2%
    assert choices[0]["pattern"] == "sliding_tile"
    candidates = config.candidates(LAYOUT)
    assert candidates[0] == choices[0]  # the sparsest candidate already fits the local head
    # the chosen output is the block-sparse one with those choices, and head 0 is within tolerance of dense
    dense = attention(q, k, v, backend="torch")
    errors = relative_error_per_head(out, dense)
    assert errors[0] <= 0.02 and errors[1] == 0
    assert runtime.calibration_errors["4x6x5", 0][0] == pytest.approx(errors[0].item())


def test_calibration_keeps_the_first_candidate_within_tolerance():
    """With a tolerance between two candidates' errors, the sparser (above it) is refused and the next taken."""
    config = SparseAttention(pattern="sliding_tile", density=0.1, tolerance=1.0)
    q, k, v = torch.randn(3, 1, LAYOUT.tokens, 1, 16, generator=torch.Generator().manual_seed(3)).unbind(0)
    dense = attention(q, k, v, backend="torch")
    runtime = SparseRuntime(config, "Test")
    errors = []
    for c in config.candidates(LAYOUT)[:-1]:
        out = block_sparse_attention(q, k, v, runtime.blocks([c], LAYOUT, q, k, "raster"), backend="torch")
        errors.append(relative_error_per_head(out, dense).item())
    assert errors[0] > errors[-1]
    i = next(i for i, e in enumerate(errors) if e < errors[0])  # the first candidate better than the sparsest
    config.tolerance = (errors[0] + errors[i]) / 2
    runtime.observe(999)
    runtime.attend(0, q, k, v, LAYOUT, backend="torch")
    chosen = config.choices_for(LAYOUT.grid, 0)
    assert chosen == [config.candidates(LAYOUT)[next(j for j, e in enumerate(errors) if e <= config.tolerance)]]


def test_schedule_dense_steps_and_layers_run_dense():
    config = SparseAttention(pattern="sliding_tile", density=0.3, dense_steps=2, dense_layers=[1])
    runtime = SparseRuntime(config, "Test")
    q, k, v = torch.randn(3, 1, LAYOUT.tokens, 2, 16).unbind(0)
    for t, sparse_layers in [(999, []), (999, []), (900, []), (800, [0, 2]), (800, [0, 2]), (999, [])]:
        runtime.observe(t)
        got = [layer for layer in range(3) if runtime.attend(layer, q, k, v, LAYOUT, backend="torch") is not None]
        assert got == sparse_layers, (t, runtime.step)
    runtime.observe(5, training=True)  # training: dense_steps do not apply, dense_layers do
    assert runtime.attend(0, q, k, v, LAYOUT, backend="torch") is not None
    assert runtime.attend(1, q, k, v, LAYOUT, backend="torch") is None


def test_save_load_reproduces_the_choices_and_outputs(tmp_path):
    config = SparseAttention(pattern=("sliding_tile", "radial", "topk"), density=0.1, tolerance=0.05)
    q, k, v = _local_and_global_heads(LAYOUT)
    runtime = SparseRuntime(config, "Test")
    runtime.observe(999)
    outs = [runtime.attend(layer, q, k, v, LAYOUT, backend="torch") for layer in range(2)]
    path = config.save(tmp_path / "cal.json")
    data = json.loads(open(path).read())
    assert data["format"] == "dit_fast.sparse_calibration" and data["version"] == 1 and data["model"] == "Test"
    assert data["calibrations"][0]["grid"] == [4, 6, 5]

    loaded = SparseAttention.load(path)
    assert loaded.choices == config.choices and loaded.to_dict() == config.to_dict()
    again = SparseRuntime(loaded, "Test")
    again.observe(999)
    outs_again = [again.attend(layer, q, k, v, LAYOUT, backend="torch") for layer in range(2)]
    assert not again.calibration_errors  # nothing calibrated: the file's choices ran
    for a, b in zip(outs, outs_again, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="calibration for Test, not Other"):
        SparseRuntime(loaded, "Other")


@pytest.mark.parametrize("edit,key", [
    (lambda d: d.update(format="x"), "format"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["config"].update(density=3), "config"),
    (lambda d: d.update(config=["sliding_tile"]), "config"),
    (lambda d: d["config"].update(pattern=5), "config"),
    (lambda d: d["calibrations"][0].update(grid=[4, 6]), "calibrations[0].grid"),
    (lambda d: d["calibrations"][0]["layers"]["0"][0].update(window=[1, 1]), "calibrations[0].layers.0"),
    (lambda d: d["calibrations"][0]["layers"]["0"].append({"pattern": "magic"}), "calibrations[0].layers.0"),
])
def test_bad_calibration_file_names_file_and_key(tmp_path, edit, key):
    config = SparseAttention(pattern="sliding_tile", density=0.3)
    config.record((4, 6, 5), 0, [{"pattern": "sliding_tile", "window": [1, 2, 1]}])
    data = json.loads(open(config.save(tmp_path / "c.json")).read())
    edit(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    pattern = rf"bad.json'?, key '{key}'".replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(SparseCalibrationError, match=pattern):
        SparseAttention.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SparseCalibrationError, match="junk.json.*not readable JSON"):
        SparseAttention.load(tmp_path / "junk.json")
    with pytest.raises(SparseCalibrationError, match="does not exist"):
        SparseAttention.load(tmp_path / "missing.json")


def test_spec_round_trip_and_errors():
    sparse = SparseAttention.from_spec("radial+topk:density=0.1,tolerance=0.05,tile=2x4x4,dense_layers=0/3,"
                                       "dense_steps=5,local=1x3x3")
    assert sparse.patterns == ("radial", "topk") and sparse.tile == (2, 4, 4) and sparse.dense_layers == (0, 3)
    assert SparseAttention.from_spec(sparse.spec()).to_dict() == sparse.to_dict()
    assert SparseAttention.from_dict(sparse.to_dict()).spec() == sparse.spec()
    for bad, match in [("", "PATTERN"), ("magic", "pattern must be one of"), ("radial:density", "key=value"),
                       ("radial:density=2", "density"), ("radial:speed=2", "unknown key 'speed'"),
                       ("radial+topk:density=0.1", "needs a tolerance"), ("radial:tile=4x4", "tile")]:
        with pytest.raises(ValueError, match=match):
            SparseAttention.from_spec(bad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(density=0), ValueError, "density"), (dict(density=1.5), ValueError, "density"),
    (dict(dense_steps=-1), ValueError, "dense_steps"), (dict(dense_steps=1.5), TypeError, "dense_steps"),
    (dict(dense_layers=3), TypeError, "dense_layers"), (dict(tolerance=0.0), ValueError, "tolerance"),
    (dict(tile=(4, 4)), ValueError, "tile"), (dict(pattern="dense"), ValueError, "pattern"),
    (dict(pattern=("radial", "radial"), tolerance=0.1), ValueError, "distinct"),
])
def test_config_errors_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseAttention(**kwargs)


def test_candidates_climb_by_sqrt2_from_the_density_to_dense():
    """The calibration's ladder: density, density * sqrt(2), ... below 1, then dense (topk on 100 video tiles of
    one token: its kept fraction is exactly (keep + local) / 100)."""
    layout = TileLayout((4, 5, 5), (1, 1, 1))
    candidates = SparseAttention(pattern="topk", density=0.1, tolerance=0.1).candidates(layout)
    assert candidates[-1] == {"pattern": "dense"}
    fractions = [(c["keep"] + 1) / layout.n_video_tiles for c in candidates[:-1]]
    assert fractions == pytest.approx([0.1 * 2 ** (i / 2) for i in range(7)], abs=0.01)  # 0.1 ... 0.8


@pytest.mark.parametrize("pattern", ["sliding_tile", "radial", "topk"])
def test_density_one_keeps_every_tile(pattern):
    config = SparseAttention(pattern=pattern, density=1.0)
    assert config.candidates(LAYOUT) == [{"pattern": "dense"}]  # nothing to calibrate
    runtime = SparseRuntime(config, "Test")
    runtime.observe(1)
    q, k, v = torch.randn(3, 1, LAYOUT.tokens, 2, 16, dtype=torch.float64).unbind(0)
    out = runtime.attend(0, q, k, v, LAYOUT, backend="torch")  # the block-sparse op, every tile kept
    assert runtime.kept_fractions() == {0: 1.0}
    torch.testing.assert_close(out, attention(q, k, v, backend="torch"), rtol=0, atol=1e-12)
