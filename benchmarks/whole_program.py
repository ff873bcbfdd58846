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
medians to its counterpart. From the compiled program it also reads what the
training step's loop body holds (``step_loop_counts``): conditionals, copies
of loop-carried buffers and fusions, so a regression in structure shows next
to the time.

``--compile-for tpu`` or ``gpu`` compiles the same programs for a TPU v5e or
an H100 without the device (``jax[tpu]`` or ``jax[cuda12]`` installed, see
``compiled_programs.py``) and reports, instead of times, the step loop's
structure, XLA's bytes and temporaries, and on the GPU the thunks that sync
the host, each δ-GClip program against its counterpart.

Writes ``<out>.json`` and ``<out>.md``::

    python benchmarks/whole_program.py
    python benchmarks/whole_program.py --platform gpu --quick
    .venv-tpu/bin/python benchmarks/whole_program.py --compile-for tpu
    JAX_PLATFORMS=cpu .venv-gpu/bin/python benchmarks/whole_program.py --compile-for gpu
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
    p.add_argument(
        "--compile-for",
        choices=("tpu", "gpu"),
        default=None,
        help="compile the programs for a TPU v5e or an H100 without the device "
        "(jax[tpu] or jax[cuda12] installed) and report what their step loops "
        "hold and XLA's bytes; nothing is run or timed",
    )
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
        name = (
            f"whole_program_{args.compile_for}_compiled"
            if args.compile_for
            else f"whole_program_{args.platform}"
        )
        args.out = ROOT / "benchmarks" / "results" / name
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


def make_model(args: argparse.Namespace) -> tuple[Callable[..., Any], ...]:
    """``(init(key) -> params, loss(params, x, y))`` of the tanh MLP."""
    import jax
    import jax.numpy as jnp

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

    return init, loss_fn


def make_train(tx: Any, args: argparse.Namespace) -> Callable[[Any], Any]:
    """``train(key) -> losses``: the whole run, scans inside scans."""
    import jax
    import jax.numpy as jnp
    import optax

    sizes = args.sizes
    init, loss_fn = make_model(args)

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
# A while instruction: its body computation.
WHILE_BODY = re.compile(r" while\(.*?body=%?([\w.\-]+)")
# What control flow calls: loop bodies and conditions, conditional branches.
CALLED = re.compile(r"(?:body|condition)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
# "%name = type opcode(operands), attributes".
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\((.*?)\)(?:, |$)", re.M
)


def _called(comps: dict[str, str], name: str) -> list[str]:
    """``name`` and every computation its control flow calls, transitively."""
    todo, seen = [name], []
    while todo:
        n = todo.pop().strip().lstrip("%")
        if n in seen or n not in comps:
            continue
        seen.append(n)
        for loop, branches in CALLED.findall(comps[n]):
            todo += [loop] if loop else branches.split(",")
    return seen


def _multiplies(comps: dict[str, str], name: str) -> bool:
    """Whether computation ``name`` has a matrix product, itself or in the
    fusions it calls (XLA:TPU fuses dots into convolution fusions, XLA:GPU
    into gemm fusions or cuBLAS custom calls)."""
    text = comps[name]
    inner = [comps.get(c, "") for c in re.findall(r"calls=%?([\w.\-]+)", text)]
    return any(
        re.search(r" (dot|convolution)\(|gemm|matmul", t) for t in [text, *inner]
    )


def step_loop_counts(hlo: str) -> dict[str, int]:
    """What the training step's loop body holds in an optimized HLO module.

    The step loop is the innermost ``while`` body that multiplies matrices
    (the scan over minibatches, which holds the forward and backward pass and
    the optimizer; the random-number loops that XLA:CPU keeps multiply
    none), the one with the most fusions if several do. Counted
    there and in the control flow it calls, fusions' insides excluded (a
    fusion is one kernel): ``conditional``, ``while``, ``fusion``, ``copy``,
    and ``carried_copy``, the copies of a loop-carried buffer (a
    ``get-tuple-element`` of the body's parameter), which XLA inserts when a
    buffer is read after the step has overwritten it in place.
    """
    comps = {m.group(1): m.group(2) for m in COMPUTATION.finditer(hlo)}
    bodies = [b for b in WHILE_BODY.findall(hlo) if b in comps]
    # The step's loop multiplies matrices itself (the random-number and
    # shuffling loops do not) and holds no other loop.
    steps = [
        b
        for b in bodies
        if _multiplies(comps, b) and not re.search(r" while\(", comps[b])
    ]
    if not steps:
        return dict.fromkeys(STRUCTURE, 0)
    step = max(steps, key=lambda b: len(re.findall(r" fusion\(", comps[b])))
    counts = dict.fromkeys(STRUCTURE, 0)
    for name in _called(comps, step):
        text = comps[name]
        params = set(re.findall(r"%([\w.\-]+) = .*? parameter\(", text))
        carried = {
            m.group(1)
            for m in INSTRUCTION.finditer(text)
            if m.group(2) == "get-tuple-element" and m.group(3).lstrip("%") in params
        }
        for m in INSTRUCTION.finditer(text):
            op = m.group(2)
            if op in counts:
                counts[op] += 1
            if op == "copy" and name == step and m.group(3).lstrip("%") in carried:
                counts["carried_copy"] += 1
    return counts


STRUCTURE = ("conditional", "while", "fusion", "copy", "carried_copy")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.compile_for:
        return compile_only(args)
    if args.platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

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
            structure[name] = step_loop_counts(compiled.as_text() or "")
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
                "step_loop": structure[name],
                "final_loss_mean": float(final.mean()),
                "final_loss_finite": bool((final == final).all()),
            }
            rows.append(against_counterpart(row, times))
    rows += time_steps(args)
    machine = {
        "platform": args.platform,
        "device": str(jax.devices()[0]),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
    return write_record(args, machine, rows, markdown)


def write_record(
    args: argparse.Namespace,
    about: dict[str, Any],
    rows: list[dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Writes ``<out>.json`` (versions, arguments, rows) and ``<out>.md``."""
    import jax
    import optax

    record = {
        "benchmark": "whole_program",
        "date": datetime.date.today().isoformat(),
        **about,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "arguments": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "parameters": sum(a * b + b for a, b in itertools.pairwise(args.sizes)),
        "steps_per_seed": args.updates * args.epochs * args.minibatches,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".md").write_text(table(record))
    return record


def against_counterpart(
    row: dict[str, Any], times: dict[str, list[float]]
) -> dict[str, Any]:
    """``row`` with its ratio to its counterpart's median, if that was timed;
    printed as it comes."""
    base = COUNTERPART.get(row["optimizer"])
    if base in times:
        row["counterpart"] = base
        row["ratio"] = row["median_s"] / stats(times[base])["median_s"]
        row["meets_target"] = row["ratio"] <= TARGET_RATIO
    versus = f"  x{row['ratio']:.2f} {base}" if "ratio" in row else ""
    print(
        f"{row['mode']:28s} {row['optimizer']:22s} {_duration(row['median_s'])}{versus}"
    )
    return row


def make_step(tx: Any, args: argparse.Namespace, n: int) -> Callable[[], None]:
    """One optimizer step (``update`` + ``apply_updates``) of ``n`` seeds'
    MLPs, ``jit(vmap(...))``, on fixed gradients; a callable timing sample."""
    import jax
    import optax

    init, loss_fn = make_model(args)
    keys = jax.random.split(jax.random.key(1), n)
    params = jax.vmap(init)(keys)
    x = jax.random.normal(jax.random.key(2), (n, args.minibatch_size, args.sizes[0]))
    y = 10.0 * jax.numpy.sin(x[..., : args.sizes[-1]])
    grads = jax.vmap(jax.grad(loss_fn))(params, x, y)
    state = jax.vmap(tx.init)(params)

    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(jax.vmap(step)).lower(params, state, grads).compile()

    def run() -> None:
        jax.block_until_ready(compiled(params, state, grads))

    run()
    return run


def time_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The optimizer step alone, vmapped over each ``--seeds`` count."""
    rows = []
    for n in args.seeds:
        mode = f"step: jit(vmap(update)) x{n}"
        programs = {
            name: make_step(make_tx(name, args), args, n) for name in args.optimizers
        }
        times = timed_samples(programs, args.samples, args.sample_seconds)
        for name in args.optimizers:
            row = {"mode": mode, "seeds": n, "optimizer": name, **stats(times[name])}
            row["samples_s"] = times[name]
            rows.append(against_counterpart(row, times))
    return rows


BYTES_TARGET = 1.03


def compile_only(args: argparse.Namespace) -> dict[str, Any]:
    """The same programs compiled for a TPU v5e or an H100 without the device.

    Per program: the step loop's structure (``step_loop_counts``), XLA's
    ``bytes accessed`` for the whole program and its temporaries, and on the
    GPU the top-level thunks that sync the host (conditionals and loops
    outside CUDA graphs). Checks, for each δ-GClip program against its
    counterpart: no conditional or loop in the step loop, no more copies of a
    carried buffer, and bytes at most ``BYTES_TARGET`` times.
    """
    import tempfile

    dump_dir = None
    if args.compile_for == "gpu":
        dump_dir = Path(tempfile.mkdtemp(prefix="xla_dump_"))
        flags = f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    else:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    import compiled_programs as cp
    import jax
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if args.compile_for == "gpu":
        topo = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=cp.H100
        )
        mesh = topologies.make_mesh(topo, (1,), ("d",))
        device = "H100 (deviceless)"
    else:
        import numpy as np
        from jax.sharding import Mesh

        topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
        mesh = Mesh(np.array(topo.devices[:1]), ("d",))
        device = "TPU v5e (deviceless)"
    modes: list[tuple[str, int]] = [("jit(train)", 1)]
    modes += [(f"jit(vmap(train)) x{n}", n) for n in args.seeds]
    key_type = jax.random.key(0).dtype
    rows = []
    for mode, n in modes:
        found: dict[str, dict[str, Any]] = {}
        for name in args.optimizers:
            train = make_train(make_tx(name, args), args)
            # A unique name, no other's prefix, to find its XLA dump.
            train.__name__ = f"train_{n}_{name}_program"
            fn = jax.jit(jax.vmap(train)) if n > 1 else jax.jit(train)
            arg = jax.ShapeDtypeStruct(
                (n,) if n > 1 else (), key_type, sharding=NamedSharding(mesh, P())
            )
            with cp.built_for(mesh):
                compiled = fn.lower(arg).compile()
            row: dict[str, Any] = {"mode": mode, "seeds": n, "optimizer": name}
            row["step_loop"] = step_loop_counts(compiled.as_text() or "")
            mem = compiled.memory_analysis()
            row["temp_bytes"] = int(mem.temp_size_in_bytes) if mem else None
            if args.compile_for == "gpu":
                assert dump_dir is not None
                row["bytes_accessed"] = cp.gpu_bytes(compiled)
                thunks = cp.thunk_counts(dump_dir, train.__name__)
                row["host_syncing_control_flow"] = thunks["host_syncing_control_flow"]
                row["command_buffers"] = thunks["command_buffers"]
            else:
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                assert cost is not None, "XLA:TPU gave no cost analysis"
                row["bytes_accessed"] = float(cost["bytes accessed"])
            found[name] = row
            rows.append(row)
        for name, row in found.items():
            base = found.get(COUNTERPART.get(name, ""))
            if base is None:
                continue
            loop, peer = row["step_loop"], base["step_loop"]
            row["counterpart"] = COUNTERPART[name]
            row["bytes_ratio"] = row["bytes_accessed"] / base["bytes_accessed"]
            failed = []
            if loop["conditional"] or loop["while"]:
                failed.append("control flow")
            if loop["carried_copy"] > peer["carried_copy"]:
                failed.append("carried copies")
            if loop["copy"] > peer["copy"]:
                failed.append("copies")
            if row["bytes_ratio"] > BYTES_TARGET:
                failed.append("bytes")
            if row.get("host_syncing_control_flow", 0) > base.get(
                "host_syncing_control_flow", 0
            ):
                failed.append("host syncs")
            row["failed"] = failed
        for name, row in found.items():
            loop = row["step_loop"]
            ratio = f"  x{row['bytes_ratio']:.3f} bytes" if "bytes_ratio" in row else ""
            print(
                f"{mode:22s} {name:22s} cond {loop['conditional']} "
                f"copies {loop['carried_copy']}/{loop['copy']}{ratio} "
                f"{row.get('failed', '')}",
                flush=True,
            )
    about = {"compiled_for": args.compile_for, "device": device}
    return write_record(args, about, rows, compiled_markdown)


def compiled_markdown(record: dict[str, Any]) -> str:
    gpu = record["compiled_for"] == "gpu"
    lines = [
        f"# Whole training programs compiled for {record['device']}",
        "",
        f"{record['date']}, jax {record['jax']}, optax {record['optax']}. The "
        f"programs of `whole_program_cpu.md` ({record['parameters']} parameters, "
        f"{record['steps_per_seed']} steps per seed), compiled without the "
        "device; nothing was run. `step loop`: what the training step's loop "
        "body holds (conditionals / loops / copies of a carried buffer / all "
        "copies / fusions). `bytes`: XLA's cost model for the whole program, "
        "against the "
        f"counterpart. Targets: no control flow in the step loop, no more "
        f"copies, bytes <= {BYTES_TARGET}x"
        + (", no more host-syncing thunks." if gpu else "."),
        "",
        "| program | optimizer | step loop | bytes | vs counterpart | temp KB "
        + ("| host syncs / graphs " if gpu else "")
        + "| target |",
        "|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|",
    ]
    for r in record["rows"]:
        loop = r["step_loop"]
        shape = (
            f"{loop['conditional']} / {loop['while']} / {loop['carried_copy']} "
            f"/ {loop['copy']} / {loop['fusion']}"
        )
        ratio = (
            f"{r['bytes_ratio']:.3f}x {r['counterpart']}" if "bytes_ratio" in r else "-"
        )
        if "failed" in r:
            target = "met" if not r["failed"] else "**" + ", ".join(r["failed"]) + "**"
        else:
            target = "-"
        temp = f"{r['temp_bytes'] / 1024:.0f}" if r["temp_bytes"] is not None else "-"
        syncs = (
            f"| {r['host_syncing_control_flow']} / {r['command_buffers']} "
            if gpu
            else ""
        )
        lines.append(
            f"| {r['mode']} | {r['optimizer']} | {shape} | "
            f"{r['bytes_accessed'] / 1e6:.3f} MB | {ratio} | {temp} {syncs}| {target} |"
        )
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-2 else f"{seconds * 1e6:.0f} µs"


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Whole training programs ({record['platform']})",
        "",
        f"{record['date']}, {record['device']}, {record['cores']} cores, "
        f"jax {record['jax']}, optax {record['optax']}. A {record['parameters']}-"
        f"parameter MLP, {record['steps_per_seed']} optimizer steps per seed "
        "(updates x epochs x minibatches, all scanned); medians of interleaved "
        f"samples. Target: δ-GClip <= {TARGET_RATIO:.2f}x its Optax counterpart. "
        "`step:` rows time the optimizer step alone (`update` + `apply_updates` "
        "on fixed gradients), vmapped over the seeds.",
        "",
        "| program | optimizer | median | q25-q75 | vs counterpart | target "
        "| step loop: conditionals / carried copies / copies / fusions |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lb = r.get("step_loop")
        ratio = f"{r['ratio']:.2f}x {r['counterpart']}" if "ratio" in r else "-"
        target = ("met" if r["meets_target"] else "**missed**") if "ratio" in r else "-"
        lines.append(
            f"| {r['mode']} | {r['optimizer']} | {_duration(r['median_s'])} "
            f"| {_duration(r['q25_s'])}-{_duration(r['q75_s'])} | {ratio} | {target} "
            + (
                f"| {lb['conditional']} / {lb['carried_copy']} / {lb['copy']} "
                f"/ {lb['fusion']} |"
                if lb
                else "| - |"
            )
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
