"""The CPU side of the memory-bound benchmarks: providers of one case timed interleaved call by call
(benchmarks/common.py time_fns), and bench_adaln / bench_rope_patchify producing one row per provider
from that timing."""

import torch

from benchmarks import bench_adaln, bench_rope_patchify, common


def test_time_fns_interleaves_the_providers():
    """After two warm-up calls each, every round calls every provider once, the first of the round rotating,
    so a burst of load lands on all of them alike; each gets its own Timing over the same number of calls."""
    calls = []
    fns = {name: ((lambda name=name: calls.append(name)), []) for name in ("a", "b", "c")}
    timings = common.time_fns(fns, "cpu", rep_ms=0, min_reps=6)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    rounds = [calls[6 + 3 * r: 9 + 3 * r] for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]
    assert set(timings) == {"a", "b", "c"} and all(t.reps == 6 for t in timings.values())


def test_time_fns_resets_grads_outside_the_timed_call():
    leaf = torch.ones(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(leaf.grad)
        (leaf * 2).sum().backward()

    common.time_fns({"f": (fn, [leaf])}, "cpu", rep_ms=0, min_reps=3)
    assert seen == [None] * len(seen) and len(seen) == 5


def test_bench_adaln_cpu_rows_per_provider():
    """One case through measure(): a row for ours-torch and for eager, both from the same interleaved run,
    the forward error against the reference recorded (eager's bf16 math differs; ours is the reference)."""
    case = bench_adaln.Case("residual_layernorm_modulate", "fwd+bwd", 2, 24, 40, 3)
    providers = ["ours-torch", "eager", "ours-torch-per-group", "ours-torch-whole"]
    rows = bench_adaln.measure(case, providers, torch.device("cpu"), {}, quick=True)
    assert [r["provider"] for r in rows] == providers
    assert all(r["median_ms"] > 0 and r["variant"] == "fwd+bwd" for r in rows)
    errors = {r["provider"]: r["fwd_rel_err_vs_reference"] for r in rows}
    assert errors["eager"] < 5e-2 and all(errors[p] < 1e-2 for p in providers if p != "eager")
    assert bench_adaln.provider_unavailable("ours-torch-whole", torch.device("cuda")) is not None


def test_bench_rope_patchify_cpu_run_writes_nothing_with_no_write(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    rows = bench_rope_patchify.run("cpu", quick=True, families=("patchify",), write=False)
    assert {(r["op"], r["provider"]) for r in rows} == {(op, p) for op in ("patchify_3d", "unpatchify_3d")
                                                        for p in ("ours-torch", "eager")}
    assert not any(tmp_path.iterdir())
