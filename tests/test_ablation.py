"""The ablation runner: its quick grid, its table against its run files, the
harness against independent Optax training loops, resuming and bad flags."""

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablation


def table_rows(md: str, problem: str, title: str) -> dict[tuple[str, int, int], list]:
    """The rows of one table of ablation.md, keyed by (activation, width, depth)."""
    section = md.split(f"## {problem}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split(f"**{title}**\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], int(cells[1]), int(cells[2]))] = cells[4:]
    return rows


def test_quick_grid_table_is_written_from_the_run_files(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--quick", "--runs-dir", str(runs), "--results-dir", str(results)]
    md_path = ablation.main(argv)
    assert md_path == results / "ablation_quick.md"
    assert md_path.with_suffix(".png").stat().st_size > 10_000
    md = md_path.read_text()
    saved = json.loads(md_path.with_suffix(".json").read_text())
    files = sorted(runs.rglob("*.json"))
    assert len(files) == 4 == len(saved["cells"])  # 2 problems x 2 activations
    for path in files:
        record = json.loads(path.read_text())
        cell = ablation.Cell(**record["settings"]["cell"])
        assert saved["cells"][cell.name]["runs"] == record["runs"]
        assert record["settings"]["problem"]["steps"] == 150
        by_delta = {r["delta"]: r for r in record["runs"]}
        assert sorted(by_delta) == sorted(ablation.DELTAS)
        for r in record["runs"]:
            fr = r["regime_fractions"]
            assert sum(fr.values()) == pytest.approx(1.0)
            assert r["final_over_initial"] == pytest.approx(
                r["final_loss"] / r["initial_loss"]
            )
            assert r["loss_curve"]["loss"][0] == r["initial_loss"]
        assert by_delta[0.0]["regime_fractions"]["floor"] == 0.0
        # Same initialization for every δ of a seed.
        assert len({r["initial_loss"] for r in record["runs"]}) == 1
        # The table's numbers are the files' numbers, recomputed here.
        key = (cell.activation, cell.width, cell.depth)
        ratios = table_rows(md, cell.problem, "final / initial loss")[key]
        steps = table_rows(md, cell.problem, "steps to 0.001 x initial loss")[key]
        floor = table_rows(md, cell.problem, "fraction of steps at the floor")[key]
        for i, d in enumerate(ablation.DELTAS):
            r = by_delta[d]
            expect = "div 1/1" if r["diverged"] else f"{r['final_over_initial']:.1e}"
            assert ratios[i] == expect
            n = r["steps_to_threshold"]
            assert steps[i] == ("-" if n is None else str(n))
            assert floor[i] == f"{r['regime_fractions']['floor']:.2f}"
    # In the theory problem the floor binds and beats GClip.
    theory = json.loads((runs / "theory_full/tanh_w256_d1.json").read_text())
    by_delta = {r["delta"]: r for r in theory["runs"]}
    assert by_delta[0.1]["regime_fractions"]["floor"] > 0.5
    assert by_delta[0.1]["final_loss"] < 0.9 * by_delta[0.0]["final_loss"]
    assert re.search(r"\| 0 \(GClip\) \| 4/4 \| 0/4 \| \+0\.00 \|", md)
    # The summary's gain for δ=0.1 is the median over cells of
    # log10(GClip's ratio / δ's ratio), from the files.
    gains = []
    for path in files:
        runs_ = {r["delta"]: r for r in json.loads(path.read_text())["runs"]}
        gains.append(
            np.log10(
                runs_[0.0]["final_over_initial"] / runs_[0.1]["final_over_initial"]
            )
        )
    row = next(line for line in md.splitlines() if line.startswith("| 0.1 |"))
    assert row.split("|")[4].strip() == f"{np.median(gains):+.2f}"

    # Resuming: finished cells are not rerun; a stale one is.
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    stale = files[0]
    record = json.loads(stale.read_text())
    record["settings_key"] = "from older settings"
    stale.write_text(json.dumps(record))
    ablation.main(argv)
    for p in files:
        changed = p.stat().st_mtime_ns != mtimes[p]
        assert changed == (p == stale), p
    assert json.loads(stale.read_text())["settings_key"] != "from older settings"


def test_harness_matches_independent_optax_loops():
    """δ=1 is plain GD and δ=0 is clip_by_global_norm + SGD: the cell's losses
    for those two must be what Optax's own transforms give."""
    problem = ablation.Problem(
        learning_rate=0.2, gamma=0.1, steps=25, n=8, batch=None, target_scale=10.0
    )
    cell = ablation.Cell("theory_full", "gelu", 32, 2)
    runs = ablation.run_cell(cell, problem, seeds=[3])["runs"]
    got = {r["delta"]: r for r in runs}
    assert got[0.0]["regime_fractions"]["clipped"] > 0.5  # clipping was active

    x, y = ablation.make_data("theory_full", problem)
    act = ablation.activation_fn("gelu")
    keys = jax.random.split(jax.random.split(jax.random.PRNGKey(3))[0], 3)
    dims = [16, 32, 32, 1]
    params = [
        jax.random.normal(k, (a, b))
        for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
    ]

    def loss_fn(p):
        h = x
        for w in p[:-1]:
            h = act(h @ w / np.sqrt(w.shape[0]))
        return 0.5 * jnp.mean(jnp.sum((h @ p[-1] / np.sqrt(32) - y) ** 2, -1))

    for delta, tx in [
        (1.0, optax.sgd(0.2)),
        (0.0, optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(0.2))),
    ]:
        p, s = params, tx.init(params)
        for _ in range(problem.steps):
            u, s = tx.update(jax.grad(loss_fn)(p), s, p)
            p = optax.apply_updates(p, u)
        np.testing.assert_allclose(got[delta]["final_loss"], loss_fn(p), rtol=2e-4)
        assert got[delta]["initial_loss"] == pytest.approx(float(loss_fn(params)))


def test_summaries_count_divergence_and_threshold():
    losses = np.array([100.0, 50.0, 0.5, 0.01])  # 1e-3 x 100 first met at 3
    r = ablation.summarize(0.1, 0, losses, np.array([2, 1, 0]))
    assert r["steps_to_threshold"] == 3 and not r["diverged"]
    assert r["regime_fractions"] == pytest.approx(
        {"unclipped": 1 / 3, "clipped": 1 / 3, "floor": 1 / 3, "skipped": 0.0}
    )
    blown = ablation.summarize(1.0, 0, np.array([1.0, 20.0, 0.5]), np.array([2, 2]))
    assert blown["diverged"] and blown["steps_to_threshold"] is None
    nan = ablation.summarize(1.0, 0, np.array([1.0, np.nan]), np.array([-1]))
    assert nan["diverged"] and nan["final_loss"] is None
    assert nan["regime_fractions"]["skipped"] == 1.0
    s = ablation.stats([blown, nan, r])
    assert s.diverged == 2 and s.ratio == pytest.approx(1e-4)
    assert s.steps_to_threshold is None  # 1 of 3 seeds reached it


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--jobs", "0"], "--jobs must be a positive integer, got 0"),
        (["--widths", "0"], "--widths must be positive integers, got 0"),
        (["--steps", "-5"], "--steps must be a positive integer, got -5"),
        (["--large-seeds", "0"], "--large-seeds must be a positive integer, got 0"),
        (["--activations", "swish"], "invalid choice: 'swish'"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(argv)
    assert message in capsys.readouterr().err


def test_largest_cells_run_fewer_seeds():
    args = ablation.parse_args(["--seeds", "0", "1", "2"])
    big = ablation.Cell("theory_full", "relu", 4096, 3)
    small = ablation.Cell("theory_full", "relu", 4096, 1)
    assert big.params > args.large_params > small.params
    assert ablation.seeds_for(args, big) == [0]
    assert ablation.seeds_for(args, small) == [0, 1, 2]
