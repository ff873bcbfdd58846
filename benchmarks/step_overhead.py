"""Cost of one optimizer step (update + apply_updates) on realistic parameter trees.

Times the jitted ``tx.update`` plus ``optax.apply_updates``, with the
parameters and the optimizer state donated, for

* ``delta_gclip``: ``rgc.delta_gclip(eta, gamma, delta)``;
* ``clip_sgd``: ``optax.chain(optax.clip_by_global_norm(gamma), optax.sgd(eta))``;
* ``sgd``: ``optax.sgd(eta)``;
* ``adam``: ``optax.adam(eta)``;
* ``torch``: when PyTorch is installed, the authors' algorithm in PyTorch
  (norm of the concatenated gradient, then an in-place SGD step);

on the trees ``resnet18`` (11.2M parameters, 62 leaves), ``transformer``
(124M, 148 leaves, GPT-2-small shapes), ``flat50m`` (one leaf of 50M) and
``small_leaves`` (``--small-leaves``, default 10,000, leaves of 100), in float32
and bfloat16.

The optimizers of a case are timed in turn, sample after sample, so that they
share the machine's noise; each reports the median and the interquartile range
of its samples, the ratios to ``sgd`` and ``clip_sgd``, the achieved memory
traffic in GB/s (words moved per parameter: 4 for the clipping methods, 3 for
SGD, 7 for Adam) against the copy bandwidth measured in the same run, the
compile time and the compiled program's peak memory. It also times the
training step of the VAE and ResNet-18 examples with δ-GClip against SGD
(``--e2e``). ``--quick`` is a short run for a borrowed accelerator: ResNet-18
and GPT-2 small, δ-GClip against clip+sgd and sgd, 7 samples, and the
end-to-end steps; a few minutes on one GPU.

Writes ``<out>.json`` and ``<out>.md``. The targets of the library (δ-GClip
within 1.05x of clip+sgd and 1.4x of sgd, the same peak memory as clip+sgd
within 1%, >= 70% of copy bandwidth on GPU for trees of >= 10M parameters,
end-to-end within 2% of SGD) are marked in the table. That hyperparameter
changes do not recompile is a test (tests/test_alias.py), not timed here.

    python benchmarks/step_overhead.py --platform cpu
    python benchmarks/step_overhead.py --platform gpu --quick
    python benchmarks/step_overhead.py --platform tpu
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from step_report import OPTIMIZERS, check_targets, markdown
from timing import copy_bandwidth, stats, timed_samples
from trees import TREES, tree_shapes

ROOT = Path(__file__).resolve().parents[1]

DTYPES = ("float32", "bfloat16")
# The Optax peers that --peers-max-leaves can leave out (never sgd: the ratios
# need it).
SKIPPABLE = ("clip_sgd", "adam")
# The VAE example trains in lax.scan chunks; the end-to-end timing does the same.
VAE_CHUNK = 50
WORDS_PER_PARAM = {"delta_gclip": 4, "clip_sgd": 4, "sgd": 3, "adam": 7, "torch": 4}
ETA, GAMMA, DELTA = 0.1, 1.0, 1e-3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default="cpu")
    p.add_argument("--trees", nargs="+", choices=TREES, default=TREES)
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=DTYPES)
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS)
    p.add_argument("--samples", type=int, default=15, help="timing samples per case")
    p.add_argument(
        "--sample-seconds",
        type=float,
        default=0.05,
        help="each sample repeats the step for at least this long",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every tree's size by this (e.g. 0.01 for a smoke run)",
    )
    p.add_argument(
        "--small-leaves",
        type=int,
        default=10_000,
        help="leaves of 100 in the small_leaves tree (XLA:CPU compiles Optax's "
        "clip_by_global_norm of 10,000 leaves for over 20 minutes)",
    )
    p.add_argument(
        "--peers-max-leaves",
        type=int,
        help="skip clip_sgd and adam on trees with more leaves than this "
        "(default: 2,000 on CPU, where XLA:CPU compiled Optax's "
        "clip_by_global_norm of 10,000 leaves for over 20 minutes and ran out "
        "of 24 GB compiling adam's bfloat16 step of 10,000 leaves; no limit "
        "elsewhere)",
    )
    p.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the examples' training steps, δ-GClip vs SGD",
    )
    p.add_argument(
        "--e2e-resnet-batch", type=int, help="default: 512 on GPU/TPU, 32 on CPU"
    )
    p.add_argument(
        "--out", type=Path, help="default benchmarks/results/step_overhead_<device>"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="ResNet-18 and GPT-2 small, δ-GClip vs clip+sgd and sgd, 7 samples "
        "(overrides --trees, --optimizers and --samples)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.trees = ["resnet18", "transformer"]
        args.optimizers = ["delta_gclip", "clip_sgd", "sgd"]
        args.samples = 7
    if args.peers_max_leaves is None and args.platform == "cpu":
        args.peers_max_leaves = 2_000
    for name in ("samples", "small_leaves", "peers_max_leaves"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = name.replace("_", "-")
            p.error(f"--{flag} must be a positive integer, got {value}")
    if not 0 < args.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault(
        "JAX_PLATFORMS", args.platform if args.platform != "gpu" else "cuda"
    )
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm import tqdm

    import rgclip_optax as rgc

    device = jax.devices()[0]
    if device.platform != {"gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}[args.platform]:
        raise SystemExit(
            f"error: --platform={args.platform} but JAX runs on {device.platform}"
        )
    torch: Any
    try:  # optional: the PyTorch reference of the authors' step
        torch = importlib.import_module("torch")
    except ImportError:
        torch = None
    optimizers = [o for o in args.optimizers if o != "torch" or torch is not None]

    def make_tx(name: str) -> optax.GradientTransformation:
        if name == "delta_gclip":
            return rgc.delta_gclip(ETA, GAMMA, DELTA)
        if name == "clip_sgd":
            return optax.chain(optax.clip_by_global_norm(GAMMA), optax.sgd(ETA))
        if name == "sgd":
            return optax.sgd(ETA)
        return optax.adam(ETA)

    def block(x: Any) -> None:
        jax.block_until_ready(x)

    copy_gbps = copy_bandwidth(jax, jnp, args)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s ({device.device_kind})")

    cases = []
    combos = [(t, d) for t in args.trees for d in args.dtypes]
    for tree_name, dtype_name in tqdm(combos, desc="cases", unit="case"):
        dtype = jnp.dtype(dtype_name)
        shapes = tree_shapes(tree_name, args.scale, args.small_leaves)
        n_params = sum(int(np.prod(s)) for s in shapes.values())
        rng = np.random.default_rng(0)
        grads = {
            k: jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
            for k, s in shapes.items()
        }
        base_params = {k: jnp.full(s, 0.01, dtype) for k, s in shapes.items()}
        results: dict[str, dict[str, Any]] = {}
        runners: dict[str, Callable[[], None]] = {}
        carries: dict[str, list[Any]] = {}
        for name in optimizers:
            if name == "torch":
                runners[name], info = torch_runner(
                    torch, shapes, dtype_name, args.platform
                )
                results[name] = info
                continue
            limit = args.peers_max_leaves
            if name in SKIPPABLE and limit is not None and len(shapes) > limit:
                results[name] = {
                    "skipped": f"{len(shapes)} leaves > --peers-max-leaves={limit}"
                }
                continue
            tx = make_tx(name)

            def step(params: Any, state: Any, g: Any, tx: Any = tx) -> tuple[Any, Any]:
                updates, state = tx.update(g, state, params)
                return optax.apply_updates(params, updates), state

            params = jax.tree.map(jnp.copy, base_params)
            state = tx.init(params)
            jitted = jax.jit(step, donate_argnums=(0, 1))
            t0 = time.perf_counter()
            compiled = jitted.lower(params, state, grads).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            memory = (
                {
                    "argument_bytes": mem.argument_size_in_bytes,
                    "output_bytes": mem.output_size_in_bytes,
                    "alias_bytes": mem.alias_size_in_bytes,
                    "temp_bytes": mem.temp_size_in_bytes,
                    "peak_bytes": mem.argument_size_in_bytes
                    + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes
                    + mem.temp_size_in_bytes,
                }
                if mem is not None
                else {}
            )
            carries[name] = [params, state]

            def run(
                c: list[Any] = carries[name], f: Any = compiled, g: Any = grads
            ) -> None:
                c[0], c[1] = f(c[0], c[1], g)
                block(c[0])

            runners[name] = run
            results[name] = {"compile_s": compile_s, "memory": memory}
        times = timed_samples(runners, args.samples, args.sample_seconds)
        itemsize = dtype.itemsize
        for name, samples in times.items():
            s = stats(samples)
            gbps = WORDS_PER_PARAM[name] * itemsize * n_params / s["median_s"] / 1e9
            results[name] |= s | {
                "samples_s": samples,
                "gb_per_s": gbps,
                "fraction_of_copy_bandwidth": gbps / copy_gbps,
            }
        for name in results:  # ratios of medians, measured side by side
            for ref in ("sgd", "clip_sgd"):
                if "median_s" in results.get(ref, {}) and "median_s" in results[name]:
                    results[name][f"ratio_to_{ref}"] = (
                        results[name]["median_s"] / results[ref]["median_s"]
                    )
        cases.append(
            {
                "tree": tree_name,
                "dtype": dtype_name,
                "params": n_params,
                "leaves": len(shapes),
                "results": results,
            }
        )

    e2e = end_to_end(args, jax, jnp, optax) if args.e2e else None
    record = {
        "date": datetime.date.today().isoformat(),
        "device": {
            "platform": device.platform,
            "device_kind": device.device_kind,
            "device_count": jax.device_count(),
            "host": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "torch": None if torch is None else torch.__version__,
        },
        "settings": {
            "samples": args.samples,
            "sample_seconds": args.sample_seconds,
            "scale": args.scale,
            "eta": ETA,
            "gamma": GAMMA,
            "delta": DELTA,
        },
        "copy_bandwidth_gb_per_s": copy_gbps,
        "cases": cases,
        "end_to_end": e2e,
    }
    record["targets"] = check_targets(record)
    kind = device.device_kind.lower().replace(" ", "_").replace("/", "_")
    out = (
        args.out
        or ROOT / "benchmarks/results" / f"step_overhead_{device.platform}_{kind}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    table = markdown(record)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return record


def torch_runner(
    torch: Any, shapes: dict[str, tuple[int, ...]], dtype_name: str, platform_name: str
) -> tuple[Callable[[], None], dict[str, Any]]:
    """The authors' δ-GClip step in PyTorch, in place, on the same shapes."""
    dev = "cuda" if platform_name == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.full(s, 0.01, dtype=dtype, device=dev) for s in shapes.values()]
    grads = [
        torch.randn(s, generator=gen).to(dtype=dtype, device=dev)
        for s in shapes.values()
    ]

    def run() -> None:
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
            h = ETA * torch.clamp(GAMMA / norm, min=DELTA, max=1.0)
            torch._foreach_add_(params, torch._foreach_mul(grads, -h))
        if dev == "cuda":
            torch.cuda.synchronize()

    return run, {"device": dev, "threads": torch.get_num_threads()}


def end_to_end(
    args: argparse.Namespace, jax: Any, jnp: Any, optax: Any
) -> dict[str, Any]:
    """The examples' training steps (synthetic inputs): δ-GClip vs SGD, interleaved."""
    sys.path.insert(0, str(ROOT / "examples"))
    import resnet18_cifar10
    from flax import nnx
    from resnet18_cifar10 import ResNet18
    from training_common import make_optimizer
    from vae_fashion_mnist import DEFAULTS as VAE_DEFAULTS
    from vae_fashion_mnist import VAE, summed_loss

    out = {}
    on_cpu = args.platform == "cpu"
    # VAE, batch 100.
    graphdef, vae_params = nnx.split(VAE(nnx.Rngs(0)))
    x = jax.random.uniform(jax.random.key(0), (100, 784))

    def vae_loss(p: Any, key: Any) -> Any:
        return summed_loss(nnx.merge(graphdef, p), x, key)

    # ResNet-18, the paper's batch of 512 (smaller on a CPU).
    batch = args.e2e_resnet_batch or (32 if on_cpu else 512)
    model = ResNet18(dtype=jnp.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    images = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    labels = jnp.arange(batch) % 10

    def resnet_loss(p: Any, stats: Any) -> Any:
        logits, new = model.apply(
            {"params": p, "batch_stats": stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new["batch_stats"]

    for workload in ("vae", "resnet18"):
        runners: dict[str, Callable[[], None]] = {}
        for opt in ("sgd", "delta_gclip"):
            if workload == "vae":
                tx = make_optimizer(opt, VAE_DEFAULTS[opt])

                def body(c: Any, _: Any, tx: Any = tx) -> Any:
                    p, s, k = c
                    g = jax.grad(vae_loss)(p, k)
                    u, s = tx.update(g, s, p)
                    return (
                        optax.apply_updates(p, u),
                        s,
                        jax.random.fold_in(k, 1),
                    ), None

                # As the example trains: VAE_CHUNK steps per call in a lax.scan.
                def chunk(c: Any, body: Any = body) -> Any:
                    return jax.lax.scan(body, c, None, length=VAE_CHUNK)[0]

                jitted = jax.jit(chunk, donate_argnums=0)
                start = (vae_params, tx.init(vae_params), jax.random.key(2))
                steps_per_call = VAE_CHUNK
            else:
                tx = make_optimizer(opt, resnet18_cifar10.DEFAULTS[opt])

                def step(c: Any, tx: Any = tx) -> Any:
                    p, stats, s = c
                    g, stats = jax.grad(resnet_loss, has_aux=True)(p, stats)
                    u, s = tx.update(g, s, p)
                    return optax.apply_updates(p, u), stats, s

                # As the example trains: one donated jitted step per call.
                jitted = jax.jit(step, donate_argnums=0)
                p0 = variables["params"]
                start = (p0, variables["batch_stats"], tx.init(p0))
                steps_per_call = 1
            # A private copy per runner, since the calls donate their input.
            carry = [jax.tree.map(jnp.copy, start)]

            def run(carry: list = carry, jitted: Any = jitted) -> None:
                carry[0] = jitted(carry[0])
                jax.block_until_ready(carry[0])

            runners[opt] = run
        samples = max(
            5, args.samples // (3 if workload == "resnet18" and on_cpu else 1)
        )
        times = timed_samples(runners, samples, args.sample_seconds)
        times = {o: [x / steps_per_call for x in t] for o, t in times.items()}
        res: dict[str, dict[str, Any]] = {
            o: stats(t) | {"samples_s": t} for o, t in times.items()
        }
        out[workload] = {
            "batch": 100 if workload == "vae" else batch,
            "results": res,
            "ratio_delta_gclip_to_sgd": res["delta_gclip"]["median_s"]
            / res["sgd"]["median_s"],
        }
    return out


if __name__ == "__main__":
    main()
