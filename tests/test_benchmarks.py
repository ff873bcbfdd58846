"""Smoke test of benchmarks/step_overhead.py on shrunken trees.

Timings are not asserted (performance is measured by the benchmark, not by
tests); the test checks that every case runs, that the reported numbers are
consistent with each other, and that the recompilation check counts traces.
"""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import step_overhead  # noqa: E402


def test_tree_shapes_match_the_models():
    resnet = step_overhead.tree_shapes("resnet18", 1.0)
    assert len(resnet) == 62
    assert sum(math.prod(s) for s in resnet.values()) == 11_173_962
    gpt = step_overhead.tree_shapes("transformer", 1.0)
    assert len(gpt) == 148
    assert sum(math.prod(s) for s in gpt.values()) == 124_439_808
    assert len(step_overhead.tree_shapes("small_leaves", 1.0)) == 10_000
    assert step_overhead.tree_shapes("small_leaves", 1.0, 30)["p00029"] == (100,)
    shrunk = step_overhead.tree_shapes("flat50m", 0.001)
    assert shrunk == {"w": (50_000,)}


def test_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "bench"
    record = step_overhead.main(
        [
            "--platform", "cpu",
            "--trees", "resnet18", "flat50m",
            "--scale", "0.002",
            "--samples", "2",
            "--sample-seconds", "0.001",
            "--optimizers", "delta_gclip", "clip_sgd", "sgd", "adam",
            "--no-e2e",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert [(c["tree"], c["dtype"]) for c in record["cases"]] == [
        ("resnet18", "float32"),
        ("resnet18", "bfloat16"),
        ("flat50m", "float32"),
        ("flat50m", "bfloat16"),
    ]
    for case in record["cases"]:
        r = case["results"]
        assert set(r) == {"delta_gclip", "clip_sgd", "sgd", "adam"}
        for name, x in r.items():
            assert len(x["samples_s"]) == 2 and x["median_s"] > 0
            assert x["q25_s"] <= x["median_s"] <= x["q75_s"]
            assert x["ratio_to_sgd"] == pytest.approx(
                x["median_s"] / r["sgd"]["median_s"]
            )
            assert x["memory"]["peak_bytes"] > 0 and x["compile_s"] > 0
        words = 4 * case["params"] * (2 if case["dtype"] == "bfloat16" else 4)
        assert r["delta_gclip"]["gb_per_s"] == pytest.approx(
            words / r["delta_gclip"]["median_s"] / 1e9
        )
    # Recompilation is a test of the library (tests/test_alias.py), not a
    # benchmark result.
    assert (
        "no_recompilation" not in record
        and "no_recompilation" not in (record["targets"])
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["device"]["platform"] == "cpu"
    table = out.with_suffix(".md").read_text()
    assert "| resnet18 | bfloat16 |" in table and "clip_sgd_1.05:" in table
    # The bandwidth target is a GPU one: on CPU it is not checked, not passed.
    assert record["targets"]["bandwidth_70pct"]["pass"] is None
    assert "bandwidth_70pct: n/a" in table


def test_clip_sgd_and_adam_are_skipped_above_the_leaf_limit(tmp_path):
    out = tmp_path / "bench"
    record = step_overhead.main(
        [
            "--trees", "small_leaves", "--small-leaves", "3",
            "--dtypes", "float32",
            "--samples", "2", "--sample-seconds", "0.001",
            "--optimizers", "delta_gclip", "clip_sgd", "sgd", "adam",
            "--peers-max-leaves", "2",
            "--no-e2e", "--out", str(out),
        ]
    )  # fmt: skip
    r = record["cases"][0]["results"]
    for name in ("clip_sgd", "adam"):
        assert r[name] == {"skipped": "3 leaves > --peers-max-leaves=2"}
    assert "ratio_to_clip_sgd" not in r["delta_gclip"]
    assert r["delta_gclip"]["ratio_to_sgd"] > 0
    table = out.with_suffix(".md").read_text()
    assert "Not run: clip_sgd on small_leaves/float32 (3 leaves" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scale", "2"], "--scale must be in (0, 1], got 2.0"),
        (["--samples", "0"], "--samples must be a positive integer, got 0"),
        (["--small-leaves", "-3"], "--small-leaves must be a positive integer, got -3"),
        (["--trees", "vgg"], "invalid choice: 'vgg'"),
        (
            ["--peers-max-leaves", "0"],
            "--peers-max-leaves must be a positive integer, got 0",
        ),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        step_overhead.main(argv)
    assert message in capsys.readouterr().err


def test_quick_sets_the_short_run():
    args = step_overhead.parse_args(["--quick", "--trees", "flat50m"])
    assert args.trees == ["resnet18", "transformer"]
    assert args.optimizers == ["delta_gclip", "clip_sgd", "sgd"]
    assert args.samples == 7 and args.e2e


def test_compiled_program_counts_ops_not_names():
    import compiled_programs as cp

    text = """
  %all-reduce.60 = (f32[], /*index=5*/f32[]) all-reduce(%a, %b), channel_id=1
  %get-tuple-element = f32[] get-tuple-element(%all-reduce.60), index=0
  %all-gather-start = f32[8] all-gather-start(%c), dimensions={0}
  %c2 = (f32[], f32[]) conditional(%p, %x, %y), branch_computations={%t, %f}
  %w = (s32[]) while(%init), condition=%cond, body=%body
"""
    assert cp.hlo_counts(text) == {
        "all_gathers": 1,
        "all_reduces": 1,
        "conditionals": 1,
        "whiles": 1,
    }


def test_compiled_program_checks_flag_each_excess():
    import compiled_programs as cp

    def row(opt, **kw):
        base = {
            "device": "TPU v5e:2x2", "tree": "t", "dtype": "float32",
            "layout": "fsdp", "optimizer": opt, "all_gathers": 0,
            "all_reduces": 1, "conditionals": 0, "whiles": 0,
            "temp_bytes": 1 << 20, "peak_bytes": 8 << 20,
            "bytes_accessed": 100.0, "largest_leaf_bytes_per_device": 1 << 10,
        }  # fmt: skip
        return base | kw

    rows = [
        row("clip_sgd"),
        row("clip_sgd_momentum", temp_bytes=5 << 20),
        row("delta_gclip", bytes_accessed=103.0),
        row("delta_gclip_momentum", temp_bytes=6 << 20),  # within 1 MB of peer
        row(
            "delta_gclip_per_tensor",
            all_gathers=2,
            all_reduces=2,
            conditionals=1,
            temp_bytes=(1 << 20) + (2 << 20),
        ),
    ]
    checks = {c["optimizer"]: c["failed"] for c in cp.check_targets(rows)}
    assert checks["delta_gclip"] == []
    assert checks["delta_gclip_momentum"] == []
    assert checks["delta_gclip_per_tensor"] == [
        "all-gathers",
        "all-reduces",
        "control flow",
        "temporaries",
    ]
    rows[2]["bytes_accessed"] = 104.0
    rows[2]["device"] = rows[0]["device"] = rows[1]["device"] = "TPU v5e:2x2"
    checks = {c["optimizer"]: c["failed"] for c in cp.check_targets(rows)}
    assert checks["delta_gclip"] == ["bytes"]


def test_whole_program_benchmark_runs_and_reports(tmp_path):
    import whole_program

    out = tmp_path / "whole"
    record = whole_program.main(
        [
            "--updates", "2", "--epochs", "2", "--minibatches", "2",
            "--minibatch-size", "8", "--sizes", "4", "8", "2",
            "--seeds", "2", "--samples", "2", "--sample-seconds", "0.001",
            "--optimizers", "clip_adam", "delta_gclip_adam",
            "--out", str(out),
        ]
    )  # fmt: skip
    rows = {(r["mode"], r["optimizer"]): r for r in record["rows"]}
    assert len(rows) == 6
    assert record["parameters"] == 4 * 8 + 8 + 8 * 2 + 2
    assert record["steps_per_seed"] == 8
    for (mode, name), r in rows.items():
        assert r["q25_s"] <= r["median_s"] <= r["q75_s"]
        if mode.startswith("step:"):  # the optimizer step alone, vmapped
            assert r["seeds"] == 2 and "step_loop" not in r
        else:
            assert r["final_loss_finite"]
            assert set(r["step_loop"]) == set(whole_program.STRUCTURE)
            assert r["step_loop"]["fusion"] > 0  # the step loop was found
        if name.startswith("delta"):
            base = rows[(mode, whole_program.COUNTERPART[name])]
            assert r["ratio"] == pytest.approx(r["median_s"] / base["median_s"])
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == record["rows"]
    table = out.with_suffix(".md").read_text()
    assert table.count("| jit(") == 4 and table.count("| step: jit(vmap(") == 2


def test_step_loop_counts_see_a_conditional_inside_a_scan():
    import jax
    import jax.numpy as jnp
    import whole_program

    def loop(with_cond):
        def body(c, x):
            c = jnp.tanh(c @ x)  # a matrix product marks the step's loop
            if with_cond:
                c = jax.lax.cond(c[0, 0] > 0, lambda: c + 1, lambda: c * 2)
            return c, c[0, 0]

        return jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))

    c, xs = jnp.ones((4, 4)), jnp.ones((5, 4, 4))
    counts = [
        whole_program.step_loop_counts(loop(w).lower(c, xs).compile().as_text())
        for w in (True, False)
    ]
    assert counts[0]["conditional"] == 1
    assert counts[1]["conditional"] == 0
    assert counts[1]["fusion"] > 0


def test_pod_model_has_the_llama_7b_leaves_and_parameters():
    import pod

    config = pod.LlamaConfig()
    assert len(pod.llama_params(config, "unstacked")) == 291
    assert len(pod.llama_params(config, "stacked")) == 12
    assert pod.parameter_count(config) == 6_738_415_616
    stacked = pod.llama_params(config, "stacked")
    assert stacked["layers/wq"] == ((32, 4096, 4096), (None, "fsdp", "tensor"))
    assert stacked["layers/attention_norm"] == ((32, 4096), (None, None))
    with pytest.raises(ValueError, match="layout must be one of"):
        pod.llama_params(config, "scanned")


def test_pod_report_reads_collectives_control_flow_and_scalars():
    import pod

    text = """HloModule m

%fused (p: f32[4]) -> f32[] {
  %p = f32[4]{0} parameter(0)
  ROOT %r = f32[]{:T(128)} reduce(%p, %z), dimensions={0}
}

ENTRY %main (a: f32[4]) -> f32[] {
  %ar = (f32[]{:T(128)}, f32[]{:T(128)}, bf16[]{:T(256)}) all-reduce(%x, %y, %z)
  %ars = (f32[2]{0}, f32[2]{0}) all-reduce-start(%v), channel_id=2
  %ard = f32[2]{0} all-reduce-done(%ars)
  %ag = bf16[8,16]{1,0} all-gather(%b), dimensions={0}
  %g = f32[]{:T(128)} get-tuple-element(%ar), index=0
  %s = f32[]{:T(128)} sqrt(%g)
  %v8 = f32[8]{0} add(%q, %q)
  %c = (f32[]) conditional(%pr, %t, %f), branch_computations={%t, %f}
  ROOT %w = (s32[]) while(%init), condition=%cond, body=%body
}
"""
    report = pod.hlo_report(text)
    ar = report["collectives"]["all-reduce"]
    # Three operands of 4 + 4 + 2 bytes, and one async all-reduce of an f32[2].
    assert ar == {"count": 2, "operands": 4, "bytes": 18}
    assert report["collectives"]["all-gather"] == {
        "count": 1, "operands": 1, "bytes": 256
    }  # fmt: skip
    assert report["conditionals"] == 1 and report["whiles"] == 1
    # The entry computation's scalar results only (not the fusion's reduce).
    assert report["scalar_opcodes"] == {"get-tuple-element": 1, "sqrt": 1}
    assert report["scalar_values"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pod", "--tensor", "0"], "--tensor must be at least 1, got 0"),
        (["--pod", "--layers", "-1"], "--layers must be at least 1, got -1"),
        ([], "--target is required"),
    ],
)
def test_pod_arguments_are_checked(argv, message, capsys):
    import compiled_programs as cp

    with pytest.raises(SystemExit):
        cp.parse_args(argv)
    assert message in capsys.readouterr().err


def test_pod_topology_options_are_checked():
    import pod

    with pytest.raises(ValueError, match=r"unknown topology option\(s\) \['mega'\]"):
        pod.tpu_mesh("v4:4x4x8,mega", 4, "auto")


def test_build_cost_benchmark_runs_reports_and_guards(tmp_path):
    # One tree, two steps, one sample: the table and JSON are written, the
    # equation counts are those of the two programs, and --strict exits 1
    # exactly when a row misses a target.
    import build_cost

    out = tmp_path / "bc"
    argv = ["--trees", "resnet18", "--steps", "delta_gclip", "per_tensor",
            "--reps", "1", "--out", str(out)]  # fmt: skip
    code = build_cost.main(argv)
    record = json.loads(out.with_suffix(".json").read_text())
    assert code == 0
    rows = {r["step"]: r for r in record["rows"]}
    assert set(rows) == {"delta_gclip", "per_tensor"}
    for r in rows.values():
        assert r["ours"]["equations"] > 0 and r["optax"]["equations"] > 0
        assert r["ours"]["total_s"] > 0
        assert math.isclose(
            r["ratio"]["equations"],
            r["ours"]["equations"] / r["optax"]["equations"],
            rel_tol=1e-2,
        )
    assert (
        "| resnet18 (62 leaves) | delta_gclip |" in out.with_suffix(".md").read_text()
    )
    assert build_cost.main([*argv, "--strict"]) == (1 if record["failures"] else 0)
    failing = {**rows["delta_gclip"], "ratio": {"total_s": 9.0, "equations": 1.0}}
    assert build_cost.check([failing]) == [
        "resnet18 (62 leaves) delta_gclip: build 9.00x > 1.2x"
    ]


def test_build_cost_table_names_each_miss_with_its_cause():
    # Each measured cause is printed once, with the steps of this run that
    # miss; a missing step with no measured cause is said to have none.
    import build_cost

    def row(step, total, equations=1.0):
        return {"step": step, "target": 1.2, "ratio": {"total_s": total,
                "equations": equations}}  # fmt: skip

    record = {"platform": "XLA:CPU", "rows": [
        row("momentum", 1.3), row("nesterov", 1.1, equations=1.6),
        row("delta_gclip", 1.0), row("momentum", 1.25)]}  # fmt: skip
    lines = build_cost.causes(record)
    assert len(lines) == 2
    assert lines[0].startswith("- momentum, nesterov: the norm that survives")
    assert lines[1].startswith("- momentum, nesterov: skipping a non-finite")
    assert build_cost.causes({**record, "rows": [row("delta_gclip", 1.0)]}) == []
    unknown = {**record, "rows": [row("made_up", 9.0)]}
    assert build_cost.causes(unknown) == ["- made_up: cause not measured yet."]


def test_build_cost_counts_nested_equations():
    import build_cost
    import jax

    def f(x):
        return jax.lax.cond(x > 0, lambda: x + 1.0, lambda: x * 2.0)

    jaxpr = jax.make_jaxpr(f)(1.0).jaxpr
    assert build_cost.count_equations(jaxpr) > len(jaxpr.eqns)


@pytest.mark.parametrize(
    "argv, message",
    [(["--reps", "0"], "--reps must be at least 1"),
     (["--trees", "mnist"], "invalid choice")],
)  # fmt: skip
def test_build_cost_arguments_are_checked(argv, message, capsys):
    import build_cost

    with pytest.raises(SystemExit):
        build_cost.parse_args(argv)
    assert message in capsys.readouterr().err


def test_adaptive_gamma_experiment_runs_quick_and_reports(tmp_path):
    import adaptive_gamma

    base = adaptive_gamma.main(
        ["--quick", "--seeds", "0", "--results-dir", str(tmp_path)]
    )
    record = json.loads(base.with_suffix(".json").read_text())
    (cell,) = record["cells"]
    assert set(cell["fixed"]) == {str(g) for g in adaptive_gamma.GAMMAS}
    assert len(cell["zscore"]) == len(cell["percentile"]) == 1
    # The quick run (100 steps) has one outlier batch, at step 75.
    assert cell["outliers_injected"] == 1
    skipped = cell["spikes"]["fixed/skip"]["spikes_skipped"]
    assert cell["spikes"]["fixed/no_skip"]["spikes_skipped"] == [0] and skipped == [1]
    text = base.with_suffix(".md").read_text()
    assert "## 1. Untuned adaptive γ" in text and "## 2. Spike skipping" in text
    assert base.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [(["--outlier-every", "1"], "--outlier-every must be at least 2"),
     (["--outlier-scale", "0"], "--outlier-scale must be > 0"),
     (["--char-lm", "--steps", "10"], "--steps must be at least 31")],
)  # fmt: skip
def test_adaptive_gamma_arguments_are_checked(argv, message, capsys):
    import adaptive_gamma

    with pytest.raises(SystemExit):
        adaptive_gamma.parse_args(argv)
    assert message in capsys.readouterr().err
