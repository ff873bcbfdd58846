"""Whole training programs: a scan-compiled loop, jitted once, vmapped over seeds.

JAX's reinforcement-learning and sweep users compile the whole training run as
one program (purejaxrl's ``ppo.py`` is the best-known example): a
``lax.scan`` over updates, with epochs and shuffled minibatches scanned inside
it, the whole run ``vmap``-ped over seeds and ``jit``-ted once. This benchmark
builds that program for a small MLP regression (``--sizes``, tanh, ~9k
parameters by default) and times it, per optimizer, as

* ``jit(train)``: one seed;
* ``jit(vmap(train))``: ``--seeds`` seeds (4 and 16 by default);

for these optimizers, each against its Optax counterpart:

* ``clip_sgd``: ``chain(clip_by_global_norm(gamma), sgd(lr))``;
* ``delta_gclip``: ``rgc.delta_gclip(lr, gamma, delta)``, against ``clip_sgd``;
* ``clip_sgd_momentum`` and ``delta_gclip_momentum`` (momentum 0.9);
* ``clip_adam``: ``chain(clip_by_global_norm(gamma), adam(lr))``;
* ``delta_gclip_adam``: ``skip_and_round(chain(scale_by_delta_gclip(gamma,
  delta, wide_updates=True), scale_by_adam(), scale_by_learning_rate(lr)))``,
  against ``clip_adam``.

The programs of one mode are timed in turn, sample after sample, so they share
the machine's noise; each reports its median and quartiles and the ratio of
medians to its counterpart. From the compiled program it also reads what sits
inside the loop bodies (the ``while`` computations): conditionals, copies,
fusions and selects, so a regression in structure shows next to the time.

Writes ``<out>.json`` and ``<out>.md``::

    python benchmarks/whole_program.py
    python benchmarks/whole_program.py --platform gpu --quick
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timing import stats, timed_samples

ROOT = Path(__file__).resolve().parents[1]

OPTIMIZERS = (
    "clip_sgd",
    "delta_gclip",
    "clip_sgd_momentum",
    "delta_gclip_momentum",
    "clip_adam",
    "delta_gclip_adam",
)
# Each δ-GClip program and the Optax program it is measured against.
COUNTERPART = {
    "delta_gclip": "clip_sgd",
    "delta_gclip_momentum": "clip_sgd_momentum",
    "delta_gclip_adam": "clip_adam",
}
TARGET_RATIO = 1.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default="cpu")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS)
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[4, 16],
        help="vmapped seed counts (jit(train), one seed, always runs)",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=[8, 64, 64, 64, 2],
        help="MLP layer widths, input first",
    )
    p.add_argument("--updates", type=int, default=32, help="outer scan length")
    p.add_argument("--epochs", type=int, default=4, help="epochs per update")
    p.add_argument("--minibatches", type=int, default=8, help="minibatches per epoch")
    p.add_argument("--minibatch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--adam-learning-rate", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=9, help="timing samples")
    p.add_argument("--sample-seconds", type=float, default=0.5)
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run for a borrowed accelerator: 5 samples, 4 seeds",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path without suffix "
        "(default: benchmarks/results/whole_program_<platform>)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.seeds = 5, [4]
    for name in ("updates", "epochs", "minibatches", "minibatch_size", "samples"):
        if getattr(args, name) < 1:
            p.error(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    if any(s < 2 for s in args.seeds):
        p.error(f"--seeds are vmapped seed counts, each >= 2, got {args.seeds}")
    if len(args.sizes) < 2 or min(args.sizes) < 1:
        p.error(f"--sizes needs two or more positive widths, got {args.sizes}")
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"whole_program_{args.platform}"
    return args


def make_tx(name: str, args: argparse.Namespace) -> Any:
    import optax

    import rgclip_optax as rgc

    lr, gamma, delta = args.learning_rate, args.gamma, args.delta
    clip = optax.clip_by_global_norm(gamma)
    return {
        "clip_sgd": lambda: optax.chain(clip, optax.sgd(lr)),
        "delta_gclip": lambda: rgc.delta_gclip(lr, gamma, delta),
        "clip_sgd_momentum": lambda: optax.chain(clip, optax.sgd(lr, momentum=0.9)),
        "delta_gclip_momentum": lambda: rgc.delta_gclip(lr, gamma, delta, momentum=0.9),
        "clip_adam": lambda: optax.chain(clip, optax.adam(args.adam_learning_rate)),
        "delta_gclip_adam": lambda: rgc.skip_and_round(
            optax.chain(
                rgc.scale_by_delta_gclip(gamma, delta, wide_updates=True),
                optax.scale_by_adam(),
                optax.scale_by_learning_rate(args.adam_learning_rate),
            )
        ),
    }[name]()


def make_train(tx: Any, args: argparse.Namespace) -> Callable[[Any], Any]:
    """``train(key) -> losses``: the whole run, scans inside scans."""
    import jax
    import jax.numpy as jnp
    import optax

    sizes = args.sizes

    def init(key: Any) -> dict[str, Any]:
        params = {}
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            key, k = jax.random.split(key)
            params[f"w{i}"] = jax.random.normal(k, (a, b)) / jnp.sqrt(a)
            params[f"b{i}"] = jnp.zeros(b)
        return params

    def mlp(params: dict[str, Any], x: Any) -> Any:
        n = len(sizes) - 1
        for i in range(n):
            x = x @ params[f"w{i}"] + params[f"b{i}"]
            x = jnp.tanh(x) if i < n - 1 else x
        return x

    def loss_fn(params: dict[str, Any], x: Any, y: Any) -> Any:
        return jnp.mean((mlp(params, x) - y) ** 2)

    def train(key: Any) -> Any:
        k_init, k_run = jax.random.split(key)
        params = init(k_init)

        def update(carry: Any, key: Any) -> tuple[Any, Any]:
            # A fresh batch each update (a rollout, in RL), split into
            # minibatches that every epoch visits in a new order.
            k_data, k_epochs = jax.random.split(key)
            shape = (args.minibatches, args.minibatch_size, sizes[0])
            x = jax.random.normal(k_data, shape)
            y = 10.0 * jnp.sin(x[..., : sizes[-1]])

            def epoch(carry: Any, key: Any) -> tuple[Any, Any]:
                def minibatch(carry: Any, i: Any) -> tuple[Any, Any]:
                    params, state = carry
                    loss, g = jax.value_and_grad(loss_fn)(params, x[i], y[i])
                    updates, state = tx.update(g, state, params)
                    return (optax.apply_updates(params, updates), state), loss

                order = jax.random.permutation(key, args.minibatches)
                return jax.lax.scan(minibatch, carry, order)

            keys = jax.random.split(k_epochs, args.epochs)
            carry, losses = jax.lax.scan(epoch, carry, keys)
            return carry, jnp.mean(losses)

        keys = jax.random.split(k_run, args.updates)
        _, losses = jax.lax.scan(update, (params, tx.init(params)), keys)
        return losses

    return train


# A computation of HLO text: "%name (params) -> type {" ... "}".
COMPUTATION = re.compile(
    r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)^\}", re.M | re.S
)
# What control flow calls: loop bodies and conditions, conditional branches.
CALLED = re.compile(r"(?:body|condition)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")


def loop_body_counts(hlo: str) -> dict[str, int]:
    """Ops inside the ``while`` bodies of an optimized HLO module: the bodies
    and the control flow they call, fusions' insides excluded (a fusion is one
    kernel)."""
    comps = {m.group(1): m.group(2) for m in COMPUTATION.finditer(hlo)}
    todo = re.findall(r"body=%?([\w.\-]+)", hlo)
    seen: set[str] = set()
    while todo:
        name = todo.pop().strip().lstrip("%")
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for loop, branches in CALLED.findall(comps[name]):
            todo += [loop] if loop else branches.split(",")
    text = "\n".join(comps[n] for n in seen)
    return {
        op: len(re.findall(rf" {op}\(", text))
        for op in ("conditional", "while", "copy", "fusion", "select")
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import optax

    if jax.default_backend() != args.platform:
        sys.exit(
            f"--platform {args.platform}, but JAX's default backend is "
            f"{jax.default_backend()}: install JAX for {args.platform}."
        )
    modes: list[tuple[str, int]] = [("jit(train)", 1)]
    modes += [(f"jit(vmap(train)) x{n}", n) for n in args.seeds]
    rows = []
    for mode, n in modes:
        programs: dict[str, Callable[[], None]] = {}
        structure: dict[str, dict[str, int]] = {}
        losses: dict[str, Any] = {}
        for name in args.optimizers:
            train = make_train(make_tx(name, args), args)
            keys = jax.random.split(jax.random.key(0), n)
            fn = jax.jit(jax.vmap(train)) if n > 1 else jax.jit(train)
            arg = keys if n > 1 else keys[0]
            compiled = fn.lower(arg).compile()
            structure[name] = loop_body_counts(compiled.as_text() or "")
            losses[name] = jax.device_get(compiled(arg))

            def run(compiled: Any = compiled, arg: Any = arg) -> None:
                jax.block_until_ready(compiled(arg))

            programs[name] = run
        times = timed_samples(programs, args.samples, args.sample_seconds)
        for name in args.optimizers:
            final = losses[name].reshape(n, -1)[:, -1]
            row = {
                "mode": mode,
                "seeds": n,
                "optimizer": name,
                **stats(times[name]),
                "samples_s": times[name],
                "loop_body": structure[name],
                "final_loss_mean": float(final.mean()),
                "final_loss_finite": bool((final == final).all()),
            }
            base = COUNTERPART.get(name)
            if base in times:
                row["counterpart"] = base
                row["ratio"] = row["median_s"] / stats(times[base])["median_s"]
                row["meets_target"] = row["ratio"] <= TARGET_RATIO
            rows.append(row)
            versus = f"  x{row['ratio']:.2f} {base}" if "ratio" in row else ""
            print(f"{mode:22s} {name:22s} {row['median_s'] * 1e3:9.2f} ms{versus}")
    record = {
        "benchmark": "whole_program",
        "date": datetime.date.today().isoformat(),
        "platform": args.platform,
        "device": str(jax.devices()[0]),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "python": sys.version.split()[0],
        "arguments": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "parameters": sum(a * b + b for a, b in itertools.pairwise(args.sizes)),
        "steps_per_seed": args.updates * args.epochs * args.minibatches,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".md").write_text(markdown(record))
    return record


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Whole training programs ({record['platform']})",
        "",
        f"{record['date']}, {record['device']}, {record['cores']} cores, "
        f"jax {record['jax']}, optax {record['optax']}. A {record['parameters']}-"
        f"parameter MLP, {record['steps_per_seed']} optimizer steps per seed "
        "(updates x epochs x minibatches, all scanned); medians of interleaved "
        f"samples. Target: δ-GClip <= {TARGET_RATIO:.2f}x its Optax counterpart.",
        "",
        "| program | optimizer | median | q25-q75 | vs counterpart | target "
        "| loop body: conditionals / copies / fusions / selects |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lb = r["loop_body"]
        ratio = f"{r['ratio']:.2f}x {r['counterpart']}" if "ratio" in r else "-"
        target = ("met" if r["meets_target"] else "**missed**") if "ratio" in r else "-"
        lines.append(
            f"| {r['mode']} | {r['optimizer']} | {r['median_s'] * 1e3:.1f} ms "
            f"| {r['q25_s'] * 1e3:.1f}-{r['q75_s'] * 1e3:.1f} | {ratio} | {target} "
            f"| {lb['conditional']} / {lb['copy']} / {lb['fusion']} / {lb['select']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
