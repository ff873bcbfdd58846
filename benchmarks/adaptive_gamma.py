"""Adaptive thresholds and spike skipping on the ablation's problems.

Two questions, on the MLPs and problems of ``ablation.py`` (squared loss,
NTK-parameterized bias-free MLPs, the theorem's random data and real digits):

1. **Does an untuned adaptive γ land within the spread of the best fixed γ?**
   Per cell, δ-GClip (the problem's η, δ = 0.1) with fixed
   γ ∈ {0.01, ..., 100} against :func:`rgc.zscore_gamma` and
   :func:`rgc.percentile_gamma` at their defaults, over seeds. The best fixed
   γ is the one with the lowest median final/initial loss; its spread is the
   range over seeds.
2. **Does spike skipping change anything where the norm spikes?** The same
   cells with outlier batches injected (every ``--outlier-every`` steps from
   step 50, the targets of that step's batch multiplied by
   ``--outlier-scale``), trained with the cell's best fixed γ and with
   ``zscore_gamma``, each without and with
   ``skip_and_round(..., spike_sigmas=6)``; the loss is always the clean one.

    python benchmarks/adaptive_gamma.py            # 12 cells x 3 seeds
    python benchmarks/adaptive_gamma.py --quick    # 1 cell, 2 seeds (CI)
    python benchmarks/adaptive_gamma.py --char-lm  # the character LM

Writes ``adaptive_gamma.{md,json,png}`` under ``--results-dir``. ``--char-lm``
asks both questions of ``examples/char_lm.py``'s transformer on the fortune
files (its model, data and loss, 300 steps, warmup then cosine): δ-GClip
(η = 1, δ = 1e-3) with fixed γ against the adaptive ones (at their defaults,
and with ``initial=1`` for the warm-up), and, with a
learning rate too high (δ-GClip at η = 4; AdamW at 3e-2, ten times the tuned
one, with the loss passed for the spike test), without and with spike
skipping. Writes ``adaptive_gamma_char_lm.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import (
    PROBLEM_SETTINGS,
    Cell,
    Problem,
    activation_fn,
    make_data,
    squared_loss,
)

ROOT = Path(__file__).resolve().parents[1]
GAMMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DELTA = 0.1
ADAPTIVE = ("zscore", "percentile")
SPIKE_SIGMAS, SPIKE_WINDOW, SPIKE_WARMUP = 6.0, 64, 32


def cells(quick: bool) -> list[Cell]:
    if quick:
        return [Cell("theory_full", "tanh", 256, 1)]
    return [
        Cell(problem, act, 1024, depth)
        for problem in PROBLEM_SETTINGS
        for act in ("tanh", "relu")
        for depth in (1, 3)
    ]


def adaptive_gamma(name: str) -> Any:
    import rgclip_optax as rgc

    return rgc.zscore_gamma() if name == "zscore" else rgc.percentile_gamma()


def trainer(
    cell: Cell, problem: Problem, outlier_every: int, outlier_scale: float
) -> tuple[Any, Any]:
    """``train(make_tx, params, key) -> (losses, spikes)``: the clean loss
    before each step and after the last; with ``outlier_every`` the targets
    of every such step's batch (from step 50) are scaled by
    ``outlier_scale``."""
    import jax
    import jax.numpy as jnp
    import optax

    x, y = make_data(cell.problem, problem)
    act = activation_fn(cell.activation)

    def loss_fn(params: list[jax.Array], xb: jax.Array, yb: jax.Array) -> jax.Array:
        return squared_loss(act, params, xb, yb)

    def train(tx: Any, params: list[jax.Array], key: jax.Array) -> Any:
        def step(carry: Any, t: jax.Array) -> Any:
            p, s = carry
            if problem.batch is None:
                xb, yb = x, y
            else:
                idx = jax.random.randint(
                    jax.random.fold_in(key, t), (problem.batch,), 0, problem.n
                )
                xb, yb = x[idx], y[idx]
            if outlier_every:
                outlier = (t >= 50) & (t % outlier_every == outlier_every // 2)
                yb = jnp.where(outlier, outlier_scale * yb, yb)
            g = jax.grad(loss_fn)(p, xb, yb)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss_fn(p, x, y)

        (p, s), losses = jax.lax.scan(
            step, (params, tx.init(params)), jnp.arange(problem.steps)
        )
        spikes = optax.tree.get(s, "spike_count")
        spikes = jnp.zeros([], jnp.int32) if spikes is None else spikes
        return jnp.append(losses, loss_fn(p, x, y)), spikes

    dims = [x.shape[1]] + [cell.width] * cell.depth + [y.shape[1]]

    def init(seed: int) -> list[jax.Array]:
        keys = jax.random.split(jax.random.PRNGKey(seed), len(dims) - 1)
        return [
            jax.random.normal(k, (a, b))
            for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
        ]

    return train, init


def ratios(losses: np.ndarray) -> list[float | None]:
    """final/initial loss per run (None: not finite)."""
    out = []
    for run in np.atleast_2d(losses):
        r = float(run[-1] / run[0])
        out.append(r if np.isfinite(r) else None)
    return out


def run_cell(cell: Cell, problem: Problem, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    seeds = list(args.seeds)
    params = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[init_for(cell, problem, s) for s in seeds]
    )
    keys = jnp.stack([jax.random.PRNGKey(1000 + s) for s in seeds])
    eta = problem.learning_rate
    out: dict[str, Any] = {"cell": cell.name, "problem": asdict(problem)}

    clean, _ = trainer(cell, problem, 0, 1.0)

    def fixed(gamma: jax.Array, p: Any, k: jax.Array) -> Any:
        return clean(_optimizer(eta, gamma, {}), p, k)

    sweep = jax.jit(jax.vmap(jax.vmap(fixed, (None, 0, 0)), (0, None, None)))
    losses, _ = jax.device_get(sweep(jnp.asarray(GAMMAS, jnp.float32), params, keys))
    out["fixed"] = {str(g): ratios(losses[i]) for i, g in enumerate(GAMMAS)}
    for name in ADAPTIVE:
        tx = _optimizer(eta, adaptive_gamma(name), {})
        run = jax.jit(jax.vmap(lambda p, k, tx=tx: clean(tx, p, k)))
        losses, _ = jax.device_get(run(params, keys))
        out[name] = ratios(losses)

    spiky, _ = trainer(cell, problem, args.outlier_every, args.outlier_scale)
    out["spikes"] = {}
    best = min(GAMMAS, key=lambda g: median(out["fixed"][str(g)]))
    out["spike_fixed_gamma"] = best
    for gamma_name in ("fixed", "zscore"):
        gamma = best if gamma_name == "fixed" else adaptive_gamma("zscore")
        for skip in (False, True):
            spike_kw = (
                {"spike_sigmas": SPIKE_SIGMAS, "spike_window": SPIKE_WINDOW,
                 "spike_warmup": SPIKE_WARMUP} if skip else {}
            )  # fmt: skip
            tx = _optimizer(eta, gamma, spike_kw)
            run = jax.jit(jax.vmap(lambda p, k, tx=tx: spiky(tx, p, k)))
            losses, spikes = jax.device_get(run(params, keys))
            out["spikes"][f"{gamma_name}/{'skip' if skip else 'no_skip'}"] = {
                "final_over_initial": ratios(losses),
                "spikes_skipped": np.asarray(spikes).tolist(),
            }
    injected = sum(
        1 for t in range(problem.steps)
        if t >= 50 and t % args.outlier_every == args.outlier_every // 2
    )  # fmt: skip
    out["outliers_injected"] = injected
    return out


def _optimizer(eta: float, gamma: Any, spike_kw: dict) -> Any:
    """δ-GClip as ``delta_gclip`` builds it, with spike skipping if asked."""
    import optax

    import rgclip_optax as rgc

    return rgc.skip_and_round(
        optax.chain(
            rgc.scale_by_delta_gclip(gamma, DELTA, wide_updates=True),
            optax.scale_by_learning_rate(eta),
        ),
        **spike_kw,
    )


def init_for(cell: Cell, problem: Problem, seed: int) -> Any:
    _, init = trainer(cell, problem, 0, 1.0)
    return init(seed)


# ------------------------------------------------------------------ report


def median(values: list[float | None]) -> float:
    """Median of log10 ratios; a diverged run (None) counts as +inf."""
    logs = [np.log10(v) if v else np.inf for v in values]
    return float(np.median(logs))


def spread(values: list[float | None]) -> tuple[float, float]:
    logs = [np.log10(v) if v else np.inf for v in values]
    return float(np.min(logs)), float(np.max(logs))


def answer_q1(record: dict) -> list[dict]:
    rows = []
    for c in record["cells"]:
        best = min(GAMMAS, key=lambda g: median(c["fixed"][str(g)]))
        lo, hi = spread(c["fixed"][str(best)])
        row = {
            "cell": c["cell"],
            "best_gamma": best,
            "best": median(c["fixed"][str(best)]),
            "best_spread": [lo, hi],
        }
        for name in ADAPTIVE:
            m = median(c[name])
            row[name] = m
            row[f"{name}_within"] = bool(m <= hi + 1e-9)
            row[f"{name}_rank"] = 1 + sum(
                median(c["fixed"][str(g)]) < m for g in GAMMAS
            )
        rows.append(row)
    return rows


def fmt(x: float) -> str:
    return "diverged" if not np.isfinite(x) else f"{x:+.2f}"


def markdown(record: dict) -> str:
    q1 = answer_q1(record)
    lines = [
        "# Adaptive γ and spike skipping on the ablation's problems",
        "",
        f"- **Machine:** {record['machine']}, jax {record['jax']}; {record['date']}",
        f"- **Command:** `{record['command']}`",
        f"- **Cells:** {len(record['cells'])} (problem/activation_width_depth),"
        f" seeds {record['seeds']}; η as in the ablation, δ = {DELTA}.",
        "- **Numbers:** log10(final loss / initial loss), median over seeds;"
        " lower is better.",
        "",
        "## 1. Untuned adaptive γ against a sweep of fixed γ",
        "",
        f"Fixed γ swept over {', '.join(f'{g:g}' for g in GAMMAS)}; "
        "`zscore_gamma()` and `percentile_gamma()` at their defaults. *Within*: the"
        " adaptive median is at most the worst seed of the best fixed γ; *rank*:"
        " its place among the 9 fixed γ (1 = better than all).",
        "",
        "| cell | best fixed γ | its median [spread] | zscore (rank, within) "
        "| percentile (rank, within) |",
        "|---|---|---|---|---|",
    ]
    for r in q1:
        lo, hi = r["best_spread"]
        lines.append(
            f"| {r['cell']} | {r['best_gamma']:g} | {fmt(r['best'])} "
            f"[{fmt(lo)}, {fmt(hi)}] "
            + " ".join(
                f"| {fmt(r[n])} ({r[n + '_rank']}, "
                f"{'yes' if r[n + '_within'] else 'no'})"
                for n in ADAPTIVE
            )
            + " |"
        )
    for n in ADAPTIVE:
        hits = sum(r[f"{n}_within"] for r in q1)
        lines.append("")
        lines.append(
            f"- `{n}`: within the best fixed γ's spread in {hits} of {len(q1)} cells."
        )
    lines += [
        "",
        "## 2. Spike skipping on runs with outlier batches",
        "",
        f"Every {record['outlier_every']} steps from step 50 the batch's targets are"
        f" multiplied by {record['outlier_scale']:g}; `skip` is"
        f" `skip_and_round(..., spike_sigmas={SPIKE_SIGMAS:g},"
        f" spike_window={SPIKE_WINDOW}, spike_warmup={SPIKE_WARMUP})`. Spikes"
        " skipped: median over seeds of the steps skipped as spikes.",
        "",
        "| cell | outliers | best fixed γ: no skip | skip (spikes skipped) "
        "| zscore: no skip | skip (spikes skipped) |",
        "|---|---|---|---|---|---|",
    ]
    for c in record["cells"]:
        s = c["spikes"]
        cells_ = []
        for g in ("fixed", "zscore"):
            a, b = s[f"{g}/no_skip"], s[f"{g}/skip"]
            cells_.append(fmt(median(a["final_over_initial"])))
            cells_.append(
                f"{fmt(median(b['final_over_initial']))} "
                f"({int(np.median(b['spikes_skipped']))})"
            )
        lines.append(
            f"| {c['cell']} | {c['outliers_injected']} | " + " | ".join(cells_) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(record["cells"])
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False
    )
    for ax, c in zip(axes.flat, record["cells"], strict=False):
        meds = [median(c["fixed"][str(g)]) for g in GAMMAS]
        ax.plot(np.log10(GAMMAS), meds, "o-", color="k", label="fixed γ")
        for name, color in zip(ADAPTIVE, ("tab:blue", "tab:orange"), strict=True):
            ax.axhline(median(c[name]), color=color, ls="--", label=name)
        ax.set_title(c["cell"], fontsize=8)
        ax.set_xlabel("log10 γ", fontsize=8)
        ax.set_ylabel("log10 final/initial", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------- the character LM

CHAR_LM_GAMMAS = (0.25, 1.0, 4.0)


def char_lm_run(make_tx: Any, seed: int, steps: int, data: dict) -> dict[str, float]:
    """Final validation bits/char, the largest/median gradient norm and the
    spikes skipped, for one run of the example's model."""
    import jax
    import jax.numpy as jnp
    import optax
    from char_lm import CharTransformer, loss_fn
    from flax import nnx

    context, batch = 64, 32
    model = CharTransformer(
        width=128, layers=2, heads=4, context=context, rngs=nnx.Rngs(seed)
    )
    graphdef, params = nnx.split(model)
    tx = make_tx(lambda eta: optax.warmup_cosine_decay_schedule(0.0, eta, 30, steps))
    train = jnp.asarray(data["train"], jnp.int32)
    val = data["validation"]
    starts = np.linspace(0, len(val) - context - 2, 128).astype(int)
    val_windows = jnp.asarray(np.stack([val[s : s + context + 1] for s in starts]))
    key = jax.random.PRNGKey(seed)

    def step(carry: Any, t: jax.Array) -> Any:
        p, s = carry
        idx = jax.random.randint(
            jax.random.fold_in(key, t), (batch,), 0, train.shape[0] - context - 1
        )
        windows = jax.vmap(
            lambda i: jax.lax.dynamic_slice(train, (i,), (context + 1,))
        )(idx)
        loss, g = jax.value_and_grad(
            lambda q: loss_fn(nnx.merge(graphdef, q), windows)
        )(p)
        u, s = tx.update(g, s, p, value=loss)
        return (optax.apply_updates(p, u), s), optax.global_norm(g)

    @jax.jit
    def run(p: Any) -> Any:
        (p, s), norms = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(steps))
        bpc = loss_fn(nnx.merge(graphdef, p), val_windows) / jnp.log(2.0)
        spikes = optax.tree.get(s, "spike_count")
        return bpc, norms, jnp.zeros([], jnp.int32) if spikes is None else spikes

    bpc, norms, spikes = jax.device_get(run(params))
    norms = np.asarray(norms)
    return {
        "final_val_bpc": float(bpc),
        "max_over_median_norm": float(np.nanmax(norms) / np.nanmedian(norms)),
        "spikes_skipped": int(spikes),
    }


def char_lm_configs() -> dict[str, Any]:
    """``name -> make_tx(schedule_of_eta)``."""
    import optax

    import rgclip_optax as rgc

    spike = {"spike_sigmas": SPIKE_SIGMAS, "spike_window": SPIKE_WINDOW,
             "spike_warmup": SPIKE_WARMUP}  # fmt: skip

    def sgd_like(eta: float, gamma: Any, **kw: Any) -> Any:
        return lambda sched: rgc.skip_and_round(
            optax.chain(
                rgc.scale_by_delta_gclip(gamma, 1e-3, wide_updates=True),
                optax.scale_by_learning_rate(sched(eta)),
            ),
            **kw,
        )

    def adamw(eta: float, **kw: Any) -> Any:
        return lambda sched: rgc.skip_and_round(
            optax.chain(
                rgc.scale_by_delta_gclip(1.0, 1e-3, wide_updates=True),
                optax.adamw(sched(eta), weight_decay=0.01),
            ),
            **kw,
        )

    configs: dict[str, Any] = {
        f"q1/fixed γ={g:g}": sgd_like(1.0, g) for g in CHAR_LM_GAMMAS
    }
    configs["q1/zscore"] = sgd_like(1.0, rgc.zscore_gamma())
    configs["q1/percentile"] = sgd_like(1.0, rgc.percentile_gamma())
    # The defaults' warm-up is unclipped (initial=inf); with a threshold for it:
    configs["q1/zscore, initial=1"] = sgd_like(1.0, rgc.zscore_gamma(initial=1.0))
    configs["q1/percentile, initial=1"] = sgd_like(
        1.0, rgc.percentile_gamma(initial=1.0)
    )
    configs["q2/δ-GClip η=4, γ=1: no skip"] = sgd_like(4.0, 1.0)
    configs["q2/δ-GClip η=4, γ=1: skip"] = sgd_like(4.0, 1.0, **spike)
    configs["q2/AdamW 3e-2: no skip"] = adamw(3e-2)
    configs["q2/AdamW 3e-2: skip"] = adamw(3e-2, **spike)
    return configs


def char_lm_main(args: argparse.Namespace) -> Path:
    import jax

    sys.path.insert(0, str(ROOT / "examples"))
    from char_lm import FORTUNES_DIR, load_fortunes
    from tqdm import tqdm

    data = load_fortunes(args.data_dir or FORTUNES_DIR)
    if len(data["train"]) == 0:
        raise SystemExit(
            f"no fortune files in {args.data_dir or FORTUNES_DIR}: "
            "apt-get install fortunes, or pass --data-dir"
        )
    runs = []
    configs = char_lm_configs()
    for name in tqdm(configs, desc="char LM"):
        for seed in args.seeds:
            r = char_lm_run(configs[name], seed, args.steps, data)
            runs.append({"config": name, "seed": seed, **r})
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {jax.local_device_count()} CPU device(s)",
        "jax": jax.__version__,
        "steps": args.steps,
        "seeds": args.seeds,
        "runs": runs,
    }
    lines = [
        "# Adaptive γ and spike skipping on the character LM",
        "",
        f"- **Machine:** {record['machine']}, jax {record['jax']}; {record['date']}",
        f"- **Command:** `python benchmarks/adaptive_gamma.py --char-lm --seeds "
        f"{' '.join(map(str, args.seeds))} --steps {args.steps}`",
        "- **Model:** `examples/char_lm.py`'s transformer, width 128, 2 blocks, 4"
        f" heads, context 64, batch 32, {args.steps} steps, warmup 30 then cosine;"
        " validation bits/char on 128 fixed windows after the last step.",
        "",
        "| configuration | final validation bits/char (per seed) | mean "
        "| max/median gradient norm | spikes skipped |",
        "|---|---|---|---|---|",
    ]
    for name in configs:
        rs = [r for r in runs if r["config"] == name]
        bpc = [r["final_val_bpc"] for r in rs]
        ratio = [r["max_over_median_norm"] for r in rs]
        skipped = [str(r["spikes_skipped"]) for r in rs]
        lines.append(
            f"| {name} | {', '.join(f'{b:.4f}' for b in bpc)} | "
            f"{np.mean(bpc):.4f} | {', '.join(f'{x:.1f}' for x in ratio)} | "
            f"{', '.join(skipped)} |"
        )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    base = args.results_dir / "adaptive_gamma_char_lm"
    base.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return base


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 cell, 2 seeds, 100 steps")
    p.add_argument("--char-lm", action="store_true", help="the character LM")
    p.add_argument("--steps", type=int, default=300, help="char LM steps")
    p.add_argument("--data-dir", type=Path, default=None, help="fortune files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--outlier-every", type=int, default=50)
    p.add_argument("--outlier-scale", type=float, default=30.0)
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.steps < 31:
        p.error(f"--steps must be at least 31 (after the warmup), got {args.steps}")
    if args.outlier_every < 2:
        p.error(f"--outlier-every must be at least 2, got {args.outlier_every}")
    if not args.outlier_scale > 0:
        p.error(f"--outlier-scale must be > 0, got {args.outlier_scale}")
    if args.quick:
        args.seeds = args.seeds[:2]
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.char_lm:
        return char_lm_main(args)
    import jax
    from tqdm import tqdm

    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {jax.local_device_count()} CPU device(s)",
        "jax": jax.__version__,
        "command": "python benchmarks/adaptive_gamma.py"
        + (" " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:])).rstrip(),
        "seeds": args.seeds,
        "outlier_every": args.outlier_every,
        "outlier_scale": args.outlier_scale,
        "cells": [],
    }
    for cell in tqdm(cells(args.quick), desc="cells"):
        problem = PROBLEM_SETTINGS[cell.problem]
        if args.quick:
            problem = replace(problem, steps=100)
        record["cells"].append(run_cell(cell, problem, args))
    record["q1"] = answer_q1(record)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    base = args.results_dir / (
        "adaptive_gamma_quick" if args.quick else "adaptive_gamma"
    )
    base.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    base.with_suffix(".md").write_text(markdown(record))
    plot(record, base.with_suffix(".png"))
    print(markdown(record))
    return base


if __name__ == "__main__":
    main()
