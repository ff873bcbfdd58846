"""Ablation of δ-GClip: δ x activation x width x depth x problem x seed.

Each *cell* (problem, activation, width, depth) trains one MLP per (δ, seed)
from the same initialization per seed, with the same η and γ, and records per
run the loss at every step and the gradient norm the rule saw. The δ values of
a seed are trained together under ``jax.vmap``, so a cell is one compiled
program. Cells run in subprocesses, ``--jobs`` at a time; each writes
``<runs-dir>/<cell>.json`` and a finished cell is reused unless ``--force``
(or its settings changed), so an interrupted grid resumes where it stopped.

Problems (squared loss ``0.5 * mean ||f(x) - y||^2``):

* ``theory_full``: the setting of Tucat et al.'s theorem: unit-norm random
  inputs, random targets scaled so that ``||g|| >> gamma / delta`` at the
  start, full-batch steps;
* ``theory_minibatch``: the same data, mini-batches drawn with replacement
  (the stochastic theorem); the loss logged is the full-data loss;
* ``digits_full``: a class-balanced subset of scikit-learn's real 8x8 digits,
  one-hot targets scaled as in the quick start, full batch.

The networks are bias-free MLPs in the NTK parameterization (weights N(0, 1),
each layer divided by sqrt(fan-in)), so one η, γ and δ mean the same step at
every width.

Per cell and δ the results report, over seeds: final/initial loss, steps to
reach 1e-3 of the initial loss, divergence (a non-finite loss, or one above 10x
the initial, at any step) and the fraction of steps unclipped, clipped and at
the floor. Under ``--results-dir``: ``ablation.md`` (tables and the summary
answers), ``ablation.png`` (heatmaps), ``ablation.json`` (every run).

    python benchmarks/ablation.py --jobs 2            # the full grid
    python benchmarks/ablation.py --quick             # CI: 4 cells, 150 steps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from paper_experiments import job_env
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
DELTAS = (0.0, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0)
ACTIVATIONS = ("tanh", "relu", "leaky_relu", "gelu")
WIDTHS = (256, 1024, 4096)
DEPTHS = (1, 3)
PROBLEMS = ("theory_full", "theory_minibatch", "digits_full")
SEEDS = (0, 1, 2)
THRESHOLD = 1e-3  # "reached": loss <= THRESHOLD * initial loss
DIVERGED = 10.0  # "diverged": loss non-finite or > DIVERGED * initial loss
REGIMES = ("unclipped", "clipped", "floor")


@dataclass(frozen=True)
class Problem:
    """Data and the shared hyperparameters of one problem."""

    learning_rate: float
    gamma: float
    steps: int
    n: int  # training examples
    batch: int | None  # None: full batch
    target_scale: float


PROBLEM_SETTINGS = {
    "theory_full": Problem(1.0, 0.1, 300, 32, None, 100.0),
    "theory_minibatch": Problem(1.0, 0.1, 300, 32, 8, 100.0),
    "digits_full": Problem(1.0, 0.1, 300, 50, None, 10.0),
}


@dataclass(frozen=True)
class Cell:
    problem: str
    activation: str
    width: int
    depth: int

    @property
    def name(self) -> str:
        return f"{self.problem}/{self.activation}_w{self.width}_d{self.depth}"

    @staticmethod
    def parse(text: str) -> Cell:
        problem, rest = text.split("/")
        act, w, d = rest.rsplit("_", 2)
        return Cell(problem, act, int(w[1:]), int(d[1:]))

    @property
    def params(self) -> int:
        """Parameters of one network."""
        d_in, d_out = (16, 1) if self.problem.startswith("theory") else (64, 10)
        return self.width * (d_in + d_out + self.width * (self.depth - 1))


# ------------------------------------------------------------ one cell (child)


def activation_fn(name: str) -> Callable[[Any], Any]:
    import jax

    return {
        "tanh": jax.numpy.tanh,
        "relu": jax.nn.relu,
        "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    }[name]


def make_data(problem_name: str, problem: Problem) -> tuple[Any, Any]:
    """(x, y), fixed for the whole grid (the seed varies the initialization)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(1234)
    if problem_name.startswith("theory"):
        x = rng.standard_normal((problem.n, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = problem.target_scale * rng.standard_normal((problem.n, 1))
        return jnp.asarray(x), jnp.asarray(y, jnp.float32)
    from sklearn.datasets import load_digits

    digits = load_digits()
    per_class = problem.n // 10
    idx = np.concatenate(
        [
            rng.choice(np.flatnonzero(digits.target == c), per_class, replace=False)
            for c in range(10)
        ]
    )
    x = digits.data[idx].astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = problem.target_scale * np.eye(10, dtype=np.float32)[digits.target[idx]]
    return jnp.asarray(x), jnp.asarray(y)


def mlp(act: Callable[[Any], Any], params: list[Any], inputs: Any) -> Any:
    """The bias-free MLP in the NTK parameterization (each layer / sqrt(fan-in))."""
    h = inputs
    for w in params[:-1]:
        h = act(h @ w / np.sqrt(w.shape[0]))
    return h @ params[-1] / np.sqrt(params[-1].shape[0])


def squared_loss(act: Callable[[Any], Any], params: list[Any], xb: Any, yb: Any) -> Any:
    """``0.5 * mean ||f(x) - y||^2``."""
    import jax.numpy as jnp

    return 0.5 * jnp.mean(jnp.sum((mlp(act, params, xb) - yb) ** 2, axis=-1))


def run_cell(cell: Cell, problem: Problem, seeds: Sequence[int]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    import rgclip_optax as rgc

    x, y = make_data(cell.problem, problem)
    act = activation_fn(cell.activation)
    dims = [x.shape[1]] + [cell.width] * cell.depth + [y.shape[1]]

    def init(key: jax.Array) -> list[jax.Array]:
        keys = jax.random.split(key, len(dims) - 1)
        return [
            jax.random.normal(k, (a, b))
            for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
        ]

    def loss_fn(params: list[jax.Array], xb: jax.Array, yb: jax.Array) -> jax.Array:
        return squared_loss(act, params, xb, yb)

    def train(delta: jax.Array, params: list[jax.Array], key: jax.Array) -> Any:
        tx = rgc.delta_gclip(problem.learning_rate, problem.gamma, delta)

        def step(carry: Any, t: jax.Array) -> tuple[Any, tuple[jax.Array, ...]]:
            p, s = carry
            if problem.batch is None:
                loss, g = jax.value_and_grad(loss_fn)(p, x, y)
            else:
                idx = jax.random.randint(
                    jax.random.fold_in(key, t), (problem.batch,), 0, problem.n
                )
                loss = loss_fn(p, x, y)
                g = jax.grad(loss_fn)(p, x[idx], y[idx])
            u, s = tx.update(g, s, p)
            norm = optax.tree.get(s, "grad_norm")
            return (optax.apply_updates(p, u), s), (loss, norm)

        (p, _), (losses, norms) = jax.lax.scan(
            step, (params, tx.init(params)), jnp.arange(problem.steps)
        )
        return jnp.append(losses, loss_fn(p, x, y)), norms

    train_deltas = jax.jit(jax.vmap(train, in_axes=(0, None, None)))
    deltas = jnp.asarray(DELTAS, jnp.float32)
    runs = []
    for seed in seeds:
        key = jax.random.PRNGKey(seed)
        init_key, batch_key = jax.random.split(key)
        losses, norms = jax.device_get(train_deltas(deltas, init(init_key), batch_key))
        regimes = np.asarray(
            rgc.delta_gclip_regime(norms, problem.gamma, deltas[:, None])
        )
        for i, delta in enumerate(DELTAS):
            runs.append(summarize(delta, seed, losses[i], regimes[i]))
    return {"runs": runs}


def summarize(
    delta: float, seed: int, losses: np.ndarray, regime: np.ndarray
) -> dict[str, Any]:
    """One run's numbers. ``losses[t]`` is the loss before step t (last: after
    the last step); ``regime[t]`` the branch of step t (-1: skipped)."""
    losses = np.asarray(losses, np.float64)
    initial, final = float(losses[0]), float(losses[-1])
    finite = np.isfinite(losses)
    diverged = bool(not finite.all() or np.nanmax(losses) > DIVERGED * initial)
    reached = np.flatnonzero(losses <= THRESHOLD * initial)
    steps = len(regime)
    # Loss curve at ~100 log-spaced steps, for plots.
    at = np.unique(np.geomspace(1, len(losses), 100).astype(int) - 1)
    return {
        "delta": delta,
        "seed": seed,
        "initial_loss": initial,
        "final_loss": final if np.isfinite(final) else None,
        "final_over_initial": final / initial if np.isfinite(final) else None,
        "steps_to_threshold": int(reached[0]) if reached.size else None,
        "diverged": diverged,
        "regime_fractions": {
            name: float(np.sum(regime == i) / steps) for i, name in enumerate(REGIMES)
        }
        | {"skipped": float(np.sum(regime == -1) / steps)},
        "loss_curve": {
            "step": at.tolist(),
            "loss": [float(v) if np.isfinite(v) else None for v in losses[at]],
        },
    }


# --------------------------------------------------------------- the grid


def cell_settings(cell: Cell, problem: Problem, seeds: Sequence[int]) -> dict:
    return {
        "cell": asdict(cell),
        "problem": asdict(problem),
        "deltas": list(DELTAS),
        "seeds": list(seeds),
        "threshold": THRESHOLD,
        "diverged_above": DIVERGED,
    }


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cell_path(runs_dir: Path, cell: Cell) -> Path:
    return runs_dir / f"{cell.name}.json"


def is_done(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text())["settings_key"] == settings_key(settings)
    except (ValueError, KeyError):
        return False


def child_main(args: argparse.Namespace) -> None:
    """Run one cell in this process and write its file."""
    import jax

    cell = Cell.parse(args.cell)
    problem = problems(args)[cell.problem]
    settings = cell_settings(cell, problem, args.seeds)
    t0 = time.perf_counter()
    record = run_cell(cell, problem, args.seeds)
    record |= {
        "settings": settings,
        "settings_key": settings_key(settings),
        "wall_seconds": time.perf_counter() - t0,
        "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}), jax {jax.__version__}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(out)  # never a half-written cell file


def problems(args: argparse.Namespace) -> dict[str, Problem]:
    out = dict(PROBLEM_SETTINGS)
    if args.steps is not None:
        out = {k: replace(v, steps=args.steps) for k, v in out.items()}
    return out


def grid(args: argparse.Namespace) -> list[Cell]:
    return [
        Cell(p, a, w, d)
        for p in args.problems
        for a in args.activations
        for w in args.widths
        for d in args.depths
    ]


def seeds_for(args: argparse.Namespace, cell: Cell) -> list[int]:
    """All of --seeds, or the first --large-seeds of them for a cell with more
    than --large-params parameters (the width-4096 depth-3 cells hold nearly
    all of the grid's arithmetic)."""
    if cell.params > args.large_params:
        return args.seeds[: args.large_seeds]
    return args.seeds


def run_grid(args: argparse.Namespace, cells: list[Cell]) -> None:
    settings = problems(args)
    todo = [
        c
        for c in cells
        if args.force
        or not is_done(
            cell_path(args.runs_dir, c),
            cell_settings(c, settings[c.problem], seeds_for(args, c)),
        )
    ]
    todo.sort(key=lambda c: -c.params)  # big cells first
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = job_env(threads)

    def one(cell: Cell) -> tuple[Cell, int]:
        out = cell_path(args.runs_dir, cell)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--cell", cell.name, "--out", str(out)]
        cmd += ["--seeds", *map(str, seeds_for(args, cell))]
        if args.steps is not None:
            cmd += ["--steps", str(args.steps)]
        with out.with_suffix(".log").open("w") as log:
            log.write(shlex.join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env
            ).returncode
        return cell, rc

    failed = []
    with (
        ThreadPoolExecutor(args.jobs) as pool,
        tqdm(total=len(todo), desc="ablation cells", unit="cell") as bar,
    ):
        for cell, rc in pool.map(one, todo):
            bar.update(1)
            if rc != 0:
                failed.append(cell.name)
                tqdm.write(f"{cell.name} failed (exit {rc}); see its .log")
    if failed:
        raise SystemExit(f"error: cells failed: {', '.join(failed)}")


# ----------------------------------------------------------- gather and report


def load_cells(args: argparse.Namespace, cells: list[Cell]) -> dict[Cell, dict]:
    """The finished cells whose settings are the grid's (stale files skipped)."""
    settings = problems(args)
    found = {}
    for c in cells:
        path = cell_path(args.runs_dir, c)
        if is_done(path, cell_settings(c, settings[c.problem], seeds_for(args, c))):
            found[c] = json.loads(path.read_text())
    if not found:
        raise SystemExit(f"error: no finished cells under {args.runs_dir}")
    if len(found) < len(cells):
        print(f"note: {len(cells) - len(found)} of {len(cells)} cells not finished")
    return found


@dataclass
class Stats:
    """One (cell, δ) over seeds."""

    ratio: float | None  # median final/initial over seeds that did not diverge
    diverged: int
    seeds: int
    steps_to_threshold: float | None  # median, when most seeds reached it
    floor: float  # mean fraction of steps at the floor
    clipped: float
    unclipped: float


def stats(runs: list[dict]) -> Stats:
    ok = [r for r in runs if not r["diverged"]]
    reached = [
        r["steps_to_threshold"] for r in runs if r["steps_to_threshold"] is not None
    ]
    fr = {k: float(np.mean([r["regime_fractions"][k] for r in runs])) for k in REGIMES}
    return Stats(
        ratio=float(np.median([r["final_over_initial"] for r in ok])) if ok else None,
        diverged=len(runs) - len(ok),
        seeds=len(runs),
        steps_to_threshold=float(np.median(reached))
        if 2 * len(reached) > len(runs)
        else None,
        **fr,
    )


def by_delta(record: dict) -> dict[float, Stats]:
    return {
        d: stats([r for r in record["runs"] if r["delta"] == d])
        for d in record["settings"]["deltas"]
    }


def delta_label(d: float) -> str:
    return {0.0: "0 (GClip)", 1.0: "1 (GD)"}.get(d, f"{d:g}")


def ratio_text(s: Stats) -> str:
    if s.ratio is None:
        return f"div {s.diverged}/{s.seeds}"
    text = f"{s.ratio:.1e}"
    return text + (f" (div {s.diverged}/{s.seeds})" if s.diverged else "")


def steps_text(s: Stats) -> str:
    return "-" if s.steps_to_threshold is None else f"{s.steps_to_threshold:.0f}"


def never_worse(found: dict[Cell, dict], tolerance: float = 1.05) -> dict[float, tuple]:
    """Per δ: (cells no worse than GClip, cells compared). No worse: no more
    diverged seeds and a median final/initial at most ``tolerance`` x GClip's."""
    out: dict[float, tuple[int, int]] = {}
    for record in found.values():
        st = by_delta(record)
        base = st[0.0]
        for d, s in st.items():
            good = s.diverged <= base.diverged and (
                base.ratio is None
                or (s.ratio is not None and s.ratio <= tolerance * base.ratio)
            )
            n_good, n = out.get(d, (0, 0))
            out[d] = (n_good + good, n + 1)
    return out


def gain(base: Stats, s: Stats) -> float | None:
    """Orders of magnitude by which δ's median final/initial loss is below
    GClip's (negative: above); None when either diverged on every seed."""
    if base.ratio is None or s.ratio is None:
        return None
    return float(np.log10(max(base.ratio, 1e-30) / max(s.ratio, 1e-30)))


def summary_lines(found: dict[Cell, dict], deltas: list[float]) -> list[str]:
    """Per δ over all cells, then the gain of the larger δ by activation,
    width and depth: the answers the tables hold, gathered."""
    per_cell = {c: by_delta(r) for c, r in found.items()}
    ok = never_worse(found)
    lines = [
        "## Summary",
        "",
        "*Gain*: orders of magnitude by which δ's median final/initial loss lies "
        "below GClip's in the same cell (median over cells). *No worse*: δ "
        "diverged on no more seeds than GClip and ended within 1.05x GClip's "
        "median final/initial loss.",
        "",
        "| δ | cells no worse than GClip | cells where a seed diverged | "
        f"median gain over GClip | cells reaching {THRESHOLD:g} x initial loss |",
        "|---|---|---|---|---|",
    ]
    for d in deltas:
        gains = [gain(st[0.0], st[d]) for st in per_cell.values()]
        finite = [g for g in gains if g is not None]
        div = sum(st[d].diverged > 0 for st in per_cell.values())
        reached = sum(st[d].steps_to_threshold is not None for st in per_cell.values())
        med = f"{np.median(finite):+.2f}" if finite else "-"
        good, n = ok[d]
        lines.append(
            f"| {delta_label(d)} | {good}/{n} | {div}/{n} | {med} | {reached}/{n} |"
        )
    shown = [d for d in deltas if d in (0.01, 0.1, 0.3)]
    for factor in ("activation", "width", "depth", "problem"):
        values = list(dict.fromkeys(getattr(c, factor) for c in per_cell))
        lines += [
            "",
            f"**Median gain over GClip by {factor}** (cells with a diverged seed "
            "in brackets)",
            "",
            f"| {factor} | " + " | ".join(f"δ={d:g}" for d in shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for v in values:
            cells = [st for c, st in per_cell.items() if getattr(c, factor) == v]
            row = []
            for d in shown:
                g = [x for st in cells if (x := gain(st[0.0], st[d])) is not None]
                div = sum(st[d].diverged > 0 for st in cells)
                text = f"{np.median(g):+.2f}" if g else "-"
                row.append(text + (f" ({div})" if div else ""))
            lines.append(f"| {v} | " + " | ".join(row) + " |")
    return [*lines, ""]


def write_markdown(args: argparse.Namespace, found: dict[Cell, dict]) -> str:
    first = next(iter(found.values()))
    deltas = first["settings"]["deltas"]
    wall = sum(r["wall_seconds"] for r in found.values())
    lines = [
        "# δ-GClip ablation: δ x activation x width x depth",
        "",
        f"- **Machine:** {first['device']}; {time.strftime('%Y-%m-%d')}",
        f"- **Cells:** {len(found)}, each {len(deltas)} δ x the seeds in its "
        f"row, all δ of a seed from one initialization; {wall / 60:.1f} min of "
        "cell time in all (cells ran in parallel)",
        "- **Command:** `python benchmarks/ablation.py "
        + shlex.join(a for a in args.argv if a != "--gather-only")
        + "`",
        f"- **Reading the tables:** median over seeds of final/initial loss (runs "
        f"that diverged left out, and counted as `div k/n`); steps to reach "
        f"{THRESHOLD:g} x the initial loss (median, `-` when most seeds did "
        f"not); the mean fraction of steps at the floor. Diverged: a non-finite "
        f"loss or one above {DIVERGED:g}x the initial, at any step.",
        "",
    ]
    lines += summary_lines(found, deltas)
    for name in dict.fromkeys(c.problem for c in found):
        p = Problem(
            **next(r for c, r in found.items() if c.problem == name)["settings"][
                "problem"
            ]
        )
        batch = "full batch" if p.batch is None else f"batch {p.batch}"
        lines += [
            f"## {name}",
            "",
            f"η={p.learning_rate:g}, γ={p.gamma:g}, {p.steps} steps, "
            f"{p.n} examples, {batch}, targets x{p.target_scale:g}.",
            "",
        ]
        cells = [c for c in found if c.problem == name]
        for title, cell_text in (
            ("final / initial loss", ratio_text),
            (
                f"steps to {THRESHOLD:g} x initial loss",
                steps_text,
            ),
            ("fraction of steps at the floor", lambda s: f"{s.floor:.2f}"),
        ):
            lines += [
                f"**{title}**",
                "",
                "| activation | width | depth | seeds | "
                + " | ".join(f"δ={delta_label(d)}" for d in deltas)
                + " |",
                "|---|---|---|---|" + "---|" * len(deltas),
            ]
            for c in cells:
                st = by_delta(found[c])
                lines.append(
                    f"| {c.activation} | {c.width} | {c.depth} | "
                    f"{len(found[c]['settings']['seeds'])} | "
                    + " | ".join(cell_text(st[d]) for d in deltas)
                    + " |"
                )
            lines.append("")
    return "\n".join(lines)


def plot(found: dict[Cell, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems_ = list(dict.fromkeys(c.problem for c in found))
    depths = sorted({c.depth for c in found})
    fig, axes = plt.subplots(
        len(problems_),
        len(depths),
        figsize=(6.5 * len(depths), 0.5 * 12 * len(problems_) + 1.5),
        squeeze=False,
        constrained_layout=True,
    )
    deltas = next(iter(found.values()))["settings"]["deltas"]
    image = None
    for i, name in enumerate(problems_):
        for j, depth in enumerate(depths):
            ax = axes[i, j]
            cells = [c for c in found if c.problem == name and c.depth == depth]
            grid_ = np.full((len(cells), len(deltas)), np.nan)
            for r, c in enumerate(cells):
                st = by_delta(found[c])
                for k, d in enumerate(deltas):
                    s = st[d]
                    if s.ratio is not None:
                        grid_[r, k] = np.log10(max(s.ratio, 1e-12))
                    if s.diverged:
                        ax.text(k, r, "×", ha="center", va="center", color="red")
            image = ax.imshow(grid_, cmap="viridis_r", vmin=-8, vmax=1, aspect="auto")
            ax.set_xticks(
                range(len(deltas)),
                [delta_label(d) for d in deltas],
                rotation=45,
                ha="right",
                fontsize=8,
            )
            ax.set_yticks(
                range(len(cells)),
                [f"{c.activation} w{c.width}" for c in cells],
                fontsize=8,
            )
            ax.set_title(f"{name}, depth {depth}", fontsize=10)
            ax.set_xlabel("δ")
    if image is not None:
        fig.colorbar(
            image,
            ax=axes,
            shrink=0.6,
            label="log10 median final/initial loss (× = a seed diverged)",
        )
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def write_results(args: argparse.Namespace, found: dict[Cell, dict]) -> Path:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    md = args.results_dir / f"{args.name}.md"
    md.write_text(write_markdown(args, found))
    record = {
        "machine": next(iter(found.values()))["device"],
        "cells": {
            c.name: {k: v for k, v in r.items() if k != "settings_key"}
            for c, r in found.items()
        },
    }
    md.with_suffix(".json").write_text(json.dumps(record))
    plot(found, md.with_suffix(".png"))
    return md


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    p.add_argument(
        "--activations", nargs="+", choices=ACTIVATIONS, default=list(ACTIVATIONS)
    )
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS))
    p.add_argument("--depths", nargs="+", type=int, default=list(DEPTHS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument(
        "--large-params",
        type=int,
        default=10_000_000,
        help="cells with more parameters per network run only --large-seeds seeds",
    )
    p.add_argument("--large-seeds", type=int, default=1)
    p.add_argument("--steps", type=int, help="override every problem's step budget")
    p.add_argument("--jobs", type=int, default=2, help="cells at a time")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/ablation")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks/results")
    p.add_argument("--name", default="ablation", help="result file stem")
    p.add_argument("--force", action="store_true", help="rerun finished cells")
    p.add_argument("--gather-only", action="store_true", help="only rebuild outputs")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: theory_full and digits_full, tanh and ReLU, width 256, "
        "depth 1, 1 seed, 150 steps",
    )
    p.add_argument("--cell", help=argparse.SUPPRESS)  # child: run this one cell
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.problems = ["theory_full", "digits_full"]
        args.activations, args.widths, args.depths = ["tanh", "relu"], [256], [1]
        args.seeds, args.steps = [0], 150
        if args.name == "ablation":
            args.name = "ablation_quick"
    for flag in ("widths", "depths", "seeds"):
        bad = [v for v in getattr(args, flag) if v < (0 if flag == "seeds" else 1)]
        if bad:
            p.error(f"--{flag} must be positive integers, got {bad[0]}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be a positive integer, got {args.steps}")
    if args.large_seeds < 1:
        p.error(f"--large-seeds must be a positive integer, got {args.large_seeds}")
    if args.jobs < 1:
        p.error(f"--jobs must be a positive integer, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.cell:
        child_main(args)
        return None
    cells = grid(args)
    if not args.gather_only:
        run_grid(args, cells)
    found = load_cells(args, cells)
    md = write_results(args, found)
    print(md.read_text())
    print(f"wrote {md}, {md.with_suffix('.png')} and {md.with_suffix('.json')}")
    return md


if __name__ == "__main__":
    main()
