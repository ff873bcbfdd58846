"""Run a paper experiment over optimizers x seeds; write a table and a plot.

Each run is the example script in its own process (``--jobs`` at a time), with
its own ``metrics.json``, ``curves.png`` and ``log.txt`` under
``--runs-dir/<optimizer>_seed<seed>/``. Finished runs are reused unless
``--force``. Then the runs are gathered into, under ``--results-dir``:

* ``<experiment>.md``: mean ± std over seeds of the final and best metrics,
  with the hyperparameters, the data, the machine and the command;
* ``<experiment>.png``: mean ± std curves per optimizer, and ``h`` per step;
* ``<experiment>.json``: per-run summaries and per-epoch curves.

Arguments this script does not know go to the example, e.g.::

    python benchmarks/paper_experiments.py vae --seeds 0 1 2 --jobs 2
    python benchmarks/paper_experiments.py resnet18 --seeds 0 \\
        --epochs 2 --train-subset 2048 --data-dir DIR/cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("sgd", "adam", "gclip", "delta_gclip")
LABELS = {
    "sgd": "SGD",
    "adam": "Adam",
    "gclip": "GClip",
    "delta_gclip": "δ-GClip",
    "clip_adam": "clip + Adam",
    "delta_gclip_adam": "δ-GClip + Adam",
    "adamw_clip": "AdamW + clip",
    "adamw_delta_gclip": "AdamW + δ-GClip",
}
SYMBOLS = {"learning_rate": "η", "gamma": "γ", "delta": "δ"}


def optimizer_spec(spec: str) -> str:
    """``name`` or ``name:key=value,...``, e.g. ``delta_gclip:delta=1e-8``."""
    rest = spec.partition(":")[2]
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in SYMBOLS or not eq:
            raise argparse.ArgumentTypeError(
                f"{item!r} in {spec!r}: overrides are key=value with key one of "
                f"{', '.join(SYMBOLS)}"
            )
        try:
            float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} in {spec!r}: {value!r} is not a number"
            ) from None
    return spec


def spec_parts(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    return name, dict(item.split("=", 1) for item in filter(None, rest.split(",")))


def spec_flags(spec: str) -> list[str]:
    name, overrides = spec_parts(spec)
    flags = ["--optimizer", name]
    for key, value in overrides.items():
        flags += [f"--{key.replace('_', '-')}", value]
    return flags


def spec_label(spec: str) -> str:
    name, overrides = spec_parts(spec)
    shown = ", ".join(f"{SYMBOLS[k]}={float(v):g}" for k, v in overrides.items())
    return LABELS[name] + (f" ({shown})" if shown else "")


def run_dir(args: argparse.Namespace, spec: str, seed: int) -> Path:
    return args.runs_dir / f"{spec.replace(':', '-').replace(',', '-')}_seed{seed}"


@dataclass(frozen=True)
class Experiment:
    script: str
    title: str
    # (metric key, column label, True when higher is better)
    metrics: tuple[tuple[str, str, bool], ...]
    curve_panels: tuple[tuple[str, ...], ...]
    log_scale: bool
    optimizers: tuple[str, ...] = OPTIMIZERS
    fixed_args: tuple[str, ...] = ()  # passed to every run
    points: str = "epochs"  # the history's list of evaluations
    x_key: str = "epoch"  # each evaluation's x value
    x_label: str = "epoch (0 = initialization)"

    def describe(self, first: dict[str, Any]) -> list[str]:
        """The table's data and training lines: the run's own ``setup`` lines
        where it writes them, else those of the epoch-based examples."""
        if "setup" in first:
            return [f"- {line}" for line in first["setup"]]
        hp = first["hyperparameters"]
        schedule = "η×0.1 at 50% and 75% of the epochs" if hp["schedule"] else "none"
        return [
            f"- **Data:** {first['data']['train']} training and "
            f"{first['data']['test']} test examples from `{first['data']['dir']}`",
            f"- **Training:** {hp['epochs']} epochs, batch {hp['batch_size']}, "
            f"schedule {schedule}; metrics evaluated after each epoch",
        ]


EXPERIMENTS = {
    "vae": Experiment(
        script="examples/vae_fashion_mnist.py",
        title="VAE on Fashion-MNIST (loss per sample: summed MSE + KL)",
        metrics=(
            ("train_loss", "train loss", False),
            ("test_loss", "test loss", False),
        ),
        curve_panels=(("train_loss",), ("test_loss",)),
        log_scale=True,
    ),
    "resnet18": Experiment(
        script="examples/resnet18_cifar10.py",
        title="ResNet-18 on CIFAR-10",
        metrics=(
            ("train_loss", "train loss", False),
            ("test_loss", "test loss", False),
            ("test_accuracy", "test accuracy", True),
        ),
        curve_panels=(("train_loss",), ("test_accuracy",)),
        log_scale=False,
    ),
    "vit": Experiment(
        script="examples/vit_cifar10.py",
        title="ViT on CIFAR-10 (64x64 inputs, random resized crops)",
        metrics=(
            ("train_loss", "train loss", False),
            ("test_loss", "test loss", False),
            ("test_accuracy", "test accuracy", True),
        ),
        curve_panels=(("train_loss",), ("test_accuracy",)),
        log_scale=False,
    ),
    **{
        f"ppo_{env.split('-')[0].lower()}": Experiment(
            script="examples/ppo.py",
            title=f"PPO on {env} (gymnax)",
            metrics=(("episode_return", "episode return", True),),
            curve_panels=(("episode_return",),),
            log_scale=False,
            optimizers=("clip_adam", "delta_gclip_adam"),
            fixed_args=("--env", env),
            points="evaluations",
            x_key="env_steps",
            x_label="environment steps",
        )
        for env in ("CartPole-v1", "Acrobot-v1")
    },
    "char_lm": Experiment(
        script="examples/char_lm.py",
        title="Character-level transformer LM on the fortune files",
        metrics=(("val_bpc", "validation bits/char", False),),
        curve_panels=(("val_bpc",),),
        log_scale=False,
        optimizers=("adamw_clip", "adamw_delta_gclip", "delta_gclip", "sgd"),
        points="evaluations",
        x_key="step",
        x_label="step",
    ),
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument(
        "--optimizers",
        nargs="+",
        type=optimizer_spec,
        help="optimizers, each NAME or NAME:key=value,... "
        "(e.g. delta_gclip:delta=1e-8); NAME one of the experiment's (default: "
        "all of them): " + ", ".join(LABELS),
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument(
        "--threads-per-job",
        type=int,
        default=None,
        help="CPU threads per run (default: all cores / jobs)",
    )
    p.add_argument("--runs-dir", type=Path, help="default runs/paper/<experiment>")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks/results")
    p.add_argument("--name", help="result file stem (default: the experiment's)")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument(
        "--gather-only", action="store_true", help="only rebuild table and plot"
    )
    args, extra = p.parse_known_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be a positive integer, got {args.jobs}")
    if "--out" in extra or "--optimizer" in extra or "--seed" in extra:
        p.error("--out, --optimizer and --seed are set per run by this script")
    exp = EXPERIMENTS[args.experiment]
    args.optimizers = args.optimizers or list(exp.optimizers)
    for spec in args.optimizers:
        name = spec_parts(spec)[0]
        if name not in exp.optimizers:
            p.error(
                f"argument --optimizers: optimizer {name!r} is not one of "
                f"{', '.join(exp.optimizers)}"
            )
    args.runs_dir = args.runs_dir or ROOT / "runs/paper" / args.experiment
    stem = exp.script.split("/")[-1][:-3]
    args.name = args.name or (args.experiment if exp.fixed_args else stem)
    return args, extra


def run_one(
    exp: Experiment, optimizer: str, seed: int, out: Path, extra: list[str], env: dict
) -> tuple[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / exp.script), *spec_flags(optimizer)]
    cmd += ["--seed", str(seed), "--out", str(out), *exp.fixed_args, *extra]
    with (out / "log.txt").open("w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env
        ).returncode
    return out.name, rc


def job_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    if threads == 1:  # XLA:CPU otherwise spreads each run over all cores
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    return env


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(np.mean(a)), float(np.std(a, ddof=1)) if len(a) > 1 else 0.0


def _num(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 1e4 or 0 < abs(x) < 1e-2 else f"{x:.4f}"


def fmt(values: list[float | None]) -> str:
    """mean ± sample std over seeds (just the value for one seed)."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if len(finite) < len(values):
        return f"non-finite in {len(values) - len(finite)}/{len(values)}"
    m, s = mean_std(finite)
    return _num(m) if len(finite) == 1 else f"{_num(m)} ± {_num(s)}"


def best(values: list[float | None], higher: bool) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return None
    return max(finite) if higher else min(finite)


def gather(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for opt in args.optimizers:
        for seed in args.seeds:
            path = run_dir(args, opt, seed) / "metrics.json"
            if path.is_file():
                runs.setdefault(opt, []).append(json.loads(path.read_text()))
    if not runs:
        raise SystemExit(f"error: no finished runs under {args.runs_dir}")
    return runs


def write_table(
    exp: Experiment, args: argparse.Namespace, extra: list[str], runs: dict
) -> str:
    first = next(iter(runs.values()))[0]
    dev = first["device"]
    lines = [
        f"# {exp.title}",
        "",
        f"- **Machine:** {dev['platform']} ({dev['device_kind']}) x "
        f"{dev['device_count']}, {dev['cpu_count']} CPU cores "
        f"({dev['cpu']}), jax {dev['jax']}, optax {dev['optax']}; "
        f"{time.strftime('%Y-%m-%d')}",
        *exp.describe(first),
        "- **Command:** `python benchmarks/paper_experiments.py "
        + shlex.join(
            [
                args.experiment,
                "--seeds",
                *map(str, args.seeds),
                "--optimizers",
                *args.optimizers,
                *extra,
            ]
        )
        + "`",
        "",
    ]
    header = ["optimizer", "hyperparameters", "seeds"]
    for _, label, _ in exp.metrics:
        header += [f"final {label}", f"best {label}"]
    regimes = "regime_fractions" in first["summary"]
    if regimes:
        header.append("steps unclipped / clipped / at floor")
    header.append("train steps/s")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    skip = 1 if exp.points == "epochs" else 0  # epoch 0 is the initialization
    for opt, rs in runs.items():
        hp = rs[0]["hyperparameters"]
        name = hp["optimizer"]
        clip = "max_grad_norm" if "max_grad_norm" in hp else "gamma"
        hps = ", ".join(
            f"{sym}={hp[k]:g}"
            for k, sym in (("learning_rate", "η"), (clip, "γ"), ("delta", "δ"))
            if k in hp
            and hp[k] is not None
            and (k != "delta" or "delta" in name)
            and (k != clip or "clip" in name)
        )
        row = [spec_label(opt), hps, str(len(rs))]
        for key, _, higher in exp.metrics:
            final = [r["history"][exp.points][-1][key] for r in rs]
            bests = [
                best([m[key] for m in r["history"][exp.points][skip:]], higher)
                for r in rs
            ]
            row += [fmt(final), fmt(bests)]
        if regimes:
            row.append(
                " / ".join(
                    f"{np.mean([r['summary']['regime_fractions'][k] for r in rs]):.2f}"
                    for k in ("unclipped", "clipped", "floor")
                )
            )
        sps = [r["history"]["train_steps_per_second"] for r in rs]
        sps = [s for s in sps if s]
        row.append(f"{np.median(sps):.3g}" if sps else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Mean ± sample standard deviation over seeds; *best* is the best evaluation "
        "of each run (after training began). Steps/s is the median over seeds and "
        "depends on how many runs shared the machine."
        + (
            " The regime fractions (mean over seeds) say how often the clipping "
            "factor was 1, γ/‖g‖ or δ."
            if regimes
            else ""
        ),
        "",
    ]
    return "\n".join(lines)


def plot(exp: Experiment, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = 1 if exp.points == "epochs" else 0  # epoch 0 is the initialization
    panels = len(exp.curve_panels) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    for ax, keys in zip(axes, exp.curve_panels, strict=False):
        for opt, rs in runs.items():
            for key in keys:
                points = [r["history"][exp.points] for r in rs]
                curves = np.array(
                    [[np.nan if m[key] is None else m[key] for m in p] for p in points],
                    dtype=np.float64,
                )
                mean, std = np.nanmean(curves, 0), np.nanstd(curves, 0)
                x = [m[exp.x_key] for m in points[0]]
                (line,) = ax.plot(x, mean, label=f"{spec_label(opt)} (n={len(rs)})")
                ax.fill_between(
                    x, mean - std, mean + std, alpha=0.2, color=line.get_color()
                )
            ax.set_ylabel(keys[0].replace("_", " "))
        if exp.log_scale:
            ax.set_yscale("log")
        ax.set_xlabel(exp.x_label)
        ax.legend()
    axes[0].set_title(exp.title, fontsize=10)
    ax = axes[-1]
    for opt, rs in runs.items():
        # h per step, all seeds: median and 5-95% band over the steps between
        # two evaluations.
        points = rs[0]["history"][exp.points][skip:]
        parts = [
            np.array_split(
                np.asarray(r["history"]["steps"]["h"], np.float64), len(points)
            )
            for r in rs
        ]
        lo, mid, hi = np.array(
            [
                np.nanpercentile(np.concatenate([p[i] for p in parts]), [5, 50, 95])
                for i in range(len(points))
            ]
        ).T
        x = [m[exp.x_key] for m in points]
        (line,) = ax.plot(x, mid, label=spec_label(opt))
        ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
        hp = rs[0]["hyperparameters"]
        if hp["optimizer"] == "delta_gclip":
            ax.axhline(
                hp["learning_rate"] * hp["delta"],
                color=line.get_color(),
                ls=":",
                lw=1,
                label=f"ηδ floor of {spec_label(opt)}",
            )
    ax.set_yscale("log")
    ax.set_xlabel(exp.x_label)
    ax.set_ylabel("step size h: median between evaluations, 5–95% band")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_json(exp: Experiment, runs: dict) -> dict[str, Any]:
    return {
        opt: [
            {
                "seed": r["hyperparameters"]["seed"],
                "hyperparameters": r["hyperparameters"],
                "summary": r["summary"],
                exp.points: r["history"][exp.points],
                "train_steps_per_second": r["history"]["train_steps_per_second"],
                "wall_seconds": r["history"]["wall_seconds"],
                "device": r["device"],
            }
            for r in rs
        ]
        for opt, rs in runs.items()
    }


def main(argv: list[str] | None = None) -> Path:
    args, extra = parse_args(argv)
    exp = EXPERIMENTS[args.experiment]
    if not args.gather_only:
        todo = [
            (o, s)
            for o in args.optimizers
            for s in args.seeds
            if args.force or not (run_dir(args, o, s) / "metrics.json").is_file()
        ]
        threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // args.jobs)
        env = job_env(threads)
        failed = []
        with (
            ThreadPoolExecutor(args.jobs) as pool,
            tqdm(total=len(todo), desc=args.experiment, unit="run") as bar,
        ):
            futures = [
                pool.submit(run_one, exp, o, s, run_dir(args, o, s), extra, env)
                for o, s in todo
            ]
            for f in futures:
                name, rc = f.result()
                bar.update(1)
                if rc != 0:
                    failed.append(name)
                    tqdm.write(f"{name} failed (exit {rc}); see its log.txt")
        if failed:
            raise SystemExit(f"error: runs failed: {', '.join(failed)}")
    runs = gather(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    table = write_table(exp, args, extra, runs)
    md = args.results_dir / f"{args.name}.md"
    md.write_text(table)
    (args.results_dir / f"{args.name}.json").write_text(
        json.dumps({"machine": platform.node(), "runs": summary_json(exp, runs)})
    )
    plot(exp, runs, args.results_dir / f"{args.name}.png")
    print(table)
    print(f"wrote {md}, {md.with_suffix('.png')} and {md.with_suffix('.json')}")
    return md


if __name__ == "__main__":
    main()
